// CUDA kernels of the training op family (docs/design.md §4). The kernel bodies are
// the header thread functions (lincomb.h, rowsum.h) that the CPU grid
// simulator (csrc/cpu/cuda_sim.cpp) runs over the same plans (launch.h); this
// file only maps launcher arguments to functors. The elementwise and row-sum
// kernels are shared with the other families (lincomb_kernel.cuh,
// rowsum_kernel.cuh).
#include <cuda_runtime.h>

#include "args.cuh"
#include "flowkern/training.h"
#include "launchers.h"
#include "lincomb_kernel.cuh"
#include "rowsum_kernel.cuh"

namespace fk_cuda {

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
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_rowsum<T>(fk::LossResidualFn<A>{in_ptr<A>(coef), target}, rows, inner,
                            {{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}},
                            out_ptr<A>(partial), chunk_len, stream);
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
        fk::LossBwdFn<A, 3>{in_ptr<A>(coef), in_ptr<A>(grad_rows), target}, rows, inner,
        {{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}},
        {{out_ptr<T>(g_pred), out_ptr<T>(g_x0), out_ptr<T>(g_x1)}}, stream, max_blocks);
  });
}

int fm_loss_backward_pred(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr pred, dptr x0,
                          dptr x1, dptr coef, int target, dptr g_pred, uintptr_t stream,
                          i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return launch_lincomb<T>(
        fk::LossBwdFn<A, 1>{in_ptr<A>(coef), in_ptr<A>(grad_rows), target}, rows, inner,
        {{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}}, {{out_ptr<T>(g_pred)}}, stream,
        max_blocks);
  });
}

}  // namespace fk_cuda
