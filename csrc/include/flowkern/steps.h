// Row functors of the sampler-step family (docs/design.md §4 "Sampling"). Every step
// is affine in its inputs with per-sample coefficients, plus (EM, churn) a
// noise term drawn in the kernel; the lincomb engine runs them all.
//
// Step table: one row of STEP_COLS values per sample, or a single row shared
// by the batch (row stride 0, as samplers precompute it per step):
//   [alpha_t, sigma_t, d_alpha_t, d_sigma_t,  alpha_s, sigma_s, d_alpha_s, d_sigma_s,
//    alpha_p, sigma_p,  h = s - t,  g]
// (p: the previous time of DPM-Solver++(2M); g: the EM diffusion coefficient).
// Guidance: with CFG the inputs carry the conditional prediction p_c and, last,
// the unconditional p_u; the guided prediction p_u + w (p_c - p_u) is never
// formed: its coefficient c splits into w c (for p_c) and (1 - w) c (for p_u).
#pragma once

#include <math.h>

#include <type_traits>

#include "coeffs.h"
#include "lincomb.h"
#include "schedules.h"

namespace fk {

constexpr int STEP_COLS = 12;
enum EIForm : int { EI_DATA = 0, EI_NOISE = 1 };
constexpr int LMS_MAX_HISTORY = 3;          // lms_step's earlier velocities
constexpr int LINCOMB_MAX_TERMS = 4;        // lincomb_step's terms
constexpr int LINCOMB_MAX_NOISY_TERMS = 3;  // ... with its in-kernel noise (LincombStepFn)

// The most host weights a step takes: lincomb_step's x and four terms.
constexpr int STEP_MAX_WEIGHTS = LINCOMB_MAX_TERMS + 1;
static_assert(STEP_MAX_WEIGHTS >= LMS_MAX_HISTORY + 1, "lms_step's weights must fit");

// A step launch's scalar arguments, from which its functor is built
// (step_launch.h with_step_fn; the CPU op, the CUDA launcher and the grid
// simulator all build it from these).
struct StepParams {
  int pred;     // prediction type (Pred)
  int variant;  // the functor's own (set() below): EI form, DPM order, history or term count
  bool cfg;     // an unconditional prediction (or its gradient) follows: weight w
  double w;     // guidance weight
  double wts[STEP_MAX_WEIGHTS] = {};  // lms_step, lincomb_step: the host weights
  double noise_std = 0;               // lincomb_step: nonzero selects the noise term
};

template <class A> struct StepRow {
  Sched<A> t, s;
  A alpha_p, sigma_p, h, g;
};

template <class A> FK_HD StepRow<A> load_step(const A* coef, i64 stride, i64 r) {
  const A* c = coef + r * stride;
  return {{c[0], c[1], c[2], c[3]}, {c[4], c[5], c[6], c[7]}, c[8], c[9], c[10], c[11]};
}

// The inverse of load_step: a row's STEP_COLS values at out.
template <class A> FK_HD void store_step(const StepRow<A>& r, A* out) {
  const A v[STEP_COLS] = {r.t.alpha, r.t.sigma, r.t.d_alpha, r.t.d_sigma, r.s.alpha, r.s.sigma,
                          r.s.d_alpha, r.s.d_sigma, r.alpha_p, r.sigma_p, r.h, r.g};
  for (int i = 0; i < STEP_COLS; ++i) out[i] = v[i];
}

// Where a step kernel reads a row's step coefficients: a table in memory
// (row r at table + r * stride; stride 0 when one row serves the batch);
// or, with `by_time`, the built-in schedule (kind, p; schedules.h) evaluated
// here in double at the row's times t, s and t_prev (each a pointer or a
// value; t_prev absent when NaN by value), with h = s - t and g by value:
// per-sample times a caller gives as tensors, with no table built; or else
// the one row `one` held by value (a sampler step at one time for the whole
// batch: no table tensor, no copy to the device). Read with constant
// indices only (see SchedSrc in schedules.h).
template <class A> struct StepSrc {
  const A* table = nullptr;
  i64 stride = 0;
  A one[STEP_COLS] = {};
  bool by_time = false;
  TimeSrc t, s, t_prev;
  double g = 0;
  int kind = 0;
  double p[kSchedParams] = {0, 0, 0};
  FK_HD StepRow<A> at(i64 r) const {
    if (table != nullptr) return load_step(table, stride, r);
    if (by_time) return timed(r);
    return {{one[0], one[1], one[2], one[3]}, {one[4], one[5], one[6], one[7]},
            one[8], one[9], one[10], one[11]};
  }
  // The built-in schedule at row r's times: each value in double, then
  // rounded to A (also the one row the host builds from float times,
  // csrc/cpu/step_args.h step_coef).
  FK_HD StepRow<A> timed(i64 r) const {
    const double tr = t.at(r), sr = s.at(r), pr = t_prev.at(r);
    const Sched<double> a = schedule_at(kind, p, tr), b = schedule_at(kind, p, sr);
    double ap = 1, sp = 1;
    if (!isnan(pr)) {
      const Sched<double> c = schedule_at(kind, p, pr);
      ap = c.alpha, sp = c.sigma;
    }
    return {{A(a.alpha), A(a.sigma), A(a.d_alpha), A(a.d_sigma)},
            {A(b.alpha), A(b.sigma), A(b.d_alpha), A(b.d_sigma)},
            A(ap), A(sp), A(sr - tr), A(g)};
  }
  // at(r) is the same row for every r (lincomb.h uniform_rows).
  FK_HD bool uniform() const {
    if (table != nullptr) return stride == 0;
    return !by_time || (t.uniform() && s.uniform() && t_prev.uniform());
  }
};

// Shared fields of every step functor. A functor with fields of its own
// hides set() (filled from the launch's StepParams) and valid() (whether
// those scalars are in range: the launchers refuse others).
template <class A> struct StepBase {
  StepSrc<A> coef; int pred; A w;
  bool uniform() const { return coef.uniform(); }  // every step's row reads only coef
  void set(const StepParams&) {}
  static bool valid(const StepParams&) { return true; }
};

// Puts coefficient c of the guided prediction at columns jc (p_c) and ju (p_u).
template <class A, int NO, int NI>
FK_HD void put_guided(Mat<A, NO, NI>& M, int k, int jc, int ju, A c, A w) {
  if (ju >= 0) { M.m[k][jc] = w * c; M.m[k][ju] = (A(1) - w) * c; }
  else M.m[k][jc] = c;
}

// Euler: x_s = x + h u_t. In (x, p[, p_u]).
template <class A, bool CFG> struct EulerFn : StepBase<A> {
  static constexpr int NI = CFG ? 3 : 2, NO = 1;
  FK_HD Mat<A, 1, NI> row(i64 r) const {
    const StepRow<A> c = this->coef.at(r);
    const Lin2<A> u = convert_coeffs(this->pred, VELOCITY, c.t);
    Mat<A, 1, NI> M{};
    M.m[0][0] = A(1) + c.h * u.a;
    put_guided(M, 0, 1, CFG ? 2 : -1, c.h * u.b, this->w);
    return M;
  }
};

// Heun, second stage: x_s = x + h/2 (u_t(x, p) + u_s(x_e, p_e)).
// In (x, p, x_e, p_e[, p_u, p_e_u]).
template <class A, bool CFG> struct HeunFn : StepBase<A> {
  static constexpr int NI = CFG ? 6 : 4, NO = 1;
  FK_HD Mat<A, 1, NI> row(i64 r) const {
    const StepRow<A> c = this->coef.at(r);
    const Lin2<A> ut = convert_coeffs(this->pred, VELOCITY, c.t);
    const Lin2<A> us = convert_coeffs(this->pred, VELOCITY, c.s);
    const A hh = A(0.5) * c.h;
    Mat<A, 1, NI> M{};
    M.m[0][0] = A(1) + hh * ut.a;
    M.m[0][2] = hh * us.a;
    put_guided(M, 0, 1, CFG ? 4 : -1, hh * ut.b, this->w);
    put_guided(M, 0, 3, CFG ? 5 : -1, hh * us.b, this->w);
    return M;
  }
};

// First-order exponential integrator / DDIM, as x_s = a x + b p:
// data form  x_s = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d,
// noise form x_s = (alpha_s/alpha_t) x + (sigma_s - alpha_s sigma_t/alpha_t) eps,
// with d (eps) the prediction converted in registers.
template <class A> FK_HD Lin2<A> ei_coeffs(int pred, int form, const StepRow<A>& c) {
  if (form == EI_DATA) {
    const Lin2<A> d = convert_coeffs(pred, X1, c.t);
    const A q = c.s.sigma / c.t.sigma;
    const A B = c.s.alpha - q * c.t.alpha;
    return {q + B * d.a, B * d.b};
  }
  const Lin2<A> e = convert_coeffs(pred, EPS, c.t);
  const A q = c.s.alpha / c.t.alpha;
  const A C = c.s.sigma - q * c.t.sigma;
  return {q + C * e.a, C * e.b};
}

// In (x, p[, p_u]) -> x_s.
template <class A, bool CFG> struct EIFn : StepBase<A> {
  static constexpr int NI = CFG ? 3 : 2, NO = 1;
  int form;
  void set(const StepParams& p) { form = p.variant; }
  static bool valid(const StepParams& p) { return p.variant == EI_DATA || p.variant == EI_NOISE; }
  FK_HD Mat<A, 1, NI> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(this->pred, form, this->coef.at(r));
    Mat<A, 1, NI> M{};
    M.m[0][0] = e.a;
    put_guided(M, 0, 1, CFG ? 2 : -1, e.b, this->w);
    return M;
  }
};

