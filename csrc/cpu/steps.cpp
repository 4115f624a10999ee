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
#include "flowkern/steps.h"

namespace flowkern_cpu {
namespace {

using OptT = c10::optional<at::Tensor>;
constexpr int64_t kPreds = 4;  // flowkern/_enums.py PREDICTIONS

#define FK_STEP_ARGS \
  const OptT &table, at::ArrayRef<double> times, int64_t kind, at::ArrayRef<double> params
#define FK_STEP_PASS table, times, kind, params

// A step's coefficient rows: a (1 or B, STEP_COLS) table in the accumulation type.
template <class A> struct StepCoef {
  at::Tensor keep;     // the table tensor, when given
  std::vector<A> own;  // the row built here
  const A* ptr;
  i64 n;               // rows: 1 (shared by the batch) or B
  i64 stride() const { return n == 1 ? 0 : fk::STEP_COLS; }
  fk::StepRow<A> row(i64 i) const { return fk::load_step(ptr, stride(), i); }
};

template <class A>
StepCoef<A> step_coef(FK_STEP_ARGS, const at::Tensor& x, bool check) {
  StepCoef<A> c;
  const i64 rows = rows_of(x);
  const auto acc = c10::CppTypeToScalarType<A>::value;
  if (table.has_value()) {
    at::Tensor tab = *table;
    TORCH_CHECK_VALUE(tab.dim() == 1 || tab.dim() == 2, "table: expected shape (",
                      fk::STEP_COLS, ",), (1, ", fk::STEP_COLS, ") or (", rows, ", ",
                      fk::STEP_COLS, "), got ", py_shape(tab.sizes()));
    if (tab.dim() == 1 && tab.numel() % fk::STEP_COLS == 0)
      tab = tab.view({-1, fk::STEP_COLS});
    TORCH_CHECK_VALUE(tab.dim() == 2 && tab.size(1) == fk::STEP_COLS &&
                          (tab.size(0) == 1 || tab.size(0) == rows),
                      "table: expected shape (", fk::STEP_COLS, ",), (1, ", fk::STEP_COLS,
                      ") or (", rows, ", ", fk::STEP_COLS, "), got ",
                      py_shape(table->sizes()));
    if (tab.scalar_type() != acc || tab.device() != x.device()) tab = tab.to(x.device(), acc);
    c.keep = tab.contiguous();
    c.ptr = c.keep.template const_data_ptr<A>();
    c.n = c.keep.size(0);
    return c;
  }
  check_schedule(kind, params);
  TORCH_CHECK(times.size() == 4, "times: expected [t, s, t_prev, g]");
  const double t = times[0], s = times[1], tp = times[2], g = times[3];
  if (check) {
    check_unit_interval("t", {t});
    check_unit_interval("s", {s});
    if (!std::isnan(tp)) check_unit_interval("t_prev", {tp});
  }
  double p[fk::kSchedParams] = {0, 0, 0};
  for (size_t i = 0; i < params.size(); ++i) p[i] = params[i];
  const auto st = fk::schedule_at(int(kind), p, t), ss = fk::schedule_at(int(kind), p, s);
  double ap = 1, sp = 1;
  if (!std::isnan(tp)) {
    const auto sc = fk::schedule_at(int(kind), p, tp);
    ap = sc.alpha, sp = sc.sigma;
  }
  const double row[fk::STEP_COLS] = {st.alpha, st.sigma, st.d_alpha, st.d_sigma,
                                     ss.alpha, ss.sigma, ss.d_alpha, ss.d_sigma,
                                     ap,       sp,       s - t,      g};
  c.own.assign(row, row + fk::STEP_COLS);
  c.ptr = c.own.data();
  c.n = 1;
  return c;
}

// ValueError unless `value(row)` is nonzero at every row (flowkern._validate.nonzero).
template <class A, class F>
void check_rows(const StepCoef<A>& c, const std::string& name, const std::string& what,
                const std::string& why, F&& value) {
  for (i64 i = 0; i < c.n; ++i)
    TORCH_CHECK_VALUE(value(c.row(i)) != A(0), name, ": ", what, " is 0 at some sample, and ",
                      why);
}

// The divisions converting `pred` to `dst` needs at time t or s (the rules of
// flowkern/ops/steps.py _nonzero_for).
template <class A>
void check_conversion(const StepCoef<A>& c, int64_t pred, int dst, bool at_s = false) {
  if (pred == dst) return;
  static const char* names[] = {"velocity", "x1", "eps", "score"};
  const std::string at = at_s ? "s" : "t";
  const std::string why =
      std::string("converting ") + names[pred] + " -> " + names[dst] + " divides by it";
  const auto sched = [at_s](const fk::StepRow<A>& r) { return at_s ? r.s : r.t; };
  const bool score = pred == fk::SCORE || dst == fk::SCORE;
  if ((score && !(pred == fk::SCORE && dst == fk::EPS)) ||
      (pred == fk::X1 && (dst == fk::VELOCITY || dst == fk::EPS)))
    check_rows(c, at, "sigma_" + at, why, [&](const fk::StepRow<A>& r) { return sched(r).sigma; });
  if ((pred == fk::EPS || pred == fk::SCORE) && (dst == fk::VELOCITY || dst == fk::X1))
    check_rows(c, at, "alpha_" + at, why, [&](const fk::StepRow<A>& r) { return sched(r).alpha; });
  if (pred == fk::VELOCITY && dst != fk::VELOCITY)
    check_rows(c, at, "alpha*d_sigma - sigma*d_alpha", "converting velocity -> " +
                   std::string(names[dst]) + " divides by it",
               [&](const fk::StepRow<A>& r) {
                 const auto q = sched(r);
                 return q.alpha * q.d_sigma - q.sigma * q.d_alpha;
               });
}

template <class A> void check_sigma_t(const StepCoef<A>& c, const char* why) {
  check_rows(c, "t", "sigma_t", why, [](const fk::StepRow<A>& r) { return r.t.sigma; });
}
template <class A> void check_alpha_t(const StepCoef<A>& c, const char* why) {
  check_rows(c, "t", "alpha_t", why, [](const fk::StepRow<A>& r) { return r.t.alpha; });
}

// A model output (or other input) of x's shape, dtype and device.
void check_like_x(const char* name, const at::Tensor& p, const at::Tensor& x) {
  TORCH_CHECK_VALUE(p.sizes().equals(x.sizes()) && p.scalar_type() == x.scalar_type() &&
                        p.device() == x.device(),
                    name, ": the model output must match the state x in shape, dtype and "
                          "device; got ", py_shape(p.sizes()), " ", py_dtype(p.scalar_type()), " ",
                    p.device(), ", x is ", py_shape(x.sizes()), " ", py_dtype(x.scalar_type()),
                    " ", x.device());
}

void check_step_out(const char* name, const at::Tensor& o, const at::Tensor& x) {
  TORCH_CHECK_VALUE(o.sizes().equals(x.sizes()) && o.scalar_type() == x.scalar_type() &&
                        o.device() == x.device(),
                    name, ": must match x in shape, dtype and device");
  TORCH_CHECK_VALUE(o.is_contiguous(), name, ": must be contiguous");
}

const at::Tensor* opt(const OptT& t) { return t.has_value() ? &*t : nullptr; }

// The dense inputs of a step: x then the named others (absent ones, nullptr,
// dropped), after checking them and the outputs against x.
std::vector<at::Tensor> step_inputs(
    const at::Tensor& x, std::initializer_list<std::pair<const char*, const at::Tensor*>> others,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> outs) {
  check_batch("x", x);
  std::vector<at::Tensor> in{x.contiguous()};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    check_like_x(name, *t, x);
    in.push_back(t->contiguous());
  }
  for (const auto& [name, o] : outs) check_step_out(name, *o, x);
  return in;
}

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
      fn.coef = c.ptr;
      fn.stride = c.stride();
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
                        [&](const auto& c) { check_conversion(c, prediction, fk::VELOCITY); },
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
                       [&](const auto& c) {
                         check_conversion(c, prediction, fk::VELOCITY);
                         check_conversion(c, prediction, fk::VELOCITY, true);
                       },
                       kNoSetup);
}

