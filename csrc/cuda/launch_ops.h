// The bodies of the launchers of launchers.h, once, as templates over an
// engine E that runs the two kinds of grid:
//   E::lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key)  elementwise
//   E::rowsum<T>(fn, rows, inner, in, partial, chunk_len, stream)      row sums
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
    case kBadTensors: return "the given tensors do not fit the launch (a step's unconditional "
                             "predictions: both or neither; every required tensor non-null)";
    case kBadKind: return "unknown field or schedule kind";
    case kBadSizes: return "bad field sizes (need at least one reference and rows, inner >= 0)";
    case kBadWorkspace: return "the field workspace is missing or smaller than the plan's "
                               "(plan_fields)";
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
int fm_loss_partial(int dtype, i64 rows, i64 inner, dptr pred, dptr x0, dptr x1,
                    const fk::CoefArg& coef, int target, dptr partial, i64 chunk_len,
                    uintptr_t stream) {
  if (!is_pred(target)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::SchedSrc<A> src;
    if (!fk::sched_src(coef, rows, src)) return kBadTable;
    return E::template rowsum<T>(fk::LossResidualFn<A>{src, target}, rows, inner,
                                 fk::Ptrs<T, 3>{{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}},
                                 out_ptr<A>(partial), chunk_len, stream);
  });
}

template <class E>
int fm_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr pred, dptr x0,
                     dptr x1, const fk::CoefArg& coef, int target, dptr g_pred, dptr g_x0,
                     dptr g_x1, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(target)) return kBadPred;
  if ((g_x0 == 0) != (g_x1 == 0)) return kBadTensors;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::SchedSrc<A> src;
    if (!fk::sched_src(coef, rows, src)) return kBadTable;
    const fk::Ptrs<T, 3> in{{in_ptr<T>(pred), in_ptr<T>(x0), in_ptr<T>(x1)}};
    const A* g = in_ptr<A>(grad_rows);
    if (g_x0 == 0)  // the usual backward: x0 and x1 are noise and data
      return E::template lincomb<T>(fk::LossBwdFn<A, 1>{src, g, target}, rows, inner, in,
                                    fk::OutPtrs<T, 1>{{out_ptr<T>(g_pred)}}, stream,
                                    max_blocks, fk::NoiseKey{});
    return E::template lincomb<T>(
        fk::LossBwdFn<A, 3>{src, g, target}, rows, inner, in,
        fk::OutPtrs<T, 3>{{out_ptr<T>(g_pred), out_ptr<T>(g_x0), out_ptr<T>(g_x1)}}, stream,
        max_blocks, fk::NoiseKey{});
  });
}

// ------------------------------------------------------------------- steps

// The given (non-zero) pointers of a launch, in argument order.
struct Given {
  dptr p[6];
  int n;
};

inline Given given(std::initializer_list<dptr> slots) {
  Given g{{}, 0};
  for (dptr s : slots)
    if (s != 0) g.p[g.n++] = s;
  return g;
}

// The noise key of a launch; `seeds`: the per-sample seeds' device address or 0.
inline fk::NoiseKey noise_key(uint64_t seed, i64 offset, dptr seeds) {
  return {seed, offset, reinterpret_cast<const int64_t*>(seeds)};
}

// A step launch: the functor of fk::with_step_fn (as the CPU op and the
// simulator build it) over the given inputs and outputs.
template <class E, int OP>
int step(int dtype, i64 rows, i64 inner, Given ins, const fk::CoefArg& coef, fk::StepParams p,
         Given outs, fk::NoiseKey key, uintptr_t stream, i64 max_blocks) {
  if (!is_pred(p.pred)) return kBadPred;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::StepSrc<A> src;
    if (!fk::step_src(coef, rows, src)) return kBadTable;
    return fk::with_step_fn<OP>(src, p, [&](auto fn) -> int {
      using Fn = decltype(fn);
      if (rows * inner == 0) return 0;  // empty tensors have null pointers
      if (ins.n != Fn::NI || outs.n != Fn::NO) return kBadTensors;
      fk::Ptrs<T, Fn::NI> in;
      for (int j = 0; j < Fn::NI; ++j) in.p[j] = in_ptr<T>(ins.p[j]);
      fk::OutPtrs<T, Fn::NO> out;
      for (int k = 0; k < Fn::NO; ++k) out.p[k] = out_ptr<T>(outs.p[k]);
      return E::template lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key);
    });
  });
}

