// CPU kernels of the training op family and the flowkern:: schemas they
// implement. Each public call (flowkern/ops/training.py) is one call of one
// of these ops: the argument checks (args.h), the coefficients (coef_args.h),
// broadcasting, the kernel and the loss reduction all happen here.
//
// Coefficient arguments, in every schema: `Tensor? t, float t_value, int
// kind, float[] params` (coef_args.h). `check`: check the times' range and
// the divisions the target needs (the public functions pass False where a
// caller has checked them already). Ops with a `.nograd` overload run the
// same kernel without the Python autograd kernel of the default overload:
// the public function calls it when no input needs a gradient.

#include <array>
#include <vector>

#include "args.h"
#include "coef_args.h"
#include "coef_checks.h"
#include "dispatch.h"
#include "flowkern/training.h"

namespace flowkern_cpu {
namespace {


// The functor FnT<A> over the op's coefficient table.
template <template <class> class FnT, class A, class... Extra>
FnT<A> make_fn(const HostCoef<A>& c, Extra... extra) {
  return FnT<A>{c.src(), extra...};
}

void interpolate_into(const Tensor& x0, const Tensor& x1, FK_COEF_ARGS, int64_t target,
                      bool check, Tensor& xt, Tensor& y, IntArrayRef shape) {
  check_code("target", target, kPreds);
  const auto a = dense(x0, shape), b = dense(x1, shape);
  dispatch_dtype(a, "interpolate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows_of(a), a, check);
    if (check) check_target(c, target);
    run_lincomb<T>(make_fn<fk::InterpolateFn>(c, int(target)), rows_of(a), inner_of(a),
                   {{cptr<T>(a), cptr<T>(b)}}, {{mptr<T>(xt), mptr<T>(y)}});
  });
}

std::tuple<Tensor, Tensor> interpolate(const Tensor& x0, const Tensor& x1,
                                               FK_COEF_ARGS, int64_t target, bool check) {
  const auto shape = common_shape({{"x0", &x0}, {"x1", &x1}});
  auto xt = empty_output(x0, shape);
  auto y = empty_output(x0, shape);
  interpolate_into(x0, x1, FK_COEF_PASS, target, check, xt, y, shape);
  return {xt, y};
}

void interpolate_out(const Tensor& x0, const Tensor& x1, FK_COEF_ARGS, int64_t target,
                     bool check, Tensor& xt, Tensor& y) {
  const auto shape = common_shape({{"x0", &x0}, {"x1", &x1}});
  check_out("out[0]", xt, shape, x0);
  check_out("out[1]", y, shape, x0);
  check_no_overlap({{"out[0]", &xt}, {"out[1]", &y}}, {{"x0", &x0}, {"x1", &x1}});
  interpolate_into(x0, x1, FK_COEF_PASS, target, check, xt, y, shape);
}

std::tuple<Tensor, Tensor> interpolate_backward(const Tensor& gxt_,
                                                        const Tensor& gy_, FK_COEF_ARGS,
                                                        int64_t target) {
  check_code("target", target, kPreds);
  const auto shape = common_shape({{"grad_xt", &gxt_}, {"grad_y", &gy_}});
  const auto gxt = dense(gxt_, shape), gy = dense(gy_, shape);
  auto gx0 = empty_output(gxt, shape);
  auto gx1 = empty_output(gxt, shape);
  dispatch_dtype(gxt, "interpolate_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows_of(gxt), gxt, false);
    run_lincomb<T>(make_fn<fk::InterpolateBwdFn>(c, int(target)), rows_of(gxt), inner_of(gxt),
                   {{cptr<T>(gxt), cptr<T>(gy)}}, {{mptr<T>(gx0), mptr<T>(gx1)}});
  });
  return {gx0, gx1};
}

Tensor convert(const Tensor& pred_, const Tensor& x_, FK_COEF_ARGS, int64_t src,
                   int64_t dst, bool check) {
  check_code("src", src, kPreds);
  check_code("dst", dst, kPreds);
  const auto shape = common_shape({{"pred", &pred_}, {"x_t", &x_}});
  const auto x = dense(x_, shape), pred = dense(pred_, shape);
  auto out = empty_output(x, shape);
  dispatch_dtype(x, "convert", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows_of(x), x, check);
    if (check) check_convert(c, src, dst);
    run_lincomb<T>(make_fn<fk::ConvertFn>(c, int(src), int(dst)), rows_of(x), inner_of(x),
                   {{cptr<T>(x), cptr<T>(pred)}}, {{mptr<T>(out)}});
  });
  return out;
}

// Gradients (g_pred, g_x) of convert.
std::tuple<Tensor, Tensor> convert_backward(const Tensor& g_, FK_COEF_ARGS,
                                                    int64_t src, int64_t dst) {
  check_code("src", src, kPreds);
  check_code("dst", dst, kPreds);
  check_batch("grad", g_);
  const auto g = contig(g_);
  auto gx = empty_output(g, g.sizes());
  auto gp = empty_output(g, g.sizes());
  dispatch_dtype(g, "convert_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows_of(g), g, false);
    run_lincomb<T>(make_fn<fk::ConvertBwdFn>(c, int(src), int(dst)), rows_of(g), inner_of(g),
                   {{cptr<T>(g)}}, {{mptr<T>(gx), mptr<T>(gp)}});
  });
  return {gp, gx};
}

