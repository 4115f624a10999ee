// CPU grid simulator of the CUDA training kernels (docs/design.md §9 "Testing CUDA
// kernels' indexing without a GPU"): debug ops that run the kernels' header
// bodies (fk::lincomb_thread, fk::rowsum_thread + fk::tree_step) over every
// block and thread of the grid that csrc/cuda/training.cu would launch, with
// the same plan (flowkern/launch.h) computed from the same pointers. A view
// at a storage offset makes pointers misaligned (vec = 1); a small max_blocks
// exercises the grid-stride loop. The sampler steps' and flow-map loss's
// simulators are cuda_sim_steps.cpp and cuda_sim_flowmap.cpp; the sweeps
// themselves are shared (cuda_sim.h).

#include <string>
#include <tuple>
#include <vector>

#include "coef_checks.h"
#include "cuda_sim.h"
#include "dispatch.h"
#include "flowkern/launch.h"
#include "flowkern/training.h"

namespace flowkern_cpu {
namespace {

using sim::Plan;

void check_inputs(const std::vector<Tensor>& in, const Tensor& coef, const char* op) {
  sim::check_same(in, op);
  const auto acc = in[0].scalar_type() == kDouble ? kDouble : kFloat;
  FK_CHECK(coef.scalar_type() == acc && coef.is_contiguous() && coef.dim() == 2 &&
               coef.size(0) == rows_of(in[0]) && coef.size(1) == 4,
           op, ": coef must be contiguous (B, 4) in the accumulation dtype");
}

// The functors' view of a (B, 4) table, one row per sample.
template <class A> fk::SchedSrc<A> table_src(const Tensor& coef) {
  fk::SchedSrc<A> s;
  s.table = cptr<A>(coef);
  s.row_step = 1;
  return s;
}

// Calls f(functor) for the op name, as the launcher of that op builds it.
template <class T, class F>
void with_functor(const std::string& op, const Tensor& coef,
                  const std::optional<Tensor>& grad_rows, IntArrayRef params, F&& f) {
  using A = fk::acc_t<T>;
  const auto c = table_src<A>(coef);
  const auto param = [&](size_t k) {
    FK_CHECK(params.size() > k, "_sim_lincomb(", op, "): missing params[", k, "]");
    return int(params[k]);
  };
  if (op == "interpolate") return f(fk::InterpolateFn<A>{c, param(0)});
  if (op == "interpolate_backward") return f(fk::InterpolateBwdFn<A>{c, param(0)});
  if (op == "convert") return f(fk::ConvertFn<A>{c, param(0), param(1)});
  if (op == "convert_backward") return f(fk::ConvertBwdFn<A>{c, param(0), param(1)});
  if (op == "fm_loss_backward" || op == "fm_loss_backward_pred") {
    FK_CHECK(grad_rows && grad_rows->is_contiguous() &&
                 grad_rows->scalar_type() == coef.scalar_type() &&
                 grad_rows->numel() == coef.size(0),
             "_sim_lincomb(", op, "): grad_rows must be (B,) in the coef dtype");
    // the row gradients as they are (scale 1, no weight)
    OptT keep;
    const fk::LossRowGrad g{reals_of(*grad_rows, keep), {}, 1.0};
    if (op == "fm_loss_backward_pred") return f(fk::LossBwdFn<A, 1>{c, g, param(0)});
    return f(fk::LossBwdFn<A, 3>{c, g, param(0)});
  }
  FK_CHECK(false, "_sim_lincomb: unknown op '", op, "'");
}

std::tuple<std::vector<Tensor>, Plan> sim_lincomb(
    const std::string& op, const std::vector<Tensor>& inputs, const Tensor& coef,
    const std::optional<Tensor>& grad_rows, IntArrayRef params, int64_t max_blocks,
    int64_t out_offset) {
  check_inputs(inputs, coef, "_sim_lincomb");
  std::vector<Tensor> outs;
  Plan plan;
  dispatch_dtype(inputs[0], "_sim_lincomb", [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_functor<T>(op, coef, grad_rows, params, [&](auto fn) {
      plan = sim::sweep_into<T>(fn, "_sim_lincomb(" + op + ")", inputs, max_blocks,
                                out_offset, outs);
    });
  });
  return {outs, plan};
}

// The row-sum grid (sim::sweep_rowsum) of fm_loss_partial.
std::tuple<Tensor, Plan> sim_fm_loss_partial(const Tensor& pred, const Tensor& x0,
                                                 const Tensor& x1, const Tensor& coef,
                                                 int64_t target, int64_t chunk_len) {
  check_inputs({pred, x0, x1}, coef, "_sim_fm_loss_partial");
  const i64 rows = rows_of(pred), inner = inner_of(pred);
  auto partial = sim::nan_partial(rows, inner, chunk_len, coef);
  Plan plan;
  dispatch_dtype(pred, "_sim_fm_loss_partial", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    plan = sim::sweep_rowsum<T>(fk::LossResidualFn<A>{table_src<A>(coef), int(target)}, rows, inner,
                                {{cptr<T>(pred), cptr<T>(x0), cptr<T>(x1)}}, mptr<A>(partial),
                                chunk_len);
  });
  return {partial, plan};
}

Plan sim_plan_lincomb(int64_t rows, int64_t inner, int64_t elem_size, bool aligned,
                      int64_t max_blocks) {
  const fk::LincombPlan p = fk::plan_lincomb(rows, inner, int(elem_size), aligned, max_blocks);
  return {p.vec, p.threads, p.blocks};
}

Plan sim_plan_rowsum(int64_t rows, int64_t inner, int64_t chunk_len) {
  const fk::RowsumPlan p = fk::plan_rowsum(rows, inner, chunk_len);
  return {p.threads, p.chunk_len, p.nchunks, p.blocks};
}

}  // namespace

// Debug ops for tests, in the test-only flowkern_sim:: namespace (with the
// simulated CUDA glue, cuda_sim_glue.cpp), not the public flowkern::. Plans are returned so a
// test can assert which path (vec, grid-stride) it exercised.
STABLE_TORCH_LIBRARY_FRAGMENT(flowkern_sim, m) {
  m.def(
      "_sim_lincomb(str op, Tensor[] inputs, Tensor coef, Tensor? grad_rows, int[] params, "
      "int max_blocks=0, int out_offset=0) -> (Tensor[], int[])");
  m.def(
      "_sim_fm_loss_partial(Tensor pred, Tensor x0, Tensor x1, Tensor coef, int target, "
      "int chunk_len=0) -> (Tensor, int[])");
  // No tensor arguments, hence nothing to dispatch on: one kernel for all keys.
  m.def(
      "_sim_plan_lincomb(int rows, int inner, int elem_size, bool aligned, int max_blocks=0) "
      "-> int[]");
  m.def("_sim_plan_rowsum(int rows, int inner, int chunk_len=0) -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CompositeExplicitAutograd, m) {
  m.impl("_sim_plan_lincomb", TORCH_BOX(&sim_plan_lincomb));
  m.impl("_sim_plan_rowsum", TORCH_BOX(&sim_plan_rowsum));
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CPU, m) {
  m.impl("_sim_lincomb", TORCH_BOX(&sim_lincomb));
  m.impl("_sim_fm_loss_partial", TORCH_BOX(&sim_fm_loss_partial));
}

}  // namespace flowkern_cpu
