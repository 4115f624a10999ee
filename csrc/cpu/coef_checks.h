// The rules of the training ops that the CPU ops (training.cpp) and the
// CUDA glue (csrc/glue/glue.h) share: argument codes, and the value checks
// of the divisions a target or a conversion needs, on host coefficient rows
// (coef_args.h).
#pragma once

#include <array>
#include <cmath>
#include <string>

#include "coef_args.h"
#include "dispatch.h"
#include "flowkern/coeffs.h"
#include "flowkern/rowsum.h"

namespace flowkern_cpu {

constexpr int64_t kPreds = 4;  // flowkern/_rules.py PREDICTIONS
enum Reduction : int64_t { MEAN = 0, SUM = 1, NONE = 2 };  // flowkern/_validate.py REDUCTIONS

#define FK_COEF_ARGS const OptT &t, double t_value, int64_t kind, const std::vector<double>& params
#define FK_COEF_PASS t, t_value, kind, params

// A velocity (target or conversion) reads the rates d_alpha, d_sigma: vp's
// d_sigma = -alpha d_alpha / sigma is -inf at t = 1, where the velocity is
// infinite (flowkern._validate.finite_rates).
template <class A> inline void check_rates(const HostCoef<A>& c, const char* why) {
  // one branch-free pass over the table's rate columns (rows of 4): r * 0
  // sums to NaN when some rate is infinite or NaN, else to 0
  double z = 0;
  const A* tab = c.table;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < c.n; ++i) z += double(tab[4 * i + 2]) * 0.0 + double(tab[4 * i + 3]) * 0.0;
  FK_CHECK_VALUE(z == 0, "t: d_alpha_t or d_sigma_t is not finite at some sample (vp's d_sigma "
                 "at t = 1), and ", why);
}

// The value checks of a regression target (interpolate, the loss).
template <class A> inline void check_target(const HostCoef<A>& c, int64_t target) {
  if (target == fk::SCORE)
    check_nonzero(c, "t", "sigma_t", "the score target -x0/sigma_t is undefined there",
                  [](fk::Sched<A> s) { return s.sigma; });
  if (target == fk::VELOCITY)
    check_rates(c, "the velocity target d_alpha x1 + d_sigma x0 is infinite there");
}

// The divisions each conversion needs (docs/design.md §3), for the training
// ops (check_convert) and the steps (step_args.h check_conversion), as
// flowkern/_rules.py DIVIDES lists them for the Python backends:
// [src][dst] in the order of flowkern/_rules.py (velocity, x1, eps, score).
enum : int { BY_SIGMA = 1, BY_ALPHA = 2, BY_DET = 4 };
constexpr int kDivides[4][4] = {{0, BY_DET, BY_DET, BY_DET | BY_SIGMA},
                                {BY_SIGMA, 0, BY_SIGMA, BY_SIGMA},
                                {BY_ALPHA, BY_ALPHA, 0, BY_SIGMA},
                                {BY_ALPHA, BY_ALPHA, 0, 0}};

template <class A> inline void check_convert(const HostCoef<A>& c, int64_t src, int64_t dst) {
  static const char* names[] = {"velocity", "x1", "eps", "score"};
  const int need = kDivides[src][dst];
  const std::string why =
      std::string("converting ") + names[src] + " -> " + names[dst] + " divides by it";
  // first, as flowkern/ops/training.py check_conversion: one message on every backend
  if (src != dst && (src == fk::VELOCITY || dst == fk::VELOCITY))
    check_rates(c, (std::string("converting ") + names[src] + " -> " + names[dst] +
                    " reads them").c_str());
  if (need & BY_SIGMA)
    check_nonzero(c, "t", "sigma_t", why.c_str(), [](fk::Sched<A> s) { return s.sigma; });
  if (need & BY_ALPHA)
    check_nonzero(c, "t", "alpha_t", why.c_str(), [](fk::Sched<A> s) { return s.alpha; });
  if (need & BY_DET)
    check_nonzero(c, "t", "alpha*d_sigma - sigma*d_alpha", why.c_str(),
                  [](fk::Sched<A> s) { return s.alpha * s.d_sigma - s.sigma * s.d_alpha; });
}

// A loss's reduction code (flowkern/_validate.py REDUCTIONS).
inline void check_reduction(int64_t reduction) {
  FK_CHECK_VALUE(reduction >= MEAN && reduction <= NONE,
                 "reduction: expected 'mean', 'sum' or 'none', got code ", reduction);
}