// Its vector-Jacobian product: in (g) -> (g_x, g_p[, g_p_u]).
template <class A, bool CFG> struct EIBwdFn : StepBase<A> {
  static constexpr int NI = 1, NO = CFG ? 3 : 2;
  int form;
  void set(const StepParams& p) { form = p.variant; }
  static bool valid(const StepParams& p) { return EIFn<A, CFG>::valid(p); }
  FK_HD Mat<A, NO, 1> row(i64 r) const {
    const Lin2<A> e = ei_coeffs(this->pred, form, this->coef.at(r));
    Mat<A, NO, 1> M{};
    M.m[0][0] = e.a;
    if (CFG) { M.m[1][0] = this->w * e.b; M.m[NO - 1][0] = (A(1) - this->w) * e.b; }
    else M.m[1][0] = e.b;
    return M;
  }
};

// DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): lambda = log(alpha/sigma),
// h = lambda_s - lambda_t, r = (lambda_t - lambda_p)/h,
// D = (1 + 1/(2r)) d_t - d_prev/(2r), x_s = (sigma_s/sigma_t) x - alpha_s expm1(-h) D.
// First order (D = d_t) when `second` is false or h is not finite (sigma_s = 0).
// In (x, p, d_prev[, p_u]) -> (x_s, d_t); d_t is stored for the next step.
// d_t does not read d_prev (lincomb.h reads()): a NaN there stays out of it.
template <class A, bool CFG> struct DPMpp2MFn : StepBase<A> {
  static constexpr int NI = CFG ? 4 : 3, NO = 2;
  FK_HD static constexpr bool reads(int k, int j) { return !(k == 1 && j == 2); }
  bool second;
  void set(const StepParams& p) { second = p.variant != 0; }
  static bool valid(const StepParams& p) { return p.variant == 0 || p.variant == 1; }
  FK_HD Mat<A, 2, NI> row(i64 r) const {
    const StepRow<A> c = this->coef.at(r);
    const Lin2<A> d = convert_coeffs(this->pred, X1, c.t);
    const A lt = log(c.t.alpha / c.t.sigma), ls = log(c.s.alpha / c.s.sigma);
    const A h = ls - lt;
    A c1 = A(1), c2 = A(0);
    if (second && isfinite(h)) {
      const A rr = (lt - log(c.alpha_p / c.sigma_p)) / h;
      c2 = A(1) / (A(2) * rr);
      c1 = A(1) + c2;
    }
    const A E = -c.s.alpha * expm1(-h);  // alpha_s (1 - e^{-h})
    Mat<A, 2, NI> M{};
    M.m[0][0] = c.s.sigma / c.t.sigma + E * c1 * d.a;
    M.m[0][2] = -E * c2;
    put_guided(M, 0, 1, CFG ? 3 : -1, E * c1 * d.b, this->w);
    M.m[1][0] = d.a;
    put_guided(M, 1, 1, CFG ? 3 : -1, d.b, this->w);
    return M;
  }
};

