// The bodies of the launchers of launchers.h, once, as templates over an
// engine E that runs the two kinds of grid:
//   E::lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key)  elementwise
//   E::rowsum<T[, STORE]>(fn, rows, inner, in, partial, chunk_len, stream[, store])
//                                                   row sums (STORE: and c_r y, RowStore)
//   E::finish<T>(fk::LossFinish<T>, stream)        the loss from those (one block)
// The GPU launchers (training.cu, steps.cu, flowmap.cu) run them on the CUDA
// kernels, the simulator's (csrc/cpu/cuda_sim_launchers.cpp) on sweeps of
// the same thread bodies over the same plans: the glue test then runs the
// launchers' own argument handling and functors. No torch, no CUDA headers
// (docs/design.md §9).
#pragma once

#include <stdint.h>

#include <initializer_list>

#include "flowkern/coef_arg.h"
#include "flowkern/flowmap.h"
#include "flowkern/step_launch.h"
#include "flowkern/rowsum.h"
#include "flowkern/training.h"
#include "launchers.h"

namespace fk_cuda {
namespace ops {

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

// The message of one of the launchers' own codes (launchers.h); nullptr for
// any other (a CUDA error code).
inline const char* code_message(int code) {
  switch (code) {
    case kBadDtype: return "unsupported dtype code (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)";
    case kBadPred: return "unknown prediction/target code (expected 0=velocity, 1=x1, 2=eps, 3=score)";
    case kGridTooLarge: return "rows * chunks exceeds the CUDA grid limit of 2^31 - 1 blocks";
    case kBadForm: return "unknown exponential-integrator form (expected 0=data, 1=noise)";
    case kBadTable: return "the coefficients fit neither one row for the batch nor one per row";
    case kBadTensors: return "the given tensors do not fit the launch (their count, or a "
                             "required one is null)";
    case kBadKind: return "unknown field or schedule kind";
    case kBadSizes: return "bad field sizes (need at least one reference and rows, inner >= 0)";
    case kBadWorkspace: return "the field workspace is missing or smaller than the plan's "
                               "(plan_fields)";
    case kBadStepOp: return "unknown step op (fk::StepOp)";
    case kBadParams: return "the step's scalars are out of range for its op (EI form, DPM "
                            "order, history or term count, guidance of an unguided step)";
    default: return nullptr;
  }
}

inline bool is_pred(int code) { return code >= fk::VELOCITY && code <= fk::SCORE; }
inline bool is_form(int form) { return form == fk::EI_DATA || form == fk::EI_NOISE; }

// ---------------------------------------------------------------- training

// One elementwise training launch: FnT<A>{coefficient source, extra...}.
template <class E, template <class> class FnT, int NI, int NO, class... Extra>
int training_lincomb(int dtype, i64 rows, i64 inner, const dptr (&in)[NI],
                     const dptr (&out)[NO], const fk::CoefArg& coef, uintptr_t stream,
                     i64 max_blocks, Extra... extra) {
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::SchedSrc<A> src;
    if (!fk::sched_src(coef, rows, src)) return kBadTable;
    fk::Ptrs<T, NI> ip;
    for (int j = 0; j < NI; ++j) ip.p[j] = in_ptr<T>(in[j]);
    fk::OutPtrs<T, NO> op;
    for (int k = 0; k < NO; ++k) op.p[k] = out_ptr<T>(out[k]);
    return E::template lincomb<T>(FnT<A>{src, extra...}, rows, inner, ip, op, stream,
                                  max_blocks, fk::NoiseKey{});
  });
}

template <class E>
int interpolate(int dtype, i64 rows, i64 inner, dptr x0, dptr x1, const fk::CoefArg& coef,
                int target, dptr xt, dptr y, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return training_lincomb<E, fk::InterpolateFn>(dtype, rows, inner, {x0, x1}, {xt, y}, coef,
                                                stream, max_blocks, target);
}

template <class E>
int interpolate_backward(int dtype, i64 rows, i64 inner, dptr g_xt, dptr g_y,
                         const fk::CoefArg& coef, int target, dptr g_x0, dptr g_x1,
                         uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  return training_lincomb<E, fk::InterpolateBwdFn>(dtype, rows, inner, {g_xt, g_y},
                                                   {g_x0, g_x1}, coef, stream, max_blocks,
                                                   target);
}

