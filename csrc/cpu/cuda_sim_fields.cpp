// CPU grid simulator of the CUDA empirical-field kernels (csrc/cuda/fields.cu,
// docs/design.md §9 "Testing CUDA kernels' indexing without a GPU"): a debug op that
// runs the kernels' block bodies (flowkern/fields_block.h) over every block of
// the grids the launcher would launch, with the same plan (fk::plan_fields),
// the same workspace layout and the same score instantiation
// (fk::with_field_score). Within a block each phase runs for every thread
// before the next phase starts (the barrier); with reverse=True the threads of
// a phase run last to first, so a phase that reads what another thread of the
// same phase writes (a missing barrier) changes the result. Outputs and the
// workspace start as NaN, so an element the grid never writes, or a partial
// state read before it is written, fails.

#include <algorithm>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "../cuda/launchers.h"
#include "flowkern/fields_block.h"

namespace flowkern_cpu {
namespace {

using Plan = std::vector<int64_t>;

Plan plan_vector(const fk::FieldPlan& p) {
  return {p.threads, p.bq, p.br, p.qblocks, p.splits, p.rchunk, p.workspace};
}

// run(phase) of a simulated block: phase(tid, regs[tid]) for every thread.
template <class Regs> struct SimBlock {
  std::vector<Regs>& regs;
  bool reverse;
  template <class Phase> void operator()(Phase&& phase) const {
    const int n = fk::kFieldThreads;
    for (int k = 0; k < n; ++k) {
      const int tid = reverse ? n - 1 - k : k;
      phase(tid, regs[tid]);
    }
  }
};

struct SimMergeBlock {
  bool reverse;
  template <class Phase> void operator()(Phase&& phase) const {
    const int n = fk::kFieldThreads;
    for (int k = 0; k < n; ++k) phase(reverse ? n - 1 - k : k);
  }
};

template <class S, class T>
void sim_fields(const Tensor& x, const Tensor& ref, const Tensor& qp, double p0,
                double p1, const fk::FieldPlan& plan, bool reverse, Tensor& mean,
                Tensor& best, Tensor& sumexp, Tensor& ws) {
  using A = fk::acc_t<T>;
  using Regs = fk::FieldRegs<A>;
  const i64 B = x.size(0), N = x.size(1), R = ref.size(0);
  const bool split = plan.splits > 1;
  A* w = split ? mptr<A>(ws) : nullptr;
  const fk::FieldArgs<T, A> a{cptr<T>(x), cptr<T>(ref), cptr<A>(qp), A(p0), A(p1), B, R, N,
                              plan.rchunk,
                              split ? w : mptr<A>(mean),
                              split ? w + plan.splits * B * N : mptr<A>(best),
                              split ? w + plan.splits * B * (N + 1) : mptr<A>(sumexp),
                              !split};
  // Blocks are independent (each owns its output rows): any order, in parallel.
  torch::stable::parallel_for(0, plan.qblocks * plan.splits, 1, [&](i64 b0, i64 b1) {
    auto sm = std::make_unique<fk::FieldSmem<S, A>>();
    std::vector<Regs> regs(fk::kFieldThreads);
    for (i64 b = b0; b < b1; ++b) {
      // Stale shared memory and registers from the previous block: NaN.
      std::fill_n(reinterpret_cast<unsigned char*>(sm.get()), sizeof(*sm), 0xff);
      std::fill_n(reinterpret_cast<unsigned char*>(regs.data()), sizeof(Regs) * regs.size(),
                  0xff);
      fk::field_block<S, T>(a, b % plan.qblocks, b / plan.qblocks, *sm,
                            SimBlock<Regs>{regs, reverse});
    }
  });
  if (!split) return;
  const fk::FieldMergeArgs<A> m{cptr<A>(qp), A(p0), A(p1), B, N, int(plan.splits), a.out, a.kb,
                                a.l, mptr<A>(mean), mptr<A>(best), mptr<A>(sumexp)};
  torch::stable::parallel_for(0, B, 1, [&](i64 b0, i64 b1) {
    fk::FieldMergeSmem<A> sm;
    for (i64 q = b0; q < b1; ++q) fk::field_merge_block<S, A>(m, q, sm, SimMergeBlock{reverse});
  });
}

template <class A>
fk::FieldPlan plan_for(i64 B, i64 R, i64 N, int64_t splits, int64_t max_blocks) {
  return fk::plan_fields<A>(B, R, N, splits, max_blocks);
}

// splits > 0 forces that many reference ranges (normalised by the plan), as
// the launcher receives them; 0 plans them from max_blocks, as flowkern.cuda
// does before launching.
std::tuple<Tensor, Tensor, Tensor, Plan> sim_field_mean(
    const Tensor& x_, const Tensor& ref_, const Tensor& qp_, int64_t kind,
    double p0, double p1, int64_t splits, int64_t max_blocks, bool reverse) {
  FK_CHECK(x_.dim() == 2 && ref_.dim() == 2 && x_.size(1) == ref_.size(1),
           "_sim_field_mean: x must be (B, N) and ref (R, N)");
  FK_CHECK(x_.scalar_type() == ref_.scalar_type(),
           "_sim_field_mean: x and ref must share a dtype");
  const auto acc = x_.scalar_type() == kDouble ? kDouble : kFloat;
  FK_CHECK(qp_.scalar_type() == acc && qp_.dim() == 2 && qp_.size(0) == x_.size(0) &&
               qp_.size(1) == 2,
           "_sim_field_mean: qp must be (B, 2) in the accumulation dtype");
  FK_CHECK(ref_.size(0) > 0, "_sim_field_mean: the reference set is empty");
  FK_CHECK(kind >= 0 && kind <= 2, "_sim_field_mean: kind must be 0, 1 or 2");
  const auto x = contig(x_), ref = contig(ref_), qp = contig(qp_);
  const i64 B = x.size(0), N = x.size(1), R = ref.size(0);
  const auto nan = std::numeric_limits<double>::quiet_NaN();
  const Device dev = x.device();
  auto mean = filled({B, N}, nan, acc, dev);
  auto best = filled({B}, nan, acc, dev);
  auto sumexp = filled({B}, nan, acc, dev);
  const fk::FieldPlan plan = acc == kDouble ? plan_for<double>(B, R, N, splits, max_blocks)
                                                : plan_for<float>(B, R, N, splits, max_blocks);
  auto ws = filled({plan.workspace}, nan, acc, dev);
  if (B > 0) {
    dispatch_dtype(x, "_sim_field_mean", [&](auto tag) {
      using T = typename decltype(tag)::type;
      fk::with_field_score<fk::acc_t<T>>(int(kind), [&](auto score) {
        sim_fields<decltype(score), T>(x, ref, qp, p0, p1, plan, reverse, mean, best, sumexp,
                                       ws);
      });
    });
  }
  return {mean, best, sumexp, plan_vector(plan)};
}

Plan sim_plan_fields(int64_t B, int64_t R, int64_t N, int64_t acc_size, int64_t splits,
                     int64_t max_blocks) {
  FK_CHECK(acc_size == 4 || acc_size == 8, "_sim_plan_fields: acc_size must be 4 or 8");
  return plan_vector(acc_size == 8 ? plan_for<double>(B, R, N, splits, max_blocks)
                                   : plan_for<float>(B, R, N, splits, max_blocks));
}

}  // namespace

// Debug ops for tests, in the test-only flowkern_sim:: namespace (with the
// simulated CUDA glue, cuda_sim_glue.cpp), not the public flowkern::. The plan is returned as
// (threads, bq, br, qblocks, splits, rchunk, workspace).
STABLE_TORCH_LIBRARY_FRAGMENT(flowkern_sim, m) {
  m.def(
      "_sim_field_mean(Tensor x, Tensor ref, Tensor qp, int kind, float p0, float p1, "
      "int splits=0, int max_blocks=0, bool reverse=False) -> (Tensor, Tensor, Tensor, int[])");
  // No tensor arguments, hence nothing to dispatch on: one kernel for all keys.
  m.def(
      "_sim_plan_fields(int B, int R, int N, int acc_size, int splits=0, int max_blocks=0) "
      "-> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CompositeExplicitAutograd, m) {
  m.impl("_sim_plan_fields", TORCH_BOX(&sim_plan_fields));
}

STABLE_TORCH_LIBRARY_IMPL(flowkern_sim, CPU, m) { m.impl("_sim_field_mean", TORCH_BOX(&sim_field_mean)); }

}  // namespace flowkern_cpu

// The CUDA launcher fk_cuda::field_mean (csrc/cuda/fields.cu) on the
// simulator, same arguments and checks: what the glue test runs
// (cuda_sim_launchers.cpp has the other launchers). Pointers are host memory.
namespace fk_sim {

int field_mean(int dtype, fk::i64 rows, fk::i64 inner, fk::i64 R, uintptr_t x, uintptr_t ref,
               uintptr_t qp, int kind, double p0, double p1, uintptr_t mean, uintptr_t best,
               uintptr_t sumexp, uintptr_t workspace, fk::i64 workspace_size, fk::i64 splits,
               uintptr_t) {
  using namespace flowkern_cpu;
  if (kind < fk::FIELD_POISSON || kind > fk::FIELD_UNIFORM) return fk_cuda::kBadKind;
  if (rows < 0 || inner < 0 || R <= 0) return fk_cuda::kBadSizes;
  static const ScalarType kTypes[] = {kFloat, kDouble, kHalf, kBFloat16};
  if (dtype < 0 || dtype > 3) return fk_cuda::kBadDtype;
  const ScalarType st = kTypes[dtype];
  const ScalarType acc = st == kDouble ? kDouble : kFloat;
  const auto plan = acc == kDouble ? plan_for<double>(rows, R, inner, splits < 1 ? 1 : splits, 0)
                                       : plan_for<float>(rows, R, inner, splits < 1 ? 1 : splits, 0);
  if (plan.splits > 1 && (workspace == 0 || workspace_size < plan.workspace))
    return fk_cuda::kBadWorkspace;
  if (rows == 0) return 0;
  const auto blob = [](uintptr_t p, IntArrayRef shape, ScalarType t) {
    return torch::stable::from_blob(reinterpret_cast<void*>(p), shape, contiguous_strides(shape),
                                    Device(DeviceType::CPU), t);
  };
  const Tensor xt = blob(x, {rows, inner}, st), rt = blob(ref, {R, inner}, st),
                   qt = blob(qp, {rows, 2}, acc);
  Tensor mt = blob(mean, {rows, inner}, acc), bt = blob(best, {rows}, acc),
             st_ = blob(sumexp, {rows}, acc);
  Tensor ws = plan.splits > 1 ? blob(workspace, {workspace_size}, acc) : Tensor();
  dispatch_dtype(xt, "field_mean", [&](auto tag) {
    using T = typename decltype(tag)::type;
    fk::with_field_score<fk::acc_t<T>>(kind, [&](auto score) {
      sim_fields<decltype(score), T>(xt, rt, qt, p0, p1, plan, false, mt, bt, st_, ws);
    });
  });
  return 0;
}

}  // namespace fk_sim
