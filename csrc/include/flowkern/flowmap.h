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
// Euler = EI step of a rectified flow against the data x1). The loss's
// weight and reduction are rowsum.h's (LossFinish forward, LossRowGrad
// backward), as flow_matching_loss's.
#pragma once

#include "rowsum.h"
#include "schedules.h"
#include "steps.h"

namespace fk {

// Where a flow-map kernel reads a row's coefficients at t and at s: a step
// table (row r at table + r * stride; stride 0 when one row serves the
// batch), or the built-in schedule (kind, p; schedules.h) evaluated here in
// double at the row's two times. One branch for the two times, each a
// pointer or a value: a SchedSrc (three sources) for each of t and s made
// ptxas spill in the backward's widest kernel (bf16, 8 a thread, sm_80).
template <class A> struct MapSrc {
  const A* table = nullptr;
  i64 stride = 0;
  TimeSrc t, s;
  int kind = 0;
  double p[kSchedParams] = {0, 0, 0};
  FK_HD StepRow<A> at(i64 r) const {
    if (table != nullptr) return load_step(table, stride, r);
    const Sched<double> a = schedule_at(kind, p, t.at(r)), b = schedule_at(kind, p, s.at(r));
    return {{A(a.alpha), A(a.sigma), A(a.d_alpha), A(a.d_sigma)},
            {A(b.alpha), A(b.sigma), A(b.d_alpha), A(b.d_sigma)}, A(1), A(1), A(0), A(0)};
  }
};

// A step table as the map's source: row r at table + r * STEP_COLS
// (row_step 1), or one row for the batch (row_step 0).
template <class A> MapSrc<A> step_table_src(const A* table, i64 row_step) {
  MapSrc<A> m;
  m.table = table;
  m.stride = row_step * STEP_COLS;
  return m;
}

// Residual: in (x, p, target) -> a x + b p - target.
template <class A> struct FlowMapResidualFn {
  static constexpr int NI = 3, NO = 1;
  MapSrc<A> coef; int pred; int form;
  FK_HD Mat<A, 1, 3> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(pred, form, coef.at(r));
    return {{{e.a, e.b, A(-1)}}};
  }
};

// d(loss)/d(p[, x][, target]) with the row's g = grad.at(r) (LossRowGrad,
// rowsum.h: the loss's gradient, the reduction's scale and the row's
// weight): with q = d rho / d(x, p, target) = (a, b, -1), g_p = 2 g b rho,
// g_x = 2 g a rho, g_target = -2 g rho; rho = q . (x, p, target) is
// recomputed in registers. In (x, p, target) -> (g_p[, g_x][, g_target]);
// GX / GT select the optional outputs.
template <class A, bool GX, bool GT> struct FlowMapBwdFn {
  static constexpr int NI = 3, NO = 1 + int(GX) + int(GT);
  MapSrc<A> coef; int pred; int form; LossRowGrad grad;
  FK_HD Mat<A, NO, 3> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(pred, form, coef.at(r));
    const A g = grad.template twice<A>(r);
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
decltype(auto) with_flowmap_bwd_fn(const MapSrc<A>& src, int pred, int form,
                                   const LossRowGrad& grad, bool grad_x, bool grad_target,
                                   F&& f) {
  if (grad_x && grad_target) return f(FlowMapBwdFn<A, true, true>{src, pred, form, grad});
  if (grad_x) return f(FlowMapBwdFn<A, true, false>{src, pred, form, grad});
  if (grad_target) return f(FlowMapBwdFn<A, false, true>{src, pred, form, grad});
  return f(FlowMapBwdFn<A, false, false>{src, pred, form, grad});
}

}  // namespace fk
