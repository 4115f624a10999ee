// Per-sample coefficient math (docs/design.md §1, §3): every training target and
// every prediction conversion is affine in two per-sample vectors, so a
// kernel loads the schedule coefficients of a row once and applies a 2-term
// affine map to each element. The Triton kernels mirror these functions in
// flowkern/triton/coeffs.py; the reference is flowkern/reference/coeffs.py.
#pragma once

#include "hd.h"

namespace fk {

// Must match flowkern/_rules.py.
enum Pred : int { VELOCITY = 0, X1 = 1, EPS = 2, SCORE = 3 };

// Schedule values at one sample's time: x_t = alpha*x1 + sigma*x0,
// u_t = d_alpha*x1 + d_sigma*x0. Kernels receive them as a (B, 4) row-major
// tensor in this order.
template <class A> struct Sched { A alpha, sigma, d_alpha, d_sigma; };

template <class A> FK_HD Sched<A> load_sched(const A* coef, i64 row) {
  const A* c = coef + row * 4;
  return Sched<A>{c[0], c[1], c[2], c[3]};
}

// y = a*x1 + b*x0, the two coefficients of a linear combination.
template <class A> struct Lin2 { A a, b; };

// Training target y = c_x1*x1 + c_x0*x0 for a prediction type (docs/design.md §4):
// velocity u_t; x1; eps = x0; score = -x0/sigma (Gaussian noise only).
template <class A> FK_HD Lin2<A> target_coeffs(int target, Sched<A> s) {
  switch (target) {
    case VELOCITY: return {s.d_alpha, s.d_sigma};
    case X1: return {A(1), A(0)};
    case EPS: return {A(0), A(1)};
    default: return {A(0), A(-1) / s.sigma};
  }
}

// Direct formulas between velocity, x1 and eps (docs/design.md §3): dst = c_x*x +
// c_p*pred. Each pair uses its own formula, not a composition through x1, so
// that no division appears that the pair does not need (velocity -> eps stays
// finite at sigma = 0, for example). Lin2.a multiplies x, Lin2.b the prediction.
template <class A> FK_HD Lin2<A> convert_coeffs_direct(int src, int dst, Sched<A> s) {
  const A al = s.alpha, sg = s.sigma, da = s.d_alpha, ds = s.d_sigma;
  if (src == dst) return {A(0), A(1)};
  switch (src) {
    case X1:  // d
      if (dst == EPS) return {A(1) / sg, -al / sg};
      return {ds / sg, da - al * ds / sg};                  // velocity
    case EPS:  // eps
      if (dst == X1) return {A(1) / al, -sg / al};
      return {da / al, ds - sg * da / al};                  // velocity
    default: {  // velocity, det = alpha*d_sigma - sigma*d_alpha
      const A det = al * ds - sg * da;
      if (dst == X1) return {ds / det, -sg / det};
      return {-da / det, al / det};                         // eps
    }
  }
}

// A prediction of type `src` at state x rewritten as type `dst`, any pair.
// A score is eps in disguise (score = -eps/sigma), so score pairs wrap the
// direct eps formulas. Not recursive: nvcc cannot inline a recursive
// function, and the call cost a stack frame with spills in every kernel.
template <class A> FK_HD Lin2<A> convert_coeffs(int src, int dst, Sched<A> s) {
  if (src == dst) return {A(0), A(1)};
  if (src == SCORE) {
    // eps = -sigma*score, then eps -> dst (dst != SCORE here).
    const Lin2<A> e = convert_coeffs_direct<A>(EPS, dst, s);
    return {e.a, -s.sigma * e.b};
  }
  if (dst == SCORE) {
    // score = -eps/sigma with eps from src.
    const Lin2<A> e = convert_coeffs_direct<A>(src, EPS, s);
    return {-e.a / s.sigma, -e.b / s.sigma};
  }
  return convert_coeffs_direct<A>(src, dst, s);
}

}  // namespace fk
