// Row functors of the flow-map op family: the squared error of the
// exponential-integrator map against a target, for the row-reduction engine
// (rowsum.h) and its vector-Jacobian product for the lincomb engine.
//
// The map is steps.h's EI step, x_s = a x + b p with (a, b) = ei_coeffs(...):
// in the data form with an x1-prediction p = d̄(t, s, x) it is the one-step
// flow map g(t, s, x) = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄.
// flowmap_loss sums rho^2 over each row with rho = a x + b p - target, so
// g(t, s, x) is never stored; it serves the flow map's semigroup loss
// (target = the stop-gradient two-jump map) and k-step distillation (the last
// Euler = EI step of a rectified flow against the data x1). Coefficients are
// the step table of steps.h (one row per sample, or one shared row).
#pragma once

#include "steps.h"

namespace fk {

// Residual: in (x, p, target) -> a x + b p - target.
template <class A> struct FlowMapResidualFn {
  static constexpr int NI = 3, NO = 1;
  const A* coef; i64 stride; int pred; int form;
  FK_HD Mat<A, 1, 3> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(pred, form, load_step(coef, stride, r));
    return {{{e.a, e.b, A(-1)}}};
  }
};

// d(row loss)/d(p[, x][, target]) scaled by the incoming per-row gradient g:
// with q = d rho / d(x, p, target) = (a, b, -1): g_p = 2 g b rho, g_x = 2 g a rho,
// g_target = -2 g rho; rho = q . (x, p, target) is recomputed in registers.
// In (x, p, target) -> (g_p[, g_x][, g_target]); GX / GT select the optional outputs.
template <class A, bool GX, bool GT> struct FlowMapBwdFn {
  static constexpr int NI = 3, NO = 1 + int(GX) + int(GT);
  const A* coef; i64 stride; int pred; int form; const A* grad_rows;
  FK_HD Mat<A, NO, 3> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(pred, form, load_step(coef, stride, r));
    const A g = A(2) * grad_rows[r];
    const A q[3] = {e.a, e.b, A(-1)};
    A c[3] = {e.b, e.a, A(-1)};  // d rho / d(p, x, target), in output order
    if (!GX) c[1] = A(-1);       // without g_x the second output is g_target
    Mat<A, NO, 3> M{};
    for (int k = 0; k < NO; ++k)
      for (int j = 0; j < 3; ++j) M.m[k][j] = g * c[k] * q[j];
    return M;
  }
};

// Returns f(fn) for the backward functor with the requested optional outputs
// (the run-time flags select FlowMapBwdFn's GX / GT). Host-only: the CPU
// kernel, the CUDA launcher and its grid simulator build the same functor.
template <class A, class F>
decltype(auto) with_flowmap_bwd_fn(const A* coef, i64 stride, int pred, int form,
                                   const A* grad_rows, bool grad_x, bool grad_target, F&& f) {
  if (grad_x && grad_target)
    return f(FlowMapBwdFn<A, true, true>{coef, stride, pred, form, grad_rows});
  if (grad_x) return f(FlowMapBwdFn<A, true, false>{coef, stride, pred, form, grad_rows});
  if (grad_target) return f(FlowMapBwdFn<A, false, true>{coef, stride, pred, form, grad_rows});
  return f(FlowMapBwdFn<A, false, false>{coef, stride, pred, form, grad_rows});
}

}  // namespace fk
