// CPU kernels of the flow-map op family and the flowkern:: schemas they
// implement: the loss of the EI map (the one-step flow map g(t, s, x))
// against a target, mean / sum over all elements of w_b (g - target)^2 or
// the per-sample mean (reduction NONE), and its fused backward. A public
// call (flowkern/ops/flowmap.py) is one call of one of these ops: the
// argument checks (flowmap_args.h), the coefficients at t and s, the
// kernel and the reduction all happen here, as in training.cpp's loss.

#include <vector>

#include "dispatch.h"
#include "flowmap_args.h"
#include "flowkern/flowmap.h"

namespace flowkern_cpu {
namespace {

Tensor flowmap_loss(const Tensor& x_, const Tensor& pred_, const Tensor& target_, FK_MAP_ARGS,
                    int64_t prediction, int64_t form, const OptT& weight, int64_t reduction,
                    bool check) {
  check_map_codes(prediction, form, reduction);
  const auto [x, pred, target] = map_inputs(x_, pred_, target_);
  const i64 rows = rows_of(x), inner = inner_of(x);
  OptT keep;
  const fk::Reals w = weight_of(weight, rows, x, keep);
  const double denom = loss_denom(reduction, rows, inner);
  Tensor out = empty_like_shape(x, reduction == NONE ? Shape{rows} : Shape{});
  dispatch_dtype(x, "flowmap_loss", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = map_coef<A>(FK_MAP_PASS, x, check);
    if (check) check_map(c, prediction, form);
    run_loss<T>(fk::FlowMapResidualFn<A>{map_src_of(c), int(prediction), int(form)}, rows, inner,
                {{cptr<T>(x), cptr<T>(pred), cptr<T>(target)}}, w, reduction == NONE, denom,
                mptr<T>(out));
  });
  return out;
}

// Gradients [g_pred, g_x (if grad_x), g_target (if grad_target)] of
// flowmap_loss from that of its output `grad` (a scalar, or (B,) for NONE),
// in one pass over (x, pred, target); each of x's shape (the autograd
// formula reduces g_target to target's).
std::vector<Tensor> flowmap_loss_backward(const Tensor& grad, const Tensor& x_,
                                          const Tensor& pred_, const Tensor& target_,
                                          FK_MAP_ARGS, int64_t prediction, int64_t form,
                                          const OptT& weight, int64_t reduction, bool grad_x,
                                          bool grad_target) {
  check_map_codes(prediction, form, reduction);
  const auto [x, pred, target] = map_inputs(x_, pred_, target_);
  const i64 rows = rows_of(x), inner = inner_of(x);
  OptT keep_w, keep_g;
  const fk::LossRowGrad rg =
      loss_row_grad(grad, weight, reduction, x, keep_w, keep_g, "flowmap_loss_backward");
  std::vector<Tensor> g;
  const int n = 1 + int(grad_x) + int(grad_target);
  for (int k = 0; k < n; ++k) g.push_back(empty_output(x));
  dispatch_dtype(x, "flowmap_loss_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const auto c = map_coef<A>(FK_MAP_PASS, x, false);
    const fk::Ptrs<T, 3> in{{cptr<T>(x), cptr<T>(pred), cptr<T>(target)}};
    const auto run = [&](auto fn) {
      using Fn = decltype(fn);
      fk::OutPtrs<T, Fn::NO> out;
      for (int k = 0; k < Fn::NO; ++k) out.p[k] = mptr<T>(g[size_t(k)]);
      run_lincomb<T>(fn, rows, inner, in, out);
    };
    fk::with_flowmap_bwd_fn(map_src_of(c), int(prediction), int(form), rg, grad_x, grad_target, run);
  });
  return g;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("flowmap_loss", TORCH_BOX(&flowmap_loss));
  m.impl("flowmap_loss.nograd", TORCH_BOX(&flowmap_loss));
  m.impl("flowmap_loss_backward", TORCH_BOX(&flowmap_loss_backward));
}

}  // namespace flowkern_cpu
