// The CUDA kernels of the empirical-field op (docs/design.md §4 "Empirical fields":
// w_ij = softmax_j(logit(key_ij)), mean_i = sum_j w_ij y_j; scores, keys and
// the online state in fields.h) written as block bodies of phases between
// barriers, so that csrc/cuda/fields.cu runs them on the GPU and the grid
// simulator (csrc/cpu/cuda_sim_fields.cpp) runs them on the CPU, every block,
// every thread, phase by phase (docs/design.md §9 "Testing CUDA kernels' indexing
// without a GPU"). Torch-free.
//
// A block body calls run(phase) for each phase in program order; phase(tid,
// regs) is one thread's work. The GPU's run calls it for its own thread and
// then __syncthreads(); the simulator's run calls it for every thread of the
// block (`regs` is the thread's registers that live across barriers). Loop
// bounds are uniform over the block, so every thread meets every barrier.
// Within a phase a thread reads shared memory that only barriers separate
// from its writers (the simulator checks it by running the threads in both
// orders).
//
// Tiling (flash-attention style, the Triton kernel's design,
// flowkern/triton/fields.py): a block owns BQ queries and one range of the
// references, in tiles of BR. Per tile:
//   1. red_ij = reduce_k red_step(x_ik - a_i y_jk) over BK-feature chunks
//      staged in shared memory (direct differences, no ||x||^2 + ||y||^2 -
//      2 x.y cancellation: the exponent multiplies distance error by (N+D)/2);
//   2. keys, the tile's smallest key per query, the online rebase of (kb, l)
//      and the weights p_ij = w(key_ij, kb_i), in shared memory;
//   3. acc_i = acc_i * scale_i + sum_j p_ij y_j over BN-feature chunks.
// The accumulator is the block's own rows of the fp32/fp64 output (features
// run to thousands; a thread reads and writes only its own elements, so tiles
// need no barrier between them for it). Nothing B x R leaves the block.
// With more than one reference range per query block ("splits", for small
// batches) the ranges write partial states (acc, kb, l) to a workspace and a
// second kernel merges them (fields.h field_merge_states).
#pragma once

#include "fields.h"
#include "hd.h"
#include "launch.h"

