// CPU kernels of the flow-map op family and the flowkern:: schemas they
// implement: the per-row squared error of the EI map (the one-step flow map
// g(t, s, x)) against a target, and its fused backward. User-facing
// validation is in flowkern/ops/flowmap.py; the TORCH_CHECKs here guard
// direct callers of torch.ops.flowkern.*.

#include <vector>

#include "dispatch.h"
#include "flowmap_args.h"
#include "flowkern/flowmap.h"

namespace flowkern_cpu {
namespace {

// Per-row sum of (a x + b pred - target)^2 in the accumulation dtype, shape (B,).
Tensor flowmap_loss_rows(const Tensor& x_, const Tensor& pred_,
                             const Tensor& target_, const Tensor& coef_,
                             int64_t prediction, int64_t form) {
  const FlowmapArgs a = flowmap_args("flowmap_loss_rows", x_, pred_, target_, coef_);
  const i64 rows = rows_of(a.x), inner = inner_of(a.x);
  const i64 seg = std::max<i64>(1, std::min(inner, kSegment));
  const i64 nseg = inner == 0 ? 1 : (inner + seg - 1) / seg;
  Tensor out = empty({rows}, a.coef.scalar_type(), a.coef.device());
  dispatch_dtype(a.x, "flowmap_loss_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const fk::FlowMapResidualFn<A> fn{cptr<A>(a.coef), a.stride, int(prediction), int(form)};
    std::vector<A> partial(size_t(rows * nseg), A(0));
    const fk::Ptrs<T, 3> in{{cptr<T>(a.x), cptr<T>(a.pred), cptr<T>(a.target)}};
    for_each_segment(rows, inner, [&](i64 r, i64 e0, i64 e1) {
      partial[size_t(r * nseg + e0 / seg)] = fk::rowsum_segment<T>(fn, r, inner, e0, e1, in);
    });
    // each row's segments summed in double (as the CUDA glue's finishing block)
    const fk::LossFinish<A> f{partial.data(), rows, nseg, {}, true, 1.0, mptr<A>(out)};
    fk::finish_thread(f, 0, 1);
  });
  return out;
}

// Gradients [g_pred, g_x (if grad_x), g_target (if grad_target)] from the
// per-row gradient of flowmap_loss_rows, in one pass over (x, pred, target).
std::vector<Tensor> flowmap_loss_backward(const Tensor& grad_rows_, const Tensor& x_,
                                              const Tensor& pred_,
                                              const Tensor& target_,
                                              const Tensor& coef_, int64_t prediction,
                                              int64_t form, bool grad_x, bool grad_target) {
  const FlowmapArgs a = flowmap_args("flowmap_loss_backward", x_, pred_, target_, coef_);
  FK_CHECK(grad_rows_.numel() == rows_of(a.x) &&
               grad_rows_.scalar_type() == a.coef.scalar_type(),
           "flowmap_loss_backward: grad_rows must be (B,) in the coefficient dtype");
  const auto grad_rows = contig(grad_rows_);
  std::vector<Tensor> g;
  const int n = 1 + int(grad_x) + int(grad_target);
  for (int k = 0; k < n; ++k) g.push_back(empty_output(a.x));
  dispatch_dtype(a.x, "flowmap_loss_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const fk::Ptrs<T, 3> in{{cptr<T>(a.x), cptr<T>(a.pred), cptr<T>(a.target)}};
    const auto run = [&](auto fn) {
      using Fn = decltype(fn);
      fk::OutPtrs<T, Fn::NO> out;
      for (int k = 0; k < Fn::NO; ++k) out.p[k] = mptr<T>(g[k]);
      run_lincomb<T>(fn, rows_of(a.x), inner_of(a.x), in, out);
    };
    fk::with_flowmap_bwd_fn(cptr<A>(a.coef), a.stride, int(prediction), int(form),
                            cptr<A>(grad_rows), grad_x, grad_target, run);
  });
  return g;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("flowmap_loss_rows", TORCH_BOX(&flowmap_loss_rows));
  m.impl("flowmap_loss_backward", TORCH_BOX(&flowmap_loss_backward));
}

}  // namespace flowkern_cpu
