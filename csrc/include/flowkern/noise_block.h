// The CPU kernels' noise: philox.h's normal_at for a block of consecutive
// elements, written lane-parallel so that the compiler vectorises Philox's
// integer rounds and the host's polynomial log and cos (philox.h); the
// numbers are bitwise those of normal_at. Needs -fno-math-errno and
// -fno-trapping-math (setup.py) for the selects to vectorise. Host only: the
// GPU draws per element in the kernel.
#pragma once

#include "philox.h"

namespace fk {

constexpr int kNoiseBlock = 64;

// out[l] = normal_at(key, e0 + l) for l < kNoiseBlock.
FK_HOST_INLINE void normal_block(NoiseKey key, i64 e0, float* out) {
  constexpr int L = kNoiseBlock;
  uint32_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    const uint64_t ctr = uint64_t(key.offset + e0 + l);
    c0[l] = uint32_t(ctr);
    c1[l] = uint32_t(ctr >> 32);
    c2[l] = 0u;
    c3[l] = 0u;
  }
  uint32_t k0 = uint32_t(key.seed), k1 = uint32_t(key.seed >> 32);
  for (int i = 0; i < 10; ++i) {  // philox4x32_10's rounds, one lane per element
    for (int l = 0; l < L; ++l) {
      const uint64_t p0 = uint64_t(0xCD9E8D57u) * c2[l];
      const uint64_t p2 = uint64_t(0xD2511F53u) * c0[l];
      c0[l] = uint32_t(p0 >> 32) ^ c1[l] ^ k0;
      c2[l] = uint32_t(p2 >> 32) ^ c3[l] ^ k1;
      c1[l] = uint32_t(p0);
      c3[l] = uint32_t(p2);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < L; ++l) out[l] = box_muller(c0[l], c1[l]);
}

// out[i] = normal_at(key, e0 + i) for i < n, with the widest vector ISA this
// CPU has (csrc/cpu/noise.cpp).
void fill_normals(NoiseKey key, i64 e0, i64 n, float* out);

// Re-reads FLOWKERN_CPU_ISA and picks fill_normals' path; the CPU ops call it
// once per launch, before their parallel loop.
void refresh_noise_isa();

}  // namespace fk
