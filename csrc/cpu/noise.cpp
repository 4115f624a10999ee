// fk::fill_normals: the CPU kernels' in-kernel noise (noise_block.h), one
// copy per vector ISA, picked once at run time. The numbers are the same
// bits on every path (integer Philox, and the same double-precision
// polynomials in the same order); only their width differs.
// FLOWKERN_CPU_ISA=base forces the baseline path (tests run both).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "flowkern/noise_block.h"

namespace {

using fk::i64;
using Fill = void (*)(fk::NoiseKey, i64, i64, float*);

// The last chunk this thread computed. The engine draws a segment's noise
// per row (lincomb.h), so rows shorter than a chunk (8 x 64: four rows per
// chunk) would compute each chunk once per row that reads it: 4x the
// numbers. Keyed by the path too, so that a test comparing two ISAs never
// compares one path's numbers with themselves.
struct LastChunk {
  Fill path = nullptr;
  uint64_t seed = 0, first = 0;  // v[i]: the normal of stream index first + i
  alignas(64) float v[fk::kNoiseChunk];
};
thread_local LastChunk t_last;

// out[i] = the normal of stream index key.offset + e0 + i, i < n: whole
// chunks from the 4-aligned index at or below it, their window copied out.
template <class Chunk>
inline void fill_chunks(Fill path, fk::NoiseKey key, i64 e0, i64 n, float* out, Chunk&& chunk) {
  LastChunk& last = t_last;
  uint64_t idx = uint64_t(key.offset + e0);
  for (i64 done = 0; done < n;) {
    if (last.path != path || last.seed != key.seed || idx < last.first ||
        idx - last.first >= uint64_t(fk::kNoiseChunk)) {
      const uint64_t base = idx & ~uint64_t(3);
      last.path = nullptr;  // not valid until the chunk is written
      chunk(key.seed, base >> 2, last.v);
      last.path = path;
      last.seed = key.seed;
      last.first = base;
    }
    const i64 skip = i64(idx - last.first);
    const i64 take = std::min<i64>(fk::kNoiseChunk - skip, n - done);
    std::copy(last.v + skip, last.v + skip + take, out + done);
    done += take;
    idx += uint64_t(take);
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
void fill_avx512(fk::NoiseKey key, i64 e0, i64 n, float* out) {
  fill_chunks(&fill_avx512, key, e0, n, out,
              [](uint64_t s, uint64_t c, float* o) { fk::normal_chunk(s, c, o); });
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
void fill_avx2(fk::NoiseKey key, i64 e0, i64 n, float* out) {
  fill_chunks(&fill_avx2, key, e0, n, out,
              [](uint64_t s, uint64_t c, float* o) { fk::normal_chunk(s, c, o); });
}
#pragma GCC pop_options

void fill_base(fk::NoiseKey key, i64 e0, i64 n, float* out) {
  fill_chunks(&fill_base, key, e0, n, out,
              [](uint64_t s, uint64_t c, float* o) { fk::normal_chunk(s, c, o); });
}

Fill pick() {
  const char* env = std::getenv("FLOWKERN_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return fill_base;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return fill_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return fill_avx2;
  return fill_base;
}

}  // namespace

namespace fk {

// The path in use: picked by refresh_noise_isa() at the start of every noisy
// CPU launch (one getenv per op call; the tests switch FLOWKERN_CPU_ISA
// between calls), not per block: a getenv per 64 elements cost ~2 ns/element.
static std::atomic<Fill> g_fill{nullptr};

void refresh_noise_isa() { g_fill.store(pick(), std::memory_order_relaxed); }

void fill_normals(NoiseKey key, i64 e0, i64 n, float* out) {
  Fill f = g_fill.load(std::memory_order_relaxed);
  if (f == nullptr) {
    f = pick();
    g_fill.store(f, std::memory_order_relaxed);
  }
  f(key, e0, n, out);
}

}  // namespace fk
