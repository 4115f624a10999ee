// CUDA kernels of the sampler-step family (docs/design.md §4 "Sampling"): the step
// functors of flowkern/steps.h on the generic elementwise kernel
// (lincomb_kernel.cuh). A launcher checks its codes, drops absent optional
// tensors (0) as the CPU ops drop absent optionals (csrc/cpu/steps.cpp), and
// builds its functor with fk::with_step_fn, which the grid simulator
// (csrc/cpu/cuda_sim_steps.cpp) calls too.
#include <cuda_runtime.h>

#include <initializer_list>

#include "args.cuh"
#include "flowkern/step_launch.h"
#include "launchers.h"
#include "lincomb_kernel.cuh"

namespace fk_cuda {
namespace {

// The given (non-zero) pointers of a launch, in argument order.
struct Given {
  dptr p[6];
  int n;
};

Given given(std::initializer_list<dptr> slots) {
  Given g{{}, 0};
  for (dptr s : slots)
    if (s != 0) g.p[g.n++] = s;
  return g;
}

template <int OP>
int launch_step(int dtype, i64 rows, i64 inner, Given ins, dptr coef, i64 coef_rows,
                fk::StepParams p, Given outs, fk::NoiseKey key, uintptr_t stream,
                i64 max_blocks) {
  if (!is_pred(p.pred)) return kBadPred;
  p.stride = fk::step_stride(coef_rows, rows);
  if (p.stride < 0) return kBadTable;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    return fk::with_step_fn<OP>(in_ptr<A>(coef), p, [&](auto fn) -> int {
      using Fn = decltype(fn);
      if (rows * inner == 0) return cudaSuccess;  // empty tensors have null pointers
      if (ins.n != Fn::NI || outs.n != Fn::NO) return kBadTensors;
      fk::Ptrs<T, Fn::NI> in;
      for (int j = 0; j < Fn::NI; ++j) in.p[j] = in_ptr<T>(ins.p[j]);
      fk::OutPtrs<T, Fn::NO> out;
      for (int k = 0; k < Fn::NO; ++k) out.p[k] = out_ptr<T>(outs.p[k]);
      return launch_lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key);
    });
  });
}

}  // namespace

int euler_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
               i64 coef_rows, int prediction, double guidance, dptr out, uintptr_t stream,
               i64 max_blocks) {
  return launch_step<fk::EULER_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                                     coef_rows, {prediction, 0, pred_uncond != 0, guidance, 0},
                                     given({out}), {}, stream, max_blocks);
}

int heun_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr x_euler, dptr pred_euler,
              dptr pred_uncond, dptr pred_euler_uncond, dptr coef, i64 coef_rows,
              int prediction, double guidance, dptr out, uintptr_t stream, i64 max_blocks) {
  // With only one unconditional prediction the count misses NI: kBadTensors.
  return launch_step<fk::HEUN_STEP>(
      dtype, rows, inner, given({x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond}),
      coef, coef_rows, {prediction, 0, pred_uncond != 0, guidance, 0}, given({out}), {}, stream,
      max_blocks);
}

int ei_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
            i64 coef_rows, int prediction, int form, double guidance, dptr out,
            uintptr_t stream, i64 max_blocks) {
  if (!is_form(form)) return kBadForm;
  return launch_step<fk::EI_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                                  coef_rows, {prediction, form, pred_uncond != 0, guidance, 0},
                                  given({out}), {}, stream, max_blocks);
}

int ei_step_backward(int dtype, i64 rows, i64 inner, dptr grad, dptr coef, i64 coef_rows,
                     int prediction, int form, double guidance, dptr g_x, dptr g_pred,
                     dptr g_pred_uncond, uintptr_t stream, i64 max_blocks) {
  if (!is_form(form)) return kBadForm;
  return launch_step<fk::EI_STEP_BACKWARD>(
      dtype, rows, inner, given({grad}), coef, coef_rows,
      {prediction, form, g_pred_uncond != 0, guidance, 0}, given({g_x, g_pred, g_pred_uncond}),
      {}, stream, max_blocks);
}

int dpmpp_2m_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr d_prev,
                  dptr pred_uncond, dptr coef, i64 coef_rows, int prediction, double guidance,
                  dptr out, dptr d_out, uintptr_t stream, i64 max_blocks) {
  // Without d_prev the first-order step ignores its third input (coefficient
  // 0): x stands in, as in the CPU op, so that no stale memory is read.
  const bool second = d_prev != 0;
  return launch_step<fk::DPMPP_2M_STEP>(
      dtype, rows, inner, given({x, pred, second ? d_prev : x, pred_uncond}), coef, coef_rows,
      {prediction, second, pred_uncond != 0, guidance, 0}, given({out, d_out}), {}, stream,
      max_blocks);
}

int em_step(int dtype, i64 rows, i64 inner, dptr x, dptr pred, dptr pred_uncond, dptr coef,
            i64 coef_rows, int prediction, double guidance, uint64_t seed, i64 offset,
            dptr out, uintptr_t stream, i64 max_blocks) {
  return launch_step<fk::EM_STEP>(dtype, rows, inner, given({x, pred, pred_uncond}), coef,
                                  coef_rows, {prediction, 0, pred_uncond != 0, guidance, 0},
                                  given({out}), {seed, offset}, stream, max_blocks);
}

int churn(int dtype, i64 rows, i64 inner, dptr x, dptr coef, i64 coef_rows, uint64_t seed,
          i64 offset, dptr out, uintptr_t stream, i64 max_blocks) {
  return launch_step<fk::CHURN>(dtype, rows, inner, given({x}), coef, coef_rows,
                                {fk::VELOCITY, 0, false, 1.0, 0}, given({out}), {seed, offset},
                                stream, max_blocks);
}

}  // namespace fk_cuda
