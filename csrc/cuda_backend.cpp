// CudaBackend: the VMM semantics on GPU memory through the CUDA driver's virtual memory API.
//
// The driver is loaded at run time (dlopen "libcuda.so.1", then cuGetProcAddress), so this
// extension imports on machines without a GPU or a driver; only asking for this backend fails.
// Measured on the H100 (shared/notes/h100-probe.md): cuMemSetAccess is the costly call (~50 us a
// page), so callers map a run of pages and grant access once for the whole run.
#include "backend.h"
#include "errors.h"

#ifdef VATTN_WITH_CUDA

#include <dlfcn.h>

namespace vattn {

namespace detail {
std::string cuda_error_text(CUresult result) {
  // NOTE: the library is already loaded when a CUresult exists; RTLD_NOLOAD just finds it again,
  // so error formatting needs no global driver table.
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  std::string text = "CUresult " + std::to_string(static_cast<int>(result));
  if (lib == nullptr) return text;
  auto get_name = reinterpret_cast<decltype(&::cuGetErrorName)>(::dlsym(lib, "cuGetErrorName"));
  auto get_string =
      reinterpret_cast<decltype(&::cuGetErrorString)>(::dlsym(lib, "cuGetErrorString"));
  const char* name = nullptr;
  const char* message = nullptr;
  if (get_name && get_name(result, &name) == CUDA_SUCCESS && name) text = name;
  if (get_string && get_string(result, &message) == CUDA_SUCCESS && message) {
    text += std::string(": ") + message;
  }
  ::dlclose(lib);
  return text;
}
}  // namespace detail

namespace {

// Owns the dlopen handle of the driver and the entry points this backend calls.
class Driver {
 public:
  Driver() : lib_(::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL)) {
    if (lib_ == nullptr) {
      const char* why = ::dlerror();
      throw VmmError("dlopen(libcuda.so.1)", 0,
                     std::string("the CUDA driver cannot be loaded: ") + (why ? why : "unknown") +
                         " (no NVIDIA driver on this machine? use the host backend)");
    }
    get_proc_ = reinterpret_cast<decltype(&::cuGetProcAddress)>(
        ::dlsym(lib_, "cuGetProcAddress_v2"));
    resolve(init, "cuInit");
    resolve(device_get, "cuDeviceGet");
    resolve(device_get_count, "cuDeviceGetCount");
    resolve(primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    resolve(primary_ctx_release, "cuDevicePrimaryCtxRelease");
    resolve(ctx_set_current, "cuCtxSetCurrent");
    resolve(granularity, "cuMemGetAllocationGranularity");
    resolve(address_reserve, "cuMemAddressReserve");
    resolve(address_free, "cuMemAddressFree");
    resolve(create, "cuMemCreate");
    resolve(release, "cuMemRelease");
    resolve(map, "cuMemMap");
    resolve(unmap, "cuMemUnmap");
    resolve(set_access, "cuMemSetAccess");
    VATTN_CHECK(init(0));
  }
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;
  ~Driver() { ::dlclose(lib_); }

  decltype(&::cuInit) init = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetCount) device_get_count = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) primary_ctx_release = nullptr;
  decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&::cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&::cuMemAddressReserve) address_reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;

 private:
  template <typename Fn>
  void resolve(Fn& fn, const char* symbol) {
    void* address = nullptr;
    if (get_proc_ != nullptr) {
      CUdriverProcAddressQueryResult status{};
      if (get_proc_(symbol, &address, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, &status) !=
          CUDA_SUCCESS) {
        address = nullptr;
      }
    }
    if (address == nullptr) address = ::dlsym(lib_, symbol);
    if (address == nullptr) {
      throw VmmError(symbol, 0, std::string("the CUDA driver lacks ") + symbol +
                                    " (driver too old for the virtual memory API?)");
    }
    fn = reinterpret_cast<Fn>(address);
  }

  void* lib_;
  decltype(&::cuGetProcAddress) get_proc_ = nullptr;
};

// Owns a retained primary context of one device (the context PyTorch's runtime uses too).
class PrimaryContext {
 public:
  PrimaryContext(std::shared_ptr<Driver> driver, int ordinal) : driver_(std::move(driver)) {
    int count = 0;
    VATTN_CHECK(driver_->device_get_count(&count));
    if (ordinal < 0 || ordinal >= count) {
      throw std::invalid_argument("CUDA device " + std::to_string(ordinal) + " asked, " +
                                  std::to_string(count) + " visible");
    }
    VATTN_CHECK(driver_->device_get(&device_, ordinal));
    VATTN_CHECK(driver_->primary_ctx_retain(&context_, device_));
  }
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;
  ~PrimaryContext() { driver_->primary_ctx_release(device_); }

