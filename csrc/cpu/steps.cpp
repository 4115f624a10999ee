// CPU kernels of the sampler-step family and the flowkern:: schemas they
// implement. Steps write into caller-provided outputs (samplers reuse their
// buffers; `out` may alias `x`, since every element is read before it is
// written). User-facing validation is in flowkern/ops/steps.py.
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <vector>

#include "dispatch.h"
#include "flowkern/steps.h"

namespace flowkern_cpu {
namespace {

using OptT = c10::optional<at::Tensor>;

// Dense views of the inputs, validated against x; absent optionals dropped.
struct StepArgs {
  std::vector<at::Tensor> in;
  at::Tensor coef;
  i64 stride;
};

StepArgs step_args(const char* op, const at::Tensor& x, std::vector<OptT> inputs,
                   const at::Tensor& coef, std::vector<at::Tensor*> outs) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.scalar_type() == want && coef.dim() == 2 && coef.size(1) == fk::STEP_COLS &&
                  (coef.size(0) == 1 || coef.size(0) == rows_of(x)),
              op, ": coef must be a (1 or B, ", fk::STEP_COLS, ") step table of dtype ", want);
  StepArgs a{{}, coef.contiguous(), coef.size(0) == 1 ? 0 : fk::STEP_COLS};
  for (auto& t : inputs) {
    if (!t.has_value()) continue;
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), op,
                ": every input must match x in shape and dtype");
    a.in.push_back(t->contiguous());
  }
  for (auto* o : outs) {
    TORCH_CHECK(o->sizes() == x.sizes() && o->scalar_type() == x.scalar_type() &&
                    o->is_contiguous(),
                op, ": outputs must be contiguous and match x");
  }
  return a;
}

template <class T, int N> fk::Ptrs<T, N> in_ptrs(const std::vector<at::Tensor>& v) {
  fk::Ptrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = cptr<T>(v[j]);
  return p;
}

template <class T, int N> fk::OutPtrs<T, N> out_ptrs(std::vector<at::Tensor*> v) {
  fk::OutPtrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = mptr<T>(*v[j]);
  return p;
}

// Runs functor template FnT<A, CFG> (chosen by whether pred_uncond is given).
template <template <class, bool> class FnT, class Setup>
void run_step(const char* op, const at::Tensor& x, const StepArgs& a, bool cfg,
              std::vector<at::Tensor*> outs, fk::NoiseKey key, Setup&& setup) {
  dispatch_dtype(x, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = fk::acc_t<T>;
    auto go = [&](auto fn) {
      using Fn = decltype(fn);
      setup(fn);
      run_lincomb<T>(fn, rows_of(x), inner_of(x), in_ptrs<T, Fn::NI>(a.in),
                     out_ptrs<T, Fn::NO>(outs), key);
    };
    if (cfg) go(FnT<A, true>{}); else go(FnT<A, false>{});
  });
}

template <class Fn, class A>
void base(Fn& fn, const StepArgs& a, int64_t pred, double w) {
  fn.coef = cptr<A>(a.coef);
  fn.stride = a.stride;
  fn.pred = int(pred);
  fn.w = A(w);
}

#define FK_SETUP(...) [&](auto& fn) { using A = std::remove_reference_t<decltype(*fn.coef)>; \
                                      base<std::remove_reference_t<decltype(fn)>, A>(fn, a, prediction, guidance); __VA_ARGS__; }

void euler_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                const at::Tensor& coef, int64_t prediction, double guidance, at::Tensor& out) {
  auto a = step_args("euler_step", x, {x, pred, pred_uncond}, coef, {&out});
  run_step<fk::EulerFn>("euler_step", x, a, pred_uncond.has_value(), {&out}, {},
                        FK_SETUP());
}

void heun_step(const at::Tensor& x, const at::Tensor& pred, const at::Tensor& x_euler,
               const at::Tensor& pred_euler, const OptT& pred_uncond,
               const OptT& pred_euler_uncond, const at::Tensor& coef, int64_t prediction,
               double guidance, at::Tensor& out) {
  TORCH_CHECK(pred_uncond.has_value() == pred_euler_uncond.has_value(),
              "heun_step: give both unconditional predictions or neither");
  auto a = step_args("heun_step", x, {x, pred, x_euler, pred_euler, pred_uncond,
                                      pred_euler_uncond}, coef, {&out});
  run_step<fk::HeunFn>("heun_step", x, a, pred_uncond.has_value(), {&out}, {}, FK_SETUP());
}

void ei_step_out(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                 const at::Tensor& coef, int64_t prediction, int64_t form, double guidance,
                 at::Tensor& out) {
  auto a = step_args("ei_step", x, {x, pred, pred_uncond}, coef, {&out});
  run_step<fk::EIFn>("ei_step", x, a, pred_uncond.has_value(), {&out}, {},
                     FK_SETUP(fn.form = int(form)));
}

