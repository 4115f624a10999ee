// CUDA kernels of the empirical-field family (docs/design.md §4 "Empirical fields"):
// mean_i = sum_j w_ij y_j with w_ij = softmax_j(logit(key_ij)), the Poisson
// field (PFGM / PFGM++), the Gaussian and the uniform-box empirical denoiser
// (scores and online state: flowkern/fields.h). The kernels' bodies are the
// block functions of flowkern/fields_block.h, which the grid simulator
// (csrc/cpu/cuda_sim_fields.cpp) runs over the same plan; a __global__ wrapper
// only supplies blockIdx, threadIdx, shared memory and the barriers.
#include <cuda_runtime.h>

#include "args.cuh"
#include "flowkern/fields_block.h"
#include "launchers.h"

namespace fk_cuda {
namespace {

// Flash-attention-style tile kernel: block (x, y) = (query block, reference
// range). ~25 KB (fp32) / ~19 KB (fp64) of static shared memory; at least 2
// resident blocks per SM (<= 128 registers).
template <class S, class T>
__global__ void __launch_bounds__(fk::kFieldThreads, 2)
    field_kernel(fk::FieldArgs<T, fk::acc_t<T>> a) {
  __shared__ fk::FieldSmem<S, fk::acc_t<T>> sm;
  fk::FieldRegs<fk::acc_t<T>> regs;
  fk::field_block<S, T>(a, blockIdx.x, blockIdx.y, sm, [&](auto&& phase) {
    phase(int(threadIdx.x), regs);
    __syncthreads();
  });
}

// Merge of the reference ranges' partial states: one block per query.
template <class S, class A>
__global__ void __launch_bounds__(fk::kFieldThreads)
    field_merge_kernel(fk::FieldMergeArgs<A> a) {
  __shared__ fk::FieldMergeSmem<A> sm;
  fk::field_merge_block<S, A>(a, blockIdx.x, sm, [&](auto&& phase) {
    phase(int(threadIdx.x));
    __syncthreads();
  });
}

template <class S, class T>
int launch_fields(i64 B, i64 N, i64 R, dptr x, dptr ref, dptr qp, double p0, double p1,
                  dptr mean, dptr best, dptr sumexp, dptr workspace, i64 workspace_size,
                  i64 splits, uintptr_t stream) {
  using A = fk::acc_t<T>;
  const fk::FieldPlan plan = fk::plan_fields<A>(B, R, N, splits < 1 ? 1 : splits, 0);
  if (plan.splits > 1 && (workspace == 0 || workspace_size < plan.workspace))
    return kBadWorkspace;
  if (B == 0) return cudaSuccess;  // empty tensors have null pointers
  if (plan.qblocks > fk::kMaxGridX || (plan.splits > 1 && B > fk::kMaxGridX))
    return kGridTooLarge;
  A* ws = out_ptr<A>(workspace);
  const bool split = plan.splits > 1;
  fk::FieldArgs<T, A> a{in_ptr<T>(x), in_ptr<T>(ref), in_ptr<A>(qp), A(p0), A(p1), B, R, N,
                        plan.rchunk,
                        split ? ws : out_ptr<A>(mean),
                        split ? ws + plan.splits * B * N : out_ptr<A>(best),
                        split ? ws + plan.splits * B * (N + 1) : out_ptr<A>(sumexp),
                        !split};
  const dim3 grid(unsigned(plan.qblocks), unsigned(plan.splits));
  field_kernel<S, T><<<grid, plan.threads, 0, as_stream(stream)>>>(a);
  if (split) {
    const fk::FieldMergeArgs<A> m{in_ptr<A>(qp), A(p0), A(p1), B, N, int(plan.splits),
                                  a.out, a.kb, a.l, out_ptr<A>(mean), out_ptr<A>(best),
                                  out_ptr<A>(sumexp)};
    field_merge_kernel<S, A><<<unsigned(B), plan.threads, 0, as_stream(stream)>>>(m);
  }
  return int(cudaGetLastError());
}

}  // namespace

int field_mean(int dtype, i64 rows, i64 inner, i64 R, dptr x, dptr ref, dptr qp, int kind,
               double p0, double p1, dptr mean, dptr best, dptr sumexp, dptr workspace,
               i64 workspace_size, i64 splits, uintptr_t stream) {
  if (kind < fk::FIELD_POISSON || kind > fk::FIELD_UNIFORM) return kBadKind;
  if (rows < 0 || inner < 0 || R <= 0) return kBadSizes;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fk::with_field_score<fk::acc_t<T>>(kind, [&](auto score) {
      return launch_fields<decltype(score), T>(rows, inner, R, x, ref, qp, p0, p1, mean, best,
                                               sumexp, workspace, workspace_size, splits,
                                               stream);
    });
  });
}

}  // namespace fk_cuda
