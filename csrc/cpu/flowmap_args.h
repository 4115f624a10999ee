// The rules of the flow-map ops (flowkern::flowmap_loss and its backward),
// shared by the CPU ops (flowmap.cpp) and the CUDA glue (csrc/cuda/glue.h):
// the tensors' checks with the messages of flowkern/ops/flowmap.py, the
// coefficients at t and s on the host, and their value checks.
//
// Coefficient arguments, in both schemas: `Tensor? t, float t_value, Tensor?
// s, float s_value, int kind, float[] params` -- each time a (B,), (1,) or ()
// tensor or, absent, the float; a built-in schedule (kind, params) evaluated
// at both (coef_args.h); or kind = kTableKind and a step table in `t` (the
// public `table=`, flowkern.step_table: a custom schedule's, or the caller's).
#pragma once

#include <array>
#include <vector>

#include "args.h"
#include "coef_args.h"
#include "coef_checks.h"
#include "dispatch.h"
#include "step_args.h"
#include "flowkern/flowmap.h"

namespace flowkern_cpu {

#define FK_MAP_ARGS                                                                     \
  const OptT &t, double t_value, const OptT &s, double s_value, int64_t kind, \
      const std::vector<double>&params
#define FK_MAP_PASS t, t_value, s, s_value, kind, params

// x a floating batch; pred (the model's output at x) of x's shape, dtype and
// device; target of x's dtype and device, broadcasting to x's shape. Returns
// the three dense, target expanded to x's shape.
inline std::array<Tensor, 3> map_inputs(const Tensor& x, const Tensor& pred,
                                        const Tensor& target) {
  check_batch("x", x);
  check_batch("pred", pred);
  check_batch("target", target);
  const Meta mx = meta_of(x), mp = meta_of(pred), mt = meta_of(target);
  check_like_x("pred", mp, mx);
  FK_CHECK_VALUE(mt.same_place(mx), "target: must match x in dtype and device; got ",
                 py_dtype(target.scalar_type()), " ", py_device(target.device()), ", x is ",
                 py_dtype(x.scalar_type()), " ", py_device(x.device()));
  bool fits = mt.sizes.size() <= mx.sizes.size();
  for (size_t i = 1; fits && i <= mt.sizes.size(); ++i) {
    const int64_t d = mt.sizes[mt.sizes.size() - i];
    fits = d == 1 || d == mx.sizes[mx.sizes.size() - i];
  }
  FK_CHECK_VALUE(fits, "target: shape ", py_shape(mt.sizes), " does not broadcast to x's ",
                 py_shape(mx.sizes));
  return {contig(x), contig(pred), dense(target, mx.sizes)};
}

// A caller's step table (`t` with kind = kTableKind), which must be given.
inline const OptT& map_table_arg(const OptT& t) {
  FK_CHECK(t.has_value(), "table: the step table is missing");
  return t;
}

// That table with its shape checked, converted to the accumulation dtype on
// x's device where it is not (step_args.h step_coef).
template <class A> StepCoef<A> map_table(const OptT& t, const Tensor& x) {
  return step_coef<A>(map_table_arg(t), {}, {}, {}, {}, kTableKind, {}, x, false);
}

// The flow map's coefficients on the host (step_args.h step_coef): the
// caller's step table; or the built-in schedule at the times t and s (each
// one, or one per row; read and shape-checked by coef_args.h read_times,
// range-checked when `check`): one row built here when both are floats, else
// evaluated at each row where it is read.
template <class A> StepCoef<A> map_coef(FK_MAP_ARGS, const Tensor& x, bool check) {
  check_schedule(kind, params);
  if (kind == kTableKind) return map_table<A>(t, x);
  return step_coef<A>(std::nullopt, t, s, std::nullopt, {t_value, s_value, NAN, 0.0}, kind,
                      params, x, check);
}

// The flow map kernels' view of those rows (fk::MapSrc): a table, or the
// schedule at each row's two times.
template <class A> fk::MapSrc<A> map_src_of(const StepCoef<A>& c) {
  if (c.src.table != nullptr) return fk::step_table_src(c.src.table, c.n == 1 ? 0 : 1);
  fk::MapSrc<A> m;
  m.t = c.src.t;
  m.s = c.src.s;
  m.kind = c.src.kind;
  for (int i = 0; i < fk::kSchedParams; ++i) m.p[i] = c.src.p[i];
  return m;
}

// The flow map's value checks, at t (flowkern/ops/flowmap.py): the division
// of its form (sigma_t in the data form, alpha_t in the noise form), then
// the conversion of the prediction to what that form reads (x1, eps). On a
// caller's step table, or on the schedule's rows at t.
inline const char* map_form_divides(int64_t form) {
  return form == fk::EI_DATA ? "the data form divides by it" : "the noise form divides by it";
}

template <class A> void check_map(const StepCoef<A>& c, int64_t prediction, int64_t form) {
  if (form == fk::EI_DATA) check_sigma_t(c, map_form_divides(form));
  else check_alpha_t(c, map_form_divides(form));
  check_conversion(c, prediction, form == fk::EI_DATA ? fk::X1 : fk::EPS);
}

template <class A> void check_map(const HostCoef<A>& c, int64_t prediction, int64_t form) {
  if (form == fk::EI_DATA)
    check_nonzero(c, "t", "sigma_t", map_form_divides(form),
                  [](fk::Sched<A> r) { return r.sigma; });
  else
    check_nonzero(c, "t", "alpha_t", map_form_divides(form),
                  [](fk::Sched<A> r) { return r.alpha; });
  check_convert(c, prediction, form == fk::EI_DATA ? fk::X1 : fk::EPS);
}

// The codes both ops take.
inline void check_map_codes(int64_t prediction, int64_t form, int64_t reduction) {
  check_code("prediction", prediction, kPreds);
  check_form(form);
  check_reduction(reduction);
}

}  // namespace flowkern_cpu
