// The argument errors of the native ops (docs/design.md §8), on the stable
// ABI: no c10 exception type crosses it, so the Python exception type rides
// on a standard one that torch's operator binding (pybind11) translates:
//
//   FK_CHECK_VALUE  std::invalid_argument                  -> ValueError
//   FK_CHECK_TYPE   std::invalid_argument, "TypeError: ..." -> ValueError, which
//                   the public functions re-raise as TypeError without the
//                   prefix (flowkern/ops/_registry.py native_errors)
//   FK_CHECK        std::runtime_error                     -> RuntimeError
//
// The message is built only when the check fails, as with TORCH_CHECK.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace flowkern_cpu {

// The prefix a type error's message carries through the op boundary; the
// Python side reads the same string (_registry.TYPE_ERROR_PREFIX).
inline constexpr const char* kTypeErrorPrefix = "TypeError: ";

template <class... Parts> std::string cat(const Parts&... parts) {
  std::ostringstream o;
  if constexpr (sizeof...(Parts) > 0) (o << ... << parts);
  return o.str();
}

[[noreturn]] inline void throw_value_error(const std::string& m) { throw std::invalid_argument(m); }
[[noreturn]] inline void throw_type_error(const std::string& m) {
  throw std::invalid_argument(kTypeErrorPrefix + m);
}
[[noreturn]] inline void throw_runtime_error(const std::string& m) { throw std::runtime_error(m); }

}  // namespace flowkern_cpu

#define FK_CHECK_VALUE(cond, ...) \
  do {                            \
    if (!(cond)) ::flowkern_cpu::throw_value_error(::flowkern_cpu::cat(__VA_ARGS__)); \
  } while (0)
#define FK_CHECK_TYPE(cond, ...) \
  do {                           \
    if (!(cond)) ::flowkern_cpu::throw_type_error(::flowkern_cpu::cat(__VA_ARGS__)); \
  } while (0)
#define FK_CHECK(cond, ...) \
  do {                      \
    if (!(cond)) ::flowkern_cpu::throw_runtime_error(::flowkern_cpu::cat(__VA_ARGS__)); \
  } while (0)
