// HostBackend: the VMM semantics on CPU memory.
//
//   reserve  -> mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE), aligned to page_size
//   page     -> a page_size slice of one memfd file (its offset is the handle)
//   map      -> mmap(MAP_SHARED | MAP_FIXED) of that slice at the address
//   unmap    -> mmap(PROT_NONE anonymous, MAP_FIXED) back over the range: reserved, not backed
//   release  -> fallocate(PUNCH_HOLE) returns the slice's memory to the OS; the offset is reused
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <vector>

#include "backend.h"
#include "errors.h"

namespace vattn {
namespace {

// Owns the memfd that holds every physical page of one backend.
class MemFd {
 public:
  MemFd() : fd_(VATTN_CHECK(memfd_create("vattn-kv", MFD_CLOEXEC))) {}
  MemFd(const MemFd&) = delete;
  MemFd& operator=(const MemFd&) = delete;
  ~MemFd() { ::close(fd_); }
  int get() const { return fd_; }

 private:
  int fd_;
};

class HostBackend final : public Backend {
 public:
  explicit HostBackend(std::size_t page_size) : page_size_(page_size) {
    const auto os_page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    if (page_size == 0 || page_size % os_page != 0) {
      throw std::invalid_argument("host page size " + std::to_string(page_size) +
                                  " must be a positive multiple of the OS page size " +
                                  std::to_string(os_page));
    }
  }

  std::string name() const override { return "host"; }
  std::size_t page_size() const override { return page_size_; }

  std::uintptr_t reserve(std::size_t bytes) override {
    // Over-reserve by one page, then trim both ends so the base is page_size aligned like the
    // CUDA backend's reservations.
    const std::size_t padded = bytes + page_size_;
    auto* raw = static_cast<char*>(VATTN_CHECK(
        ::mmap(nullptr, padded, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)));
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t base = (start + page_size_ - 1) / page_size_ * page_size_;
    const std::size_t head = base - start;
    const std::size_t tail = padded - head - bytes;
    if (head) VATTN_CHECK(::munmap(raw, head));
    if (tail) VATTN_CHECK(::munmap(reinterpret_cast<void*>(base + bytes), tail));
    return base;
  }

  void free_reservation(std::uintptr_t base, std::size_t bytes) override {
    VATTN_CHECK(::munmap(reinterpret_cast<void*>(base), bytes));
  }

  PageHandle create_page() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_slices_.empty()) {
      const PageHandle slice = free_slices_.back();
      free_slices_.pop_back();
      return slice;
    }
    const PageHandle slice = file_slices_;
    VATTN_CHECK(::ftruncate(fd_.get(), static_cast<off_t>((file_slices_ + 1) * page_size_)));
    ++file_slices_;
    return slice;
  }

  void release_page(PageHandle slice) override {
    std::lock_guard<std::mutex> lock(mutex_);
    VATTN_CHECK(::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                            static_cast<off_t>(slice * page_size_),
                            static_cast<off_t>(page_size_)));
    free_slices_.push_back(slice);
  }

  void map(std::uintptr_t addr, PageHandle slice) override {
    void* got = VATTN_CHECK(::mmap(reinterpret_cast<void*>(addr), page_size_,
                                   PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_.get(),
                                   static_cast<off_t>(slice * page_size_)));
    if (reinterpret_cast<std::uintptr_t>(got) != addr) {
      throw VmmError("mmap(MAP_FIXED)", 0, "mmap placed the page away from the asked address");
    }
  }

  // mmap already applied PROT_READ | PROT_WRITE.
  void set_access(std::uintptr_t, std::size_t) override {}

  void unmap(std::uintptr_t addr, std::size_t bytes) override {
    VATTN_CHECK(::mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0));
  }

 private:
  const std::size_t page_size_;
  MemFd fd_;
  std::mutex mutex_;  // guards the slice bookkeeping below
  PageHandle file_slices_ = 0;
  std::vector<PageHandle> free_slices_;
};

}  // namespace

std::shared_ptr<Backend> make_host_backend(std::size_t page_size) {
  return std::make_shared<HostBackend>(page_size);
}

}  // namespace vattn
