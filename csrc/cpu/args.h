// Argument checks of the public ops, done once in C++ so that a public call
// is one dispatcher call (docs/design.md §8). The messages and
// exception types are those of flowkern/_validate.py, which keeps the same
// rules for the backends that do not come through here (torch, triton):
// TypeError for a wrong type or dtype, ValueError for a wrong shape, device
// or value, each naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

namespace flowkern_cpu {

// A shape as Python prints a tuple: (4, 3), (3,), ().
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

// torch.float32 etc., as Python prints a dtype.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// flowkern._validate.tensor: a floating batch (B, ...).
inline void check_batch(const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), name, ": dtype ", py_dtype(x.scalar_type()),
                   " is not supported; use float16, bfloat16, float32 or float64");
  TORCH_CHECK_VALUE(x.dim() > 0, name,
                    ": expected a batch of shape (B, ...), got a scalar tensor");
}

// flowkern._validate.same_shape: every tensor a floating batch of the first's
// dtype and device; returns their common (broadcast) shape.
inline at::DimVector common_shape(std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  const auto& [name0, x0] = *args.begin();
  for (const auto& [name, x] : args) check_batch(name, *x);
  bool equal = true;
  for (const auto& [name, x] : args) {
    TORCH_CHECK_TYPE(x->scalar_type() == x0->scalar_type(), name, ": dtype ",
                     py_dtype(x->scalar_type()), " differs from ", name0, "'s ",
                     py_dtype(x0->scalar_type()), "; cast one of them");
    TORCH_CHECK_VALUE(x->device() == x0->device(), name, ": on ", x->device(), " but ", name0,
                      " is on ", x0->device(), "; move them to one device");
    equal = equal && x->sizes().equals(x0->sizes());
  }
  if (equal) return at::DimVector(x0->sizes());
  at::DimVector shape(x0->sizes());
  bool ok = true;
  for (const auto& [name, x] : args) {
    // at::infer_size_dimvector, without its exception (its message names no argument).
    const auto a = at::IntArrayRef(shape), b = x->sizes();
    const size_t n = std::max(a.size(), b.size());
    at::DimVector out(n);
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
    TORCH_CHECK_VALUE(false, "shapes do not broadcast: ", o.str());
  }
  return shape;
}

// x broadcast to `shape` and contiguous: no copy when it already is.
inline at::Tensor dense(const at::Tensor& x, at::IntArrayRef shape) {
  if (x.sizes().equals(shape)) return x.is_contiguous() ? x : x.contiguous();
  return x.expand(shape).contiguous();
}

// A caller's output buffer: the full shape, x's dtype and device, contiguous,
// not a tensor autograd would have to track.
inline void check_out(const char* name, const at::Tensor& o, at::IntArrayRef shape,
                      const at::Tensor& like) {
  TORCH_CHECK_VALUE(o.sizes().equals(shape) && o.scalar_type() == like.scalar_type() &&
                        o.device() == like.device(),
                    name, ": must have shape ", py_shape(shape), ", dtype ",
                    py_dtype(like.scalar_type()), " and device ", like.device(), "; got ",
                    py_shape(o.sizes()), ", ", py_dtype(o.scalar_type()), ", ", o.device());
  TORCH_CHECK_VALUE(o.is_contiguous(), name, ": must be contiguous");
}

using Named = std::pair<const char*, const at::Tensor*>;

// Whether a and b may share memory, and whether exactly (same bytes, same
// layout: an in-place write, element for element).
inline at::MemOverlapStatus overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return at::MemOverlapStatus::No;
  if (!a.storage().is_alias_of(b.storage())) return at::MemOverlapStatus::No;
  const auto s = at::get_overlap_status(a, b);
  // TooHard (a broadcast or overlapping view of the same storage): treated as
  // a partial overlap, since no kernel here can write it safely.
  return s == at::MemOverlapStatus::TooHard ? at::MemOverlapStatus::Partial : s;
}

// ValueError unless the outputs are pairwise disjoint and each output either
// is an input exactly (an in-place write, e.g. out=x: every element is read
// before the same thread writes it) or shares no memory with any input. A
// partial overlap would silently mix old and new values.
inline void check_no_overlap(std::initializer_list<Named> outs, std::initializer_list<Named> ins) {
  for (auto o = outs.begin(); o != outs.end(); ++o) {
    for (auto p = outs.begin(); p != o; ++p)
      TORCH_CHECK_VALUE(overlap(*o->second, *p->second) == at::MemOverlapStatus::No, o->first,
                        ": shares memory with ", p->first, "; give separate output buffers");
    for (const auto& [name, in] : ins)
      TORCH_CHECK_VALUE(in == nullptr ||
                            overlap(*o->second, *in) != at::MemOverlapStatus::Partial,
                        o->first, ": overlaps ", name, " without being it; write in place only "
                        "as ", o->first, "=", name, " exactly (same memory and layout), or give "
                        "a separate buffer");
  }
}

// Prediction / target codes of flowkern/_rules.py.
inline void check_code(const char* name, int64_t code, int64_t n) {
  TORCH_CHECK_VALUE(code >= 0 && code < n, name, ": code ", code, " is out of range [0, ", n,
                    ")");
}

}  // namespace flowkern_cpu
