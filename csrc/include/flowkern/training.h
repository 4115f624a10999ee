// Row functors of the training op family (docs/design.md §4 "Training"), for the
// lincomb engine (lincomb.h) and the row-reduction engine (rowsum.h).
// Inputs and outputs are listed in the order the kernels pass pointers;
// `coef` says where a row's schedule values come from (schedules.h SchedSrc).
#pragma once

#include "coeffs.h"
#include "lincomb.h"
#include "rowsum.h"
#include "schedules.h"

namespace fk {

// interpolate: in (x0, x1) -> out (x_t, y); x_t = a x1 + s x0, y = target.
template <class A> struct InterpolateFn {
  static constexpr int NI = 2, NO = 2;
  SchedSrc<A> coef; int target;
  bool uniform() const { return coef.uniform(); }  // lincomb.h uniform_rows
  FK_HD Mat<A, 2, 2> row(i64 r) const {
    const Sched<A> s = coef.at(r);
    const Lin2<A> y = target_coeffs(target, s);
    return {{{s.sigma, s.alpha}, {y.b, y.a}}};
  }
};

// Its vector-Jacobian product: in (g_xt, g_y) -> out (g_x0, g_x1).
template <class A> struct InterpolateBwdFn {
  static constexpr int NI = 2, NO = 2;
  SchedSrc<A> coef; int target;
  bool uniform() const { return coef.uniform(); }  // lincomb.h uniform_rows
  FK_HD Mat<A, 2, 2> row(i64 r) const {
    const Sched<A> s = coef.at(r);
    const Lin2<A> y = target_coeffs(target, s);
    return {{{s.sigma, y.b}, {s.alpha, y.a}}};
  }
};

// convert: in (x, pred) -> out (pred as dst).
template <class A> struct ConvertFn {
  static constexpr int NI = 2, NO = 1;
  SchedSrc<A> coef; int src, dst;
  bool uniform() const { return coef.uniform(); }  // lincomb.h uniform_rows
  FK_HD Mat<A, 1, 2> row(i64 r) const {
    const Lin2<A> c = convert_coeffs(src, dst, coef.at(r));
    return {{{c.a, c.b}}};
  }
};

// Its vector-Jacobian product: in (g) -> out (g_x, g_pred).
template <class A> struct ConvertBwdFn {
  static constexpr int NI = 1, NO = 2;
  SchedSrc<A> coef; int src, dst;
  bool uniform() const { return coef.uniform(); }  // lincomb.h uniform_rows
  FK_HD Mat<A, 2, 1> row(i64 r) const {
    const Lin2<A> c = convert_coeffs(src, dst, coef.at(r));
    return {{{c.a}, {c.b}}};
  }
};

// flow_matching_loss residual: in (pred, x0, x1) -> pred - y. The loss kernel
// sums its square over each row; y is never stored.
template <class A> struct LossResidualFn {
  static constexpr int NI = 3, NO = 1;
  SchedSrc<A> coef; int target;
  FK_HD Mat<A, 1, 3> row(i64 r) const {
    const Lin2<A> y = target_coeffs(target, coef.at(r));
    return {{{A(1), -y.b, -y.a}}};
  }
};

// d(row loss)/d(pred, x0, x1) scaled by the row's g = grad.at(r) (LossRowGrad,
// rowsum.h): with rho = pred - a x1 - b x0, g_pred = 2 g rho, g_x0 = -b g_pred,
// g_x1 = -a g_pred; in (pred, x0, x1) -> out (g_pred, g_x0, g_x1), or with
// NO = 1 g_pred alone (x0 and x1 are noise and data: the usual backward
// writes one tensor instead of three).
template <class A, int NOUT = 3> struct LossBwdFn {
  static_assert(NOUT == 1 || NOUT == 3, "g_pred alone, or all three gradients");
  static constexpr int NI = 3, NO = NOUT;
  SchedSrc<A> coef; LossRowGrad grad; int target;
  FK_HD Mat<A, NO, 3> row(i64 r) const {
    const Lin2<A> y = target_coeffs(target, coef.at(r));
    const A g = grad.template twice<A>(r);  // 2 g
    const A p[3] = {A(1), -y.b, -y.a};  // d rho / d(pred, x0, x1)
    Mat<A, NO, 3> M;
    for (int k = 0; k < NO; ++k)
      for (int j = 0; j < 3; ++j) M.m[k][j] = g * p[k] * p[j];
    return M;
  }
};

}  // namespace fk
