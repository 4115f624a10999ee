// What the grid simulators of the CUDA kernels share (cuda_sim.cpp: training
// family, cuda_sim_steps.cpp: sampler steps, cuda_sim_flowmap.cpp: flow-map
// loss): NaN-filled outputs at a chosen storage offset, and the sweeps of
// fk::lincomb_thread and of fk::rowsum_thread + fk::tree_step over every block
// and thread of the grid the launchers would launch (same plan, launch.h).
#pragma once

#include <limits>
#include <string>
#include <vector>

#include "dispatch.h"
#include "flowkern/launch.h"
#include "flowkern/rowsum.h"

namespace flowkern_cpu {
namespace sim {

using Plan = std::vector<int64_t>;

// An output of `like`'s shape whose data starts `offset` elements into its
// storage, filled with NaN so that an element the grid skips is caught.
inline Tensor nan_output(const Tensor& like, int64_t offset) {
  const int64_t n = like.numel();
  Tensor buf =
      filled({n + offset}, std::numeric_limits<double>::quiet_NaN(), like.scalar_type(), like.device());
  return torch::stable::view(torch::stable::narrow(buf, 0, offset, n), like.sizes());
}

// Every thread of every block runs lincomb_thread; the kernel is race-free
// (each chunk has one owner), so the blocks may run in any order.
template <class T, class Fn>
Plan sweep_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                   fk::OutPtrs<T, Fn::NO> out, i64 max_blocks, fk::NoiseKey key = {}) {
  const fk::LincombPlan plan = fk::plan_lincomb_for(rows, inner, in, out, max_blocks);
  const i64 nthreads = plan.blocks * plan.threads;
  fk::with_vec<T>(plan.vec, [&](auto vec) {
    torch::stable::parallel_for(0, plan.blocks, 1, [&](i64 b0, i64 b1) {
      for (i64 b = b0; b < b1; ++b)
        for (int t = 0; t < plan.threads; ++t)
          fk::lincomb_thread<decltype(vec)::value>(fn, b * plan.threads + t, nthreads, rows,
                                                   inner, in, out, key);
    });
  });
  return {plan.vec, plan.threads, plan.blocks};
}

// Runs fn's grid over `inputs` (Fn::NI contiguous tensors of one shape and
// storage type T) into Fn::NO fresh NaN outputs; returns them and the plan.
template <class T, class Fn>
Plan sweep_into(const Fn& fn, const std::string& op, const std::vector<Tensor>& inputs,
                int64_t max_blocks, int64_t out_offset, std::vector<Tensor>& outs,
                fk::NoiseKey key = {}) {
  FK_CHECK(inputs.size() == size_t(Fn::NI), op, ": expected ", Fn::NI, " inputs, got ",
           inputs.size());
  FK_CHECK(out_offset >= 0, op, ": out_offset must be >= 0");
  const Tensor& x = inputs[0];
  fk::Ptrs<T, Fn::NI> in;
  for (int j = 0; j < Fn::NI; ++j) in.p[j] = cptr<T>(inputs[j]);
  fk::OutPtrs<T, Fn::NO> out;
  for (int k = 0; k < Fn::NO; ++k) {
    outs.push_back(nan_output(x, out_offset));
    out.p[k] = mptr<T>(outs.back());
  }
  return sweep_lincomb<T>(fn, rows_of(x), inner_of(x), in, out, max_blocks, key);
}

// The row-sum kernel (csrc/cuda/rowsum_kernel.cuh) block by block, exactly
// its phases between barriers: every thread stores its partial in shared
// memory, then each halving step runs for all threads before the next (the
// step reads only slots >= stride, which no thread of the same step writes, so
// thread order within a step is free). Writes `partial`, (rows, nchunks) of
// the plan, which it returns as (threads, chunk_len, nchunks, blocks).
template <class T, class Fn, bool STORE = false>
Plan sweep_rowsum(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                  fk::acc_t<T>* partial, i64 chunk_len, fk::RowStore<T> st = {}) {
  using A = fk::acc_t<T>;
  const fk::RowsumPlan plan = fk::plan_rowsum(rows, inner, chunk_len);
  torch::stable::parallel_for(0, plan.blocks, 1, [&](i64 b0, i64 b1) {
    std::vector<A> smem(plan.threads);
    for (i64 b = b0; b < b1; ++b) {
      for (int t = 0; t < plan.threads; ++t)
        smem[t] = fk::rowsum_thread<T, Fn, STORE>(fn, b, t, plan.threads, inner, plan.nchunks,
                                                  plan.chunk_len, in, st);
      for (int stride = plan.threads / 2; stride > 0; stride /= 2)
        for (int t = 0; t < plan.threads; ++t) fk::tree_step(smem.data(), t, stride);
      partial[b] = smem[0];
    }
  });
  return {plan.threads, plan.chunk_len, plan.nchunks, plan.blocks};
}

// The loss-finishing kernel (rowsum_kernel.cuh, loss_finish_kernel): its one
// block of kFinishThreads threads, phase by phase.
template <class T> void sweep_finish(const fk::LossFinish<T>& f) {
  constexpr int n = fk::kFinishThreads;
  std::vector<double> smem(n);
  for (int t = 0; t < n; ++t) smem[t] = fk::finish_thread<T>(f, t, n);
  for (int stride = n / 2; stride > 0; stride /= 2)
    for (int t = 0; t < n; ++t) fk::tree_step(smem.data(), t, stride);
  fk::finish_total<T>(f, smem[0]);
}

// A (rows, nchunks) partials tensor of the row-sum plan, NaN-filled so that a
// block the grid skips is caught.
inline Tensor nan_partial(i64 rows, i64 inner, i64 chunk_len, const Tensor& coef) {
  return filled({rows, fk::plan_rowsum(rows, inner, chunk_len).nchunks},
                std::numeric_limits<double>::quiet_NaN(), coef.scalar_type(), coef.device());
}

// Inputs must be contiguous with one shape and dtype.
inline void check_same(const std::vector<Tensor>& in, const char* op) {
  FK_CHECK(!in.empty(), op, ": no inputs");
  for (const auto& t : in) {
    FK_CHECK(t.is_contiguous() && same_sizes(t.sizes(), in[0].sizes()) &&
                 t.scalar_type() == in[0].scalar_type(),
             op, ": inputs must be contiguous with one shape and dtype");
  }
}

}  // namespace sim
}  // namespace flowkern_cpu
