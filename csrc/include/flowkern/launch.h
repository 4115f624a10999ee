// Launch plans of the CUDA kernels, shared by the launchers (csrc/cuda/) and
// the CPU grid simulator (csrc/cpu/cuda_sim.cpp), so that the simulator sweeps
// exactly the grid the GPU runs. Host-only integer arithmetic; no torch, no
// CUDA headers (docs/design.md §9 "No torch headers in .cu files").
#pragma once

#include <stdint.h>

#include <type_traits>

#include "lincomb.h"

namespace fk {

// 132 SMs (H100 SXM) x 16 blocks of 256 threads: two waves of full occupancy;
// beyond that the grid-stride loop is cheaper than more blocks.
constexpr i64 kDefaultMaxBlocks = 132 * 16;
constexpr int kThreads = 256;
// Elements one row-sum block reduces: 16 per thread, enough to hide latency
// while a batch of few large samples still spreads over many blocks.
constexpr i64 kRowsumChunk = 16 * kThreads;
// Threads of the loss's one finishing block (rowsum.h LossFinish): the most a
// block may have, so that a batch of many small samples (a 2-D toy's 65536
// rows) is 64 rows per thread.
constexpr int kFinishThreads = 1024;
// gridDim.x limit of sm_30 and later.
constexpr i64 kMaxGridX = 2147483647;

inline i64 cdiv(i64 a, i64 b) { return (a + b - 1) / b; }

struct LincombPlan {
  int vec;      // elements per thread per iteration (one 128-bit access when > 1)
  int threads;  // per block
  i64 blocks;   // 0: nothing to launch
};

// vec = 16 / elem_size when every row splits into whole 16-byte packs
// (inner % vec == 0) and every pointer is 16-byte aligned, else 1.
inline LincombPlan plan_lincomb(i64 rows, i64 inner, int elem_size, bool all_16B_aligned,
                                i64 max_blocks = kDefaultMaxBlocks) {
  const int wide = 16 / elem_size;
  const int vec = (all_16B_aligned && inner % wide == 0) ? wide : 1;
  const i64 chunks = rows * inner / vec;
  if (max_blocks <= 0) max_blocks = kDefaultMaxBlocks;
  if (max_blocks > kMaxGridX) max_blocks = kMaxGridX;
  i64 blocks = cdiv(chunks, kThreads);
  if (blocks > max_blocks) blocks = max_blocks;
  return {vec, kThreads, blocks};
}

struct RowsumPlan {
  int threads;    // per block, a power of two (the tree halves it)
  i64 chunk_len;  // elements of a row one block reduces
  i64 nchunks;    // blocks per row; the kernel writes (rows, nchunks) partials
  i64 blocks;     // rows * nchunks, one block per (row, chunk)
};

// inner == 0 still gets one chunk per row, so every partial is written (as 0).
inline RowsumPlan plan_rowsum(i64 rows, i64 inner, i64 chunk_len = kRowsumChunk) {
  if (chunk_len <= 0) chunk_len = kRowsumChunk;
  const i64 nchunks = inner > 0 ? cdiv(inner, chunk_len) : 1;
  return {kThreads, chunk_len, nchunks, rows * nchunks};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The plan of a lincomb launch over these very pointers.
template <class T, int NI, int NO>
LincombPlan plan_lincomb_for(i64 rows, i64 inner, const Ptrs<T, NI>& in,
                             const OutPtrs<T, NO>& out, i64 max_blocks) {
  bool ok = true;
  for (int j = 0; j < NI; ++j) ok = ok && aligned16(in.p[j]);
  for (int k = 0; k < NO; ++k) ok = ok && aligned16(out.p[k]);
  return plan_lincomb(rows, inner, int(sizeof(T)), ok, max_blocks);
}

// Calls f(std::integral_constant<int, VEC>{}) for the plan's run-time vec, so
// that launcher and simulator instantiate the same lincomb_thread<VEC>.
template <class T, class F> void with_vec(int vec, F&& f) {
  constexpr int wide = 16 / int(sizeof(T));
  if (vec == wide) f(std::integral_constant<int, wide>{});
  else f(std::integral_constant<int, 1>{});
}

}  // namespace fk
