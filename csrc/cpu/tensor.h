// flowkern's whole view of torch in C++: PyTorch's stable ABI
// (torch/csrc/stable, docs/build.md "One wheel across torch versions"). The
// kernels (csrc/include) include no torch header at all; the op bodies and
// the CUDA glue see tensors only through this file, so the compiled module
// loads into every torch from TORCH_TARGET_VERSION (setup.py) up.
//
// Only shim calls that exist at the target version: the tensor's own
// metadata calls, aoti_torch_empty_strided for outputs (a direct call, not
// a boxed dispatch), and the dispatcher by name for the few view/copy ops.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "errors.h"

namespace flowkern_cpu {

using Tensor = torch::stable::Tensor;
using OptT = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using DoubleArrayRef = torch::headeronly::HeaderOnlyArrayRef<double>;
using Shape = std::vector<int64_t>;  // an owned shape (at::DimVector's role)

inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kDouble = ScalarType::Double;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
inline constexpr ScalarType kLong = ScalarType::Long;
inline constexpr ScalarType kInt = ScalarType::Int;
inline constexpr ScalarType kBool = ScalarType::Bool;

inline Shape to_shape(IntArrayRef s) { return Shape(s.begin(), s.end()); }

// "cpu", "cuda:0": as Python prints a device.
inline std::string py_device(const Device& d) {
  std::string s = d.type() == DeviceType::CPU    ? "cpu"
                  : d.type() == DeviceType::CUDA ? "cuda"
                  : d.type() == DeviceType::Meta ? "meta"
                                                 : "device" + std::to_string(int(d.type()));
  if (d.has_index() && d.type() != DeviceType::CPU) s += ":" + std::to_string(int(d.index()));
  return s;
}

inline bool is_floating(ScalarType t) {
  return t == kFloat || t == kDouble || t == kHalf || t == kBFloat16 ||
         t == ScalarType::Float8_e4m3fn || t == ScalarType::Float8_e5m2 ||
         t == ScalarType::Float8_e4m3fnuz || t == ScalarType::Float8_e5m2fnuz;
}

inline bool is_complex(ScalarType t) {
  return t == ScalarType::ComplexHalf || t == ScalarType::ComplexFloat ||
         t == ScalarType::ComplexDouble;
}

// The shim's integer codes of a dtype and a device type.
inline int32_t shim_dtype(ScalarType t) {
  return torch::stable::detail::to<int32_t>(torch::stable::detail::from(t));
}
inline int32_t shim_device_type(DeviceType t) {
  return torch::stable::detail::to<int32_t>(torch::stable::detail::from(t));
}

// Row-major strides of a shape, into out[0 .. shape.size()).
inline void fill_contiguous_strides(IntArrayRef shape, int64_t* out) {
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    out[i] = s;
    s *= shape[i] > 1 ? shape[i] : 1;
  }
}
inline Shape contiguous_strides(IntArrayRef shape) {
  Shape strides(shape.size());
  fill_contiguous_strides(shape, strides.data());
  return strides;
}

// A shim call's error code to an exception. torch >= 2.12's headers carry
// STABLE_TORCH_ERROR_CODE_CHECK, which adds the shim's own message (e.g. the
// allocator's); a build against older headers (a GPU machine's torch 2.11,
// docs/build.md) has the header-only check, which names the call alone.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define FK_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define FK_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

