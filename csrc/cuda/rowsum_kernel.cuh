// The generic row-sum kernel of every op family with a squared-residual loss:
// one block per (row, chunk) runs fk::rowsum_thread (rowsum.h), the body the
// CPU grid simulator (csrc/cpu/cuda_sim.h, sweep_rowsum) runs over the same
// plan (launch.h), then a shared-memory tree. Internal linkage for the reason
// given in lincomb_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include "args.cuh"
#include "flowkern/launch.h"
#include "flowkern/rowsum.h"

namespace fk_cuda {
namespace {

// Per-thread partials, then a shared-memory tree with a barrier after each
// halving; thread 0 writes the block's sum. blockDim.x is kThreads
// (plan_rowsum), a compile-time size for smem.
template <class T, bool STORE, class Fn>
__global__ void __launch_bounds__(fk::kThreads)
    rowsum_kernel(Fn fn, i64 inner, i64 nchunks, i64 chunk_len, fk::Ptrs<T, Fn::NI> in,
                  fk::acc_t<T>* partial, fk::RowStore<T> st) {
  __shared__ fk::acc_t<T> smem[fk::kThreads];
  const int tid = threadIdx.x;
  smem[tid] = fk::rowsum_thread<T, Fn, STORE>(fn, blockIdx.x, tid, fk::kThreads, inner,
                                              nchunks, chunk_len, in, st);
  __syncthreads();
  for (int stride = fk::kThreads / 2; stride > 0; stride /= 2) {
    fk::tree_step(smem, tid, stride);
    __syncthreads();
  }
  if (tid == 0) partial[blockIdx.x] = smem[0];
}

// Per (row, chunk) sums into `partial`, (rows, nchunks) of
// fk::plan_rowsum(rows, inner, chunk_len); asynchronous on `stream`.
// With STORE, each element's c_r y goes to st.p as well (fk::RowStore).
template <class T, bool STORE, class Fn>
int launch_rowsum(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                  fk::acc_t<T>* partial, i64 chunk_len, uintptr_t stream, fk::RowStore<T> st) {
  const fk::RowsumPlan plan = fk::plan_rowsum(rows, inner, chunk_len);
  if (plan.blocks == 0) return cudaSuccess;
  if (plan.blocks > fk::kMaxGridX) return kGridTooLarge;
  rowsum_kernel<T, STORE><<<unsigned(plan.blocks), plan.threads, 0, as_stream(stream)>>>(
      fn, inner, plan.nchunks, plan.chunk_len, in, partial, st);
  return int(cudaGetLastError());
}

// The loss from the row-sum kernel's partials (fk::LossFinish, rowsum.h), by
// one block on the same stream right after it: each thread sums its rows in
// double (fk::finish_thread), the block's tree adds the threads' parts in a
// fixed order (deterministic), thread 0 stores the total. Replaces the
// torch reductions, casts and scalings the glue made of it before (five
// launches and host round trips through the shim). One block of
// kFinishThreads: even a 2-D toy batch of 65536 samples is 64 rows a thread.
template <class T>
__global__ void __launch_bounds__(fk::kFinishThreads) loss_finish_kernel(fk::LossFinish<T> f) {
  __shared__ double smem[fk::kFinishThreads];
  const int tid = threadIdx.x;
  smem[tid] = fk::finish_thread<T>(f, tid, fk::kFinishThreads);
  __syncthreads();
  for (int stride = fk::kFinishThreads / 2; stride > 0; stride /= 2) {
    fk::tree_step(smem, tid, stride);
    __syncthreads();
  }
  if (tid == 0) fk::finish_total<T>(f, smem[0]);
}

template <class T> int launch_loss_finish(const fk::LossFinish<T>& f, uintptr_t stream) {
  loss_finish_kernel<T><<<1, fk::kFinishThreads, 0, as_stream(stream)>>>(f);
  return int(cudaGetLastError());
}

}  // namespace
}  // namespace fk_cuda
