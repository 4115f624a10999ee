// Host entry points of flowkern._cuda's kernels, callable from g++ code
// (bindings.cpp) without torch or CUDA headers: device pointers and the
// cudaStream_t travel as uintptr_t, results are cudaError_t codes (0 = ok).
//
// Common arguments: `dtype` 0 = float32, 1 = float64, 2 = float16,
// 3 = bfloat16; tensors are contiguous (rows, inner); `coef` is (rows, 4)
// float (double for float64) holding alpha, sigma, d_alpha, d_sigma;
// `max_blocks` caps the grid (<= 0: fk::kDefaultMaxBlocks). Launches are
// asynchronous on `stream`; nothing synchronises with the host.
#pragma once

#include <stdint.h>

#include "flowkern/launch.h"

namespace fk_cuda {

using fk::i64;
using dptr = uintptr_t;

// (x0, x1) -> (x_t, y).
int interpolate(int dtype, i64 rows, i64 inner, dptr x0, dptr x1, dptr coef, int target,
                dptr xt, dptr y, uintptr_t stream, i64 max_blocks);

// (g_xt, g_y) -> (g_x0, g_x1).
int interpolate_backward(int dtype, i64 rows, i64 inner, dptr g_xt, dptr g_y, dptr coef,
                         int target, dptr g_x0, dptr g_x1, uintptr_t stream, i64 max_blocks);

// (x, pred of type src) -> pred as type dst.
int convert(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr coef, int src, int dst,
            dptr out, uintptr_t stream, i64 max_blocks);

// g -> (g_x, g_pred).
int convert_backward(int dtype, i64 rows, i64 inner, dptr g, dptr coef, int src, int dst,
                     dptr g_x, dptr g_pred, uintptr_t stream, i64 max_blocks);

// Per (row, chunk) sums of (pred - y)^2 into `partial`, (rows, nchunks) of
// fk::plan_rowsum(rows, inner, chunk_len) in the coefficient dtype.
int fm_loss_partial(int dtype, i64 rows, i64 inner, dptr pred, dptr x0, dptr x1, dptr coef,
                    int target, dptr partial, i64 chunk_len, uintptr_t stream);

// grad_rows (rows,) in the coefficient dtype -> (g_pred, g_x0, g_x1).
int fm_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr pred, dptr x0,
                     dptr x1, dptr coef, int target, dptr g_pred, dptr g_x0, dptr g_x1,
                     uintptr_t stream, i64 max_blocks);

// The same, g_pred alone (x0 and x1 need no gradient).
int fm_loss_backward_pred(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr pred, dptr x0,
                          dptr x1, dptr coef, int target, dptr g_pred, uintptr_t stream,
                          i64 max_blocks);

// The empirical-field launchers are in launchers_fields.h (fields.cu).

// Sampler steps (steps.cu; the per-element maps are the functors of
// flowkern/steps.h). `coef` is a step table (coef_rows, fk::STEP_COLS) in the
// accumulation dtype, coef_rows 1 (one row for the whole batch) or rows.
// Optional tensors are 0 when absent; an unconditional prediction selects
// classifier-free guidance p_u + guidance (p - p_u). `out` may equal `x`
// (each element is read before it is written, by the same thread).

// x_s = x + h u_t.
int euler_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
               i64 coef_rows, int prediction, double guidance, dptr out, uintptr_t stream,
               i64 max_blocks);

// x_s = x + h/2 (u_t(x, pred) + u_s(x_euler, pred_euler)); both unconditional
// predictions or neither.
int heun_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr x_euler, dptr pred_euler,
              dptr pred_uncond, dptr pred_euler_uncond, dptr coef, i64 coef_rows,
              int prediction, double guidance, dptr out, uintptr_t stream, i64 max_blocks);

// First-order exponential integrator; form 0 = data, 1 = noise (fk::EIForm).
int ei_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
            i64 coef_rows, int prediction, int form, double guidance, dptr out,
            uintptr_t stream, i64 max_blocks);

// grad -> (g_x, g_pred[, g_pred_uncond]); g_pred_uncond given selects guidance.
int ei_step_backward(int dtype, i64 rows, i64 inner, dptr grad, dptr coef, i64 coef_rows,
                     int prediction, int form, double guidance, dptr g_x, dptr g_pred,
                     dptr g_pred_uncond, uintptr_t stream, i64 max_blocks);

// DPM-Solver++(2M) -> (x_s, d_t); first order when d_prev is absent.
int dpmpp_2m_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr d_prev,
                  dptr pred_uncond, dptr coef, i64 coef_rows, int prediction, double guidance,
                  dptr out, dptr d_out, uintptr_t stream, i64 max_blocks);

// Euler-Maruyama; element e draws Philox(seed, offset + e) (flowkern/philox.h).
int em_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
            i64 coef_rows, int prediction, double guidance, uint64_t seed, i64 offset,
            dptr out, uintptr_t stream, i64 max_blocks);

// Renoising from t to t_hat (the table's s columns), noise as em_step.
int churn(int dtype, i64 rows, i64 inner, dptr x, dptr coef, i64 coef_rows, uint64_t seed,
          i64 offset, dptr out, uintptr_t stream, i64 max_blocks);

// Flow-map loss (flowmap.cu; the functors of flowkern/flowmap.h): the squared
// error of the EI map a x + b pred against `target`, with (a, b) from the step
// table `coef` (coef_rows 1 or rows) as in ei_step; prediction and form as there.

// Per (row, chunk) sums of (a x + b pred - target)^2 into `partial`,
// (rows, nchunks) of fk::plan_rowsum(rows, inner, chunk_len) in the
// accumulation dtype.
int flowmap_loss_partial(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr target,
                         dptr coef, i64 coef_rows, int prediction, int form, dptr partial,
                         i64 chunk_len, uintptr_t stream);

// grad_rows (rows,) in the accumulation dtype -> (g_pred[, g_x][, g_target]);
// an output given as 0 is not computed.
int flowmap_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr x, dptr pred,
                          dptr target, dptr coef, i64 coef_rows, int prediction, int form,
                          dptr g_pred, dptr g_x, dptr g_target, uintptr_t stream,
                          i64 max_blocks);

// The launchers' own argument errors (CUDA's codes are all >= 0).
enum : int {
  kBadDtype = -1,
  kBadPred = -2,
  kGridTooLarge = -3,
  kBadForm = -4,
  kBadTable = -5,
  kBadTensors = -6,
  kBadKind = -7,
  kBadSizes = -8,
  kBadWorkspace = -9,
};

// cudaGetErrorString, or the message of one of the codes above.
const char* error_string(int code);

}  // namespace fk_cuda