template <class E>
int euler_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond,
               const fk::CoefArg& coef, int prediction, double guidance, dptr out,
               uintptr_t stream, i64 max_blocks) {
  return step<E, fk::EULER_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                                 {prediction, 0, pred_uncond != 0, guidance}, given({out}), {},
                                 stream, max_blocks);
}

template <class E>
int heun_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr x_euler, dptr pred_euler,
              dptr pred_uncond, dptr pred_euler_uncond, const fk::CoefArg& coef, int prediction,
              double guidance, dptr out, uintptr_t stream, i64 max_blocks) {
  // With only one unconditional prediction the count misses NI: kBadTensors.
  return step<E, fk::HEUN_STEP>(
      dtype, rows, inner, given({x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond}),
      coef, {prediction, 0, pred_uncond != 0, guidance}, given({out}), {}, stream, max_blocks);
}

template <class E>
int ei_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond,
            const fk::CoefArg& coef, int prediction, int form, double guidance, dptr out,
            uintptr_t stream, i64 max_blocks) {
  if (!is_form(form)) return kBadForm;
  return step<E, fk::EI_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                              {prediction, form, pred_uncond != 0, guidance}, given({out}), {},
                              stream, max_blocks);
}

template <class E>
int ei_step_backward(int dtype, i64 rows, i64 inner, dptr grad, const fk::CoefArg& coef,
                     int prediction, int form, double guidance, dptr g_x, dptr g_pred,
                     dptr g_pred_uncond, uintptr_t stream, i64 max_blocks) {
  if (!is_form(form)) return kBadForm;
  return step<E, fk::EI_STEP_BACKWARD>(dtype, rows, inner, given({grad}), coef,
                                       {prediction, form, g_pred_uncond != 0, guidance},
                                       given({g_x, g_pred, g_pred_uncond}), {}, stream,
                                       max_blocks);
}

template <class E>
int dpmpp_2m_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr d_prev,
                  dptr pred_uncond, const fk::CoefArg& coef, int prediction, double guidance,
                  dptr out, dptr d_out, uintptr_t stream, i64 max_blocks) {
  // Without d_prev the first-order step ignores its third input (coefficient
  // 0): x stands in, as in the CPU op, so that no stale memory is read.
  const bool second = d_prev != 0;
  return step<E, fk::DPMPP_2M_STEP>(dtype, rows, inner,
                                    given({x, pred, second ? d_prev : x, pred_uncond}), coef,
                                    {prediction, second, pred_uncond != 0, guidance},
                                    given({out, d_out}), {}, stream, max_blocks);
}

template <class E>
int em_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond,
            const fk::CoefArg& coef, int prediction, double guidance, uint64_t seed, i64 offset,
            dptr seeds, dptr out, uintptr_t stream, i64 max_blocks) {
  return step<E, fk::EM_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                              {prediction, 0, pred_uncond != 0, guidance}, given({out}),
                              noise_key(seed, offset, seeds), stream, max_blocks);
}

template <class E>
int churn(int dtype, i64 rows, i64 inner, dptr x, const fk::CoefArg& coef, uint64_t seed,
          i64 offset, dptr seeds, dptr out, uintptr_t stream, i64 max_blocks) {
  return step<E, fk::CHURN>(dtype, rows, inner, given({x}), coef,
                            {fk::VELOCITY, 0, false, 1.0}, given({out}),
                            noise_key(seed, offset, seeds), stream, max_blocks);
}

template <class E>
int lms_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr u1, dptr u2, dptr u3,
             dptr pred_uncond, const fk::CoefArg& coef, int prediction, double guidance,
             const double* weights, dptr out, dptr u_out, uintptr_t stream, i64 max_blocks) {
  // The history is u1 (newest), u2, u3, each 0 when absent; none after an absent one.
  if ((u1 == 0 && u2 != 0) || (u2 == 0 && u3 != 0) || weights == nullptr) return kBadTensors;
  const int nh = int(u1 != 0) + int(u2 != 0) + int(u3 != 0);
  fk::StepParams p{prediction, nh, pred_uncond != 0, guidance};
  for (int j = 0; j <= nh; ++j) p.wts[j] = weights[j];
  return step<E, fk::LMS_STEP>(dtype, rows, inner, given({x, pred, u1, u2, u3, pred_uncond}),
                               coef, p, given({out, u_out}), {}, stream, max_blocks);
}

