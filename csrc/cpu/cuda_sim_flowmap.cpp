// CPU grid simulator of the CUDA flow-map loss kernels (csrc/cuda/flowmap.cu):
// debug ops that build the launchers' functors (flowkern/flowmap.h; the
// backward's through fk::with_flowmap_bwd_fn) over a step table and sweep
// the row-sum and elementwise kernel bodies over every block and thread of
// the launch plan (cuda_sim.h). Outputs start as NaN. (The whole ops, with
// times evaluated in the kernel and the finishing block, run on the
// simulated glue: cuda_sim_glue.cpp.)

#include <string>
#include <tuple>
#include <vector>

#include "cuda_sim.h"
#include "coef_checks.h"
#include "dispatch.h"
#include "flowkern/flowmap.h"
#include "flowkern/step_launch.h"

namespace flowkern_cpu {
namespace {

// Inputs (x, pred, target) contiguous with one shape and dtype, the step
// table contiguous (1 or B, STEP_COLS) in the accumulation dtype, the codes
// those the launchers accept; returns the table's row step (0 or 1).
i64 check_flowmap(const std::vector<Tensor>& in, const Tensor& coef, int64_t prediction,
                  int64_t form, const char* op) {
  sim::check_same(in, op);
  const auto acc = in[0].scalar_type() == kDouble ? kDouble : kFloat;
  const i64 stride = coef.dim() == 2 ? fk::step_stride(coef.size(0), rows_of(in[0])) : -1;
  FK_CHECK(coef.scalar_type() == acc && coef.is_contiguous() && coef.dim() == 2 &&
               coef.size(1) == fk::STEP_COLS && stride >= 0,
           op, ": coef must be a contiguous (1 or B, ", fk::STEP_COLS,
           ") step table in the accumulation dtype");
  FK_CHECK(prediction >= fk::VELOCITY && prediction <= fk::SCORE, op,
           ": unknown prediction ", prediction);
  FK_CHECK(form == fk::EI_DATA || form == fk::EI_NOISE, op, ": unknown form ", form);
  return stride == 0 ? 0 : 1;
}

std::tuple<Tensor, sim::Plan> sim_flowmap_loss_partial(
    const Tensor& x, const Tensor& pred, const Tensor& target, const Tensor& coef,
    int64_t prediction, int64_t form, int64_t chunk_len) {
  const char* op = "_sim_flowmap_loss_partial";
  const i64 step = check_flowmap({x, pred, target}, coef, prediction, form, op);
  const i64 rows = rows_of(x), inner = inner_of(x);
  auto partial = sim::nan_partial(rows, inner, chunk_len, coef);
  sim::Plan plan;
  dispatch_dtype(x, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    plan = sim::sweep_rowsum<T>(
        fk::FlowMapResidualFn<A>{fk::step_table_src(cptr<A>(coef), step), int(prediction),
                                 int(form)},
        rows, inner, {{cptr<T>(x), cptr<T>(pred), cptr<T>(target)}}, mptr<A>(partial), chunk_len);
  });
  return {partial, plan};
}

// Outputs (g_pred[, g_x][, g_target]) as the launcher writes them, for the
// loss's gradient `grad` (a scalar, or (B,) for reduction NONE) without a
// weight (fk::LossRowGrad as the ops build it).
std::tuple<std::vector<Tensor>, sim::Plan> sim_flowmap_loss_backward(
    const Tensor& grad, const Tensor& x, const Tensor& pred, const Tensor& target,
    const Tensor& coef, int64_t prediction, int64_t form, int64_t reduction, bool grad_x,
    bool grad_target, int64_t max_blocks, int64_t out_offset) {
  const std::string op = "_sim_flowmap_loss_backward";
  const std::vector<Tensor> inputs{x, pred, target};
  const i64 step = check_flowmap(inputs, coef, prediction, form, op.c_str());
  check_reduction(reduction);
  OptT keep;
  const fk::LossRowGrad rg{loss_grad_of(grad, rows_of(x), x, reduction, keep, op.c_str()), {},
                           1.0 / loss_denom(reduction, rows_of(x), inner_of(x))};
  std::vector<Tensor> outs;
  sim::Plan plan;
  dispatch_dtype(x, op.c_str(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::with_flowmap_bwd_fn(fk::step_table_src(cptr<A>(coef), step), int(prediction),
                            int(form), rg, grad_x, grad_target, [&](auto fn) {
                              plan = sim::sweep_into<T>(fn, op, inputs, max_blocks, out_offset,
                                                        outs);
                            });
  });
  return {outs, plan};
}

}  // namespace

// Debug ops for tests, in the test-only flowkern_sim:: namespace (with the
// simulated CUDA glue, cuda_sim_glue.cpp), not the public flowkern::. The plans are returned so
// a test can assert which path it exercised: (threads, chunk_len, nchunks,
// blocks) for the row sum, (vec, threads, blocks) for the backward.
STABLE_TORCH_LIBRARY_FRAGMENT(flowkern_sim, m) {
  m.def(
      "_sim_flowmap_loss_partial(Tensor x, Tensor pred, Tensor target, Tensor coef, "
      "int prediction, int form, int chunk_len=0) -> (Tensor, int[])");
  m.def(
      "_sim_flowmap_loss_backward(Tensor grad, Tensor x, Tensor pred, Tensor target, "
      "Tensor coef, int prediction, int form, int reduction, bool grad_x, bool grad_target, "
      "int max_blocks=0, int out_offset=0) -> (Tensor[], int[])");
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CPU, m) {
  m.impl("_sim_flowmap_loss_partial", TORCH_BOX(&sim_flowmap_loss_partial));
  m.impl("_sim_flowmap_loss_backward", TORCH_BOX(&sim_flowmap_loss_backward));
}

}  // namespace flowkern_cpu
