// Row reduction engine: sum over each row of (M_row * in)^2 for a row functor
// with NO == 1 (the flow-matching loss residual). CPU kernels reduce a row
// segment with an OpenMP simd reduction (vectorised, lane-wise partial sums);
// the CUDA kernel body is split into the two phases between barriers so the
// grid simulator can run it: per-thread partials, then a shared-memory tree.
#pragma once

#include "lincomb.h"

namespace fk {

// d loss / d (row r's sum of squares): the loss's gradient (one value, or
// one per row for reduction 'none'; a null `grad` reads 1) times the
// reduction's scale (1 / (B n) for 'mean', 1 / n for 'none', 1 for 'sum'; n
// the elements of a row) times the row's weight, in double, rounded once to
// the accumulation type. twice(r), 2 at(r), is what the residual's row is
// scaled by to give d loss / d (the residual's inputs): LossBwdFn's g
// (training.h) and RowStore's.
struct LossRowGrad {
  Reals grad, weight;
  double scale;
  template <class A> FK_HD A at(i64 r) const {
    return A(grad.at(r) * scale * weight.at(r));
  }
  template <class A> FK_HD A twice(i64 r) const { return A(2) * at<A>(r); }
};

// What a fused loss forward also stores (STORE): at each element, the
// residual's row scaled by grad.twice(r) applied to the inputs -- the
// gradient of the weighted, reduced sum of squares for a loss gradient of 1
// (`grad` holds no gradient: it reads 1). That is LossBwdFn's g and matrix
// for grad = 1, so the stored value is fm_loss_backward's g_pred for grad = 1
// bit for bit. `p` is laid out as the inputs, (rows, inner).
template <class T> struct RowStore {
  T* p = nullptr;
  LossRowGrad grad{};
};

// The one-output row M with its entries times c.
template <class M, class A> FK_HD M scaled_row(M row, A c) {
FK_UNROLL
  for (auto& v : row.m[0]) v = c * v;
  return row;
}

// Rows shorter than this take a plain loop (SIMD = false): the vector
// reduction's set-up costs more than such a row (fm_loss on (32768, 2),
// 1 thread: most of the loss's time); from 32 elements on it pays (measured).
constexpr i64 kShortRowSum = 24;

// SIMD = false: the plain loop, for rows shorter than kShortRowSum.
template <class T, class Fn, bool STORE = false, bool SIMD = true>
inline acc_t<T> rowsum_segment(const Fn& fn, i64 r, i64 inner, i64 e0, i64 e1,
                               Ptrs<T, Fn::NI> in, RowStore<T> st = {}) {
  static_assert(Fn::NO == 1, "rowsum reduces a single output");
  using A = acc_t<T>;
  const auto M = fn.row(r);
  const T* p[Fn::NI];
  for (int j = 0; j < Fn::NI; ++j) p[j] = in.p[j] + r * inner;
  T* g = STORE ? st.p + r * inner : nullptr;
  const auto Mg = STORE ? scaled_row(M, st.grad.template twice<A>(r)) : M;
  A s = A(0);
  const auto element = [&](i64 e) {
    A x[Fn::NI], y[1];
    for (int j = 0; j < Fn::NI; ++j) x[j] = load(p[j], e);
    apply<Fn>(M, x, y);
    if constexpr (STORE) {
      A yg[1];
      apply<Fn>(Mg, x, yg);
      store(g, e, yg[0]);
    }
    return y[0] * y[0];
  };
  if constexpr (SIMD) {
    // An OpenMP simd reduction lets g++ keep one partial sum per vector lane
    // (reassociation it may not do on its own without -ffast-math): packed
    // loads, multiplies and adds, and a lane-wise, pairwise-like error.
#pragma omp simd reduction(+ : s)
    for (i64 e = e0; e < e1; ++e) s += element(e);
  } else {
    for (i64 e = e0; e < e1; ++e) s += element(e);
  }
  return s;
}

// Phase 1 of the CUDA row-sum kernel: block `blk` covers elements
// [chunk*chunk_len, (chunk+1)*chunk_len) of row blk / nchunks; thread `tid`
// of `nthr` sums its strided elements. Returns the thread's partial.
template <class T, class Fn, bool STORE = false>
FK_HD acc_t<T> rowsum_thread(const Fn& fn, i64 blk, int tid, int nthr, i64 inner,
                             i64 nchunks, i64 chunk_len, Ptrs<T, Fn::NI> in,
                             RowStore<T> st = {}) {
  using A = acc_t<T>;
  const i64 r = blk / nchunks;
  const i64 chunk = blk - r * nchunks;
  const i64 e0 = chunk * chunk_len;
  i64 e1 = e0 + chunk_len;
  if (e1 > inner) e1 = inner;
  const A c = STORE ? st.grad.template twice<A>(r) : A(0);  // first: ptxas spills when later
  const auto M = fn.row(r);
  const auto Mg = STORE ? scaled_row(M, c) : M;
  const i64 base = r * inner;
  A s = A(0);
  for (i64 e = e0 + tid; e < e1; e += nthr) {
    A x[Fn::NI], y[1];
FK_UNROLL
    for (int j = 0; j < Fn::NI; ++j) x[j] = load(in.p[j], base + e);
    apply<Fn>(M, x, y);
    s += y[0] * y[0];
    if (STORE) {
      A yg[1];
      apply<Fn>(Mg, x, yg);
      store(st.p, base + e, yg[0]);
    }
  }
  return s;
}

// Phase 2, one step of the tree (all threads tid < stride, then a barrier).
template <class A> FK_HD void tree_step(A* smem, int tid, int stride) {
  if (tid < stride) smem[tid] += smem[tid + stride];
}

// The loss from the row sums' (rows, nchunks) partials: row r's sum (its
// chunks in order, in double) times its weight; per_row (reduction 'none')
// stores each row's / denom, otherwise the rows' total / denom goes to out[0].
// The CPU op runs it as one thread; the CUDA glue as one block after the
// row-sum kernel (rowsum_kernel.cuh), so a loss is two launches and no torch
// op.
template <class T> struct LossFinish {
  const acc_t<T>* partial;
  i64 rows, nchunks;
  Reals weight;
  bool per_row;
  double denom;
  T* out;
};

// Phase 1 of the finishing block: thread tid of nthr takes rows tid, tid +
// nthr, ...; returns its part of the total (0 when per_row). Phase 2 is
// tree_step on doubles, then finish_total by thread 0.
template <class T> FK_HD double finish_thread(const LossFinish<T>& f, int tid, int nthr) {
  double total = 0;
  for (i64 r = tid; r < f.rows; r += nthr) {
    double s = 0;
    for (i64 k = 0; k < f.nchunks; ++k) s += double(f.partial[r * f.nchunks + k]);
    s *= f.weight.at(r);
    if (f.per_row) store(f.out, r, acc_t<T>(s / f.denom));
    else total += s;
  }
  return total;
}

template <class T> FK_HD void finish_total(const LossFinish<T>& f, double total) {
  if (!f.per_row) store(f.out, 0, acc_t<T>(total / f.denom));
}

}  // namespace fk