// Linear multistep (Adams-Bashforth on the step's nodes; k-diffusion's
// sample_lms): u_t = the velocity of the guided prediction at t,
// x_s = x + wts[0] u_t + sum_{j=1..NH} wts[j] u_{t_{i-j}}, with the NH earlier
// velocities passed in (the newest first) and the weights (integrals of the
// Lagrange basis over [t, s]) computed by the caller. Returns (x_s, u_t); u_t
// is the next step's history. u_t does not read the history (reads()).
// In (x, p, u_1 .. u_NH[, p_u]) -> (x_s, u_t).

template <class A, bool CFG, int NH> struct LMSFn : StepBase<A> {
  static_assert(NH >= 0 && NH <= LMS_MAX_HISTORY, "lms_step keeps at most 3 earlier velocities");
  static constexpr int NI = 2 + NH + (CFG ? 1 : 0), NO = 2;
  FK_HD static constexpr bool reads(int k, int j) { return !(k == 1 && j >= 2 && j < 2 + NH); }
  A wts[LMS_MAX_HISTORY + 1];
  void set(const StepParams& p) {
    for (int j = 0; j <= LMS_MAX_HISTORY; ++j) wts[j] = A(p.wts[j]);
  }
  FK_HD Mat<A, 2, NI> row(i64 r) const {
    const Lin2<A> u = convert_coeffs(this->pred, VELOCITY, this->coef.at(r).t);
    Mat<A, 2, NI> M{};
    M.m[0][0] = A(1) + wts[0] * u.a;
    put_guided(M, 0, 1, CFG ? NI - 1 : -1, wts[0] * u.b, this->w);
FK_UNROLL
    for (int j = 0; j < NH; ++j) M.m[0][2 + j] = wts[1 + j];
    M.m[1][0] = u.a;
    put_guided(M, 1, 1, CFG ? NI - 1 : -1, u.b, this->w);
    return M;
  }
};

