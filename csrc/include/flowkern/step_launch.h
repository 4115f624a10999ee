// How a step launch builds its functor (steps.h) from the launcher's scalar
// arguments. The CUDA launchers (csrc/cuda/steps.cu) and their grid simulator
// (csrc/cpu/cuda_sim_steps.cpp) both call with_step_fn, so the simulator runs
// exactly the functor the GPU runs. Host-only; no torch, no CUDA headers
// (docs/design.md §9 "No torch headers in .cu files").
#pragma once

#include <type_traits>

#include "steps.h"

namespace fk {

// One launcher per op.
enum StepOp : int {
  EULER_STEP, HEUN_STEP, EI_STEP, EI_STEP_BACKWARD, DPMPP_2M_STEP, EM_STEP, CHURN, LMS_STEP,
  LINCOMB_STEP
};

// The most host weights a step takes: lincomb_step's x and four terms.
constexpr int STEP_MAX_WEIGHTS = LINCOMB_MAX_TERMS + 1;
static_assert(STEP_MAX_WEIGHTS >= LMS_MAX_HISTORY + 1, "lms_step's weights must fit");

// A step's scalar arguments.
struct StepParams {
  int pred;     // prediction type (Pred)
  int variant;  // EI_STEP(_BACKWARD): the form (EIForm); DPMPP_2M_STEP: 1 = second order;
                // LMS_STEP: the number of earlier velocities (0 .. LMS_MAX_HISTORY);
                // LINCOMB_STEP: the number of terms (1 .. LINCOMB_MAX_TERMS)
  bool cfg;     // an unconditional prediction (or its gradient) follows: weight w
  double w;     // guidance weight
  double wts[STEP_MAX_WEIGHTS] = {};  // LMS_STEP, LINCOMB_STEP: the host weights
  double noise_std = 0;               // LINCOMB_STEP: nonzero selects the noise term
};

// Row stride of a (coef_rows, STEP_COLS) step table for `rows` samples: 0 when
// one row serves the batch (as the CPU ops read a (1, 12) table), STEP_COLS
// for one row per sample, -1 when the table fits neither.
inline i64 step_stride(i64 coef_rows, i64 rows) {
  if (coef_rows == 1) return 0;
  return coef_rows == rows ? STEP_COLS : -1;
}

template <class Fn, class A> Fn step_base(const StepSrc<A>& coef, const StepParams& p) {
  Fn fn{};
  fn.coef = coef;
  fn.pred = p.pred;
  fn.w = A(p.w);
  return fn;
}

// Returns f(fn) for OP's functor in accumulation type A reading its
// coefficients from `coef`; p.cfg picks the CFG instantiation (churn has none).
template <int OP, class A, class F>
decltype(auto) with_step_fn(const StepSrc<A>& coef, const StepParams& p, F&& f) {
  const auto go = [&](auto cfg) -> decltype(auto) {
    [[maybe_unused]] constexpr bool CFG = decltype(cfg)::value;  // churn has none
    if constexpr (OP == EULER_STEP) {
      return f(step_base<EulerFn<A, CFG>>(coef, p));
    } else if constexpr (OP == HEUN_STEP) {
      return f(step_base<HeunFn<A, CFG>>(coef, p));
    } else if constexpr (OP == EI_STEP) {
      auto fn = step_base<EIFn<A, CFG>>(coef, p);
      fn.form = p.variant;
      return f(fn);
    } else if constexpr (OP == EI_STEP_BACKWARD) {
      auto fn = step_base<EIBwdFn<A, CFG>>(coef, p);
      fn.form = p.variant;
      return f(fn);
    } else if constexpr (OP == DPMPP_2M_STEP) {
      auto fn = step_base<DPMpp2MFn<A, CFG>>(coef, p);
      fn.second = p.variant != 0;
      return f(fn);
    } else if constexpr (OP == EM_STEP) {
      return f(step_base<EMFn<A, CFG>>(coef, p));
    } else if constexpr (OP == LMS_STEP) {
      const auto lms = [&](auto nh) -> decltype(auto) {
        auto fn = step_base<LMSFn<A, CFG, decltype(nh)::value>>(coef, p);
        for (int j = 0; j <= LMS_MAX_HISTORY; ++j) fn.wts[j] = A(p.wts[j]);
        return f(fn);
      };
      // the launchers check the count (kBadTensors); 3 stands for any other
      switch (p.variant) {
        case 0: return lms(std::integral_constant<int, 0>{});
        case 1: return lms(std::integral_constant<int, 1>{});
        case 2: return lms(std::integral_constant<int, 2>{});
        default: return lms(std::integral_constant<int, 3>{});
      }
    } else if constexpr (OP == LINCOMB_STEP) {
      const auto lc = [&](auto nt, auto nz) -> decltype(auto) {
        auto fn = step_base<LincombStepFn<A, decltype(nt)::value, decltype(nz)::value>>(coef, p);
        for (int j = 0; j < STEP_MAX_WEIGHTS; ++j) fn.wts[j] = A(p.wts[j]);
        fn.noise_std = A(p.noise_std);
        return f(fn);
      };
      const auto terms = [&](auto nz) -> decltype(auto) {
        // the launchers check the count (kBadTensors); the largest stands for any other
        constexpr int kMax = decltype(nz)::value ? LINCOMB_MAX_NOISY_TERMS : LINCOMB_MAX_TERMS;
        switch (p.variant) {
          case 1: return lc(std::integral_constant<int, 1>{}, nz);
          case 2: return lc(std::integral_constant<int, 2>{}, nz);
          case 3: return lc(std::integral_constant<int, 3>{}, nz);
          default: return lc(std::integral_constant<int, kMax>{}, nz);
        }
      };
      if (p.noise_std != 0) return terms(std::true_type{});
      return terms(std::false_type{});
    } else {
      static_assert(OP == CHURN, "unknown step op");
      return f(step_base<ChurnFn<A>>(coef, p));
    }
  };
  if (p.cfg && OP != CHURN && OP != LINCOMB_STEP) return go(std::true_type{});
  return go(std::false_type{});
}

}  // namespace fk
