// The built-in schedules of docs/design.md §2 at one time t: (alpha, sigma, d_alpha,
// d_sigma) in double precision. Mirrors flowkern/schedules.py (the Python
// classes are the reference; tests/test_schedules.py holds the two to the
// same values). The CPU op flowkern::schedule_table builds the kernels'
// (B, 4) coefficient table from it in one call.
#pragma once

#include <math.h>

#include "coeffs.h"
#include "hd.h"

namespace fk {

// Must match the kinds of flowkern/schedules.py's _NATIVE table.
enum SchedKind : int { LINEAR = 0, COSINE = 1, POLYNOMIAL = 2, VP = 3, VE = 4, EDM = 5 };
constexpr int kSchedParams = 3;  // the most parameters a built-in takes

// p: the schedule's parameters, in the order of the Python constructor:
// polynomial (n), vp (beta_min, beta_max), ve (sigma_min, sigma_max),
// edm (sigma_min, sigma_max, rho).
FK_HD Sched<double> schedule_at(int kind, const double* p, double t) {
  switch (kind) {
    case LINEAR: return {t, 1 - t, 1, -1};
    case COSINE: {
      const double h = 0.5 * M_PI;
      const double s = sin(h * t), c = cos(h * t);
      return {s, c, h * c, -h * s};
    }
    case POLYNOMIAL: {
      const double n = p[0], a = pow(t, n), d = n * pow(t, n - 1);
      return {a, 1 - a, d, -d};
    }
    case VP: {
      // s = 1 - t; log alpha = -s^2 (b_max - b_min)/4 - s b_min/2;
      // sigma^2 = -expm1(2 log alpha), accurate near t = 1.
      const double bmin = p[0], bmax = p[1], s = 1 - t;
      const double la = -0.25 * s * s * (bmax - bmin) - 0.5 * s * bmin;
      const double dla = 0.5 * s * (bmax - bmin) + 0.5 * bmin;
      const double alpha = exp(la), sigma = sqrt(-expm1(2 * la));
      return {alpha, sigma, alpha * dla, -alpha * alpha * dla / sigma};
    }
    case VE: {
      const double smin = p[0], r = log(p[1] / smin), sigma = smin * exp(r * (1 - t));
      return {1, sigma, 0, -r * sigma};
    }
    default: {  // EDM: sigma = (hi + t (lo - hi))^rho, lo/hi = sigma_min/max^(1/rho)
      const double rho = p[2], lo = pow(p[0], 1 / rho), hi = pow(p[1], 1 / rho);
      const double b = hi + t * (lo - hi);
      return {1, pow(b, rho), 0, rho * pow(b, rho - 1) * (lo - hi)};
    }
  }
}

}  // namespace fk