namespace fk {

constexpr int kFieldThreads = 256;
constexpr int kFieldGrid = 16;  // the threads as a kFieldGrid x kFieldGrid grid
static_assert(kFieldGrid * kFieldGrid == kFieldThreads, "thread grid");
constexpr int kFieldMaxSplits = 32;
// Workspace elements the partial states may take (128 MB of fp32).
constexpr i64 kFieldMaxWorkspace = i64(1) << 25;

// Queries per block, references per tile, feature chunks of the reduction
// and of the weighted sum. fp32: ~25 KB of static shared memory; fp64 ~19 KB.
template <class A> struct FieldTile;
template <> struct FieldTile<float> {
  static constexpr int BQ = 32, BR = 64, BK = 32, BN = 64;
};
template <> struct FieldTile<double> {
  static constexpr int BQ = 32, BR = 32, BK = 16, BN = 32;
};

// ---------------------------------------------------------------------------
// Launch plan (host), shared by the launcher and the simulator.

struct FieldPlan {
  int threads;    // per block
  int bq, br;     // queries per block, references per tile
  i64 qblocks;    // gridDim.x of the tile kernel
  i64 splits;     // reference ranges per query block (gridDim.y); > 1: merge kernel
  i64 rchunk;     // references per range, a multiple of br
  i64 workspace;  // accumulation-dtype elements of the partial states (0 if splits == 1)
};

// splits > 0: that many reference ranges (at most one per tile, kFieldMaxSplits
// and the workspace budget); splits <= 0: enough ranges that the grid fills
// max_blocks / 8 blocks, each range at least two tiles (max_blocks: two waves
// of 256-thread blocks at 8 per SM, launch.h; the tile kernel keeps 2 per SM
// resident, __launch_bounds__ in fields.cu, so one wave of it). Idempotent:
// planning with the returned splits gives the same plan.
template <class A>
inline FieldPlan plan_fields(i64 B, i64 R, i64 N, i64 splits, i64 max_blocks) {
  using Tl = FieldTile<A>;
  const i64 qblocks = cdiv(B, Tl::BQ);
  const i64 tiles = cdiv(R, Tl::BR);
  if (splits <= 0) {
    if (max_blocks <= 0) max_blocks = kDefaultMaxBlocks;
    const i64 target = max_blocks / 8;
    splits = (qblocks > 0 && qblocks < target) ? cdiv(target, qblocks) : 1;
    if (splits > tiles / 2) splits = tiles / 2;
  }
  if (splits > kFieldMaxSplits) splits = kFieldMaxSplits;
  if (B > 0 && splits > 1) {
    const i64 fit = kFieldMaxWorkspace / (B * (N + 2));
    if (splits > fit) splits = fit;
  }
  if (splits > tiles) splits = tiles;
  if (splits < 1) splits = 1;
  const i64 rchunk = cdiv(tiles, splits) * Tl::BR;
  if (R > 0) splits = cdiv(R, rchunk);
  return {kFieldThreads, Tl::BQ, Tl::BR, qblocks, splits, rchunk,
          splits > 1 ? splits * B * (N + 2) : 0};
}

// Calls f(score) with a value of the score type of `kind` (fields.h), for the
// launcher and the simulator to instantiate the same kernels.
template <class A, class F> auto with_field_score(int kind, F&& f) {
  switch (kind) {
    case FIELD_POISSON: return f(PoissonScore<A>{});
    case FIELD_GAUSSIAN: return f(GaussianScore<A>{});
    default: return f(UniformScore<A>{});
  }
}

// ---------------------------------------------------------------------------
// The tile kernel.

template <class T, class A> struct FieldArgs {
  const T* x;    // (B, N) queries
  const T* ref;  // (R, N) references
  const A* qp;   // (B, 2) per-query score parameters (fields.h)
  A p0, p1;
  i64 B, R, N;
  i64 rchunk;  // references per range (FieldPlan)
  // Output rows s * B + q of range s: the normalised mean (one range) or the
  // partial accumulators (acc, kb, l) of a workspace (splits > 1).
  A* out;  // (splits, B, N)
  A* kb;   // (splits, B)
  A* l;    // (splits, B)
  bool normalise;
};

// Registers that live across barriers: the thread's reductions.
template <class A> struct FieldRegs {
  static constexpr int TQ = FieldTile<A>::BQ / kFieldGrid, TR = FieldTile<A>::BR / kFieldGrid;
  A red[TQ][TR];
};

template <class S, class A> struct FieldSmem {
  using Tl = FieldTile<A>;
  // The +1 columns keep the strided row reads of phase 1 free of bank conflicts.
  struct Dist {
    A x[Tl::BQ][Tl::BK + 1];
    A y[Tl::BR][Tl::BK + 1];
  };
  union Stage {
    Dist d;                 // phase 1 chunks
    A yw[Tl::BR][Tl::BN];   // phase 3 chunks
  } u;
  A p[Tl::BQ][Tl::BR + 1];  // keys, then weights, of the tile
  S sc[Tl::BQ];             // the queries' scores
  A kb[Tl::BQ], l[Tl::BQ], scale[Tl::BQ];  // online state, the tile's rebase factor
};

// min(avail, cap) as an int: the rows or features a tile or chunk covers.
FK_HD int field_count(i64 avail, int cap) { return avail < cap ? int(avail) : cap; }

// Elements [0, n) of a tile as kFieldThreads threads load them: thread tid
// takes tid, tid + kFieldThreads, ... (consecutive threads, consecutive
// features: coalesced).
template <int n, class F> FK_HD void field_for_tile(int tid, F&& f) {
  static_assert(n % kFieldThreads == 0, "tile elements must split evenly over the threads");
FK_UNROLL
  for (int m = 0; m < n / kFieldThreads; ++m) f(tid + m * kFieldThreads);
}

// Block (qb, s): queries [qb * BQ, +BQ) against range s of the references.
template <class S, class T, class Exec>
FK_HD void field_block(const FieldArgs<T, acc_t<T>>& a, i64 qb, i64 s,
                       FieldSmem<S, acc_t<T>>& sm, Exec&& run) {
  using A = acc_t<T>;
  using Tl = FieldTile<A>;
  using Regs = FieldRegs<A>;
  constexpr int BQ = Tl::BQ, BR = Tl::BR, BK = Tl::BK, BN = Tl::BN, G = kFieldGrid;
  constexpr int TQ = Regs::TQ, TR = Regs::TR, TK = BN / G;
  const i64 N = a.N;
  const i64 q0 = qb * BQ;
  const int nq = field_count(a.B - q0, BQ);
  const i64 r_begin = s * a.rchunk;
  const i64 r_end = r_begin + a.rchunk < a.R ? r_begin + a.rchunk : a.R;
  const i64 orow = s * a.B + q0;  // the block's first output row

  // Scores and empty states; rows past the batch copy its last query.
  run([&](int tid, Regs&) {
    if (tid < BQ) {
      sm.sc[tid] = S::make(a.qp, q0 + (tid < nq ? tid : nq - 1), a.p0, a.p1);
      const FieldState<A> e = FieldState<A>::empty();
      sm.kb[tid] = e.kb;
      sm.l[tid] = e.l;
    }
  });
  for (i64 r0 = r_begin; r0 < r_end; r0 += BR) {
    const int nr = field_count(r_end - r0, BR);
    const bool first = r0 == r_begin, last = r0 + BR >= r_end;
    // 1. red_ij = reduce_k red_step(x_ik - a_i y_jk), BK features a chunk (at
    //    least one chunk: N = 0 still gives keys).
    for (i64 k0 = 0; k0 == 0 || k0 < N; k0 += BK) {
      const int kn = field_count(N - k0, BK);
      run([&](int tid, Regs& g) {
        field_for_tile<BQ * BK>(tid, [&](int e) {
          const int i = e / BK, k = e % BK;
          sm.u.d.x[i][k] = (i < nq && k < kn) ? load(a.x, (q0 + i) * N + k0 + k) : A(0);
        });
        field_for_tile<BR * BK>(tid, [&](int e) {
          const int j = e / BK, k = e % BK;
          sm.u.d.y[j][k] = (j < nr && k < kn) ? load(a.ref, (r0 + j) * N + k0 + k) : A(0);
        });
        if (k0 == 0) {
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
            for (int rb = 0; rb < TR; ++rb) g.red[qa][rb] = red_init<S, A>();
        }
      });
      const bool keys = k0 + BK >= N;
      run([&](int tid, Regs& g) {
        const int tq = tid / G, tr = tid % G;
        S sc[TQ];
FK_UNROLL
        for (int qa = 0; qa < TQ; ++qa) sc[qa] = sm.sc[tq + G * qa];
        // A sum of N squares as N/BK chunk sums of BK terms: ~sqrt(BK) +
        // sqrt(N/BK) ulps of error instead of ~sqrt(N), which the logit
        // multiplies by up to (N+D)/2 (docs/design.md §4: distances accurately).
        A part[TQ][TR];
FK_UNROLL
        for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
          for (int rb = 0; rb < TR; ++rb) part[qa][rb] = red_init<S, A>();
        for (int k = 0; k < kn; ++k) {
          A xv[TQ], yv[TR];
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa) xv[qa] = sm.u.d.x[tq + G * qa][k];
FK_UNROLL
          for (int rb = 0; rb < TR; ++rb) yv[rb] = sm.u.d.y[tr + G * rb][k];
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
            for (int rb = 0; rb < TR; ++rb)
              part[qa][rb] = red_step(sc[qa], part[qa][rb], xv[qa], yv[rb]);
        }
FK_UNROLL
        for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
          for (int rb = 0; rb < TR; ++rb)
            g.red[qa][rb] = red_combine<S, A>(g.red[qa][rb], part[qa][rb]);
        if (keys) {  // key_ij of the tile (fields.h *Score::key)
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
            for (int rb = 0; rb < TR; ++rb) {
              const int j = tr + G * rb;
              sm.p[tq + G * qa][j] = j < nr ? sc[qa].key(g.red[qa][rb]) : FieldLimits<A>::inf();
            }
        }
      });
    }
    // 2. kb_i <- min(kb_i, min_j key_ij), scale_i = w(kb_i old, kb_i new),
    //    l_i <- scale_i l_i (fields.h field_rebase) ...
    run([&](int tid, Regs&) {
      if (tid < BQ) {
        A mn = FieldLimits<A>::inf();
        for (int j = 0; j < nr; ++j) mn = sm.p[tid][j] < mn ? sm.p[tid][j] : mn;
        FieldState<A> st{sm.kb[tid], sm.l[tid]};
        sm.scale[tid] = field_rebase(sm.sc[tid], st, mn);
        sm.kb[tid] = st.kb;
        sm.l[tid] = st.l;
      }
    });
    // ... and p_ij = w(key_ij, kb_i), over the keys in place.
    run([&](int tid, Regs&) {
      const int tq = tid / G, tr = tid % G;
FK_UNROLL
      for (int qa = 0; qa < TQ; ++qa) {
        const int i = tq + G * qa;
        const S sc = sm.sc[i];
        const A kb = sm.kb[i];
FK_UNROLL
        for (int rb = 0; rb < TR; ++rb) {
          const int j = tr + G * rb;
          sm.p[i][j] = j < nr ? sc.weight(sm.p[i][j], kb) : A(0);
        }
      }
    });
    // 3. l_i += sum_j p_ij; acc_i <- scale_i acc_i + sum_j p_ij y_j, BN
    //    features a chunk; after the last tile mean_i = acc_i / l_i (one
    //    range) or the partial state (acc_i, kb_i, l_i) of the range.
    for (i64 k0 = 0; k0 == 0 || k0 < N; k0 += BN) {
      const int kn = field_count(N - k0, BN);
      run([&](int tid, Regs&) {
        field_for_tile<BR * BN>(tid, [&](int e) {
          const int j = e / BN, k = e % BN;
          sm.u.yw[j][k] = (j < nr && k < kn) ? load(a.ref, (r0 + j) * N + k0 + k) : A(0);
        });
        if (k0 == 0 && tid < BQ) {
          A sum = A(0);
          for (int j = 0; j < nr; ++j) sum += sm.p[tid][j];
          sm.l[tid] += sum;
        }
      });
      run([&](int tid, Regs&) {
        const int tq = tid / G, tk = tid % G;
        // sum_j p_ij y_j of the tile first: a sum over R in tile-sized pieces.
        A acc[TQ][TK];
FK_UNROLL
        for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
          for (int c = 0; c < TK; ++c) acc[qa][c] = A(0);
        for (int j = 0; j < nr; ++j) {
          A pv[TQ], yv[TK];
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa) pv[qa] = sm.p[tq + G * qa][j];
FK_UNROLL
          for (int c = 0; c < TK; ++c) yv[c] = sm.u.yw[j][tk + G * c];
FK_UNROLL
          for (int qa = 0; qa < TQ; ++qa)
FK_UNROLL
            for (int c = 0; c < TK; ++c) acc[qa][c] = fk_fma(pv[qa], yv[c], acc[qa][c]);
        }
FK_UNROLL
        for (int qa = 0; qa < TQ; ++qa) {
          const int i = tq + G * qa;
          if (i >= nq) continue;
          const A scale = sm.scale[i], l = sm.l[i];
FK_UNROLL
          for (int c = 0; c < TK; ++c) {
            const int k = tk + G * c;
            if (k >= kn) continue;
            A* o = a.out + (orow + i) * N + k0 + k;
            const A v = first ? acc[qa][c] : fk_fma(*o, scale, acc[qa][c]);
            *o = (last && a.normalise) ? v / l : v;
          }
        }
      });
    }
  }
  run([&](int tid, Regs&) {
    if (tid < nq) {
      a.kb[orow + tid] = sm.kb[tid];
      a.l[orow + tid] = sm.l[tid];
    }
  });
}

