// The interface every VMM backend implements, and the RAII owners built on it.
//
// A backend reserves virtual address ranges, creates physical pages of one fixed size, and maps
// pages into reserved ranges. Two backends implement it with the same semantics:
//   * CudaBackend: the CUDA virtual memory driver API (GPU memory);
//   * HostBackend: Linux memfd + mmap(MAP_FIXED) (CPU memory), so every layer above the driver is
//     testable on a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace vattn {

using PageHandle = std::uint64_t;

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  // Bytes per physical page; reservations and mappings are multiples of it.
  virtual std::size_t page_size() const = 0;
  // Reserves `bytes` (a multiple of page_size) of virtual addresses, aligned to page_size.
  virtual std::uintptr_t reserve(std::size_t bytes) = 0;
  virtual void free_reservation(std::uintptr_t base, std::size_t bytes) = 0;
  virtual PageHandle create_page() = 0;
  virtual void release_page(PageHandle page) = 0;
  // Maps one page at `addr` (page aligned, inside a reservation, currently unmapped).
  virtual void map(std::uintptr_t addr, PageHandle page) = 0;
  // Grants read/write access to a mapped run; called once per run because it is the costly call.
  virtual void set_access(std::uintptr_t addr, std::size_t bytes) = 0;
  // Unmaps a run of mapped pages; the range stays reserved.
  virtual void unmap(std::uintptr_t addr, std::size_t bytes) = 0;
};

std::shared_ptr<Backend> make_host_backend(std::size_t page_size);
// Throws VmmError when the driver cannot be loaded or the device does not exist.
std::shared_ptr<Backend> make_cuda_backend(int device, std::size_t page_size);
// The allocation granularity of `device`, loading the driver if needed (throws like above).
std::size_t cuda_granularity(int device);
// Whether the CUDA driver can be loaded and sees at least one device; `why` says why not.
bool cuda_available(std::string* why);

// Owns one physical page. Move-only; the destructor releases the page and never throws.
class PhysicalPage {
 public:
  explicit PhysicalPage(std::shared_ptr<Backend> backend)
      : backend_(std::move(backend)), handle_(backend_->create_page()) {}
  PhysicalPage(PhysicalPage&& other) noexcept
      : backend_(std::move(other.backend_)), handle_(other.handle_) {}
  PhysicalPage& operator=(PhysicalPage&&) = delete;
  PhysicalPage(const PhysicalPage&) = delete;
  PhysicalPage& operator=(const PhysicalPage&) = delete;
  ~PhysicalPage() {
    if (!backend_) return;
    try {
      backend_->release_page(handle_);
    } catch (...) {
      // NOTE: a destructor must not throw; the driver keeps no reference we could leak here.
    }
  }
  PageHandle handle() const { return handle_; }

 private:
  std::shared_ptr<Backend> backend_;
  PageHandle handle_;
};

}  // namespace vattn
