// The built-in schedules of docs/design.md §2 at one time t: (alpha, sigma, d_alpha,
// d_sigma) in double precision. Mirrors flowkern/schedules.py (the Python
// classes are the reference; tests/test_schedules.py holds the two to the
// same values). The CPU ops evaluate it on the host per row; the CUDA
// kernels evaluate it per row from a times tensor (SchedSrc below), so that
// no coefficient table is built before a launch (docs/design.md §8).
#pragma once

#include <math.h>

#include <type_traits>

#include "coeffs.h"
#include "hd.h"

namespace fk {

// Must match the kinds of flowkern/schedules.py's _NATIVE table.
enum SchedKind : int { LINEAR = 0, COSINE = 1, POLYNOMIAL = 2, VP = 3, VE = 4, EDM = 5 };
constexpr int kSchedParams = 3;  // the most parameters a built-in takes

// sin(a) and cos(a) of a = (pi/2) t. On the GPU not through sin/cos: CUDA's
// double versions bring their large-argument reduction, a 40-byte
// local-memory stack frame, into every kernel that calls them. There q =
// fl(a/pi), e = a - pi q from two fma residuals against pi = PI_HI + PI_LO
// (|e| < 1e-15), and sin(a) = sinpi(q) + e cospi(q), cos(a) = cospi(q) -
// e sinpi(q); the dropped terms are O(e^2). At t = 1 this gives cos(a) =
// 6.1e-17 like the host and torch (a = fl(pi/2) is not pi/2), not 0.
FK_HD void sincos_half_pi(double t, double* s, double* c) {
  const double a = 0.5 * M_PI * t;
#if defined(__CUDA_ARCH__)
  const double q = a * M_1_PI;
  double e = fma(-q, 3.141592653589793, a);
  e = fma(-q, 1.2246467991473532e-16, e);
  double sq, cq;
  sincospi(q, &sq, &cq);
  *s = fma(e, cq, sq);
  *c = fma(-e, sq, cq);
#else
  *s = sin(a);
  *c = cos(a);
#endif
}

// pow(x, y). On the GPU not through pow: CUDA's accurate double pow is an
// out-of-line call in every kernel that uses it. There exp2(y log2|x|)
// (relative error ~|y log2 x| ulp, about 1e-15 for these schedules) with
// pow's special cases: x^0 = 1^y = 1, a negative base only to integer powers.
FK_HD double pow_d(double x, double y) {
#if defined(__CUDA_ARCH__)
  if (y == 0.0 || x == 1.0) return 1.0;
  const double m = exp2(y * log2(fabs(x)));
  if (x >= 0.0) return m;
  if (y != floor(y)) return __longlong_as_double(0x7ff8000000000000ULL);  // NaN
  return 0.5 * y != floor(0.5 * y) ? -m : m;
#else
  return pow(x, y);
#endif
}

// p: the schedule's parameters, in the order of the Python constructor:
// polynomial (n), vp (beta_min, beta_max), ve (sigma_min, sigma_max),
// edm (sigma_min, sigma_max, rho). KIND known at compile time: loops over
// many times take the kind's switch out of the loop (with_sched_kind).
template <int KIND> FK_HD Sched<double> schedule_of(const double* p, double t) {
  if constexpr (KIND == LINEAR) {
    return {t, 1 - t, 1, -1};
  } else if constexpr (KIND == COSINE) {
    // sigma = cos(pi t / 2) written sin(pi (1 - t) / 2): exactly 0 at t = 1
    // (cos(fl(pi/2)) is 6.1e-17), accurate near it (flowkern/schedules.py).
    const double h = 0.5 * M_PI;
    double a, s, unused;
    sincos_half_pi(t, &a, &unused);
    sincos_half_pi(1 - t, &s, &unused);
    return {a, s, h * s, -h * a};
  } else if constexpr (KIND == POLYNOMIAL) {
    const double n = p[0], a = pow_d(t, n), d = n * pow_d(t, n - 1);
    return {a, 1 - a, d, -d};
  } else if constexpr (KIND == VP) {
    // s = 1 - t; log alpha = -s^2 (b_max - b_min)/4 - s b_min/2;
    // sigma^2 = -expm1(2 log alpha), accurate near t = 1.
    const double bmin = p[0], bmax = p[1], s = 1 - t;
    const double la = -0.25 * s * s * (bmax - bmin) - 0.5 * s * bmin;
    const double dla = 0.5 * s * (bmax - bmin) + 0.5 * bmin;
    const double alpha = exp(la), sigma = sqrt(-expm1(2 * la));
    return {alpha, sigma, alpha * dla, -alpha * alpha * dla / sigma};
  } else if constexpr (KIND == VE) {
    const double smin = p[0], r = log(p[1] / smin), sigma = smin * exp(r * (1 - t));
    return {1, sigma, 0, -r * sigma};
  } else {  // EDM: sigma = (hi + t (lo - hi))^rho, lo/hi = sigma_min/max^(1/rho)
    const double rho = p[2], lo = pow_d(p[0], 1 / rho), hi = pow_d(p[1], 1 / rho);
    const double b = hi + t * (lo - hi);
    return {1, pow_d(b, rho), 0, rho * pow_d(b, rho - 1) * (lo - hi)};
  }
}

// The same with the kind at run time (an unknown kind reads as EDM; the ops
// check kinds first).
FK_HD Sched<double> schedule_at(int kind, const double* p, double t) {
  switch (kind) {
    case LINEAR: return schedule_of<LINEAR>(p, t);
    case COSINE: return schedule_of<COSINE>(p, t);
    case POLYNOMIAL: return schedule_of<POLYNOMIAL>(p, t);
    case VP: return schedule_of<VP>(p, t);
    case VE: return schedule_of<VE>(p, t);
    default: return schedule_of<EDM>(p, t);
  }
}

#if !defined(__CUDACC__)
// f(std::integral_constant<int, KIND>{}) for a kind known at run time: a host
// loop over many rows switches once, and its body inlines the kind's
// formula (the training ops' host table, coef_args.h; the schedule_table
// op, schedules.cpp).
template <class F> decltype(auto) with_sched_kind(int kind, F&& f) {
  switch (kind) {
    case LINEAR: return f(std::integral_constant<int, LINEAR>{});
    case COSINE: return f(std::integral_constant<int, COSINE>{});
    case POLYNOMIAL: return f(std::integral_constant<int, POLYNOMIAL>{});
    case VP: return f(std::integral_constant<int, VP>{});
    case VE: return f(std::integral_constant<int, VE>{});
    default: return f(std::integral_constant<int, EDM>{});
  }
}
#endif

// A time per row: `p` (float32, or float64 when f64) at r * step, or,
// without p, `value` for every row.
struct TimeSrc {
  const void* p = nullptr;
  bool f64 = false;
  i64 step = 0;
  double value = 0;
  FK_HD double at(i64 r) const {
    if (p == nullptr) return value;
    return f64 ? static_cast<const double*>(p)[r * step]
               : double(static_cast<const float*>(p)[r * step]);
  }
  FK_HD bool uniform() const { return p == nullptr || step == 0; }  // one time for every row
};

// Where a training kernel reads a row's schedule values (the functors of
// training.h): a (n, 4) table in memory (row r at r * row_step, row_step 0
// when one row serves the batch); else per-row times `t` (t_step 0 or 1;
// float32 or float64, read as the caller gave them) of the built-in schedule
// (kind, p), evaluated in double here; else `one`, a
// single row held by value. Rows are read with constant indices only: a
// member array indexed at run time would move the kernel's parameters to
// local memory.
template <class A> struct SchedSrc {
  const A* table = nullptr;
  i64 row_step = 0;
  const void* t = nullptr;  // float, or double when t_f64
  bool t_f64 = false;
  i64 t_step = 0;
  int kind = 0;
  double p[kSchedParams] = {0, 0, 0};
  Sched<A> one{};
  FK_HD Sched<A> at(i64 r) const {
    if (table != nullptr) return load_sched(table, r * row_step);
    if (t != nullptr) {
      const double tr = t_f64 ? static_cast<const double*>(t)[r * t_step]
                              : double(static_cast<const float*>(t)[r * t_step]);
      const Sched<double> s = schedule_at(kind, p, tr);
      return {A(s.alpha), A(s.sigma), A(s.d_alpha), A(s.d_sigma)};
    }
    return one;
  }
  // at(r) is the same row for every r (lincomb.h uniform_rows).
  FK_HD bool uniform() const {
    return table != nullptr ? row_step == 0 : (t == nullptr || t_step == 0);
  }
};

}  // namespace fk