// ---------------------------------------------------------------------------
// The merge kernel (splits > 1): one block per query.

template <class A> struct FieldMergeArgs {
  const A* qp;
  A p0, p1;
  i64 B, N;
  int splits;
  const A* acc;  // (splits, B, N) partial accumulators
  const A* kb;   // (splits, B)
  const A* l;    // (splits, B)
  A* mean;       // (B, N)
  A* best;       // (B,)
  A* sumexp;     // (B,)
};

template <class A> struct FieldMergeSmem {
  A f[kFieldMaxSplits];  // the ranges' factors (fields.h field_merge_states)
  A kb, l;
};

template <class S, class A, class Exec>
FK_HD void field_merge_block(const FieldMergeArgs<A>& a, i64 q, FieldMergeSmem<A>& sm,
                             Exec&& run) {
  run([&](int tid) {
    if (tid == 0) {
      const S sc = S::make(a.qp, q, a.p0, a.p1);
      A kb;
      sm.l = field_merge_states(sc, a.kb + q, a.l + q, a.B, a.splits, sm.f, &kb);
      sm.kb = kb;
    }
  });
  run([&](int tid) {
    const A l = sm.l;
    for (i64 k = tid; k < a.N; k += kFieldThreads)
      a.mean[q * a.N + k] = field_merge_sum(sm.f, a.acc + q * a.N + k, a.B * a.N, a.splits) / l;
    if (tid == 0) {
      a.best[q] = sm.kb;
      a.sumexp[q] = l;
    }
  });
}

}  // namespace fk
