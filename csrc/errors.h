// Error handling for the VMM mechanism: one check macro, one exception type.
//
// Every driver or OS call goes through VATTN_CHECK. A failure throws vattn::VmmError carrying the
// call's text, the numeric code and the system's message; the bindings turn it into the Python
// exception replica._vmm.VmmError. Nothing here exits or aborts the process.
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef VATTN_WITH_CUDA
#include <cuda.h>
#endif

namespace vattn {

class VmmError : public std::runtime_error {
 public:
  VmmError(std::string call, long code, const std::string& message)
      : std::runtime_error(message), call_(std::move(call)), code_(code) {}
  const std::string& call() const { return call_; }
  long code() const { return code_; }

 private:
  std::string call_;
  long code_;
};

namespace detail {

[[noreturn]] inline void fail(const char* expr, long code, const std::string& why, const char* file,
                              int line) {
  throw VmmError(expr, code,
                 std::string(expr) + " failed: " + why + " (code " + std::to_string(code) +
                     ") at " + file + ":" + std::to_string(line));
}

// POSIX calls that return -1 and set errno (ftruncate, fallocate, munmap, memfd_create, ...).
inline int check(int result, const char* expr, const char* file, int line) {
  if (result == -1) {
    const int err = errno;
    fail(expr, err, std::strerror(err), file, line);
  }
  return result;
}

// mmap returns MAP_FAILED and sets errno.
inline void* check(void* result, const char* expr, const char* file, int line) {
  if (result == MAP_FAILED) {
    const int err = errno;
    fail(expr, err, std::strerror(err), file, line);
  }
  return result;
}

#ifdef VATTN_WITH_CUDA
// Resolves the driver's own name and message for a CUresult (defined in cuda_backend.cpp, which
// owns the dynamically loaded driver).
std::string cuda_error_text(CUresult result);

inline CUresult check(CUresult result, const char* expr, const char* file, int line) {
  if (result != CUDA_SUCCESS) fail(expr, static_cast<long>(result), cuda_error_text(result), file, line);
  return result;
}
#endif

}  // namespace detail
}  // namespace vattn

#define VATTN_CHECK(expr) ::vattn::detail::check((expr), #expr, __FILE__, __LINE__)
