// Bridges ATen tensors to the torch-free kernels: storage-type dispatch and
// the parallel loops that call the engines' row segments.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "flowkern/lincomb.h"
#include "flowkern/rowsum.h"

namespace flowkern_cpu {

using fk::i64;

template <class T> struct Tag { using type = T; };

// Storage type of each supported dtype; 16-bit floats are reinterpreted as
// the header's bit-compatible fk::f16 / fk::bf16.
template <class F> void dispatch_dtype(const at::Tensor& t, const char* op, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<fk::f16>{});
    case at::kBFloat16: return f(Tag<fk::bf16>{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
}

template <class T> const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <class T> T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

// Rows of a (B, ...) tensor and their length.
inline i64 rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }
inline i64 inner_of(const at::Tensor& t) {
  const i64 r = rows_of(t);
  return r == 0 ? 0 : t.numel() / r;
}

// Segment length: long enough to amortise a row's coefficients, short enough
// that a large single row still splits across threads.
constexpr i64 kSegment = 16384;

// Calls body(r, e0, e1) on every row segment, in parallel.
template <class Body> void for_each_segment(i64 rows, i64 inner, Body&& body) {
  if (rows == 0 || inner == 0) return;
  const i64 seg = std::min(inner, kSegment);
  const i64 nseg = (inner + seg - 1) / seg;
  const i64 grain = std::max<i64>(1, kSegment / seg);
  at::parallel_for(0, rows * nseg, grain, [&](i64 b, i64 e) {
    for (i64 k = b; k < e; ++k) {
      const i64 r = k / nseg, s = k - r * nseg;
      body(r, s * seg, std::min(inner, (s + 1) * seg));
    }
  });
}

// out_k = M_row * in over whole tensors (all contiguous, same shape).
template <class T, class Fn>
void run_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                 fk::OutPtrs<T, Fn::NO> out, fk::NoiseKey key = {}) {
  for_each_segment(rows, inner, [&](i64 r, i64 e0, i64 e1) {
    fk::lincomb_segment<T>(fn, r, inner, e0, e1, in, out, key);
  });
}

}  // namespace flowkern_cpu
