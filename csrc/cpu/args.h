// Argument checks of the public ops, done once in C++ so that a public call
// is one dispatcher call (docs/design.md §8). The messages and
// exception types are those of flowkern/_validate.py, which keeps the same
// rules for the backends that do not come through here (torch, triton):
// TypeError for a wrong type or dtype, ValueError for a wrong shape, device
// or value, each naming the argument.
#pragma once

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tensor.h"

namespace flowkern_cpu {

// A shape as Python prints a tuple: (4, 3), (3,), ().
inline std::string py_shape(IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

// torch.float32 etc., as Python prints a dtype.
inline std::string py_dtype(ScalarType t) {
  switch (t) {
    case kFloat: return "torch.float32";
    case kDouble: return "torch.float64";
    case kHalf: return "torch.float16";
    case kBFloat16: return "torch.bfloat16";
    case kLong: return "torch.int64";
    case kInt: return "torch.int32";
    case kBool: return "torch.bool";
    default: return std::string("torch.") + torch::headeronly::toString(t);
  }
}

// Whether a shim dtype code is one the kernels take: float32, float64,
// float16, bfloat16. On the code: Tensor::scalar_type converts it through a
// chain of shim calls, ~5% of a small op's host time where every check used it.
inline bool is_float_code(int32_t dtype) {
  static const int32_t f32 = shim_dtype(kFloat), f64 = shim_dtype(kDouble),
                       f16 = shim_dtype(kHalf), bf16 = shim_dtype(kBFloat16);
  return dtype == f32 || dtype == f64 || dtype == f16 || dtype == bf16;
}

// flowkern._validate.tensor: a floating batch (B, ...).
inline void check_batch(const char* name, const Tensor& x) {
  int32_t dtype = 0;
  FK_SHIM_CHECK(aoti_torch_get_dtype(x.get(), &dtype));
  FK_CHECK_TYPE(is_float_code(dtype), name, ": dtype ", py_dtype(x.scalar_type()),
                " is not supported; use float16, bfloat16, float32 or float64");
  FK_CHECK_VALUE(x.dim() > 0, name,
                 ": expected a batch of shape (B, ...), got a scalar tensor");
}

// flowkern._validate.same_shape: every tensor a floating batch of the first's
// dtype and device; returns their common (broadcast) shape. Each tensor's
// metadata is read once (Meta); the messages convert codes only on failure.
inline Shape common_shape(std::initializer_list<std::pair<const char*, const Tensor*>> args) {
  const auto& [name0, x0] = *args.begin();
  for (const auto& [name, x] : args) check_batch(name, *x);
  const Meta m0 = meta_of(*x0);
  bool equal = true;
  for (const auto& [name, x] : args) {
    const Meta m = x == x0 ? m0 : meta_of(*x);
    FK_CHECK_TYPE(m.dtype == m0.dtype, name, ": dtype ",
                  py_dtype(x->scalar_type()), " differs from ", name0, "'s ",
                  py_dtype(x0->scalar_type()), "; cast one of them");
    FK_CHECK_VALUE(m.same_device(m0), name,
                   ": on ", py_device(x->device()), " but ", name0, " is on ",
                   py_device(x0->device()), "; move them to one device");
    equal = equal && same_sizes(m.sizes, m0.sizes);
  }
  if (equal) return to_shape(x0->sizes());
  Shape shape = to_shape(x0->sizes());
  bool ok = true;
  for (const auto& [name, x] : args) {
    // at::infer_size_dimvector, without its exception (its message names no argument).
    const auto a = IntArrayRef(shape), b = x->sizes();
    const size_t n = std::max(a.size(), b.size());
    Shape out(n);
    for (size_t i = 0; i < n && ok; ++i) {
      const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
      const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
      ok = da == db || da == 1 || db == 1;
      out[i] = da == 1 ? db : da;
    }
    if (!ok) break;
    shape = out;
  }
  if (!ok) {
    std::ostringstream o;
    bool first = true;
    for (const auto& [name, x] : args) {
      o << (first ? "" : ", ") << name << py_shape(x->sizes());
      first = false;
    }
    FK_CHECK_VALUE(false, "shapes do not broadcast: ", o.str());
  }
  return shape;
}

// x broadcast to `shape` and contiguous: no copy when it already is.
inline Tensor dense(const Tensor& x, IntArrayRef shape) {
  if (x.sizes().equals(shape)) return contig(x);
  return torch::stable::contiguous(expand(x, shape));
}

// A caller's output buffer: the full shape, x's dtype and device, contiguous,
// not a tensor autograd would have to track.
inline void check_out(const char* name, const Tensor& o, IntArrayRef shape,
                      const Tensor& like) {
  FK_CHECK_VALUE(o.sizes().equals(shape) && o.scalar_type() == like.scalar_type() &&
                     o.device() == like.device(),
                 name, ": must have shape ", py_shape(shape), ", dtype ",
                 py_dtype(like.scalar_type()), " and device ", py_device(like.device()), "; got ",
                 py_shape(o.sizes()), ", ", py_dtype(o.scalar_type()), ", ", py_device(o.device()));
  FK_CHECK_VALUE(o.is_contiguous(), name, ": must be contiguous");
}

using Named = std::pair<const char*, const Tensor*>;
using NamedMeta = std::pair<const char*, Meta>;

// ValueError unless the outputs are pairwise disjoint and each output either
// is an input exactly (an in-place write, e.g. out=x: every element is read
// before the same thread writes it) or shares no memory with any input. A
// partial overlap would silently mix old and new values. Undefined inputs
// (absent optional ones) are skipped.
inline void check_no_overlap(const NamedMeta* outs, size_t n_outs, const NamedMeta* ins,
                             size_t n_ins) {
  for (size_t o = 0; o < n_outs; ++o) {
    for (size_t p = 0; p < o; ++p)
      FK_CHECK_VALUE(overlap(outs[o].second, outs[p].second) == Overlap::No, outs[o].first,
                     ": shares memory with ", outs[p].first, "; give separate output buffers");
    for (size_t i = 0; i < n_ins; ++i)
      FK_CHECK_VALUE(overlap(outs[o].second, ins[i].second) != Overlap::Partial,
                     outs[o].first, ": overlaps ", ins[i].first, " without being it; write in "
                     "place only as ", outs[o].first, "=", ins[i].first, " exactly (same memory "
                     "and layout), or give a separate buffer");
  }
}
inline void check_no_overlap(std::initializer_list<Named> outs, std::initializer_list<Named> ins) {
  std::vector<NamedMeta> o, i;
  for (const auto& [name, t] : outs) o.emplace_back(name, meta_of(*t));
  for (const auto& [name, t] : ins)
    if (t != nullptr) i.emplace_back(name, meta_of(*t));
  check_no_overlap(o.data(), o.size(), i.data(), i.size());
}

// Prediction / target codes of flowkern/_rules.py.
inline void check_code(const char* name, int64_t code, int64_t n) {
  FK_CHECK_VALUE(code >= 0 && code < n, name, ": code ", code, " is out of range [0, ", n,
                 ")");
}

}  // namespace flowkern_cpu