// Whether two shapes are equal (torch < 2.12's IntArrayRef has no ==).
inline bool same_sizes(IntArrayRef a, IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// A fresh contiguous tensor, of the shim's dtype and device codes. The
// strides live on the stack up to 8 dims (an output's allocation is most of a
// small op's own host time: no second heap allocation for them).
inline Tensor empty_codes(IntArrayRef shape, int32_t dtype, int32_t device_type,
                          int32_t device_index) {
  constexpr size_t kDims = 8;
  int64_t small[kDims];
  Shape large;
  int64_t* strides = small;
  if (shape.size() > kDims) {
    large.resize(shape.size());
    strides = large.data();
  }
  fill_contiguous_strides(shape, strides);
  AtenTensorHandle h = nullptr;
  FK_SHIM_CHECK(aoti_torch_empty_strided(int64_t(shape.size()), shape.data(), strides, dtype,
                                         device_type, device_index, &h));
  return Tensor(h);
}
inline Tensor empty(IntArrayRef shape, ScalarType dtype, const Device& device) {
  return empty_codes(shape, shim_dtype(dtype), shim_device_type(device.type()),
                     device.has_index() ? device.index() : 0);
}
// A tensor's dtype and device as the shim's codes: equal codes, equal dtypes
// and devices, without Tensor::scalar_type's and device()'s conversions (a
// chain of shim calls each).
inline void shim_codes(const Tensor& t, int32_t& dtype, int32_t& device_type,
                       int32_t& device_index) {
  FK_SHIM_CHECK(aoti_torch_get_dtype(t.get(), &dtype));
  FK_SHIM_CHECK(aoti_torch_get_device_type(t.get(), &device_type));
  FK_SHIM_CHECK(aoti_torch_get_device_index(t.get(), &device_index));
}
// Like `like`'s dtype and device (shim_codes).
inline Tensor empty_like_shape(const Tensor& like, IntArrayRef shape) {
  int32_t dtype = 0, device_type = 0, device_index = 0;
  shim_codes(like, dtype, device_type, device_index);
  return empty_codes(shape, dtype, device_type, device_index);
}

// x itself when contiguous, else a contiguous copy.
inline Tensor contig(const Tensor& x) {
  return x.is_contiguous() ? x : torch::stable::contiguous(x);
}

// An aten op by name through the dispatcher, for the few this file needs
// that have no stable wrapper. Arguments of the types the shim converts
// (tensors, ints, floats, bools, int lists; no Scalar).
template <class... Args>
Tensor aten_op(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  FK_SHIM_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// aten::expand: a broadcast view.
inline Tensor expand(const Tensor& x, IntArrayRef shape) {
  return aten_op("aten::expand", "", x, shape, false);
}
inline Tensor mul(const Tensor& a, const Tensor& b) { return aten_op("aten::mul", "Tensor", a, b); }

inline Tensor to_dtype(const Tensor& x, ScalarType t) {
  return x.scalar_type() == t ? x : torch::stable::to(x, t);
}
inline Tensor to_cpu(const Tensor& x) {
  return x.is_cpu() ? x : torch::stable::to(x, Device(DeviceType::CPU));
}
inline Tensor filled(IntArrayRef shape, double value, ScalarType t, const Device& d) {
  return torch::stable::full(shape, value, t, std::nullopt, d);
}

// A 0-dim float64 CPU tensor: a factor any device's tensor can be
// multiplied by (the shim passes no Scalar), with no device allocation.
inline Tensor host_scalar(double v) { return filled({}, v, kDouble, Device(DeviceType::CPU)); }

// Sums over dimension 1 of a (rows, k) tensor: (rows,), in `dtype` if given.
inline Tensor row_sums(const Tensor& x, std::optional<ScalarType> dtype = std::nullopt) {
  const int64_t dim[] = {1};
  return torch::stable::sum(x, IntArrayRef(dim), false, dtype);
}

inline size_t nbytes(const Tensor& x) { return size_t(x.numel()) * x.element_size(); }

// One read of a tensor's metadata through the shim, for the checks that
// compare many tensors with each other (a step's model outputs and buffers
// against x, every output against every input: step_args.h step_inputs):
// ~10 shim calls per tensor instead of ~10 per comparison, which on a
// lms_step of 8 tensors was ~0.4 us of its ~3.6 us (see docs/build.md,
// "Host time"). Dtype and device as the shim's codes (equal codes, equal
// dtypes and devices); sizes and strides point into the tensor, which
// outlives this.
struct Meta {
  const Tensor* t = nullptr;
  bool defined = false, contiguous = false;
  IntArrayRef sizes, strides;
  int32_t dtype = 0, device_type = 0, device_index = 0;
  const void* data = nullptr;
  int64_t numel = 0, element_size = 0;
  bool same_device(const Meta& o) const {
    return device_type == o.device_type && device_index == o.device_index;
  }
  bool same_place(const Meta& o) const { return dtype == o.dtype && same_device(o); }
};
inline Meta meta_of(const Tensor& t) {
  Meta m;
  m.t = &t;
  m.defined = t.defined();
  if (!m.defined) return m;
  m.sizes = t.sizes();
  m.strides = t.strides();
  shim_codes(t, m.dtype, m.device_type, m.device_index);
  m.numel = 1;
  for (const int64_t n : m.sizes) m.numel *= n;
  m.contiguous = t.is_contiguous();
  if (m.numel > 0) {
    m.data = t.const_data_ptr();
    m.element_size = int64_t(aoti_torch_dtype_element_size(m.dtype));
  }
  return m;
}

// Whether a and b may share memory, and whether exactly (same first
// element, sizes and strides: an in-place write, element for element).
// Decided on the address ranges the two views span: distinct allocations
// never intersect, and two views of one allocation that intersect without
// being the same view (interleaved, shifted, broadcast) count as a partial
// overlap, since no kernel here can write such an output safely.
enum class Overlap { No, Full, Partial };
inline Overlap overlap(const Meta& a, const Meta& b) {
  if (!a.defined || !b.defined || a.numel == 0 || b.numel == 0) return Overlap::No;
  auto span = [](const Meta& x, uintptr_t& lo, uintptr_t& hi) {
    int64_t first = 0, last = 0;
    for (size_t d = 0; d < x.sizes.size(); ++d) {
      const int64_t ext = (x.sizes[d] - 1) * x.strides[d];
      (ext < 0 ? first : last) += ext;
    }
    const auto p = reinterpret_cast<uintptr_t>(x.data);
    lo = p + first * x.element_size;
    hi = p + (last + 1) * x.element_size;  // one past the last byte
  };
  uintptr_t alo, ahi, blo, bhi;
  span(a, alo, ahi);
  span(b, blo, bhi);
  if (ahi <= blo || bhi <= alo) return Overlap::No;
  const bool same = a.data == b.data && a.element_size == b.element_size &&
                    same_sizes(a.sizes, b.sizes) && same_sizes(a.strides, b.strides);
  // The same view is an exact alias only when no two of its elements share
  // memory (a contiguous view: what every output buffer here must be).
  return same && a.contiguous ? Overlap::Full : Overlap::Partial;
}
inline Overlap overlap(const Tensor& a, const Tensor& b) { return overlap(meta_of(a), meta_of(b)); }

}  // namespace flowkern_cpu
