// The sampler-step ops of flowkern/ops/schemas.inc, written once for every
// device: each op checks its arguments (step_args.h), states its value checks
// and builds the launch's scalars (fk::StepParams), then hands the launch to
// the device's runner R (through launch(), which checks the prediction code
// first, for every runner):
//   R::run<OP>(in, outs, coef, check, p, noise, checks)  one launch of step
//       op OP (fk::StepOp, flowkern/steps.h FK_STEP_OPS) over the dense inputs
//       `in` (x first) and the outputs; `coef` the step's coefficient
//       arguments (nullptr: none); checks(StepCoef) the op's value checks,
//       run where the coefficient values are on the host
//   R::values_read(check)   whether values in the tensors' memory are read
//                           for checks (CPU: always; CUDA: FLOWKERN_DEBUG=1)
//   R::empty(x)             a fresh output like x
// The CPU runner is in steps.cpp, the CUDA glue's (on the GPU launchers and
// on the grid simulator's) in csrc/cuda/glue.h. Steps write into
// caller-provided outputs (samplers reuse their buffers; `out` may alias `x`,
// since every element is read before it is written).
//
// Step coefficients, in every `.times` schema: `Tensor? table, Tensor? t, Tensor? s,
// Tensor? t_prev, float[] times, int kind, float[] params` (FK_STEP_ARGS; the
// default overloads lack t, s, t_prev: Plain below). A
// table (flowkern.step_table: (12,), (1, 12) or (B, 12)) is used as given;
// without one, times = [t, s, t_prev, g] (t_prev NaN when absent) and the
// built-in schedule (kind, params) give the row, in double precision; a time
// given as a tensor (per-sample times: (), (1,) or (B,)) replaces its float,
// and the schedule is evaluated at each row's times (step_coef, step_args.h;
// on CUDA in the kernel, fk::StepSrc).
#pragma once

#include <vector>

#include "flowkern/step_launch.h"
#include "step_args.h"

