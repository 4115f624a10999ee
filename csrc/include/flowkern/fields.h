// Empirical fields over a reference batch (docs/design.md §4 "Empirical fields"):
// the score functions of the Poisson field (PFGM / PFGM++), the Gaussian
// empirical denoiser and the uniform-box denoiser, and the online-softmax
// state they share. Torch-free; shared by the CPU kernel (csrc/cpu/fields.cpp),
// the CUDA kernel (csrc/cuda/fields.cu, body in fields_block.h) and its grid
// simulator (csrc/cpu/cuda_sim_fields.cpp). flowkern/triton/fields.py mirrors
// these formulas; flowkern/reference/fields.py is the ground truth.
//
// For query i and reference j every kind reduces the feature differences
// d_k = x_ik - a_i y_jk to a scalar `red` (a sum of squares, or a maximum
// box violation), turns it into a KEY, and the logit is a decreasing
// function of the key:
//
//   kind      per-query row (qp)  red                      key                logit(key)
//   POISSON   r                   sum d^2 (a = 1)          max(red + r^2, tiny) -(N+D)/2 log(key)
//   GAUSSIAN  alpha, sigma        sum d^2 (a = alpha)      red                -key / (2 sigma^2)
//   UNIFORM   alpha, sigma        max_k max(lo' - d, d - hi')  red            0 if key <= 0, else
//                                 with lo' = sigma lo, hi' = sigma hi            "-inf" (see below)
//
// The online state of a query is (kb, l, acc): kb = the smallest key seen
// (the largest logit), l = sum_j w(k_j, kb), acc = sum_j w(k_j, kb) y_j, with
// w(k, kb) = exp(logit(k) - logit(kb)) evaluated from the keys directly:
//   POISSON   (kb / k)^c = exp(c log(kb / k))   -- a ratio, not a difference of
//             two logits of size ~c |log k| each (fp32 would lose ~c |log k| ulp)
//   GAUSSIAN  exp(-(k - kb) / (2 sigma^2)), and 1 when k == kb (sigma = 0 gives
//             the nearest reference, the limit, instead of inf * 0)
//   UNIFORM   1 if max(k, 0) == max(kb, 0) else 0: equal weights over the
//             references inside the box; when none is inside, the reference(s)
//             with the smallest violation (documented fallback).
// w is multiplicative, w(k, kb') = w(k, kb) w(kb, kb'), so states merge:
// tiles of one query, R-splits across threads and shards across ranks.
//
// Degenerate inputs stay finite: a query equal to a reference with r = 0 has
// key = tiny (the smallest normal number) instead of 0, so its logit is the
// largest finite one and it takes (almost) all the weight, the limit; and the
// weight of the best reference is exactly 1, so l >= 1 and nothing underflows
// to 0/0.
#pragma once

#include <float.h>
#include <math.h>

#include "hd.h"

