// The elementwise engine behind every fused training and sampler step.
//
// A tensor of shape (B, ...) is viewed as `rows` = B rows of `inner`
// contiguous elements. Each op supplies a row functor `Fn` with
//   static constexpr int NI, NO;          // inputs, outputs
//   FK_HD Mat<A, NO, NI> row(i64 r) const; // per-sample coefficients
// and every element e of row r becomes out[k][e] = sum_j M[k][j] * in[j][e].
// The coefficient math lives in the functors (coeffs.h and the op headers);
// the loops live here once, for the CPU kernels and for the CUDA kernels.
#pragma once

#include <utility>

#include "hd.h"
#include "philox.h"
#if !defined(__CUDACC__)
#include <algorithm>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "noise_block.h"
#endif

namespace fk {

// The per-row coefficients: out_k = sum_j m[k][j] in_j (+ noise[k] * xi for
// functors that declare NOISE = true; xi from philox.h, keyed per element).
template <class A, int NO, int NI> struct Mat { A m[NO][NI]; A noise[NO]; };

template <class Fn, class = void> struct has_noise { static constexpr bool value = false; };
template <class Fn> struct has_noise<Fn, decltype(void(Fn::NOISE))> {
  static constexpr bool value = Fn::NOISE;
};

// Uniform rows: a functor may declare `bool uniform() const`, true when
// row(r) is the same for every r and the functor reads nothing else per row
// (a step at one time for the batch; a training op at one t). The CPU engine
// then runs the tensor as one row (dispatch.h run_lincomb): one coefficient
// evaluation and one vectorised loop instead of one per row. Default: false.
template <class Fn, class = void> struct has_uniform { static constexpr bool value = false; };
template <class Fn> struct has_uniform<Fn, decltype(void(std::declval<const Fn&>().uniform()))> {
  static constexpr bool value = true;
};
template <class Fn> bool uniform_rows(const Fn& fn) {
  if constexpr (has_uniform<Fn>::value) return fn.uniform();
  else return false;
}

template <class T, int N> struct Ptrs { const T* p[N]; };
template <class T, int N> struct OutPtrs { T* p[N]; };

// Structural zeros: a functor may declare which inputs each output reads,
//   FK_HD static constexpr bool reads(int k, int j);
// and the terms it does not read are left out of the sum rather than
// multiplied by a 0 coefficient, so a NaN or inf in an input that an output
// does not depend on stays out of it (0 * NaN = NaN; e.g. DPM-Solver++'s d_t
// does not read d_prev). The choice is made at compile time (the loops are
// unrolled), never from a coefficient's value: a NaN the math does reach
// (a model output times a 0 step) still propagates. Default: reads all.
template <class Fn, class = void> struct has_reads { static constexpr bool value = false; };
template <class Fn> struct has_reads<Fn, decltype(void(Fn::reads(0, 0)))> {
  static constexpr bool value = true;
};
template <class Fn> FK_HD constexpr bool reads(int k, int j) {
  if constexpr (has_reads<Fn>::value) return Fn::reads(k, j);
  else return true;
}

// out = M * in for one element, in the accumulation type (Fn: reads()).
template <class Fn, class A, int NO, int NI>
FK_HD void apply(const Mat<A, NO, NI>& M, const A (&in)[NI], A (&out)[NO]) {
FK_UNROLL
  for (int k = 0; k < NO; ++k) {
    A s = reads<Fn>(k, 0) ? M.m[k][0] * in[0] : A(0);
FK_UNROLL
    for (int j = 1; j < NI; ++j)
      if (reads<Fn>(k, j)) s += M.m[k][j] * in[j];
    out[k] = s;
  }
}

#if !defined(__CUDACC__)
// Elements [e0, e1) of row r: the CPU kernels call this on cache-sized
// segments, a block of kBlock elements at a time; the element loop is
// branch-free so g++ vectorises it. Noise comes kNoiseChunk elements at a
// time from fk::fill_normals (noise_block.h: the numbers of normal_at,
// vectorised).
// With `stream`, whole aligned blocks are written with cache-bypassing
// stores (SSE2 movntdq, in every x86-64 CPU): for a working set larger than
// the last-level cache a normal store first reads the line it overwrites
// (read-for-ownership), a third more traffic for a 2-in/2-out map. The
// caller decides (dispatch.h run_lincomb); the stores are fenced here.
constexpr int kBlock = kNoiseBlock;  // 64 elements: whole 64-byte lines for every T

template <class T, class Fn>
inline void lincomb_segment(const Fn& fn, i64 r, i64 inner, i64 e0, i64 e1,
                            Ptrs<T, Fn::NI> in, OutPtrs<T, Fn::NO> out, NoiseKey key = {},
                            bool stream = false) {
  using A = acc_t<T>;
  constexpr int NO = Fn::NO;
  constexpr bool noisy = has_noise<Fn>::value;
  const auto M = fn.row(r);
  key = for_row(key, r, inner);
  // Elements [b, b + n) into dst[k][0, n).
  const auto block = [&](i64 b, i64 n, T* const (&dst)[NO], const float* xi) {
    FK_IVDEP
    for (i64 i = 0; i < n; ++i) {
      A x[Fn::NI], y[NO];
      for (int j = 0; j < Fn::NI; ++j) x[j] = load(in.p[j], b + i);
      apply<Fn>(M, x, y);
      if constexpr (noisy)
        for (int k = 0; k < NO; ++k) y[k] += M.noise[k] * A(xi[i]);
      for (int k = 0; k < NO; ++k) store(dst[k], i, y[k]);
    }
  };
  const i64 end = r * inner + e1;
  i64 b = r * inner + e0;
  if (!noisy && !stream) {
    T* dst[NO];
    for (int k = 0; k < NO; ++k) dst[k] = out.p[k] + b;
    return block(b, end - b, dst, nullptr);
  }
  // Bytes past a cache-line boundary, or -1 if the outputs differ. Streamed
  // blocks start on a line: a line written in pieces by two blocks leaves the
  // write-combining buffer partial (measured 1.8x slower than aligned).
  const auto misalign = [&](i64 e) {
    const uintptr_t m0 = uintptr_t(out.p[0] + e) & 63u;
    for (int k = 1; k < NO; ++k)
      if ((uintptr_t(out.p[k] + e) & 63u) != m0) return i64(-1);
    return i64(m0);
  };
#if !defined(__SSE2__)
  stream = false;  // no portable cache-bypassing store: plain stores
#endif
  const i64 mis = stream ? misalign(b) : -1;
  stream = mis >= 0 && mis % i64(sizeof(T)) == 0;
  // The noise of elements [xi_lo, xi_hi), drawn a chunk at a time
  // (noise_block.h). Each draw ends on a 4-aligned stream index (but at the
  // segment's end), so the next one starts on one and fill_normals never
  // computes a chunk for a few of its numbers; a block straddling the end
  // keeps the part already drawn. (Drawing from each block's start cost 2x
  // for offsets that are not a multiple of 4.)
  alignas(64) float xi[kBlock + kNoiseChunk];
  i64 xi_lo = b, xi_hi = b;
  alignas(64) T tmp[NO][kBlock];
  // A short first block brings the streamed blocks onto cache-line boundaries.
  i64 n = stream && mis ? (64 - mis) / i64(sizeof(T)) : kBlock;
  for (; b < end; b += n, n = kBlock) {
    n = end - b < n ? end - b : n;
    if constexpr (noisy) {
      if (b + n > xi_hi) {  // b <= xi_hi: the blocks are contiguous
        const i64 keep = xi_hi - b;
        for (i64 i = 0; i < keep; ++i) xi[i] = xi[b - xi_lo + i];
        const i64 lead = i64(uint64_t(key.offset + xi_hi) & 3u);
        const i64 hi = end - xi_hi < kNoiseChunk - lead ? end : xi_hi + kNoiseChunk - lead;
        fill_normals(key, xi_hi, hi - xi_hi, xi + keep);
        xi_lo = b;
        xi_hi = hi;
      }
    }
    const bool streamed = stream && n == kBlock;
    T* dst[NO];
    for (int k = 0; k < NO; ++k) dst[k] = streamed ? tmp[k] : out.p[k] + b;
    block(b, n, dst, xi + (b - xi_lo));
#if defined(__SSE2__)
    if (streamed)
      for (int k = 0; k < NO; ++k)
        for (size_t c = 0; c < kBlock * sizeof(T) / 16; ++c)
          _mm_stream_si128(reinterpret_cast<__m128i*>(out.p[k] + b) + c,
                           _mm_load_si128(reinterpret_cast<const __m128i*>(tmp[k]) + c));
#endif
  }
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // the streamed lines are visible before the caller's join
#endif
}

// Rows shorter than this take lincomb_rows when the op's working set stays
// in cache (dispatch.h run_lincomb): lincomb_segment's per-call set-up (noise
// key, blocks, streaming) costs more than a short row's elements. Measured
// here, float32, 1 thread, euler_step with a per-sample table: (4096, 2)
// 24.2 -> 7.8 us (eager 9.4), (1024, 64) 12.6 -> 7.7 us; no row length up to
// 128 was slower (em_step, interpolate, docs/build.md "Short rows").
constexpr i64 kShortRow = 129;
static_assert(kShortRow <= kNoiseChunk, "a short row's noise fits one buffer");

// Whole rows [r0, r1) of `inner` < kShortRow elements: each row's
// coefficients, then its elements (no blocks, no streaming). The noise of
// consecutive rows is one stream (for_row changes nothing without
// per-sample seeds), drawn for as many whole rows as fill a chunk at once;
// with per-sample seeds, row by row.
template <class T, class Fn>
inline void lincomb_rows(const Fn& fn, i64 r0, i64 r1, i64 inner, Ptrs<T, Fn::NI> in,
                         OutPtrs<T, Fn::NO> out, NoiseKey key = {}) {
  using A = acc_t<T>;
  constexpr int NI = Fn::NI, NO = Fn::NO;
  constexpr bool noisy = has_noise<Fn>::value;
  alignas(64) float xi[noisy ? kNoiseChunk : 1];
  i64 xi_lo = 0, xi_hi = 0;  // the flat elements whose noise xi holds
  for (i64 r = r0; r < r1; ++r) {
    const auto M = fn.row(r);
    const i64 b = r * inner;
    const float* nz = xi;
    if constexpr (noisy) {
      if (key.seeds != nullptr) {
        fill_normals(for_row(key, r, inner), b, inner, xi);
      } else {
        if (b + inner > xi_hi) {
          const i64 n = std::min<i64>((r1 - r) * inner, kNoiseChunk / inner * inner);
          fill_normals(key, b, n, xi);
          xi_lo = b;
          xi_hi = b + n;
        }
        nz = xi + (b - xi_lo);
      }
    }
    FK_IVDEP
    for (i64 i = 0; i < inner; ++i) {
      A x[NI], y[NO];
      for (int j = 0; j < NI; ++j) x[j] = load(in.p[j], b + i);
      apply<Fn>(M, x, y);
      if constexpr (noisy)
        for (int k = 0; k < NO; ++k) y[k] += M.noise[k] * A(nz[i]);
      for (int k = 0; k < NO; ++k) store(out.p[k], b + i, y[k]);
    }
  }
}

#endif  // !__CUDACC__ (the GPU runs lincomb_thread)

// Aligned pack of VEC elements: one 128-bit load or store on the GPU.
template <class T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

// The CUDA kernel body, written as a function of the global thread index so
// that the CPU grid simulator (csrc/cpu/cuda_sim.cpp) runs exactly the code
// the GPU runs. Grid-stride loop over chunks of VEC consecutive elements;
// VEC > 1 only when inner % VEC == 0 and every pointer is 16-byte aligned
// (the launcher checks), so a chunk never straddles two rows. Offsets are
// 64-bit. The row coefficients are recomputed only when the row changes.
template <int VEC, class T, class Fn>
FK_HD void lincomb_thread(const Fn& fn, i64 gtid, i64 nthreads, i64 rows, i64 inner,
                          Ptrs<T, Fn::NI> in, OutPtrs<T, Fn::NO> out, NoiseKey key = {}) {
  using A = acc_t<T>;
  const i64 nchunks = rows * inner / VEC;
  i64 cached = -1;
  decltype(fn.row(0)) M{};
  NoiseKey rkey = key;
  for (i64 c = gtid; c < nchunks; c += nthreads) {
    const i64 e = c * VEC;
    const i64 r = e / inner;
    if (r != cached) {
      M = fn.row(r);
      if constexpr (has_noise<Fn>::value) rkey = for_row(key, r, inner);
      cached = r;
    }
    Pack<T, VEC> pin[Fn::NI], pout[Fn::NO];
FK_UNROLL
    for (int j = 0; j < Fn::NI; ++j) {
#if defined(__CUDA_ARCH__)
      pin[j] = *reinterpret_cast<const Pack<T, VEC>*>(in.p[j] + e);
#else
      for (int v = 0; v < VEC; ++v) pin[j].v[v] = in.p[j][e + v];
#endif
    }
FK_UNROLL
    for (int v = 0; v < VEC; ++v) {
      A x[Fn::NI], y[Fn::NO];
FK_UNROLL
      for (int j = 0; j < Fn::NI; ++j) x[j] = to_float(pin[j].v[v]);
      apply<Fn>(M, x, y);
      if constexpr (has_noise<Fn>::value) {
        const A xi = A(normal_at(rkey, e + v));
FK_UNROLL
        for (int k = 0; k < Fn::NO; ++k) y[k] += M.noise[k] * xi;
      }
FK_UNROLL
      for (int k = 0; k < Fn::NO; ++k) pout[k].v[v] = from_acc<T>(y[k]);
    }
FK_UNROLL
    for (int k = 0; k < Fn::NO; ++k) {
#if defined(__CUDA_ARCH__)
      *reinterpret_cast<Pack<T, VEC>*>(out.p[k] + e) = pout[k];
#else
      for (int v = 0; v < VEC; ++v) out.p[k][e + v] = pout[k].v[v];
#endif
    }
  }
}

}  // namespace fk