// lincomb_step: x_s = c_x x + sum_k c_k p_k (+ c_xi xi), a step whose
// coefficients the caller computed on the host (k-diffusion's
// DPM-Solver++(3M) SDE over the model's last three denoised outputs): the
// engine's matrix itself, one row for the batch, no table. In (x, p_1 .. p_NT);
// wts = (c_x, c_1 .. c_NT); NZ: the in-kernel noise term, std noise_std. With
// noise at most 3 terms: 5 half-precision 128-bit packs and a Philox draw per
// element spill at the engine's 64 registers (tests/test_cuda_build.py); a
// caller's own noise tensor is a term.

template <class A, int NT, bool NZ> struct LincombStepFn : StepBase<A> {
  static_assert(NT >= 1 && NT <= (NZ ? LINCOMB_MAX_NOISY_TERMS : LINCOMB_MAX_TERMS),
                "lincomb_step combines 1 to 4 terms, 1 to 3 with its noise");
  static constexpr int NI = 1 + NT, NO = 1;
  static constexpr bool NOISE = NZ;
  A wts[LINCOMB_MAX_TERMS + 1];
  A noise_std;
  void set(const StepParams& p) {
    for (int j = 0; j <= LINCOMB_MAX_TERMS; ++j) wts[j] = A(p.wts[j]);
    noise_std = A(p.noise_std);
  }
  FK_HD Mat<A, 1, NI> row(i64) const {
    Mat<A, 1, NI> M{};
FK_UNROLL
    for (int j = 0; j < NI; ++j) M.m[0][j] = wts[j];
    M.noise[0] = NZ ? noise_std : A(0);
    return M;
  }
};

// Euler-Maruyama for dX = [u + g^2/2 s] dt + g dW:
// x_s = x + h (u + g^2/2 score) + g sqrt(h) xi. In (x, p[, p_u]).
template <class A, bool CFG> struct EMFn : StepBase<A> {
  static constexpr int NI = CFG ? 3 : 2, NO = 1;
  static constexpr bool NOISE = true;
  FK_HD Mat<A, 1, NI> row(i64 r) const {
    const StepRow<A> c = this->coef.at(r);
    const Lin2<A> u = convert_coeffs(this->pred, VELOCITY, c.t);
    const Lin2<A> s = convert_coeffs(this->pred, SCORE, c.t);
    const A k = A(0.5) * c.g * c.g;
    Mat<A, 1, NI> M{};
    M.m[0][0] = A(1) + c.h * (u.a + k * s.a);
    put_guided(M, 0, 1, CFG ? 2 : -1, c.h * (u.b + k * s.b), this->w);
    M.noise[0] = c.g * sqrt(c.h);
    return M;
  }
};

// Churn: renoise from t to an earlier t_hat (the table's "s" columns):
// x_hat = (alpha_that/alpha_t) x + sqrt(sigma_that^2 - (alpha_that sigma_t/alpha_t)^2) xi.
template <class A> struct ChurnFn : StepBase<A> {
  static constexpr int NI = 1, NO = 1;
  static constexpr bool NOISE = true;
  FK_HD Mat<A, 1, 1> row(i64 r) const {
    const StepRow<A> c = this->coef.at(r);
    const A q = c.s.alpha / c.t.alpha;
    const A base = q * c.t.sigma;
    A var = c.s.sigma * c.s.sigma - base * base;
    if (!(var > A(0))) var = A(0);
    Mat<A, 1, 1> M{};
    M.m[0][0] = q;
    M.noise[0] = sqrt(var);
    return M;
  }
};

// ------------------------------------------------------------ the step ops

