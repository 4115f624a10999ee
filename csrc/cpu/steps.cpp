// CPU kernels of the sampler-step family and the flowkern:: schemas they
// implement. Each public step (flowkern/ops/steps.py) is one call of one of
// these ops: argument checks (args.h), the step's coefficient row, the value
// checks and the kernel all happen here. Steps write into caller-provided
// outputs (samplers reuse their buffers; `out` may alias `x`, since every
// element is read before it is written).
//
// Step coefficients, in every schema: `Tensor? table, float[] times, int
// kind, float[] params`. A table (flowkern.step_table: (12,), (1, 12) or
// (B, 12)) is used as given; without one, times = [t, s, t_prev, g] (t_prev
// NaN when absent) and the built-in schedule (kind, params) give the single
// row here, in double precision (the formulas of flowkern.step_table).
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "args.h"
#include "coef_args.h"
#include "dispatch.h"
#include "flowkern/step_launch.h"
#include "flowkern/steps.h"
#include "step_args.h"

namespace flowkern_cpu {
namespace {

template <class T, int N> fk::Ptrs<T, N> in_ptrs(const std::vector<at::Tensor>& v) {
  fk::Ptrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = cptr<T>(v[size_t(j)]);
  return p;
}

template <class T, int N> fk::OutPtrs<T, N> out_ptrs(std::vector<at::Tensor*> v) {
  fk::OutPtrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = mptr<T>(*v[size_t(j)]);
  return p;
}

// Runs functor template FnT<A, CFG> (CFG: whether pred_uncond is given) over
// the step's coefficients; checks(c) runs the value checks first, setup(fn)
// sets the functor's own fields.
template <template <class, bool> class FnT, class Checks, class Setup>
void run_step(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& in,
              FK_STEP_ARGS, bool check, int64_t prediction, double guidance, bool cfg,
              std::vector<at::Tensor*> outs, fk::NoiseKey key, Checks&& checks, Setup&& setup) {
  check_code("prediction", prediction, kPreds);
  dispatch_dtype(x, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    const StepCoef<A> c = step_coef<A>(FK_STEP_PASS, x, check);
    if (check) checks(c);
    auto go = [&](auto fn) {
      using Fn = decltype(fn);
      fn.coef = fk::StepSrc<A>{c.ptr, c.stride()};
      fn.pred = int(prediction);
      fn.w = A(guidance);
      setup(fn);
      run_lincomb<T>(fn, rows_of(x), inner_of(x), in_ptrs<T, Fn::NI>(in),
                     out_ptrs<T, Fn::NO>(outs), key);
    };
    if (cfg) go(FnT<A, true>{}); else go(FnT<A, false>{});
  });
}

const auto kNoSetup = [](auto&) {};

void euler_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                FK_STEP_ARGS, int64_t prediction, double guidance, bool check, at::Tensor& out) {
  const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                              {{"out", &out}});
  run_step<fk::EulerFn>("euler_step", x, in, FK_STEP_PASS, check, prediction, guidance,
                        pred_uncond.has_value(), {&out}, {},
                        [&](const auto& c) { StepChecks::euler(c, prediction); },
                        kNoSetup);
}

void heun_step(const at::Tensor& x, const at::Tensor& pred, const at::Tensor& x_euler,
               const at::Tensor& pred_euler, const OptT& pred_uncond,
               const OptT& pred_euler_uncond, FK_STEP_ARGS, int64_t prediction,
               double guidance, bool check, at::Tensor& out) {
  TORCH_CHECK_VALUE(pred_uncond.has_value() == pred_euler_uncond.has_value(),
                    "pred_euler_uncond: give both unconditional predictions or neither");
  check_batch("x_euler", x_euler);
  const auto in = step_inputs(x, {{"pred", &pred}, {"x_euler", &x_euler},
                                  {"pred_euler", &pred_euler},
                                  {"pred_uncond", opt(pred_uncond)},
                                  {"pred_euler_uncond", opt(pred_euler_uncond)}},
                              {{"out", &out}});
  run_step<fk::HeunFn>("heun_step", x, in, FK_STEP_PASS, check, prediction, guidance,
                       pred_uncond.has_value(), {&out}, {},
                       [&](const auto& c) { StepChecks::heun(c, prediction); },
                       kNoSetup);
}

void ei_step_out(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                 FK_STEP_ARGS, int64_t prediction, int64_t form, double guidance, bool check,
                 at::Tensor& out) {
  check_form(form);
  const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                              {{"out", &out}});
  run_step<fk::EIFn>(
      "ei_step", x, in, FK_STEP_PASS, check, prediction, guidance, pred_uncond.has_value(),
      {&out}, {},
      [&](const auto& c) { StepChecks::ei(c, prediction, form); },
      [&](auto& fn) { fn.form = int(form); });
}

at::Tensor ei_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                   FK_STEP_ARGS, int64_t prediction, int64_t form, double guidance, bool check) {
  check_batch("x", x);
  auto out = empty_output(x);
  ei_step_out(x, pred, pred_uncond, FK_STEP_PASS, prediction, form, guidance, check, out);
  return out;
}

// Gradients (g_x, g_pred[, g_pred_uncond]) of ei_step.
std::vector<at::Tensor> ei_step_backward(const at::Tensor& grad, FK_STEP_ARGS,
                                         int64_t prediction, int64_t form, double guidance,
                                         bool cfg) {
  check_form(form);
  check_batch("grad", grad);
  std::vector<at::Tensor> g;
  for (int k = 0; k < (cfg ? 3 : 2); ++k) g.push_back(empty_output(grad));
  std::vector<at::Tensor*> outs;
  for (auto& t : g) outs.push_back(&t);
  const std::vector<at::Tensor> in{grad.contiguous()};
  run_step<fk::EIBwdFn>("ei_step_backward", grad, in, FK_STEP_PASS, false, prediction, guidance,
                        cfg, outs, {}, [](const auto&) {},
                        [&](auto& fn) { fn.form = int(form); });
  return g;
}

