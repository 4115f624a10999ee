// The argument errors of the native ops (docs/design.md §8), on the stable
// ABI. No c10 exception type crosses it, and what a standard exception
// becomes in Python depends on the torch that runs the kernel: torch 2.14's
// operator binding (pybind11) turns std::invalid_argument into ValueError,
// torch 2.15 turns every exception of a stable kernel into RuntimeError. So
// the Python type rides in the message, as a prefix:
//
//   FK_CHECK_VALUE  std::invalid_argument("ValueError: ...")
//   FK_CHECK_TYPE   std::invalid_argument("TypeError: ...")
//   FK_CHECK        std::runtime_error("...")           (an internal error)
//
// and the public functions re-raise a prefixed ValueError or RuntimeError as
// the type it names, without the prefix (flowkern/ops/_registry.py retyped):
// the same exception types and messages under every torch (docs/build.md).
// The message is built only when the check fails, as with TORCH_CHECK.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace flowkern_cpu {

// The prefixes; the Python side reads the same strings (_registry.ERROR_PREFIXES).
inline constexpr const char* kValueErrorPrefix = "ValueError: ";
inline constexpr const char* kTypeErrorPrefix = "TypeError: ";

template <class... Parts> std::string cat(const Parts&... parts) {
  std::ostringstream o;
  if constexpr (sizeof...(Parts) > 0) (o << ... << parts);
  return o.str();
}

[[noreturn]] inline void throw_value_error(const std::string& m) {
  throw std::invalid_argument(kValueErrorPrefix + m);
}
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
