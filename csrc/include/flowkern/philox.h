// Counter-based Gaussian noise, identical on every backend (docs/design.md §4 em_step):
// stream index n = offset + e (with per-sample seeds: key = the row's seed, e
// counted within the row; NoiseKey). One Philox4x32-10 call, key = seed (lo,
// hi), counter = n / 4 as (lo, hi, 0, 0), gives four words and four normals:
// words (0, 1) and (2, 3) are two uniform pairs (Triton's uint -> [0, 1) map)
// and each pair gives both Box-Muller outputs, R cos(theta) and R sin(theta);
// n % 4 picks one (normal_at). flowkern/triton/philox.py and
// flowkern/reference/steps.philox_normal are its twins; the CPU kernels draw
// the same numbers a block at a time, one Philox call and two logarithms per
// four elements (noise_block.h).
#pragma once

#include <math.h>

#include "hd.h"

namespace fk {

// `seeds`: per-sample seeds (docs/design.md §4 "Per-sample seeds"): row r
// then draws as if it were a batch of one with seed seeds[r], so its noise
// does not depend on the batch it is in (for_row).
struct NoiseKey {
  uint64_t seed;
  i64 offset;
  const int64_t* seeds = nullptr;
};

// The key of row r (of `inner` elements) such that normal_at(key, e) for the
// flat element index e draws the batch-wide counter offset + e, or, with
// per-sample seeds, seed seeds[r] at counter offset + (e - r inner).
FK_HD NoiseKey for_row(NoiseKey key, i64 r, i64 inner) {
  if (key.seeds == nullptr) return key;
  return {uint64_t(key.seeds[r]), key.offset - r * inner, nullptr};
}

FK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
}

FK_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mulhi32(0xCD9E8D57u, c2) ^ c[1] ^ k0;
    c[2] = mulhi32(0xD2511F53u, c0) ^ c[3] ^ k1;
    c[1] = 0xCD9E8D57u * c2;
    c[3] = 0xD2511F53u * c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// [0, 1) from 31 random bits, the way Triton maps a uint32 (x < 0 -> ~x,
// written branch-free so that the CPU's block loop vectorises).
FK_HD float uniform_from_bits(uint32_t u) {
  const int32_t x = int32_t(u);
  return float(x ^ (x >> 31)) * 4.6566127342e-10f;
}

#if defined(__CUDA_ARCH__)
// cos(a), or sin(a) when `sine`, of the Box-Muller angle a = 2 pi u2 in
// [0, 2 pi). cosf/sinf carry a Payne-Hanek reduction for |a| > 105615 whose
// table costs every noise kernel a 28-byte local-memory stack frame; here
// cos(a) = cospi(a / pi) instead, with a / pi = hi + lo to ~2^-48 (fmaf
// residual) and cospi(hi + lo) = cospi(hi) - pi lo sinpi(hi), sinpi(hi + lo)
// = sinpi(hi) + pi lo cospi(hi) (|pi lo| < 2e-7: the dropped terms are below
// 1e-13). With exactly rounded sinpi/cospi this is within 1.5 ulp of cos(a)
// and sin(a) (tests/test_cuda_sim_steps.py emulates it); CUDA documents
// sincospif at 1 ulp and cosf itself at 2 ulp.
__device__ inline float cos_or_sin(float a, bool sine) {
  const float inv_pi_hi = 0.31830987334251404f;   // float(1/pi)
  const float inv_pi_lo = 1.2841276486597053e-08f;  // float(1/pi - inv_pi_hi)
  const float hi = a * inv_pi_hi;
  const float lo = fmaf(a, inv_pi_lo, fmaf(a, inv_pi_hi, -hi));
  float s, c;
  sincospif(hi, &s, &c);
  const float d = 3.14159265f * lo;
  return sine ? fmaf(d, c, s) : fmaf(-d, s, c);
}
__device__ inline float log_unit(float x) { return logf(x); }
#else
// Inlined into the CPU kernels' ISA-specific loops (csrc/cpu/noise.cpp).
#define FK_HOST_INLINE __attribute__((always_inline)) inline

// The host's log and cos, rounded to float: evaluated in double by
// branch-free polynomials (below 1e-13 relative error, so correctly rounded
// but for values within 1e-13 of a rounding boundary; glibc's logf/cosf miss
// the correct rounding on ~1% of these arguments), so that the CPU kernels'
// block loop (noise_block.h) vectorises them. CUDA's logf is within 1 ulp.