void dpmpp_2m_step(const at::Tensor& x, const at::Tensor& pred, const OptT& d_prev,
                   const OptT& pred_uncond, FK_STEP_ARGS, int64_t prediction, double guidance,
                   bool check, at::Tensor& out, at::Tensor& d_out) {
  // Without d_prev the first-order step ignores the third input: x stands there.
  const auto in = step_inputs(
      x, {{"pred", &pred}, {"d_prev", d_prev.has_value() ? &*d_prev : &x},
          {"pred_uncond", opt(pred_uncond)}},
      {{"out", &out}, {"d_out", &d_out}});
  const bool second = d_prev.has_value();
  run_step<fk::DPMpp2MFn>(
      "dpmpp_2m_step", x, in, FK_STEP_PASS, check, prediction, guidance,
      pred_uncond.has_value(), {&out, &d_out}, {},
      [&](const auto& c) { StepChecks::dpmpp_2m(c, prediction); },
      [&](auto& fn) { fn.second = second; });
}

void em_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
             FK_STEP_ARGS, int64_t prediction, double guidance, int64_t seed, int64_t offset,
             const OptT& per_sample_seeds, bool check, at::Tensor& out) {
  const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                              {{"out", &out}});
  const at::Tensor seeds = step_seeds(per_sample_seeds, x, check);
  run_step<fk::EMFn>("em_step", x, in, FK_STEP_PASS, check, prediction, guidance,
                     pred_uncond.has_value(), {&out}, noise_key(seed, offset, seeds),
                     [&](const auto& c) { StepChecks::em(c, prediction); },
                     kNoSetup);
}

template <class A, bool> using ChurnT = fk::ChurnFn<A>;

void churn(const at::Tensor& x, FK_STEP_ARGS, int64_t seed, int64_t offset,
           const OptT& per_sample_seeds, bool check, at::Tensor& out) {
  const auto in = step_inputs(x, {}, {{"out", &out}});
  const at::Tensor seeds = step_seeds(per_sample_seeds, x, check);
  run_step<ChurnT>("churn", x, in, FK_STEP_PASS, check, 0, 1.0, false, {&out},
                   noise_key(seed, offset, seeds),
                   [](const auto& c) { StepChecks::churn(c); }, kNoSetup);
}

template <int NH> struct LMSOf {
  template <class A, bool CFG> using Fn = fk::LMSFn<A, CFG, NH>;
};

void lms_step(const at::Tensor& x, const at::Tensor& pred, const OptT& u1, const OptT& u2,
              const OptT& u3, const OptT& pred_uncond, at::ArrayRef<double> weights,
              FK_STEP_ARGS, int64_t prediction, double guidance, bool check, at::Tensor& out,
              at::Tensor& u_out) {
  const int nh = lms_history(u1, u2, u3, weights);
  const auto in = step_inputs(x, {{"pred", &pred}, {"u1", opt(u1)}, {"u2", opt(u2)},
                                  {"u3", opt(u3)}, {"pred_uncond", opt(pred_uncond)}},
                              {{"out", &out}, {"u_out", &u_out}});
  const auto go = [&](auto fn_of) {
    using Of = decltype(fn_of);
    run_step<Of::template Fn>(
        "lms_step", x, in, FK_STEP_PASS, check, prediction, guidance, pred_uncond.has_value(),
        {&out, &u_out}, {}, [&](const auto& c) { StepChecks::lms(c, prediction); },
        [&](auto& fn) { for (int j = 0; j <= nh; ++j) fn.wts[j] = decltype(fn.w)(weights[j]); });
  };
  switch (nh) {
    case 0: return go(LMSOf<0>{});
    case 1: return go(LMSOf<1>{});
    case 2: return go(LMSOf<2>{});
    default: return go(LMSOf<3>{});
  }
}

// No coefficient table: the functor comes from the caller's weights through
// fk::with_step_fn, as in the CUDA launcher and the grid simulator.
void lincomb_step(const at::Tensor& x, at::TensorList terms, at::ArrayRef<double> weights,
                  double noise_std, int64_t seed, int64_t offset,
                  const OptT& per_sample_seeds, bool check, at::Tensor& out) {
  const int nt = lincomb_terms(terms, weights, noise_std);
  const auto in = lincomb_inputs(x, terms, out);
  const at::Tensor seeds = step_seeds(per_sample_seeds, x, check);
  fk::StepParams p{fk::VELOCITY, nt, false, 1.0};
  for (int j = 0; j <= nt; ++j) p.wts[j] = weights[j];
  p.noise_std = noise_std;
  dispatch_dtype(x, "lincomb_step", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    fk::with_step_fn<fk::LINCOMB_STEP>(fk::StepSrc<A>{}, p, [&](auto fn) {
      using Fn = decltype(fn);
      run_lincomb<T>(fn, rows_of(x), inner_of(x), in_ptrs<T, Fn::NI>(in),
                     out_ptrs<T, Fn::NO>({&out}), noise_key(seed, offset, seeds));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("euler_step", &euler_step);
  m.impl("heun_step", &heun_step);
  m.impl("ei_step", &ei_step);
  m.impl("ei_step.nograd", &ei_step);
  m.impl("ei_step_out", &ei_step_out);
  m.impl("ei_step_backward", &ei_step_backward);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step);
  m.impl("em_step", &em_step);
  m.impl("churn", &churn);
  m.impl("lms_step", &lms_step);
  m.impl("lincomb_step", &lincomb_step);
}

}  // namespace flowkern_cpu