namespace flowkern_cpu {

// A step's coefficient arguments, as the schemas pass them.
struct StepTimes {
  const OptT& table;
  const OptT &t, &s, &t_prev;
  const std::vector<double>& times;
  int64_t kind;
  const std::vector<double>& params;
};

// A noisy step's stream: seed, offset and the per-sample seeds (step_seeds).
struct StepNoise {
  int64_t seed = 0, offset = 0;
  OptT seeds;  // optional: a default stable Tensor costs a shim call and two heap objects
};

// The launch scalars of a step with a prediction type and guidance.
inline fk::StepParams guided(int64_t prediction, int variant, const OptT& pred_uncond,
                             double guidance) {
  return {int(prediction), variant, pred_uncond.has_value(), guidance};
}

template <class R> struct StepOps {
  using Outs = std::vector<Tensor*>;

  // One launch of step op OP on the runner, after the prediction code check.
  template <int OP, class Checks>
  static void launch(const std::vector<Tensor>& in, const Outs& outs, const StepTimes* coef,
                     bool check, const fk::StepParams& p, const StepNoise& noise,
                     Checks&& checks) {
    check_code("prediction", p.pred, kPreds);
    R::template run<OP>(in, outs, coef, check, p, noise, checks);
  }

  static void euler_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                         FK_STEP_ARGS, int64_t prediction, double guidance, bool check,
                         Tensor& out) {
    const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                                {{"out", &out}});
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::EULER_STEP>(in, Outs{&out}, &coef, check,
                           guided(prediction, 0, pred_uncond, guidance), {},
                           [&](const auto& c) {
                             check_conversion(c, prediction, fk::VELOCITY);
                           });
  }

  static void heun_step(const Tensor& x, const Tensor& pred, const Tensor& x_euler,
                        const Tensor& pred_euler, const OptT& pred_uncond,
                        const OptT& pred_euler_uncond, FK_STEP_ARGS, int64_t prediction,
                        double guidance, bool check, Tensor& out) {
    FK_CHECK_VALUE(pred_uncond.has_value() == pred_euler_uncond.has_value(),
                   "pred_euler_uncond: give both unconditional predictions or neither");
    check_batch("x_euler", x_euler);
    const auto in = step_inputs(x, {{"pred", &pred}, {"x_euler", &x_euler},
                                    {"pred_euler", &pred_euler},
                                    {"pred_uncond", opt(pred_uncond)},
                                    {"pred_euler_uncond", opt(pred_euler_uncond)}},
                                {{"out", &out}});
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::HEUN_STEP>(in, Outs{&out}, &coef, check,
                          guided(prediction, 0, pred_uncond, guidance), {},
                          [&](const auto& c) {
                            check_conversion(c, prediction, fk::VELOCITY);
                            check_conversion(c, prediction, fk::VELOCITY, true);
                          });
  }

  // Exponential integrator: the data form divides by sigma_t, the noise form by alpha_t.
  template <class A> static void ei_checks(const StepCoef<A>& c, int64_t pred, int64_t form) {
    if (form == fk::EI_DATA) {
      check_sigma_t(c, "the data form divides by it");
      check_conversion(c, pred, fk::X1);
    } else {
      check_alpha_t(c, "the noise form divides by it");
      check_conversion(c, pred, fk::EPS);
    }
  }

  static void ei_step_out(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                          FK_STEP_ARGS, int64_t prediction, int64_t form, double guidance,
                          bool check, Tensor& out) {
    check_form(form);
    const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                                {{"out", &out}});
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::EI_STEP>(in, Outs{&out}, &coef, check,
                        guided(prediction, int(form), pred_uncond, guidance), {},
                        [&](const auto& c) { ei_checks(c, prediction, form); });
  }

  static Tensor ei_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                            FK_STEP_ARGS, int64_t prediction, int64_t form, double guidance,
                            bool check) {
    check_batch("x", x);
    auto out = R::empty(x);
    ei_step_out(x, pred, pred_uncond, FK_STEP_PASS, prediction, form, guidance, check, out);
    return out;
  }

  // Gradients (g_x, g_pred[, g_pred_uncond]) of ei_step.
  static std::vector<Tensor> ei_step_backward(const Tensor& grad, FK_STEP_ARGS,
                                                  int64_t prediction, int64_t form,
                                                  double guidance, bool cfg) {
    check_form(form);
    check_batch("grad", grad);
    const std::vector<Tensor> in{contig(grad)};
    std::vector<Tensor> g;
    for (int k = 0; k < (cfg ? 3 : 2); ++k) g.push_back(R::empty(in[0]));
    Outs outs;
    for (auto& t : g) outs.push_back(&t);
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::EI_STEP_BACKWARD>(in, outs, &coef, false,
                                 {int(prediction), int(form), cfg, guidance}, {},
                                 [](const auto&) {});
    return g;
  }

  static void dpmpp_2m_step(const Tensor& x, const Tensor& pred, const OptT& d_prev,
                            const OptT& pred_uncond, FK_STEP_ARGS, int64_t prediction,
                            double guidance, bool check, Tensor& out, Tensor& d_out) {
    // Without d_prev the first-order step ignores the third input: x stands there.
    const auto in = step_inputs(
        x, {{"pred", &pred}, {"d_prev", d_prev.has_value() ? &*d_prev : &x},
            {"pred_uncond", opt(pred_uncond)}},
        {{"out", &out}, {"d_out", &d_out}});
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::DPMPP_2M_STEP>(
        in, Outs{&out, &d_out}, &coef, check,
        guided(prediction, d_prev.has_value(), pred_uncond, guidance), {},
        [&](const auto& c) {
          check_sigma_t(c, "the data form divides by it");
          // alpha_t = 0 (pure noise, lambda_t = -inf) is the first-order limit the
          // kernel takes (h = inf: E = alpha_s, x_s = (sigma_s/sigma_t) x + alpha_s d,
          // DDIM from zero SNR); between two pure-noise levels the step is undefined
          using A = typename std::decay_t<decltype(c)>::value_type;
          check_rows(c, "t", "each of alpha_t, alpha_s",
                     "the step between two pure-noise levels (lambda = -inf) is undefined",
                     [](const fk::StepRow<A>& r) {
                       return r.t.alpha != A(0) || r.s.alpha != A(0) ? A(1) : A(0);
                     });
          check_conversion(c, prediction, fk::X1);
        });
  }

  static void em_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                      FK_STEP_ARGS, int64_t prediction, double guidance, int64_t seed,
                      int64_t offset, const OptT& per_sample_seeds, bool check, Tensor& out) {
    const auto in = step_inputs(x, {{"pred", &pred}, {"pred_uncond", opt(pred_uncond)}},
                                {{"out", &out}});
    const StepNoise noise{seed, offset, step_seeds(per_sample_seeds, x, R::values_read(check))};
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::EM_STEP>(in, Outs{&out}, &coef, check,
                        guided(prediction, 0, pred_uncond, guidance), noise,
                        [&](const auto& c) {
                          check_conversion(c, prediction, fk::VELOCITY);
                          check_conversion(c, prediction, fk::SCORE);
                          check_step_direction(c, true);
                        });
  }

  static void churn(const Tensor& x, FK_STEP_ARGS, int64_t seed, int64_t offset,
                    const OptT& per_sample_seeds, bool check, Tensor& out) {
    const auto in = step_inputs(x, {}, {{"out", &out}});
    const StepNoise noise{seed, offset, step_seeds(per_sample_seeds, x, R::values_read(check))};
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::CHURN>(in, Outs{&out}, &coef, check, {fk::VELOCITY, 0, false, 1.0},
                      noise, [](const auto& c) {
                        check_alpha_t(c, "churn divides by it");
                        check_step_direction(c, false);
                      });
  }

  static void lms_step(const Tensor& x, const Tensor& pred, const OptT& u1,
                       const OptT& u2, const OptT& u3, const OptT& pred_uncond,
                       const std::vector<double>& weights, FK_STEP_ARGS, int64_t prediction,
                       double guidance, bool check, Tensor& out, Tensor& u_out) {
    const int nh = lms_history(u1, u2, u3, weights);
    const auto in = step_inputs(x, {{"pred", &pred}, {"u1", opt(u1)}, {"u2", opt(u2)},
                                    {"u3", opt(u3)}, {"pred_uncond", opt(pred_uncond)}},
                                {{"out", &out}, {"u_out", &u_out}});
    fk::StepParams p = guided(prediction, nh, pred_uncond, guidance);
    for (int j = 0; j <= nh; ++j) p.wts[j] = weights[size_t(j)];
    const StepTimes coef{FK_STEP_PASS};
    launch<fk::LMS_STEP>(in, Outs{&out, &u_out}, &coef, check, p, {},
                         [&](const auto& c) {
                           check_conversion(c, prediction, fk::VELOCITY);
                         });
  }

  // No coefficient table: the caller's weights are the matrix.
  static void lincomb_step(const Tensor& x, const std::vector<Tensor>& terms,
                           const std::vector<double>& weights, double noise_std, int64_t seed,
                           int64_t offset, const OptT& per_sample_seeds, bool check,
                           Tensor& out) {
    const int nt = lincomb_terms(terms, weights, noise_std);
    const auto in = lincomb_inputs(x, terms, out);
    const StepNoise noise{seed, offset, step_seeds(per_sample_seeds, x, R::values_read(check))};
    fk::StepParams p{fk::VELOCITY, nt, false, 1.0};
    for (int j = 0; j <= nt; ++j) p.wts[j] = weights[size_t(j)];
    p.noise_std = noise_std;
    launch<fk::LINCOMB_STEP>(in, Outs{&out}, nullptr, check, p, noise,
                             [](const auto&) {});
  }

  // The default overloads: float times or a table, no per-sample time
  // tensors (their schemas lack t, s, t_prev: schemas.inc), each the op above
  // with none of them.
  struct Plain {
    static inline const OptT none{};
#define FK_PLAIN_ARGS \
  const OptT &table, const std::vector<double>&times, int64_t kind, const std::vector<double>&params
#define FK_PLAIN_PASS table, none, none, none, times, kind, params
    static void euler_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                           FK_PLAIN_ARGS, int64_t prediction, double guidance, bool check,
                           Tensor& out) {
      StepOps::euler_step(x, pred, pred_uncond, FK_PLAIN_PASS, prediction, guidance, check,
                          out);
    }
    static void heun_step(const Tensor& x, const Tensor& pred, const Tensor& x_euler,
                          const Tensor& pred_euler, const OptT& pred_uncond,
                          const OptT& pred_euler_uncond, FK_PLAIN_ARGS, int64_t prediction,
                          double guidance, bool check, Tensor& out) {
      StepOps::heun_step(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond,
                         FK_PLAIN_PASS, prediction, guidance, check, out);
    }
    static Tensor ei_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                          FK_PLAIN_ARGS, int64_t prediction, int64_t form, double guidance,
                          bool check) {
      return StepOps::ei_step(x, pred, pred_uncond, FK_PLAIN_PASS, prediction, form, guidance,
                              check);
    }
    static void ei_step_out(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                            FK_PLAIN_ARGS, int64_t prediction, int64_t form, double guidance,
                            bool check, Tensor& out) {
      StepOps::ei_step_out(x, pred, pred_uncond, FK_PLAIN_PASS, prediction, form, guidance,
                           check, out);
    }
    static void dpmpp_2m_step(const Tensor& x, const Tensor& pred, const OptT& d_prev,
                              const OptT& pred_uncond, FK_PLAIN_ARGS, int64_t prediction,
                              double guidance, bool check, Tensor& out, Tensor& d_out) {
      StepOps::dpmpp_2m_step(x, pred, d_prev, pred_uncond, FK_PLAIN_PASS, prediction, guidance,
                             check, out, d_out);
    }
    static void em_step(const Tensor& x, const Tensor& pred, const OptT& pred_uncond,
                        FK_PLAIN_ARGS, int64_t prediction, double guidance, int64_t seed,
                        int64_t offset, const OptT& per_sample_seeds, bool check, Tensor& out) {
      StepOps::em_step(x, pred, pred_uncond, FK_PLAIN_PASS, prediction, guidance, seed, offset,
                       per_sample_seeds, check, out);
    }
    static void churn(const Tensor& x, FK_PLAIN_ARGS, int64_t seed, int64_t offset,
                      const OptT& per_sample_seeds, bool check, Tensor& out) {
      StepOps::churn(x, FK_PLAIN_PASS, seed, offset, per_sample_seeds, check, out);
    }
    static void lms_step(const Tensor& x, const Tensor& pred, const OptT& u1, const OptT& u2,
                         const OptT& u3, const OptT& pred_uncond,
                         const std::vector<double>& weights, FK_PLAIN_ARGS, int64_t prediction,
                         double guidance, bool check, Tensor& out, Tensor& u_out) {
      StepOps::lms_step(x, pred, u1, u2, u3, pred_uncond, weights, FK_PLAIN_PASS, prediction,
                        guidance, check, out, u_out);
    }