// ln(x) for a float x in [1e-7, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^15/15), s = (m - 1)/(m + 1),
// |s| <= 0.1716 (the next term is < 1e-14 of ln m).
FK_HOST_INLINE float log_unit(float x) {
  const uint32_t bits = float_bits(x);
  int e = int((bits >> 23) & 0xffu) - 127;
  double m = bits_float((bits & 0x7fffffu) | 0x3f800000u);
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  e = big ? e + 1 : e;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double p = 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  return float(double(e) * 0.6931471805599453 + 2.0 * s * p);
}

// cos(a) and sin(a) for a float a in [0, 2 pi]: a = q pi/2 + r, |r| <= pi/4,
// with pi/2 split into a 33-bit head (q * head is exact) and its tail
// (fdlibm's pio2_1, pio2_1t); Taylor polynomials of cos r and sin r to r^14
// and r^15, evaluated once for both; sin(q pi/2 + r) = cos((q - 1) pi/2 + r).
FK_HOST_INLINE void cos_and_sin(float a, float& cos_a, float& sin_a) {
  const double x = a;
  const double q = floor(x * 0.6366197723675814 + 0.5);
  const double r = (x - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11;
  const double r2 = r * r;
  double c = -1.0 / 87178291200.0;
  c = c * r2 + 1.0 / 479001600.0;
  c = c * r2 - 1.0 / 3628800.0;
  c = c * r2 + 1.0 / 40320.0;
  c = c * r2 - 1.0 / 720.0;
  c = c * r2 + 1.0 / 24.0;
  c = c * r2 - 0.5;
  c = c * r2 + 1.0;
  double s = -1.0 / 1307674368000.0;
  s = s * r2 + 1.0 / 6227020800.0;
  s = s * r2 - 1.0 / 39916800.0;
  s = s * r2 + 1.0 / 362880.0;
  s = s * r2 - 1.0 / 5040.0;
  s = s * r2 + 1.0 / 120.0;
  s = s * r2 - 1.0 / 6.0;
  s = r + r * r2 * s;
  // cos(k pi/2 + r) for k = -1..4: +s, +c, -s, -c, +s, +c (selects, no
  // branches); cos takes k = q, sin k = q - 1
  const auto at = [&](double k) {
    const double odd = (k == 1.0) | (k == 3.0) | (k == -1.0) ? 1.0 : 0.0;
    const double neg = (k == 1.0) | (k == 2.0) ? -1.0 : 1.0;
    return float(neg * (odd * s + (1.0 - odd) * c));
  };
  cos_a = at(q);
  sin_a = at(q - 1.0);
}

FK_HOST_INLINE float cos_or_sin(float a, bool sine) {
  float c, s;
  cos_and_sin(a, c, s);
  return sine ? s : c;
}
#endif

#if defined(__CUDA_ARCH__)
#define FK_NOISE_INLINE FK_HD
#else
#define FK_NOISE_INLINE FK_HOST_INLINE
#endif

// Box-Muller's radius sqrt(-2 log u1) from a pair's first word.
FK_NOISE_INLINE float bm_radius(uint32_t w0) {
  float u1 = uniform_from_bits(w0);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  return sqrtf(-2.0f * log_unit(u1));
}

// Box-Muller's angle 2 pi u2 from a pair's second word.
FK_NOISE_INLINE float bm_angle(uint32_t w1) { return 6.283185307179586f * uniform_from_bits(w1); }

// Stream index n's normal: Philox(key, n / 4), pair (n % 4) / 2, and the
// cosine (n even) or sine (n odd) output of Box-Muller.
FK_HD float normal_at(NoiseKey key, i64 e) {
  const uint64_t n = uint64_t(key.offset + e), ctr = n >> 2;
  uint32_t c[4] = {uint32_t(ctr), uint32_t(ctr >> 32), 0u, 0u};
  philox4x32_10(c, uint32_t(key.seed), uint32_t(key.seed >> 32));
  const bool second = (n & 2u) != 0;
  const float radius = bm_radius(second ? c[2] : c[0]);
  return radius * cos_or_sin(bm_angle(second ? c[3] : c[1]), (n & 1u) != 0);
}

}  // namespace fk