template <class E>
int convert(int dtype, i64 rows, i64 inner, dptr x, dptr pred, const fk::CoefArg& coef, int src,
            int dst, dptr out, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(src) || !is_pred(dst)) return kBadPred;
  return training_lincomb<E, fk::ConvertFn>(dtype, rows, inner, {x, pred}, {out}, coef, stream,
                                            max_blocks, src, dst);
}

template <class E>
int convert_backward(int dtype, i64 rows, i64 inner, dptr g, const fk::CoefArg& coef, int src,
                     int dst, dptr g_x, dptr g_pred, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(src) || !is_pred(dst)) return kBadPred;
  return training_lincomb<E, fk::ConvertBwdFn>(dtype, rows, inner, {g}, {g_x, g_pred}, coef,
                                               stream, max_blocks, src, dst);
}

template <class E>
int fm_loss(int dtype, i64 rows, i64 inner, dptr pred, dptr x0, dptr x1, const fk::CoefArg& coef,
            int target, dptr partial, i64 chunk_len, const fk::Reals& weight, bool per_row,
            double denom, dptr out, dptr g_pred, uintptr_t stream) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::SchedSrc<A> src;
    if (!fk::sched_src(coef, rows, src)) return kBadTable;
    const fk::LossResidualFn<A> fn{src, target};
    const fk::Ptrs<T, 3> in{{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}};
    const fk::RowStore<T> st{out_ptr<T>(g_pred), {{}, weight, 1.0 / denom}};
    const int rc =
        g_pred == 0
            ? E::template rowsum<T>(fn, rows, inner, in, out_ptr<A>(partial), chunk_len, stream)
            : E::template rowsum<T, true>(fn, rows, inner, in, out_ptr<A>(partial), chunk_len,
                                          stream, st);
    if (rc != 0) return rc;
    const i64 nchunks = fk::plan_rowsum(rows, inner, chunk_len).nchunks;
    return E::template finish<T>(
        fk::LossFinish<T>{in_ptr<A>(partial), rows, nchunks, weight, per_row, denom,
                          out_ptr<T>(out)},
        stream);
  });
}

template <class E>
int fm_loss_backward(int dtype, i64 rows, i64 inner, const fk::LossRowGrad& grad, dptr pred,
                     dptr x0, dptr x1, const fk::CoefArg& coef, int target, dptr g_pred,
                     dptr g_x0, dptr g_x1, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  if ((g_x0 == 0) != (g_x1 == 0)) return kBadTensors;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::SchedSrc<A> src;
    if (!fk::sched_src(coef, rows, src)) return kBadTable;
    const fk::Ptrs<T, 3> in{{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}};
    if (g_x0 == 0)  // the usual backward: x0 and x1 are noise and data
      return E::template lincomb<T>(fk::LossBwdFn<A, 1>{src, grad, target}, rows, inner, in,
                                    fk::OutPtrs<T, 1>{{out_ptr<T>(g_pred)}}, stream,
                                    max_blocks, fk::NoiseKey{});
    return E::template lincomb<T>(
        fk::LossBwdFn<A, 3>{src, grad, target}, rows, inner, in,
        fk::OutPtrs<T, 3>{{out_ptr<T>(g_pred), out_ptr<T>(g_x0), out_ptr<T>(g_x1)}}, stream,
        max_blocks, fk::NoiseKey{});
  });
}

// ------------------------------------------------------------------- steps

