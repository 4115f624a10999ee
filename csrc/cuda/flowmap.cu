// CUDA kernels of the flow-map op family (docs/design.md §4: the one-step flow map
// g(t, s, x), ei_step's exponential-integrator map, against a target): the
// functors of flowkern/flowmap.h on the shared row-sum and elementwise kernels
// (rowsum_kernel.cuh, lincomb_kernel.cuh), the bodies the CPU grid simulator
// (csrc/cpu/cuda_sim_flowmap.cpp) runs over the same plans. The backward's
// functor comes from fk::with_flowmap_bwd_fn, as on the CPU and in the
// simulator.
#include <cuda_runtime.h>

#include "args.cuh"
#include "flowkern/flowmap.h"
#include "flowkern/step_launch.h"
#include "launchers.h"
#include "lincomb_kernel.cuh"
#include "rowsum_kernel.cuh"

namespace fk_cuda {

namespace {

// The codes both launchers check first; the table's row stride on success.
int check_codes(int prediction, int form, i64 coef_rows, i64 rows, i64& stride) {
  if (!is_pred(prediction)) return kBadPred;
  if (!is_form(form)) return kBadForm;
  stride = fk::step_stride(coef_rows, rows);
  return stride < 0 ? kBadTable : 0;
}

}  // namespace

int flowmap_loss_partial(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr target,
                         dptr coef, i64 coef_rows, int prediction, int form, dptr partial,
                         i64 chunk_len, uintptr_t stream) {
  i64 stride = 0;
  if (const int bad = check_codes(prediction, form, coef_rows, rows, stride)) return bad;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    if (rows == 0) return cudaSuccess;  // nothing to write; empty tensors have null pointers
    // With inner == 0 the kernel reads no element and writes each row's 0.
    if (coef == 0 || partial == 0 || (inner > 0 && (x == 0 || pred == 0 || target == 0)))
      return kBadTensors;
    return launch_rowsum<T>(
        fk::FlowMapResidualFn<A>{in_ptr<A>(coef), stride, prediction, form}, rows, inner,
        {{in_ptr<T>(x), in_ptr<T>(pred), in_ptr<T>(target)}}, out_ptr<A>(partial), chunk_len,
        stream);
  });
}

int flowmap_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr x, dptr pred,
                          dptr target, dptr coef, i64 coef_rows, int prediction, int form,
                          dptr g_pred, dptr g_x, dptr g_target, uintptr_t stream,
                          i64 max_blocks) {
  i64 stride = 0;
  if (const int bad = check_codes(prediction, form, coef_rows, rows, stride)) return bad;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    if (rows * inner == 0) return cudaSuccess;  // empty tensors have null pointers
    if (grad_rows == 0 || x == 0 || pred == 0 || target == 0 || coef == 0 || g_pred == 0)
      return kBadTensors;
    const dptr given[3] = {g_pred, g_x, g_target};  // the functor's output order, absent 0
    return fk::with_flowmap_bwd_fn(
        in_ptr<A>(coef), stride, prediction, form, in_ptr<A>(grad_rows), g_x != 0,
        g_target != 0, [&](auto fn) -> int {
          using Fn = decltype(fn);
          fk::OutPtrs<T, Fn::NO> out;
          for (int j = 0, k = 0; j < 3; ++j)
            if (given[j] != 0) out.p[k++] = out_ptr<T>(given[j]);
          return launch_lincomb<T>(fn, rows, inner,
                                   {{in_ptr<T>(x), in_ptr<T>(pred), in_ptr<T>(target)}}, out,
                                   stream, max_blocks);
        });
  });
}

}  // namespace fk_cuda
