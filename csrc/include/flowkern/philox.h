// Counter-based Gaussian noise, identical on every backend (DESIGN §4 em_step):
// element e of a step draws Philox4x32-10 with key = seed (lo, hi) and counter
// = (offset + e) as (lo, hi, 0, 0), maps the first two words to uniforms as
// Triton's uint_to_uniform_float does, and takes the cosine branch of
// Box-Muller (as tl.randn). flowkern/triton/philox.py and
// flowkern/reference/steps.philox_normal are its twins.
#pragma once

#include <math.h>

#include "hd.h"

namespace fk {

struct NoiseKey { uint64_t seed; i64 offset; };

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

// [0, 1) from 31 random bits, the way Triton maps a uint32.
FK_HD float uniform_from_bits(uint32_t u) {
  int32_t x = int32_t(u);
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

// cos(a) of the Box-Muller angle a = 2 pi u2 in [0, 2 pi). The CPU (and the
// simulator) call cosf. On the GPU, cosf carries a Payne-Hanek reduction for
// |a| > 105615 whose table costs every noise kernel a 28-byte local-memory
// stack frame; here cos(a) = cospi(a / pi) instead, with a / pi = hi + lo to
// ~2^-48 (fmaf residual) and cospi(hi + lo) = cospi(hi) - pi lo sinpi(hi)
// (|pi lo| < 2e-7: the dropped terms are below 1e-13). With exactly rounded
// sinpi/cospi this is within 1.5 ulp of cos(a) (tests/test_cuda_sim_steps.py
// emulates it); CUDA documents sincospif at 1 ulp and cosf itself at 2 ulp.
FK_HD float cos_angle(float a) {
#if defined(__CUDA_ARCH__)
  const float inv_pi_hi = 0.31830987334251404f;   // float(1/pi)
  const float inv_pi_lo = 1.2841276486597053e-08f;  // float(1/pi - inv_pi_hi)
  const float hi = a * inv_pi_hi;
  const float lo = fmaf(a, inv_pi_lo, fmaf(a, inv_pi_hi, -hi));
  float s, c;
  sincospif(hi, &s, &c);
  return fmaf(-3.14159265f * lo, s, c);
#else
  return cosf(a);
#endif
}

FK_HD float normal_at(NoiseKey key, i64 e) {
  const uint64_t ctr = uint64_t(key.offset + e);
  uint32_t c[4] = {uint32_t(ctr), uint32_t(ctr >> 32), 0u, 0u};
  philox4x32_10(c, uint32_t(key.seed), uint32_t(key.seed >> 32));
  float u1 = uniform_from_bits(c[0]);
  const float u2 = uniform_from_bits(c[1]);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  return sqrtf(-2.0f * logf(u1)) * cos_angle(6.283185307179586f * u2);
}

}  // namespace fk
