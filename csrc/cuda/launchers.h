// Host entry points of the CUDA kernels, callable from g++ code (the glue,
// glue.h) without torch or CUDA headers: device pointers and the
// cudaStream_t travel as uintptr_t, results are cudaError_t codes (0 = ok)
// or the launchers' own codes below.
//
// Common arguments: `dtype` 0 = float32, 1 = float64, 2 = float16,
// 3 = bfloat16; tensors are contiguous (rows, inner); `coef` says where the
// schedule coefficients come from (flowkern/coef_arg.h: a table in device
// memory, per-row times with a built-in schedule, or one row by value);
// `max_blocks` caps the grid (<= 0: fk::kDefaultMaxBlocks). Launches are
// asynchronous on `stream`; nothing synchronises with the host.
//
// Every launcher is listed once, in an X-macro entry (name, parameters,
// arguments): fk_cuda:: declares and defines them on the GPU kernels
// (training.cu, steps.cu, flowmap.cu), fk_sim:: on the CPU grid simulator
// (csrc/cpu/cuda_sim_launchers.cpp); both run the bodies of launch_ops.h.
#pragma once

#include <stdint.h>

#include "flowkern/coef_arg.h"
#include "flowkern/launch.h"
#include "flowkern/steps.h"
#include "flowkern/training.h"

namespace fk_cuda {

using fk::i64;
using dptr = uintptr_t;

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
  kBadStepOp = -10,
  kBadParams = -11,
};

}  // namespace fk_cuda

#define FK_LAUNCH_COMMON int dtype, fk_cuda::i64 rows, fk_cuda::i64 inner
#define FK_TAIL uintptr_t stream, fk_cuda::i64 max_blocks
#define FK_D fk_cuda::dptr

// Training family (training.cu; functors of flowkern/training.h):
//   interpolate            (x0, x1) -> (x_t, y)
//   interpolate_backward   (g_xt, g_y) -> (g_x0, g_x1)
//   convert                (x, pred of type src) -> pred as type dst
//   convert_backward       g -> (g_x, g_pred)
//   fm_loss                per (row, chunk) sums of (pred - y)^2 into `partial`,
//                          (rows, nchunks) of fk::plan_rowsum(rows, inner,
//                          chunk_len) in the accumulation dtype, then one block
//                          (fk::LossFinish) weighs and reduces them into `out`:
//                          (rows,) with per_row, else one value; in pred's dtype.
//                          With g_pred (else 0) the row-sum pass also stores d
//                          loss / d pred for a loss gradient of 1 (fk::RowStore)
//   fm_loss_backward       (pred, x0, x1) -> (g_pred, g_x0, g_x1), each row
//                          scaled by grad.at(r) (fk::LossRowGrad: the loss's
//                          gradient, scale and weight, read in the kernel);
//                          g_x0 = g_x1 = 0 (absent): g_pred alone
#define FK_TRAINING_LAUNCHERS(X)                                                              \
  X(interpolate,                                                                              \
    (FK_LAUNCH_COMMON, FK_D x0, FK_D x1, const fk::CoefArg& coef, int target, FK_D xt,        \
     FK_D y, FK_TAIL),                                                                        \
    (dtype, rows, inner, x0, x1, coef, target, xt, y, stream, max_blocks))                    \
  X(interpolate_backward,                                                                     \
    (FK_LAUNCH_COMMON, FK_D g_xt, FK_D g_y, const fk::CoefArg& coef, int target, FK_D g_x0,   \
     FK_D g_x1, FK_TAIL),                                                                     \
    (dtype, rows, inner, g_xt, g_y, coef, target, g_x0, g_x1, stream, max_blocks))            \
  X(convert,                                                                                  \
    (FK_LAUNCH_COMMON, FK_D x, FK_D pred, const fk::CoefArg& coef, int src, int dst,          \
     FK_D out, FK_TAIL),                                                                      \
    (dtype, rows, inner, x, pred, coef, src, dst, out, stream, max_blocks))                   \
  X(convert_backward,                                                                         \
    (FK_LAUNCH_COMMON, FK_D g, const fk::CoefArg& coef, int src, int dst, FK_D g_x,           \
     FK_D g_pred, FK_TAIL),                                                                   \
    (dtype, rows, inner, g, coef, src, dst, g_x, g_pred, stream, max_blocks))                 \
  X(fm_loss,                                                                                  \
    (FK_LAUNCH_COMMON, FK_D pred, FK_D x0, FK_D x1, const fk::CoefArg& coef, int target,      \
     FK_D partial, fk_cuda::i64 chunk_len, const fk::Reals& weight, bool per_row,             \
     double denom, FK_D out, FK_D g_pred, uintptr_t stream),                                  \
    (dtype, rows, inner, pred, x0, x1, coef, target, partial, chunk_len, weight, per_row,     \
     denom, out, g_pred, stream))                                                             \
  X(fm_loss_backward,                                                                         \
    (FK_LAUNCH_COMMON, const fk::LossRowGrad& grad, FK_D pred, FK_D x0, FK_D x1,              \
     const fk::CoefArg& coef, int target, FK_D g_pred, FK_D g_x0, FK_D g_x1, FK_TAIL),        \
    (dtype, rows, inner, grad, pred, x0, x1, coef, target, g_pred, g_x0, g_x1, stream,        \
     max_blocks))

