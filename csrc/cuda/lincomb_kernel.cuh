// The generic elementwise kernel of every op family: the __global__ wrapper
// passes only its global thread index to fk::lincomb_thread (lincomb.h), the
// body the CPU grid simulator (csrc/cpu/cuda_sim*.cpp) sweeps over the same
// plan (launch.h).
//
// Internal linkage on purpose: each .cu is compiled whole-program (no -rdc),
// and nvcc registers a translation unit's kernels with that unit's own device
// code, so a kernel instantiation must not be shared across .cu files.
#pragma once

#include <cuda_runtime.h>

#include "args.cuh"
#include "flowkern/launch.h"

namespace fk_cuda {
namespace {

// At least 4 resident blocks per SM: <= 64 registers, half occupancy on
// sm_80/sm_90, plenty for a streaming kernel. Without a minimum, ptxas's own
// register target spilled around the fp64 division slow-path calls
// (HeunFn<double, true>, VEC 1, sm_90: 12 bytes).
template <int VEC, class T, class Fn>
__global__ void __launch_bounds__(fk::kThreads, 4)
    lincomb_kernel(Fn fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                   fk::OutPtrs<T, Fn::NO> out, fk::NoiseKey key) {
  fk::lincomb_thread<VEC>(fn, i64(blockIdx.x) * blockDim.x + threadIdx.x,
                          i64(gridDim.x) * blockDim.x, rows, inner, in, out, key);
}

// Asynchronous on `stream`; `key` is read only by functors with NOISE.
template <class T, class Fn>
int launch_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                   fk::OutPtrs<T, Fn::NO> out, uintptr_t stream, i64 max_blocks,
                   fk::NoiseKey key = {}) {
  const fk::LincombPlan plan = fk::plan_lincomb_for(rows, inner, in, out, max_blocks);
  if (plan.blocks == 0) return cudaSuccess;
  fk::with_vec<T>(plan.vec, [&](auto vec) {
    lincomb_kernel<decltype(vec)::value, T, Fn>
        <<<unsigned(plan.blocks), plan.threads, 0, as_stream(stream)>>>(fn, rows, inner, in, out,
                                                                       key);
  });
  return cudaGetLastError();
}

}  // namespace
}  // namespace fk_cuda
