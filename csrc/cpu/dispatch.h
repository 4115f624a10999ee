// Bridges torch tensors to the torch-free kernels: storage-type dispatch and
// the parallel loops that call the engines' row segments.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>

#include <algorithm>
#include <vector>

#include "flowkern/lincomb.h"
#include "flowkern/rowsum.h"
#include "tensor.h"

namespace flowkern_cpu {

using fk::i64;

template <class T> struct Tag { using type = T; };

// Storage type of each supported dtype; 16-bit floats are reinterpreted as
// the header's bit-compatible fk::f16 / fk::bf16.
template <class F> void dispatch_dtype(const Tensor& t, const char* op, F&& f) {
  switch (t.scalar_type()) {
    case kFloat: return f(Tag<float>{});
    case kDouble: return f(Tag<double>{});
    case kHalf: return f(Tag<fk::f16>{});
    case kBFloat16: return f(Tag<fk::bf16>{});
    default: FK_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
}

template <class T> const T* cptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <class T> T* mptr(Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

// A fresh output shaped like `like`. Large ones ask the kernel for
// transparent huge pages before the first touch: a fresh allocation this big
// comes straight from mmap, and its first write faults once per 4 KiB page
// (~1.3 us each in this VM: 43 ms for the two 64 MiB outputs of a 16M-element
// interpolate, 5x the kernel). With 2 MiB pages it faults 512x less often.
// Only where THP is "madvise" or "always"; elsewhere madvise fails harmlessly.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeOutputBytes = 4 * kHugePage;  // flowkern/ops/_registry.py gates on it too
inline Tensor empty_output(const Tensor& like, IntArrayRef shape) {
  auto out = empty_like_shape(like, shape);
  const size_t bytes = nbytes(out);
  if (bytes >= kHugeOutputBytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
    const uintptr_t lo = (p + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t hi = (p + bytes) & ~(kHugePage - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
  return out;
}
inline Tensor empty_output(const Tensor& like) { return empty_output(like, like.sizes()); }

// Rows of a (B, ...) tensor and their length.
inline i64 rows_of(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }
inline i64 inner_of(const Tensor& t) {
  const i64 r = rows_of(t);
  return r == 0 ? 0 : t.numel() / r;
}

// Segment length: long enough to amortise a row's coefficients, short enough
// that a large single row still splits across threads.
constexpr i64 kSegment = 16384;

// parallel_for's grain over rows (or row segments) of `len` elements: about
// kSegment elements a task.
inline i64 grain_of(i64 len) { return std::max<i64>(1, kSegment / std::max<i64>(1, len)); }

// Calls body(r, e0, e1) on every row segment, in parallel.
template <class Body> void for_each_segment(i64 rows, i64 inner, Body&& body) {
  if (rows == 0 || inner == 0) return;
  const i64 seg = std::min(inner, kSegment);
  const i64 nseg = (inner + seg - 1) / seg;
  const i64 grain = grain_of(seg);
  if (nseg == 1) {  // whole rows: no 64-bit division per row (~10 ns a row on 2-wide rows)
    torch::stable::parallel_for(0, rows, grain, [&](i64 b, i64 e) {
      for (i64 r = b; r < e; ++r) body(r, i64(0), inner);
    });
    return;
  }
  torch::stable::parallel_for(0, rows * nseg, grain, [&](i64 b, i64 e) {
    for (i64 k = b; k < e; ++k) {
      const i64 r = k / nseg, s = k - r * nseg;
      body(r, s * seg, std::min(inner, (s + 1) * seg));
    }
  });
}

// Bytes of the last-level cache this CPU shares: sysfs (what lscpu reports;
// in a VM sysconf's figure can be the host socket's, 8x larger here), else
// sysconf, else 32 MiB.
inline i64 last_level_cache_bytes() {
  static const i64 bytes = [] {
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long kib = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%ld%c", &kib, &unit);
      std::fclose(f);
      if (got == 2 && kib > 0 && unit == 'K') return i64(kib) << 10;
    }
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? i64(l3) : i64(32) << 20;
  }();
  return bytes;
}

// run_lincomb's short rows (lincomb.h lincomb_rows). Not inlined: with this
// loop inside run_lincomb, g++ compiled its segment path ~25% slower
// (interpolate, 1 x 65536 float32, 1 thread: 11.2 -> 14.0 us, measured A/B).
template <class T, class Fn>
[[gnu::noinline]] void run_lincomb_rows(const Fn& fn, i64 rows, i64 inner,
                                        fk::Ptrs<T, Fn::NI> in, fk::OutPtrs<T, Fn::NO> out,
                                        fk::NoiseKey key) {
  torch::stable::parallel_for(0, rows, grain_of(inner), [&](i64 b, i64 e) {
    fk::lincomb_rows<T>(fn, b, e, inner, in, out, key);
  });
}

template <class T, class Fn>
void run_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                 fk::OutPtrs<T, Fn::NO> out, fk::NoiseKey key = {});

// run_lincomb's uniform rows as one row of n elements. Not inlined, as
// run_lincomb_rows.
template <class T, class Fn>
[[gnu::noinline]] void run_lincomb_flat(const Fn& fn, i64 n, fk::Ptrs<T, Fn::NI> in,
                                        fk::OutPtrs<T, Fn::NO> out, fk::NoiseKey key) {
  run_lincomb<T>(fn, 1, n, in, out, key);
}

// out_k = M_row * in over whole tensors (all contiguous, same shape). The
// outputs are streamed past the cache when the op's working set could not
// stay in it anyway (lincomb.h). Uniform rows (lincomb.h uniform_rows) run as
// one row of rows * inner elements: the same values bit for bit (noise is
// keyed by the flat element index unless seeds are per sample), one
// coefficient evaluation instead of one a row.
template <class T, class Fn>
void run_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                 fk::OutPtrs<T, Fn::NO> out, fk::NoiseKey key) {
  if (rows > 1 && key.seeds == nullptr && fk::uniform_rows(fn))
    return run_lincomb_flat<T>(fn, rows * inner, in, out, key);
  const bool stream =
      rows * inner * i64(sizeof(T)) * (Fn::NI + Fn::NO) > last_level_cache_bytes();
  if constexpr (fk::has_noise<Fn>::value) fk::refresh_noise_isa();
  if (inner > 0 && inner < fk::kShortRow && !stream)  // short rows: one loop over them
    return run_lincomb_rows<T>(fn, rows, inner, in, out, key);
  for_each_segment(rows, inner, [&](i64 r, i64 e0, i64 e1) {
    fk::lincomb_segment<T>(fn, r, inner, e0, e1, in, out, key, stream);
  });
}

// A loss over whole tensors (the row-sum engine, rowsum.h): each row's
// segments summed by fk::rowsum_segment into partials, then summed per row
// in double, weighed and reduced by fk::finish_thread as one thread, as the
// CUDA glue's finishing block does: into out[0], or out[r] when per_row.
// STORE: the same pass also writes st's gradient (fk::RowStore).
template <class T, bool STORE = false, class Fn>
void run_loss(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in, const fk::Reals& weight,
              bool per_row, double denom, T* out, fk::RowStore<T> st = {}) {
  const i64 seg = std::max<i64>(1, std::min(inner, kSegment));  // as for_each_segment
  const i64 nseg = inner == 0 ? 1 : (inner + seg - 1) / seg;
  std::vector<fk::acc_t<T>> partial(size_t(rows * nseg), fk::acc_t<T>(0));
  // Many short rows: one plain loop over them (rowsum.h kShortRowSum). Not
  // folded into for_each_segment's lambda as a choice per row: that cost the
  // short rows 3x here (fm_loss (32768, 2), 1 thread: 194 -> 639 us, A/B).
  if (inner > 0 && inner < fk::kShortRowSum) {
    torch::stable::parallel_for(0, rows, grain_of(inner), [&](i64 b, i64 e) {
      for (i64 r = b; r < e; ++r)
        partial[size_t(r)] = fk::rowsum_segment<T, Fn, STORE, false>(fn, r, inner, 0, inner, in, st);
    });
  } else {
    for_each_segment(rows, inner, [&](i64 r, i64 e0, i64 e1) {
      partial[size_t(r * nseg + e0 / seg)] =
          fk::rowsum_segment<T, Fn, STORE>(fn, r, inner, e0, e1, in, st);
    });
  }
  const fk::LossFinish<T> f{partial.data(), rows, nseg, weight, per_row, denom, out};
  fk::finish_total(f, fk::finish_thread(f, 0, 1));
}

}  // namespace flowkern_cpu