namespace fk {

// Must match flowkern/ops/fields.py.
enum FieldKind : int { FIELD_POISSON = 0, FIELD_GAUSSIAN = 1, FIELD_UNIFORM = 2 };

template <class A> struct FieldLimits;
template <> struct FieldLimits<float> {
  static FK_HD float tiny() { return FLT_MIN; }
  static FK_HD float inf() { return __builtin_huge_valf(); }
};
template <> struct FieldLimits<double> {
  static FK_HD double tiny() { return DBL_MIN; }
  static FK_HD double inf() { return __builtin_huge_val(); }
};

FK_HD float fk_log(float v) { return logf(v); }
FK_HD double fk_log(double v) { return log(v); }
FK_HD float fk_exp(float v) { return expf(v); }
FK_HD double fk_exp(double v) { return exp(v); }
FK_HD float fk_fma(float a, float b, float c) { return fmaf(a, b, c); }
FK_HD double fk_fma(double a, double b, double c) { return fma(a, b, c); }
template <class A> FK_HD A fk_max(A a, A b) { return a > b ? a : b; }
template <class A> FK_HD A fk_min(A a, A b) { return a < b ? a : b; }

// Per-query parameters of a score: qp is a (B, 2) row-major table in the
// accumulation dtype, p0/p1 are per-call scalars.
//   POISSON: qp = (r, unused), p0 = c = (N + D)/2.
//   GAUSSIAN: qp = (alpha, sigma).
//   UNIFORM: qp = (alpha, sigma), p0 = lo, p1 = hi.
template <class A> struct PoissonScore {
  static constexpr bool kSumSq = true, kUnitAlpha = true;
  A r2, c;
  static FK_HD PoissonScore make(const A* qp, i64 i, A p0, A) {
    const A r = qp[2 * i];
    return {r * r, p0};
  }
  FK_HD A alpha() const { return A(1); }
  FK_HD A lo() const { return A(0); }
  FK_HD A hi() const { return A(0); }
  // Lifts 0 (a query on a reference, r = 0) to tiny; a NaN stays a NaN.
  FK_HD A key(A red) const {
    const A s = red + r2;
    return s < FieldLimits<A>::tiny() ? FieldLimits<A>::tiny() : s;
  }
  // k >= kb >= tiny. kb = inf (no reference yet) gives log(0) = -inf -> 0.
  FK_HD A weight(A k, A kb) const { return k == kb ? A(1) : fk_exp(c * fk_log(kb / k)); }
};

template <class A> struct GaussianScore {
  static constexpr bool kSumSq = true, kUnitAlpha = false;
  A a, inv;  // inv = 1/(2 sigma^2); +inf at sigma = 0
  static FK_HD GaussianScore make(const A* qp, i64 i, A, A) {
    const A s = qp[2 * i + 1];
    return {qp[2 * i], A(1) / (A(2) * s * s)};
  }
  FK_HD A alpha() const { return a; }
  FK_HD A lo() const { return A(0); }
  FK_HD A hi() const { return A(0); }
  FK_HD A key(A red) const { return red; }
  FK_HD A weight(A k, A kb) const { return k > kb ? fk_exp(-(k - kb) * inv) : A(1); }
};

template <class A> struct UniformScore {
  static constexpr bool kSumSq = false, kUnitAlpha = false;
  A a, l, h;  // the box scaled by sigma: x - a y must lie in [l, h] elementwise
  static FK_HD UniformScore make(const A* qp, i64 i, A p0, A p1) {
    const A s = qp[2 * i + 1];
    return {qp[2 * i], s * p0, s * p1};
  }
  FK_HD A alpha() const { return a; }
  FK_HD A lo() const { return l; }
  FK_HD A hi() const { return h; }
  FK_HD A key(A red) const { return red; }
  FK_HD A weight(A k, A kb) const { return fk_max(k, A(0)) <= fk_max(kb, A(0)) ? A(1) : A(0); }
};

// One feature of the reduction: sum of squares (POISSON, GAUSSIAN) or box
// violation max (UNIFORM). d = x - a y with one rounding (fma).
template <class S, class A> FK_HD A red_init() {
  return S::kSumSq ? A(0) : -FieldLimits<A>::inf();
}
template <class S, class A> FK_HD A red_step(const S& s, A acc, A x, A y) {
  const A d = fk_fma(-s.alpha(), y, x);
  if (S::kSumSq) return fk_fma(d, d, acc);
  return fk_max(acc, fk_max(s.lo() - d, d - s.hi()));
}
template <class S, class A> FK_HD A red_combine(A a, A b) {
  return S::kSumSq ? a + b : fk_max(a, b);
}

// The online state of one query.
template <class A> struct FieldState {
  A kb, l;
  FK_HD static FieldState empty() { return {FieldLimits<A>::inf(), A(0)}; }
};

// Lowers kb to include a tile whose smallest key is `tile_kb`; returns the
// factor by which l and acc must be multiplied (0 when the state was empty).
template <class S, class A> FK_HD A field_rebase(const S& s, FieldState<A>& st, A tile_kb) {
  const A nb = tile_kb < st.kb ? tile_kb : st.kb;
  const A f = s.weight(st.kb, nb);
  st.kb = nb;
  st.l *= f;
  return f;
}

// Merging two partial states (a, b) of one query: the new kb and the factors
// of a's and b's (l, acc).
template <class S, class A> struct MergeFactors { A kb, fa, fb; };
template <class S, class A> FK_HD MergeFactors<S, A> field_merge(const S& s, A kb_a, A kb_b) {
  const A nb = kb_a < kb_b ? kb_a : kb_b;
  return {nb, s.weight(kb_a, nb), s.weight(kb_b, nb)};
}

// Merging n partial states of one query (keys kb[k * stride], sums
// l[k * stride]; the CPU kernel's and the CUDA kernel's reference-range
// splits): writes the factor of state k's (l, acc) to f[k] and the merged key
// to *kb_out; returns the merged sum l.
template <class S, class A>
FK_HD A field_merge_states(const S& s, const A* kb, const A* l, i64 stride, int n, A* f,
                           A* kb_out) {
  A best = kb[0];
  for (int k = 1; k < n; ++k) best = kb[k * stride] < best ? kb[k * stride] : best;
  A lsum = A(0);
  for (int k = 0; k < n; ++k) {
    f[k] = s.weight(kb[k * stride], best);
    lsum += f[k] * l[k * stride];
  }
  *kb_out = best;
  return lsum;
}

// One element of the merged accumulator: sum_k f[k] acc[k * stride].
template <class A> FK_HD A field_merge_sum(const A* f, const A* acc, i64 stride, int n) {
  A v = A(0);
  for (int k = 0; k < n; ++k) v += f[k] * acc[k * stride];
  return v;
}

}  // namespace fk