template <class E>
int lincomb_step(int dtype, i64 rows, i64 inner, dptr x, dptr p1, dptr p2, dptr p3, dptr p4,
                 const double* weights, double noise_std, uint64_t seed, i64 offset, dptr seeds,
                 dptr out, uintptr_t stream, i64 max_blocks) {
  // The terms are p1 .. p4, p1 given, none after an absent one; no table.
  // (Empty tensors have null pointers: then p1 is 0 and nothing is launched.)
  if ((p1 == 0 && rows * inner != 0) || (p2 == 0 && p3 != 0) || (p3 == 0 && p4 != 0) ||
      weights == nullptr)
    return kBadTensors;
  const int nt = 1 + int(p2 != 0) + int(p3 != 0) + int(p4 != 0);
  if (noise_std != 0 && nt > fk::LINCOMB_MAX_NOISY_TERMS) return kBadTensors;
  fk::StepParams p{fk::VELOCITY, nt, false, 1.0};
  for (int j = 0; j <= nt; ++j) p.wts[j] = weights[j];
  p.noise_std = noise_std;
  return step<E, fk::LINCOMB_STEP>(dtype, rows, inner, given({x, p1, p2, p3, p4}),
                                   fk::CoefArg{}, p, given({out}),
                                   noise_key(seed, offset, seeds), stream, max_blocks);
}

// ---------------------------------------------------------------- flow map

// The step table of a flow-map launch (the flow map always reads one).
template <class A> bool flowmap_table(const fk::CoefArg& coef, i64 rows, fk::StepSrc<A>& src) {
  return coef.table != 0 && fk::step_src(coef, rows, src);
}

template <class E>
int flowmap_loss_partial(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr target,
                         const fk::CoefArg& coef, int prediction, int form, dptr partial,
                         i64 chunk_len, uintptr_t stream) {
  if (!is_pred(prediction)) return kBadPred;
  if (!is_form(form)) return kBadForm;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    if (rows == 0) return 0;  // nothing to write; empty tensors have null pointers
    fk::StepSrc<A> src;
    if (!flowmap_table(coef, rows, src)) return kBadTable;
    // With inner == 0 the kernel reads no element and writes each row's 0.
    if (partial == 0 || (inner > 0 && (x == 0 || pred == 0 || target == 0)))
      return kBadTensors;
    return E::template rowsum<T>(
        fk::FlowMapResidualFn<A>{src.table, src.stride, prediction, form}, rows, inner,
        fk::Ptrs<T, 3>{{in_ptr<T>(x), in_ptr<T>(pred), in_ptr<T>(target)}}, out_ptr<A>(partial),
        chunk_len, stream);
  });
}

template <class E>
int flowmap_loss_backward(int dtype, i64 rows, i64 inner, dptr grad_rows, dptr x, dptr pred,
                          dptr target, const fk::CoefArg& coef, int prediction, int form,
                          dptr g_pred, dptr g_x, dptr g_target, uintptr_t stream,
                          i64 max_blocks) {
  if (!is_pred(prediction)) return kBadPred;
  if (!is_form(form)) return kBadForm;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    if (rows * inner == 0) return 0;  // empty tensors have null pointers
    fk::StepSrc<A> src;
    if (!flowmap_table(coef, rows, src)) return kBadTable;
    if (grad_rows == 0 || x == 0 || pred == 0 || target == 0 || g_pred == 0)
      return kBadTensors;
    const dptr outs[3] = {g_pred, g_x, g_target};  // the functor's output order, absent 0
    return fk::with_flowmap_bwd_fn(
        src.table, src.stride, prediction, form, in_ptr<A>(grad_rows), g_x != 0, g_target != 0,
        [&](auto fn) -> int {
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