// How a launch builds a step's functor from its StepParams (the makers of
// FK_STEP_OPS): with(coef, p, f) returns f(fn), valid(p) says whether the
// scalars are in range. Guided: a template <class A, bool CFG> functor, p.cfg
// picking the instantiation; Unguided: a template <class A> one.
template <class Fn, class A> Fn make_step(const StepSrc<A>& coef, const StepParams& p) {
  Fn fn{};
  fn.coef = coef;
  fn.pred = p.pred;
  fn.w = A(p.w);
  fn.set(p);
  return fn;
}

template <template <class, bool> class FnT> struct Guided {
  template <class A, class F>
  static decltype(auto) with(const StepSrc<A>& coef, const StepParams& p, F&& f) {
    if (p.cfg) return f(make_step<FnT<A, true>>(coef, p));
    return f(make_step<FnT<A, false>>(coef, p));
  }
  static bool valid(const StepParams& p) {
    return FnT<float, false>::valid(p) && FnT<float, true>::valid(p);
  }
};

template <template <class> class FnT> struct Unguided {
  template <class A, class F>
  static decltype(auto) with(const StepSrc<A>& coef, const StepParams& p, F&& f) {
    return f(make_step<FnT<A>>(coef, p));
  }
  static bool valid(const StepParams& p) { return !p.cfg && FnT<float>::valid(p); }
};

// lms_step: the history length p.variant (0 .. LMS_MAX_HISTORY) is a template parameter.
struct LMSMaker {
  template <class A, class F>
  static decltype(auto) with(const StepSrc<A>& coef, const StepParams& p, F&& f) {
    const auto go = [&](auto cfg, auto nh) -> decltype(auto) {
      return f(make_step<LMSFn<A, decltype(cfg)::value, decltype(nh)::value>>(coef, p));
    };
    const auto hist = [&](auto cfg) -> decltype(auto) {
      switch (p.variant) {  // valid() refuses any other; 3 stands for it
        case 0: return go(cfg, std::integral_constant<int, 0>{});
        case 1: return go(cfg, std::integral_constant<int, 1>{});
        case 2: return go(cfg, std::integral_constant<int, 2>{});
        default: return go(cfg, std::integral_constant<int, 3>{});
      }
    };
    if (p.cfg) return hist(std::true_type{});
    return hist(std::false_type{});
  }
  static bool valid(const StepParams& p) { return p.variant >= 0 && p.variant <= LMS_MAX_HISTORY; }
};

// lincomb_step: the term count p.variant and the noise (p.noise_std != 0)
// are template parameters; no guidance.
struct LincombMaker {
  template <class A, class F>
  static decltype(auto) with(const StepSrc<A>& coef, const StepParams& p, F&& f) {
    const auto go = [&](auto nt, auto nz) -> decltype(auto) {
      return f(make_step<LincombStepFn<A, decltype(nt)::value, decltype(nz)::value>>(coef, p));
    };
    const auto terms = [&](auto nz) -> decltype(auto) {
      // valid() refuses any other count; the largest stands for it
      constexpr int kMax = decltype(nz)::value ? LINCOMB_MAX_NOISY_TERMS : LINCOMB_MAX_TERMS;
      switch (p.variant) {
        case 1: return go(std::integral_constant<int, 1>{}, nz);
        case 2: return go(std::integral_constant<int, 2>{}, nz);
        case 3: return go(std::integral_constant<int, 3>{}, nz);
        default: return go(std::integral_constant<int, kMax>{}, nz);
      }
    };
    if (p.noise_std != 0) return terms(std::true_type{});
    return terms(std::false_type{});
  }
  static bool valid(const StepParams& p) {
    return !p.cfg && p.variant >= 1 &&
           p.variant <= (p.noise_std != 0 ? LINCOMB_MAX_NOISY_TERMS : LINCOMB_MAX_TERMS);
  }
};

// Every step op, once: (enum id, op name, maker). The enum fk::StepOp, the
// names, fk::with_step_fn and the launchers' dispatch (step_launch.h) come
// from this list; a new step adds its functor above and one line here.
#define FK_STEP_OPS(X)                                   \
  X(EULER_STEP, euler_step, Guided<EulerFn>)             \
  X(HEUN_STEP, heun_step, Guided<HeunFn>)                \
  X(EI_STEP, ei_step, Guided<EIFn>)                      \
  X(EI_STEP_BACKWARD, ei_step_backward, Guided<EIBwdFn>) \
  X(DPMPP_2M_STEP, dpmpp_2m_step, Guided<DPMpp2MFn>)     \
  X(EM_STEP, em_step, Guided<EMFn>)                      \
  X(CHURN, churn, Unguided<ChurnFn>)                     \
  X(LMS_STEP, lms_step, LMSMaker)                        \
  X(LINCOMB_STEP, lincomb_step, LincombMaker)

}  // namespace fk