// flow_matching_loss: mean / sum over all elements of w_b (pred - y)^2, or the
// per-sample mean over the features (reduction NONE, shape (B,)); in pred's
// dtype (dispatch.h run_loss: row sums per segment, then fk::finish_thread in
// double, as the CUDA glue's finishing block does).
// With g_pred (fm_loss_with_grad) the same pass also stores d loss / d pred
// for a loss gradient of 1 (fk::RowStore).
Tensor loss_pass(const Tensor& pred_, const Tensor& x0_, const Tensor& x1_, FK_COEF_ARGS,
                 int64_t target, const OptT& weight, int64_t reduction, bool check,
                 OptT* g_pred) {
  check_code("target", target, kPreds);
  check_reduction(reduction);
  Shape shape;
  const auto [pred, x0, x1] = loss_inputs(pred_, x0_, x1_, shape);
  const i64 rows = rows_of(pred), inner = inner_of(pred);
  OptT keep;
  const fk::Reals w = weight_of(weight, rows, pred, keep);
  const double denom = loss_denom(reduction, rows, inner);
  Tensor out = empty_like_shape(pred, reduction == NONE ? Shape{rows} : Shape{});
  if (g_pred != nullptr) *g_pred = empty_output(pred, shape);
  dispatch_dtype(pred, "flow_matching_loss", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows, pred, check);
    if (check) check_target(c, target);
    const auto fn = make_fn<fk::LossResidualFn>(c, int(target));
    const fk::Ptrs<T, 3> in{{cptr<T>(pred), cptr<T>(x0), cptr<T>(x1)}};
    if (g_pred == nullptr)
      run_loss<T>(fn, rows, inner, in, w, reduction == NONE, denom, mptr<T>(out));
    else
      run_loss<T, true>(fn, rows, inner, in, w, reduction == NONE, denom, mptr<T>(out),
                        {mptr<T>(**g_pred), {{}, w, 1.0 / denom}});
  });
  return out;
}

Tensor fm_loss(const Tensor& pred, const Tensor& x0, const Tensor& x1, FK_COEF_ARGS,
               int64_t target, const OptT& weight, int64_t reduction, bool check) {
  return loss_pass(pred, x0, x1, FK_COEF_PASS, target, weight, reduction, check, nullptr);
}

std::tuple<Tensor, Tensor> fm_loss_with_grad(const Tensor& pred, const Tensor& x0,
                                             const Tensor& x1, FK_COEF_ARGS, int64_t target,
                                             const OptT& weight, int64_t reduction, bool check) {
  OptT g;
  Tensor loss = loss_pass(pred, x0, x1, FK_COEF_PASS, target, weight, reduction, check, &g);
  return {loss, *g};
}

// Gradients of fm_loss from that of its output `grad` (a scalar, or (B,) for
// NONE): (g_pred) when nout = 1, (g_pred, g_x0, g_x1) when nout = 3, each of
// the broadcast shape (the autograd formula reduces them to the inputs').
std::vector<Tensor> fm_loss_backward(const Tensor& grad, const Tensor& pred_,
                                         const Tensor& x0_, const Tensor& x1_,
                                         FK_COEF_ARGS, int64_t target, const OptT& weight,
                                         int64_t reduction, int64_t nout) {
  check_code("target", target, kPreds);
  FK_CHECK(nout == 1 || nout == 3, "fm_loss_backward: nout must be 1 or 3");
  check_reduction(reduction);
  Shape shape;
  const auto [pred, x0, x1] = loss_inputs(pred_, x0_, x1_, shape);
  const i64 rows = rows_of(pred), inner = inner_of(pred);
  OptT keep_w, keep_g;
  const fk::LossRowGrad rg =
      loss_row_grad(grad, weight, reduction, pred, keep_w, keep_g, "fm_loss_backward");
  std::vector<Tensor> g(static_cast<size_t>(nout));
  for (auto& gk : g) gk = empty_output(pred, shape);
  dispatch_dtype(pred, "fm_loss_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = host_coef<A>(FK_COEF_PASS, rows, pred, false);
    const fk::Ptrs<T, 3> in{{cptr<T>(pred), cptr<T>(x0), cptr<T>(x1)}};
    const auto go = [&](auto fn) {
      using Fn = decltype(fn);
      fk::OutPtrs<T, Fn::NO> out;
      for (int k = 0; k < Fn::NO; ++k) out.p[k] = mptr<T>(g[size_t(k)]);
      run_lincomb<T>(fn, rows, inner, in, out);
    };
    if (nout == 1) go(fk::LossBwdFn<A, 1>{c.src(), rg, int(target)});
    else go(fk::LossBwdFn<A, 3>{c.src(), rg, int(target)});
  });
  return g;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("interpolate", TORCH_BOX(&interpolate));
  m.impl("interpolate.nograd", TORCH_BOX(&interpolate));
  m.impl("interpolate_out", TORCH_BOX(&interpolate_out));
  m.impl("interpolate_backward", TORCH_BOX(&interpolate_backward));
  m.impl("convert", TORCH_BOX(&convert));
  m.impl("convert.nograd", TORCH_BOX(&convert));
  m.impl("convert_backward", TORCH_BOX(&convert_backward));
  m.impl("fm_loss", TORCH_BOX(&fm_loss));
  m.impl("fm_loss.nograd", TORCH_BOX(&fm_loss));
  m.impl("fm_loss_with_grad.nograd", TORCH_BOX(&fm_loss_with_grad));
  m.impl("fm_loss_backward", TORCH_BOX(&fm_loss_backward));
}

}  // namespace flowkern_cpu