void check_form(int64_t form) {
  TORCH_CHECK_VALUE(form == fk::EI_DATA || form == fk::EI_NOISE, "form: code ", form,
                    " is out of range [0, 2)");
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
      [&](const auto& c) {
        if (form == fk::EI_DATA) {
          check_sigma_t(c, "the data form divides by it");
          check_conversion(c, prediction, fk::X1);
        } else {
          check_alpha_t(c, "the noise form divides by it");
          check_conversion(c, prediction, fk::EPS);
        }
      },
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
      [&](const auto& c) {
        check_sigma_t(c, "the data form divides by it");
        check_alpha_t(c, "log(alpha_t/sigma_t) needs it");
        check_conversion(c, prediction, fk::X1);
      },
      [&](auto& fn) { fn.second = second; });
}

void em_step(const at::Tensor& x, const at::Tensor& pred, const OptT& pred_uncond,
             FK_STEP_ARGS, int64_t prediction, double guidance, int64_t seed, int64_t offset,
             bool check, at::Tensor& out) {
  const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                              {{"out", &out}});
  run_step<fk::EMFn>("em_step", x, in, FK_STEP_PASS, check, prediction, guidance,
                     pred_uncond.has_value(), {&out}, {uint64_t(seed), offset},
                     [&](const auto& c) {
                       check_conversion(c, prediction, fk::VELOCITY);
                       check_conversion(c, prediction, fk::SCORE);
                     },
                     kNoSetup);
}