  // Driver calls act on the calling thread's current context; the mapping worker thread and the
  // Python thread both come through here, so every entry point binds first (a thread-local store).
  void bind() const { VATTN_CHECK(driver_->ctx_set_current(context_)); }
  CUdevice device() const { return device_; }

 private:
  std::shared_ptr<Driver> driver_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
};

CUmemAllocationProp device_allocation(CUdevice device) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(device);
  return prop;
}

std::size_t granularity_of(Driver& driver, CUdevice device) {
  CUmemAllocationProp prop = device_allocation(device);
  std::size_t granularity = 0;
  VATTN_CHECK(driver.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  return granularity;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int ordinal, std::size_t page_size)
      : driver_(std::make_shared<Driver>()), context_(driver_, ordinal) {
    context_.bind();
    prop_ = device_allocation(context_.device());
    const std::size_t granularity = granularity_of(*driver_, context_.device());
    page_size_ = page_size == 0 ? granularity : page_size;
    if (page_size_ % granularity != 0) {
      throw std::invalid_argument("CUDA page size " + std::to_string(page_size) +
                                  " must be a multiple of the device granularity " +
                                  std::to_string(granularity));
    }
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  }

  std::string name() const override { return "cuda"; }
  std::size_t page_size() const override { return page_size_; }

  std::uintptr_t reserve(std::size_t bytes) override {
    context_.bind();
    CUdeviceptr base = 0;
    VATTN_CHECK(driver_->address_reserve(&base, bytes, page_size_, 0, 0));
    return static_cast<std::uintptr_t>(base);
  }

  void free_reservation(std::uintptr_t base, std::size_t bytes) override {
    context_.bind();
    VATTN_CHECK(driver_->address_free(static_cast<CUdeviceptr>(base), bytes));
  }

  PageHandle create_page() override {
    context_.bind();
    CUmemGenericAllocationHandle handle = 0;
    VATTN_CHECK(driver_->create(&handle, page_size_, &prop_, 0));
    return static_cast<PageHandle>(handle);
  }

  void release_page(PageHandle page) override {
    context_.bind();
    VATTN_CHECK(driver_->release(static_cast<CUmemGenericAllocationHandle>(page)));
  }

  void map(std::uintptr_t addr, PageHandle page) override {
    context_.bind();
    VATTN_CHECK(driver_->map(static_cast<CUdeviceptr>(addr), page_size_, 0,
                             static_cast<CUmemGenericAllocationHandle>(page), 0));
  }

  void set_access(std::uintptr_t addr, std::size_t bytes) override {
    context_.bind();
    VATTN_CHECK(driver_->set_access(static_cast<CUdeviceptr>(addr), bytes, &access_, 1));
  }

  void unmap(std::uintptr_t addr, std::size_t bytes) override {
    context_.bind();
    VATTN_CHECK(driver_->unmap(static_cast<CUdeviceptr>(addr), bytes));
  }

 private:
  std::shared_ptr<Driver> driver_;
  PrimaryContext context_;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc access_{};
  std::size_t page_size_ = 0;
};

}  // namespace

std::shared_ptr<Backend> make_cuda_backend(int device, std::size_t page_size) {
  return std::make_shared<CudaBackend>(device, page_size);
}

std::size_t cuda_granularity(int device) {
  auto driver = std::make_shared<Driver>();
  PrimaryContext context(driver, device);
  return granularity_of(*driver, context.device());
}

bool cuda_available(std::string* why) {
  try {
    Driver driver;
    int count = 0;
    VATTN_CHECK(driver.device_get_count(&count));
    if (count == 0) {
      if (why) *why = "the CUDA driver sees no device";
      return false;
    }
    return true;
  } catch (const std::exception& error) {
    if (why) *why = error.what();
    return false;
  }
}

}  // namespace vattn

#else  // built without cuda.h

namespace vattn {

namespace {
[[noreturn]] void no_cuda() {
  throw VmmError("make_cuda_backend", 0, "vattn was built without the CUDA headers (cuda.h)");
}
}  // namespace

std::shared_ptr<Backend> make_cuda_backend(int, std::size_t) { no_cuda(); }
std::size_t cuda_granularity(int) { no_cuda(); }
bool cuda_available(std::string* why) {
  if (why) *why = "vattn was built without the CUDA headers (cuda.h)";
  return false;
}

}  // namespace vattn

#endif
