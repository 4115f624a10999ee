// The CPU kernels' noise: philox.h's normal_at for a block of consecutive
// elements, written lane-parallel so that the compiler vectorises Philox's
// integer rounds and the host's polynomial log, cos and sin (philox.h); the
// numbers are bitwise those of normal_at, at a quarter of its Philox calls
// and half of its logarithms and polynomials. Needs -fno-math-errno and
// -fno-trapping-math (setup.py) for the selects to vectorise. Host only: the
// GPU draws per element in the kernel.
#pragma once

#include "philox.h"

namespace fk {

constexpr int kNoiseBlock = 64;   // the elements of one lincomb block (lincomb.h kBlock)
constexpr int kNoiseChunk = 256;  // the stream indices of one normal_chunk

// tmp[i] = the normal of stream index 4 ctr0 + i (philox.h normal_at), for
// i < kNoiseChunk: 64 Philox calls, both uniform pairs of each, both
// Box-Muller outputs of each pair. Long enough that every loop below runs
// whole vectors with independent chains (a 64-element block's 17 calls
// were latency-bound: measured 2.3 ns/element, 1.4 here).
FK_HOST_INLINE void normal_chunk(uint64_t seed, uint64_t ctr0, float* tmp) {
  constexpr int C = kNoiseChunk / 4, P = 2 * C;
  uint32_t c0[C], c1[C], c2[C], c3[C];
  for (int j = 0; j < C; ++j) {
    const uint64_t ctr = ctr0 + uint64_t(j);
    c0[j] = uint32_t(ctr);
    c1[j] = uint32_t(ctr >> 32);
    c2[j] = 0u;
    c3[j] = 0u;
  }
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int i = 0; i < 10; ++i) {  // philox4x32_10's rounds, one lane per counter
    for (int j = 0; j < C; ++j) {
      const uint64_t p0 = uint64_t(0xCD9E8D57u) * c2[j];
      const uint64_t p2 = uint64_t(0xD2511F53u) * c0[j];
      c0[j] = uint32_t(p0 >> 32) ^ c1[j] ^ k0;
      c2[j] = uint32_t(p2 >> 32) ^ c3[j] ^ k1;
      c1[j] = uint32_t(p0);
      c3[j] = uint32_t(p2);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // pair 2 j: words (0, 1) of counter j; pair 2 j + 1: words (2, 3)
  uint32_t w0[P], w1[P];
  for (int j = 0; j < C; ++j) {
    w0[2 * j] = c0[j];
    w1[2 * j] = c1[j];
    w0[2 * j + 1] = c2[j];
    w1[2 * j + 1] = c3[j];
  }
  float rc[P], rs[P];
  for (int p = 0; p < P; ++p) {
    const float radius = bm_radius(w0[p]);
    float c, s;
    cos_and_sin(bm_angle(w1[p]), c, s);
    rc[p] = radius * c;
    rs[p] = radius * s;
  }
  for (int p = 0; p < P; ++p) {
    tmp[2 * p] = rc[p];
    tmp[2 * p + 1] = rs[p];
  }
}

// out[i] = normal_at(key, e0 + i) for i < n, with the widest vector ISA this
// CPU has (csrc/cpu/noise.cpp).
void fill_normals(NoiseKey key, i64 e0, i64 n, float* out);

// Re-reads FLOWKERN_CPU_ISA and picks fill_normals' path; the CPU ops call it
// once per launch, before their parallel loop.
void refresh_noise_isa();

}  // namespace fk