template <class A, bool> using ChurnT = fk::ChurnFn<A>;

void churn(const at::Tensor& x, FK_STEP_ARGS, int64_t seed, int64_t offset, bool check,
           at::Tensor& out) {
  const auto in = step_inputs(x, {}, {{"out", &out}});
  run_step<ChurnT>("churn", x, in, FK_STEP_PASS, check, 0, 1.0, false, {&out},
                   {uint64_t(seed), offset},
                   [](const auto& c) { check_alpha_t(c, "churn divides by it"); }, kNoSetup);
}


}  // namespace

#define FK_STEP_SCHEMA "Tensor? table, float[] times, int kind, float[] params"

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def("euler_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA
        ", int prediction, float guidance, bool check, Tensor(a!) out) -> ()");
  m.def("heun_step(Tensor x, Tensor pred, Tensor x_euler, Tensor pred_euler, "
        "Tensor? pred_uncond, Tensor? pred_euler_uncond, " FK_STEP_SCHEMA
        ", int prediction, float guidance, bool check, Tensor(a!) out) -> ()");
  m.def("ei_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA
        ", int prediction, int form, float guidance, bool check) -> Tensor");
  m.def("ei_step.nograd(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA
        ", int prediction, int form, float guidance, bool check) -> Tensor");
  m.def("ei_step_out(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA
        ", int prediction, int form, float guidance, bool check, Tensor(a!) out) -> ()");
  m.def("ei_step_backward(Tensor grad, " FK_STEP_SCHEMA
        ", int prediction, int form, float guidance, bool cfg) -> Tensor[]");
  m.def("dpmpp_2m_step(Tensor x, Tensor pred, Tensor? d_prev, Tensor? pred_uncond, "
        FK_STEP_SCHEMA ", int prediction, float guidance, bool check, Tensor(a!) out, "
        "Tensor(b!) d_out) -> ()");
  m.def("em_step(Tensor x, Tensor pred, Tensor? pred_uncond, " FK_STEP_SCHEMA
        ", int prediction, float guidance, int seed, int offset, bool check, "
        "Tensor(a!) out) -> ()");
  m.def("churn(Tensor x, " FK_STEP_SCHEMA
        ", int seed, int offset, bool check, Tensor(a!) out) -> ()");
}

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
}

}  // namespace flowkern_cpu