#undef FK_PLAIN_ARGS
#undef FK_PLAIN_PASS
  };

  // Every op above as the kernel of its schema in library m: the default
  // overloads (and ei_step.nograd) Plain's, the `.times` ones the full ops.
  static void register_all(torch::stable::detail::StableLibrary& m) {
    m.impl("euler_step", TORCH_BOX(&Plain::euler_step));
    m.impl("euler_step.times", TORCH_BOX(&euler_step));
    m.impl("heun_step", TORCH_BOX(&Plain::heun_step));
    m.impl("heun_step.times", TORCH_BOX(&heun_step));
    m.impl("ei_step", TORCH_BOX(&Plain::ei_step));
    m.impl("ei_step.nograd", TORCH_BOX(&Plain::ei_step));
    m.impl("ei_step.times", TORCH_BOX(&ei_step));
    m.impl("ei_step.times_nograd", TORCH_BOX(&ei_step));
    m.impl("ei_step_out", TORCH_BOX(&Plain::ei_step_out));
    m.impl("ei_step_out.times", TORCH_BOX(&ei_step_out));
    m.impl("ei_step_backward", TORCH_BOX(&ei_step_backward));
    m.impl("dpmpp_2m_step", TORCH_BOX(&Plain::dpmpp_2m_step));
    m.impl("dpmpp_2m_step.times", TORCH_BOX(&dpmpp_2m_step));
    m.impl("em_step", TORCH_BOX(&Plain::em_step));
    m.impl("em_step.times", TORCH_BOX(&em_step));
    m.impl("churn", TORCH_BOX(&Plain::churn));
    m.impl("churn.times", TORCH_BOX(&churn));
    m.impl("lms_step", TORCH_BOX(&Plain::lms_step));
    m.impl("lms_step.times", TORCH_BOX(&lms_step));
    m.impl("lincomb_step", TORCH_BOX(&lincomb_step));
  }
};

}  // namespace flowkern_cpu