// Every step op (FK_STEP_OPS): the functor of fk::with_step_fn (as the CPU
// op and the simulator build it) over the given inputs and outputs.
template <class E>
int step(int op, int dtype, i64 rows, i64 inner, const dptr* ins, int nin,
         const fk::CoefArg& coef, const fk::StepParams& p, const dptr* outs, int nout,
         uint64_t seed, i64 offset, dptr seeds, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(p.pred)) return kBadPred;
  const fk::NoiseKey key{seed, offset, reinterpret_cast<const int64_t*>(seeds)};
  return fk::with_step_op(op, int(kBadStepOp), [&](auto id) -> int {
    constexpr int OP = decltype(id)::value;
    if (!fk::step_params_valid<OP>(p)) return kBadParams;
    return dispatch_dtype(dtype, [&](auto tag) -> int {
      using T = typename decltype(tag)::type;
      using A = fk::acc_t<T>;
      fk::StepSrc<A> src;
      if (!fk::step_src(coef, rows, src)) return kBadTable;
      return fk::with_step_fn<OP>(src, p, [&](auto fn) -> int {
        using Fn = decltype(fn);
        if (nin != Fn::NI || nout != Fn::NO) return kBadTensors;
        if (rows * inner == 0) return 0;  // empty tensors have null pointers
        fk::Ptrs<T, Fn::NI> in;
        for (int j = 0; j < Fn::NI; ++j) {
          if (ins[j] == 0) return kBadTensors;
          in.p[j] = in_ptr<T>(ins[j]);
        }
        fk::OutPtrs<T, Fn::NO> out;
        for (int k = 0; k < Fn::NO; ++k) {
          if (outs[k] == 0) return kBadTensors;
          out.p[k] = out_ptr<T>(outs[k]);
        }
        return E::template lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key);
      });
    });
  });
}

// ---------------------------------------------------------------- flow map

template <class E>
int flowmap_loss(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr target,
                 const fk::CoefArg& t, const fk::CoefArg& s, int prediction, int form,
                 dptr partial, i64 chunk_len, const fk::Reals& weight, bool per_row,
                 double denom, dptr out, uintptr_t stream) {
  if (!is_pred(prediction)) return kBadPred;
  if (!is_form(form)) return kBadForm;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::MapSrc<A> src;
    if (!fk::map_src(t, s, rows, src)) return kBadTable;
    const int rc = E::template rowsum<T>(
        fk::FlowMapResidualFn<A>{src, prediction, form}, rows, inner,
        fk::Ptrs<T, 3>{{in_ptr<T>(x), in_ptr<T>(pred), in_ptr<T>(target)}}, out_ptr<A>(partial),
        chunk_len, stream);
    if (rc != 0) return rc;
    const i64 nchunks = fk::plan_rowsum(rows, inner, chunk_len).nchunks;
    return E::template finish<T>(
        fk::LossFinish<T>{in_ptr<A>(partial), rows, nchunks, weight, per_row, denom,
                          out_ptr<T>(out)},
        stream);
  });
}

template <class E>
int flowmap_loss_backward(int dtype, i64 rows, i64 inner, const fk::LossRowGrad& grad, dptr x,
                          dptr pred, dptr target, const fk::CoefArg& t, const fk::CoefArg& s,
                          int prediction, int form, dptr g_pred, dptr g_x, dptr g_target,
                          uintptr_t stream, i64 max_blocks) {
  if (!is_pred(prediction)) return kBadPred;
  if (!is_form(form)) return kBadForm;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    if (rows * inner == 0) return 0;  // empty tensors have null pointers
    fk::MapSrc<A> src;
    if (!fk::map_src(t, s, rows, src)) return kBadTable;
    if (x == 0 || pred == 0 || target == 0 || g_pred == 0) return kBadTensors;
    const dptr outs[3] = {g_pred, g_x, g_target};  // the functor's output order, absent 0
    return fk::with_flowmap_bwd_fn(
        src, prediction, form, grad, g_x != 0, g_target != 0, [&](auto fn) -> int {
          using Fn = decltype(fn);
          fk::OutPtrs<T, Fn::NO> out;
          for (int j = 0, k = 0; j < 3; ++j)
            if (outs[j] != 0) out.p[k++] = out_ptr<T>(outs[j]);
          return E::template lincomb<T>(
              fn, rows, inner, fk::Ptrs<T, 3>{{in_ptr<T>(x), in_ptr<T>(pred), in_ptr<T>(target)}},
              out, stream, max_blocks, fk::NoiseKey{});
        });
  });
}

}  // namespace ops
}  // namespace fk_cuda

// Defines fk_cuda::/fk_sim:: launcher `name` as ops::name<ENGINE> (ENGINE a
// macro naming the engine type in the defining file).
#define FK_DEFINE_LAUNCHER(name, params, args) \
  int name params { return ops::name<FK_ENGINE> args; }