at::Tensor ei_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
                   const at::Tensor& coef, int64_t prediction, int64_t form, double guidance) {
  auto out = empty_output(x);
  ei_step_out(x, pred, pred_uncond, coef, prediction, form, guidance, out);
  return out;
}

std::vector<at::Tensor> ei_step_backward(const at::Tensor& grad, const at::Tensor& coef,
                                         int64_t prediction, int64_t form, double guidance,
                                         bool cfg) {
  std::vector<at::Tensor> g;
  for (int k = 0; k < (cfg ? 3 : 2); ++k) g.push_back(empty_output(grad));
  std::vector<at::Tensor*> outs;
  for (auto& t : g) outs.push_back(&t);
  auto a = step_args("ei_step_backward", grad, {grad}, coef, outs);
  run_step<fk::EIBwdFn>("ei_step_backward", grad, a, cfg, outs, {},
                        FK_SETUP(fn.form = int(form)));
  return g;
}

void dpmpp_2m_step(const at::Tensor& x, const at::Tensor& pred, const OptT& d_prev,
                   const OptT& pred_uncond, const at::Tensor& coef, int64_t prediction,
                   double guidance, at::Tensor& out, at::Tensor& d_out) {
  // Without d_prev the first-order step ignores the third input: pass x there.
  auto a = step_args("dpmpp_2m_step", x, {x, pred, d_prev.has_value() ? d_prev : OptT(x),
                                          pred_uncond}, coef, {&out, &d_out});
  const bool second = d_prev.has_value();
  run_step<fk::DPMpp2MFn>("dpmpp_2m_step", x, a, pred_uncond.has_value(), {&out, &d_out}, {},
                          FK_SETUP(fn.second = second));
}

void em_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
             const at::Tensor& coef, int64_t prediction, double guidance, int64_t seed,
             int64_t offset, at::Tensor& out) {
  auto a = step_args("em_step", x, {x, pred, pred_uncond}, coef, {&out});
  run_step<fk::EMFn>("em_step", x, a, pred_uncond.has_value(), {&out},
                     {uint64_t(seed), offset}, FK_SETUP());
}

template <class A, bool> using ChurnT = fk::ChurnFn<A>;

void churn(const at::Tensor& x, const at::Tensor& coef, int64_t seed, int64_t offset,
           at::Tensor& out) {
  auto a = step_args("churn", x, {x}, coef, {&out});
  const int64_t prediction = 0;
  const double guidance = 1.0;
  run_step<ChurnT>("churn", x, a, false, {&out}, {uint64_t(seed), offset}, FK_SETUP());
}

#undef FK_SETUP

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "euler_step(Tensor x, Tensor pred, Tensor? pred_uncond, Tensor coef, int prediction, "
      "float guidance, Tensor(a!) out) -> ()");
  m.def(
      "heun_step(Tensor x, Tensor pred, Tensor x_euler, Tensor pred_euler, Tensor? pred_uncond, "
      "Tensor? pred_euler_uncond, Tensor coef, int prediction, float guidance, Tensor(a!) out) "
      "-> ()");
  m.def(
      "ei_step(Tensor x, Tensor pred, Tensor? pred_uncond, Tensor coef, int prediction, int form, "
      "float guidance) -> Tensor");
  m.def(
      "ei_step_out(Tensor x, Tensor pred, Tensor? pred_uncond, Tensor coef, int prediction, "
      "int form, float guidance, Tensor(a!) out) -> ()");
  m.def(
      "ei_step_backward(Tensor grad, Tensor coef, int prediction, int form, float guidance, "
      "bool cfg) -> Tensor[]");
  m.def(
      "dpmpp_2m_step(Tensor x, Tensor pred, Tensor? d_prev, Tensor? pred_uncond, Tensor coef, "
      "int prediction, float guidance, Tensor(a!) out, Tensor(b!) d_out) -> ()");
  m.def(
      "em_step(Tensor x, Tensor pred, Tensor? pred_uncond, Tensor coef, int prediction, "
      "float guidance, int seed, int offset, Tensor(a!) out) -> ()");
  m.def("churn(Tensor x, Tensor coef, int seed, int offset, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("euler_step", &euler_step);
  m.impl("heun_step", &heun_step);
  m.impl("ei_step", &ei_step);
  m.impl("ei_step_out", &ei_step_out);
  m.impl("ei_step_backward", &ei_step_backward);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step);
  m.impl("em_step", &em_step);
  m.impl("churn", &churn);
}

}  // namespace flowkern_cpu
