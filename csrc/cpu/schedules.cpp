// flowkern::schedule_table: the (rows, 4) coefficient table of a built-in
// schedule (csrc/include/flowkern/schedules.h) from a CPU time tensor, with
// the [0, 1] range check folded into the same loop. It replaces a dozen small
// torch ops and a host round trip of the Python path (flowkern.schedules.
// coefficients), ~60 us of every training-op call.

#include <cmath>

#include "flowkern/schedules.h"
#include "tensor.h"

namespace flowkern_cpu {
namespace {

template <class S, class D>
void fill(const S* t, int64_t nt, int64_t rows, int64_t kind, const double* p, D* out,
          double& lo, double& hi, bool& nan) {
  fk::with_sched_kind(int(kind), [&](auto k) {  // the kind's switch out of the loop
    for (int64_t i = 0; i < nt; ++i) {
      const double ti = double(t[i]);
      nan |= std::isnan(ti);
      lo = ti < lo ? ti : lo;
      hi = ti > hi ? ti : hi;
      const auto c = fk::schedule_of<decltype(k)::value>(p, ti);
      D* o = out + 4 * i;
      o[0] = D(c.alpha), o[1] = D(c.sigma), o[2] = D(c.d_alpha), o[3] = D(c.d_sigma);
    }
  });
  for (int64_t i = nt; i < rows; ++i)  // a single time broadcast to every row
    for (int k = 0; k < 4; ++k) out[4 * i + k] = out[k];
}

// t: (1,) or (rows,), float32 or float64. dtype: the table's (float32 or
// float64). check: the argument's name to report times outside [0, 1] (or
// NaN) under, or "" for no check.
Tensor schedule_table(const Tensor& t_, int64_t kind, const std::vector<double>& params,
                      int64_t rows, ScalarType dtype, const std::string& check) {
  FK_CHECK(kind >= fk::LINEAR && kind <= fk::EDM, "schedule_table: unknown kind ", kind);
  FK_CHECK(params.size() <= size_t(fk::kSchedParams), "schedule_table: too many params");
  FK_CHECK(dtype == kFloat || dtype == kDouble,
           "schedule_table: dtype must be float32 or float64");
  const auto t = contig(t_);
  FK_CHECK(t.dim() == 1 && (t.size(0) == rows || t.size(0) == 1) && rows >= 0,
           "schedule_table: t must have shape (1,) or (rows,)");
  FK_CHECK(t.scalar_type() == kFloat || t.scalar_type() == kDouble,
           "schedule_table: t must be float32 or float64");
  double p[fk::kSchedParams] = {0, 0, 0};
  for (size_t i = 0; i < params.size(); ++i) p[i] = params[i];
  auto out = empty({rows, 4}, dtype, t.device());
  const int64_t nt = rows == 0 ? 0 : t.size(0);
  double lo = INFINITY, hi = -INFINITY;
  bool nan = false;
  const auto go = [&](auto* tp) {
    if (dtype == kFloat)
      fill(tp, nt, rows, kind, p, static_cast<float*>(out.mutable_data_ptr()), lo, hi, nan);
    else
      fill(tp, nt, rows, kind, p, static_cast<double*>(out.mutable_data_ptr()), lo, hi, nan);
  };
  if (t.scalar_type() == kFloat)
    go(static_cast<const float*>(t.const_data_ptr()));
  else
    go(static_cast<const double*>(t.const_data_ptr()));
  if (nan) lo = hi = NAN;  // torch.aminmax propagates NaN
  // The message of flowkern._validate.check_unit_interval, word for word.
  FK_CHECK_VALUE(check.empty() || nt == 0 || (!nan && lo >= 0 && hi <= 1), check,
                 ": times must lie in [0, 1] (0 = noise, 1 = data); got values in [", lo,
                 ", ", hi, "]");
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def("schedule_table(Tensor t, int kind, float[] params, int rows, ScalarType dtype, "
        "str check) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("schedule_table", TORCH_BOX(&schedule_table)); }

}  // namespace flowkern_cpu