// The loss's optional per-sample weight: (rows,) or one value, real, on the
// data's device.
inline void check_weight(const Tensor& w, int64_t rows, const Tensor& like) {
  FK_CHECK_VALUE(w.device() == like.device(), "weight: on ", py_device(w.device()),
                 " but the data is on ", py_device(like.device()));
  FK_CHECK_VALUE(w.dim() <= 1 && (w.numel() == 1 || w.numel() == rows),
                 "weight: expected shape (", rows, ",) or a scalar, got ",
                 py_shape(w.sizes()));
  FK_CHECK_TYPE(!is_complex(w.scalar_type()), "weight: expected a real tensor, got ",
                py_dtype(w.scalar_type()));
}

// A weight or a loss gradient (one value, or one per row) as the fk::Reals a
// kernel reads: where it lies when its dtype is a float one (its stride is the
// step), else (an int or bool weight) converted to double into `keep` first.
inline fk::Reals reals_of(const Tensor& t, OptT& keep) {
  int code = -1;
  switch (t.scalar_type()) {
    case kFloat: code = 0; break;
    case kDouble: code = 1; break;
    case kHalf: code = 2; break;
    case kBFloat16: code = 3; break;
    default: break;
  }
  if (code < 0 || t.dim() > 1) {
    keep = contig(torch::stable::reshape(to_dtype(t, code < 0 ? kDouble : t.scalar_type()), {-1}));
    code = code < 0 ? 1 : code;
  }
  const Tensor& v = keep ? *keep : t;
  return {v.const_data_ptr(), code, v.numel() == 1 || v.dim() == 0 ? 0 : v.stride(0)};
}

// The optional per-sample weight (1 or rows values), checked, as the kernels
// read it (none: fk::Reals reads 1).
inline fk::Reals weight_of(const OptT& weight, int64_t rows, const Tensor& like, OptT& keep) {
  if (!weight.has_value()) return {};
  check_weight(*weight, rows, like);
  return reals_of(*weight, keep);
}

// What the loss divides a row's weighted sum of squares by: the elements of
// a row for reduction NONE (a per-sample mean), all elements for MEAN, 1 for
// SUM (an empty loss divides by 1).
inline double loss_denom(int64_t reduction, int64_t rows, int64_t inner) {
  return reduction == NONE ? double(std::max<int64_t>(inner, 1))
         : reduction == MEAN ? double(std::max<int64_t>(rows * inner, 1))
                             : 1.0;
}

// fm_loss_backward's `grad` (the loss's gradient: a scalar, or (B,) for
// NONE), checked, as LossRowGrad reads it.
inline fk::Reals loss_grad_of(const Tensor& grad, int64_t rows, const Tensor& pred,
                              int64_t reduction, OptT& keep, const char* op) {
  FK_CHECK(grad.device() == pred.device() &&
               (reduction == NONE ? grad.numel() == rows : grad.numel() == 1),
           op, ": grad must be a scalar, or (B,) for reduction 'none'");
  fk::Reals g = reals_of(grad, keep);
  if (reduction != NONE) g.step = 0;
  return g;
}

// What a loss's backward scales each row's gradient by (fk::LossRowGrad):
// the loss's gradient `grad`, the reduction's scale and the weight, read
// where they lie (`keep_*` hold converted copies); `like` the dense data
// (rows, inner).
inline fk::LossRowGrad loss_row_grad(const Tensor& grad, const OptT& weight, int64_t reduction,
                                     const Tensor& like, OptT& keep_w, OptT& keep_g,
                                     const char* op) {
  const int64_t rows = rows_of(like), inner = inner_of(like);
  const fk::Reals w = weight_of(weight, rows, like, keep_w);
  return {loss_grad_of(grad, rows, like, reduction, keep_g, op), w,
          1.0 / loss_denom(reduction, rows, inner)};
}

// Dense (pred, x0, x1) of one broadcast shape.
inline std::array<Tensor, 3> loss_inputs(const Tensor& pred, const Tensor& x0,
                                             const Tensor& x1, Shape& shape) {
  shape = common_shape({{"pred", &pred}, {"x0", &x0}, {"x1", &x1}});
  return {dense(pred, shape), dense(x0, shape), dense(x1, shape)};
}

}  // namespace flowkern_cpu
