// CUDA kernels of the training op family (DESIGN §4). The kernel bodies are
// the header thread functions (lincomb.h, rowsum.h) that the CPU grid
// simulator (csrc/cpu/cuda_sim.cpp) runs over the same plans (launch.h); this
// file only maps launcher arguments to functors, plans and grids.
#include <cuda_runtime.h>

#include "flowkern/launch.h"
#include "flowkern/rowsum.h"
#include "flowkern/training.h"
#include "launchers.h"

namespace fk_cuda {
namespace {

template <int VEC, class T, class Fn>
__global__ void __launch_bounds__(fk::kThreads)
    lincomb_kernel(Fn fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                   fk::OutPtrs<T, Fn::NO> out) {
  fk::lincomb_thread<VEC>(fn, i64(blockIdx.x) * blockDim.x + threadIdx.x,
                          i64(gridDim.x) * blockDim.x, rows, inner, in, out);
}

// One block per (row, chunk): per-thread partials, then a shared-memory tree
// with a barrier after each halving; thread 0 writes the block's sum.
// blockDim.x is kThreads (plan_rowsum), a compile-time size for smem.
template <class T, class Fn>
__global__ void __launch_bounds__(fk::kThreads)
    rowsum_kernel(Fn fn, i64 inner, i64 nchunks, i64 chunk_len, fk::Ptrs<T, Fn::NI> in,
                  fk::acc_t<T>* partial) {
  __shared__ fk::acc_t<T> smem[fk::kThreads];
  const int tid = threadIdx.x;
  smem[tid] = fk::rowsum_thread<T>(fn, blockIdx.x, tid, fk::kThreads, inner, nchunks,
                                   chunk_len, in);
  __syncthreads();
  for (int stride = fk::kThreads / 2; stride > 0; stride /= 2) {
    fk::tree_step(smem, tid, stride);
    __syncthreads();
  }
  if (tid == 0) partial[blockIdx.x] = smem[0];
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <class T> const T* in_ptr(dptr p) { return reinterpret_cast<const T*>(p); }
template <class T> T* out_ptr(dptr p) { return reinterpret_cast<T*>(p); }

template <class T> struct Tag { using type = T; };

// Storage type of a dtype code; 16-bit floats as the header's bit-compatible
// structs (fk::f16, fk::bf16).
template <class F> int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(Tag<float>{});
    case 1: return f(Tag<double>{});
    case 2: return f(Tag<fk::f16>{});
    case 3: return f(Tag<fk::bf16>{});
    default: return kBadDtype;
  }
}

bool is_pred(int code) { return code >= fk::VELOCITY && code <= fk::SCORE; }

template <class T, class Fn>
int launch_lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                   fk::OutPtrs<T, Fn::NO> out, uintptr_t stream, i64 max_blocks) {
  const fk::LincombPlan plan = fk::plan_lincomb_for(rows, inner, in, out, max_blocks);
  if (plan.blocks == 0) return cudaSuccess;
  fk::with_vec<T>(plan.vec, [&](auto vec) {
    lincomb_kernel<decltype(vec)::value, T, Fn>
        <<<unsigned(plan.blocks), plan.threads, 0, as_stream(stream)>>>(fn, rows, inner, in, out);
  });
  return cudaGetLastError();
}

}  // namespace

int interpolate(int dtype, i64 rows, i64 inner, dptr x0, dptr x1, dptr coef, int target,
                dptr xt, dptr y, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(fk::InterpolateFn<A>{in_ptr<A>(coef), target}, rows, inner,
                             {{in_ptr<T>(x0), in_ptr<T>(x1)}}, {{out_ptr<T>(xt), out_ptr<T>(y)}},
                             stream, max_blocks);
  });
}

int interpolate_backward(int dtype, i64 rows, i64 inner, dptr g_xt, dptr g_y, dptr coef,
                         int target, dptr g_x0, dptr g_x1, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(fk::InterpolateBwdFn<A>{in_ptr<A>(coef), target}, rows, inner,
                             {{in_ptr<T>(g_xt), in_ptr<T>(g_y)}},
                             {{out_ptr<T>(g_x0), out_ptr<T>(g_x1)}}, stream, max_blocks);
  });
}

int convert(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr coef, int src, int dst,
            dptr out, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(src) || !is_pred(dst)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(fk::ConvertFn<A>{in_ptr<A>(coef), src, dst}, rows, inner,
                             {{in_ptr<T>(x), in_ptr<T>(pred)}}, {{out_ptr<T>(out)}}, stream,
                             max_blocks);
  });
}

int convert_backward(int dtype, i64 rows, i64 inner, dptr g, dptr coef, int src, int dst,
                     dptr g_x, dptr g_pred, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(src) || !is_pred(dst)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(fk::ConvertBwdFn<A>{in_ptr<A>(coef), src, dst}, rows, inner,
                             {{in_ptr<T>(g)}}, {{out_ptr<T>(g_x), out_ptr<T>(g_pred)}}, stream,
                             max_blocks);
  });
}

int fm_loss_partial(int dtype, i64 rows, i64 inner, dptr pred, dptr x0, dptr x1, dptr coef,
                    int target, dptr partial, i64 chunk_len, uintptr_t stream) {
  if (!is_pred(target)) return kBadPred;
  const fk::RowsumPlan plan = fk::plan_rowsum(rows, inner, chunk_len);
  if (plan.blocks == 0) return cudaSuccess;
  if (plan.blocks > fk::kMaxGridX) return kGridTooLarge;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    rowsum_kernel<T><<<unsigned(plan.blocks), plan.threads, 0, as_stream(stream)>>>(
        fk::LossResidualFn<A>{in_ptr<A>(coef), target}, inner, plan.nchunks, plan.chunk_len,
        fk::Ptrs<T, 3>{{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}}, out_ptr<A>(partial));
    return int(cudaGetLastError());
  });
}

int fm_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr pred, dptr x0,
                     dptr x1, dptr coef, int target, dptr g_pred, dptr g_x0, dptr g_x1,
                     uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(
        fk::LossBwdFn<A>{in_ptr<A>(coef), in_ptr<A>(grad_rows), target}, rows, inner,
        {{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}},
        {{out_ptr<T>(g_pred), out_ptr<T>(g_x0), out_ptr<T>(g_x1)}}, stream, max_blocks);
  });
}

}  // namespace fk_cuda