// Sampler steps (steps.cu; the ops of FK_STEP_OPS, flowkern/steps.h): one
// launcher for all, `op` an fk::StepOp. The functor comes from `p`
// (fk::StepParams: prediction, the op's variant, guidance, host weights)
// through fk::with_step_fn; `ins` and `outs` are its inputs and outputs in
// the functor's order, absent optionals left out (nin, nout must be its NI,
// NO). `coef` is a step table (1 or rows rows of fk::STEP_COLS) or one step
// row by value (lincomb_step reads none). A noisy step's element e draws
// Philox(seed, offset + e), or with `seeds` (a (rows,) int64 device array,
// else 0) row r draws Philox(seeds[r], offset + its element index in r).
// An output may equal an input (each element is read before it is written,
// by the same thread).
#define FK_STEP_LAUNCHERS(X)                                                                  \
  X(step,                                                                                     \
    (int op, FK_LAUNCH_COMMON, const FK_D* ins, int nin, const fk::CoefArg& coef,             \
     const fk::StepParams& p, const FK_D* outs, int nout, uint64_t seed, fk_cuda::i64 offset, \
     FK_D seeds, FK_TAIL),                                                                    \
    (op, dtype, rows, inner, ins, nin, coef, p, outs, nout, seed, offset, seeds, stream,      \
     max_blocks))

// Flow-map loss (flowmap.cu; functors of flowkern/flowmap.h): the squared
// error of the EI map a x + b pred against `target` (x's shape), (a, b) at
// the coefficients of t and s (fk::map_src: a step table in `t`, or each
// time a CoefArg of its own) as in ei_step.
//   flowmap_loss           per (row, chunk) sums into `partial` as fm_loss's,
//                          then one block (fk::LossFinish) weighs and reduces
//                          them into `out`: (rows,) with per_row, else one
//                          value; in x's dtype
//   flowmap_loss_backward  (x, pred, target) -> (g_pred[, g_x][, g_target]),
//                          each row scaled by grad.at(r) (fk::LossRowGrad);
//                          an output given as 0 is not computed
#define FK_FLOWMAP_LAUNCHERS(X)                                                               \
  X(flowmap_loss,                                                                             \
    (FK_LAUNCH_COMMON, FK_D x, FK_D pred, FK_D target, const fk::CoefArg& t,                  \
     const fk::CoefArg& s, int prediction, int form, FK_D partial, fk_cuda::i64 chunk_len,    \
     const fk::Reals& weight, bool per_row, double denom, FK_D out, uintptr_t stream),        \
    (dtype, rows, inner, x, pred, target, t, s, prediction, form, partial, chunk_len, weight, \
     per_row, denom, out, stream))                                                            \
  X(flowmap_loss_backward,                                                                    \
    (FK_LAUNCH_COMMON, const fk::LossRowGrad& grad, FK_D x, FK_D pred, FK_D target,           \
     const fk::CoefArg& t, const fk::CoefArg& s, int prediction, int form, FK_D g_pred,       \
     FK_D g_x, FK_D g_target, FK_TAIL),                                                       \
    (dtype, rows, inner, grad, x, pred, target, t, s, prediction, form, g_pred, g_x,          \
     g_target, stream, max_blocks))

// Empirical fields (fields.cu; flowkern/fields_block.h): (mean, best, sumexp)
// of flowkern::field_mean for x (rows, inner) queries, ref (R, inner)
// references, qp (rows, 2) score parameters; the outputs (rows, inner),
// (rows,), (rows,) in the accumulation dtype. kind: 0 poisson, 1 gaussian,
// 2 uniform (fk::FieldKind). `splits` reference ranges per query block,
// normalised as fk::plan_fields does; more than one needs `workspace` of at
// least the plan's workspace elements of the accumulation dtype.
#define FK_FIELD_LAUNCHERS(X)                                                                 \
  X(field_mean,                                                                               \
    (FK_LAUNCH_COMMON, fk_cuda::i64 R, FK_D x, FK_D ref, FK_D qp, int kind, double p0,        \
     double p1, FK_D mean, FK_D best, FK_D sumexp, FK_D workspace,                            \
     fk_cuda::i64 workspace_size, fk_cuda::i64 splits, uintptr_t stream),                     \
    (dtype, rows, inner, R, x, ref, qp, kind, p0, p1, mean, best, sumexp, workspace,          \
     workspace_size, splits, stream))

#define FK_ALL_LAUNCHERS(X) \
  FK_TRAINING_LAUNCHERS(X) FK_STEP_LAUNCHERS(X) FK_FLOWMAP_LAUNCHERS(X) FK_FIELD_LAUNCHERS(X)

#define FK_DECLARE_LAUNCHER(name, params, args) int name params;

namespace fk_cuda {
FK_ALL_LAUNCHERS(FK_DECLARE_LAUNCHER)

// cudaGetErrorString, or the message of one of the codes above.
const char* error_string(int code);

// Streaming multiprocessors of a device (cached), or <= 0 when unknown.
int multiprocessor_count(int device);
}  // namespace fk_cuda

namespace fk_sim {
FK_ALL_LAUNCHERS(FK_DECLARE_LAUNCHER)
}  // namespace fk_sim
