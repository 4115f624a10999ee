// CPU kernel of the empirical-field op family (docs/design.md §4 "Empirical
// fields") and its flowkern:: schema:
//
//   field_mean(Tensor x, Tensor ref, Tensor qp, int kind, float p0, float p1)
//       -> (Tensor mean, Tensor best, Tensor sumexp)
//
// x (B, N) queries, ref (R, N) references (one dtype), qp (B, 2) per-query
// parameters in the accumulation dtype (fields.h). For each query: mean =
// sum_j w_ij y_j / sum_j w_ij, best = the smallest key (the key of the largest
// logit; fields.h), sumexp = sum_j w(k_ij, best). All three are in the
// accumulation dtype, so states computed over disjoint reference sets (shards
// across ranks) merge exactly as tiles do (flowkern/ops/fields.py).
//
// One kernel for every kind: the score is a template parameter. Work is split
// into units of QB queries x a range of references, in parallel
// (torch::stable::parallel_for); the reference range is split as well when there are
// fewer query blocks than threads, and the split states are merged here.
// Memory: O((B + R) N) (a zero-padded copy of the inputs in the accumulation
// dtype when they are 16-bit or N is not a multiple of the vector chunk),
// never B x R.

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "field_args.h"
#include "flowkern/fields.h"

// The baseline copy returns 32-byte vectors from inline helpers without AVX:
// harmless (they are inlined, never called across an ABI boundary).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flowkern_cpu {
namespace fields_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FK_FIELDS_FMA 1
#include "fields_kernels.inc"
#undef FK_FIELDS_FMA
#pragma GCC pop_options
}  // namespace fields_avx2

namespace fields_base {
#define FK_FIELDS_FMA 0
#include "fields_kernels.inc"
#undef FK_FIELDS_FMA
}  // namespace fields_base

namespace {

using fields_base::QB;

// AVX2+FMA when the CPU has it, unless FLOWKERN_CPU_ISA=base (tests run both).
bool use_avx2() {
  const char* env = std::getenv("FLOWKERN_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Rows of `t` (contiguous (rows, N), storage type T) as accumulation-dtype
// rows of stride Np, zero padded; no copy when they already are.
template <class T, class A>
const A* as_padded(const Tensor& t, i64 N, i64 Np, std::vector<A>& buf) {
  const i64 rows = t.size(0);
  if constexpr (std::is_same_v<T, A>) {
    if (N == Np) return cptr<A>(t);
  }
  buf.assign(size_t(rows) * size_t(Np), A(0));
  const T* src = cptr<T>(t);
  A* dst = buf.data();
  torch::stable::parallel_for(0, rows, std::max<i64>(1, 65536 / std::max<i64>(Np, 1)), [&](i64 b, i64 e) {
    for (i64 r = b; r < e; ++r)
      for (i64 k = 0; k < N; ++k) dst[r * Np + k] = fk::load(src, r * N + k);
  });
  return dst;
}

template <class T, template <class> class ScoreT>
void field_mean_impl(const Tensor& x, const Tensor& ref, const Tensor& qp, double p0,
                     double p1, Tensor& mean, Tensor& best, Tensor& sumexp) {
  using A = fk::acc_t<T>;
  using S = ScoreT<A>;
  constexpr int W = fields_base::VT<A>::W;
  const i64 B = x.size(0), N = x.size(1), R = ref.size(0);
  if (B == 0) return;
  const i64 Np = std::max<i64>(2 * W, (N + 2 * W - 1) / (2 * W) * (2 * W));
  std::vector<A> xbuf, rbuf;
  const A* xq = as_padded<T, A>(x, N, Np, xbuf);
  const A* rp = as_padded<T, A>(ref, N, Np, rbuf);
  const A* q = cptr<A>(qp);
  // References per tile: ~256 KB of them (with the query block, L2-resident).
  const int RB = int(std::clamp<i64>((256 << 10) / (Np * i64(sizeof(A))), 32, 512) / 2 * 2);
  const i64 nqb = (B + QB - 1) / QB;
  const i64 threads = int64_t(torch::stable::get_num_threads());
  i64 splits = 1;
  if (nqb < threads) splits = std::clamp<i64>((2 * threads + nqb - 1) / nqb, 1, std::max<i64>(1, R / (2 * RB)));
  const i64 rchunk = (R + splits - 1) / splits;
  splits = (R + rchunk - 1) / rchunk;
  A* m = mptr<A>(mean);
  A* kb = mptr<A>(best);
  A* l = mptr<A>(sumexp);
  std::vector<A> pacc, pkb, pl;
  if (splits > 1) {
    pacc.resize(size_t(splits) * size_t(B) * size_t(N));
    pkb.resize(size_t(splits) * size_t(B));
    pl.resize(size_t(splits) * size_t(B));
  }
  const bool avx2 = use_avx2();
  const A a0 = A(p0), a1 = A(p1);
  torch::stable::parallel_for(0, nqb * splits, 1, [&](i64 b, i64 e) {
    for (i64 u = b; u < e; ++u) {
      const i64 qb = u / splits, s = u - qb * splits;
      const i64 q0 = qb * QB;
      const int nq = int(std::min<i64>(QB, B - q0));
      const i64 r0 = s * rchunk, r1 = std::min(R, r0 + rchunk);
      A* o = splits > 1 ? pacc.data() + (s * B + q0) * N : m + q0 * N;
      A* ko = splits > 1 ? pkb.data() + s * B + q0 : kb + q0;
      A* lo = splits > 1 ? pl.data() + s * B + q0 : l + q0;
      if (avx2)
        fields_avx2::run_unit<S, A>(xq, rp, q, a0, a1, N, Np, q0, nq, r0, r1, RB, o, ko, lo,
                                    splits == 1);
      else
        fields_base::run_unit<S, A>(xq, rp, q, a0, a1, N, Np, q0, nq, r0, r1, RB, o, ko, lo,
                                    splits == 1);
    }
  });
  if (splits == 1) return;
  // Merge the split states of each query (fields.h field_merge_states).
  torch::stable::parallel_for(0, B, 1, [&](i64 b, i64 e) {
    std::vector<A> f(splits);
    for (i64 i = b; i < e; ++i) {
      const S sc = S::make(q, i, a0, a1);
      A best_k;
      const A lsum = fk::field_merge_states(sc, pkb.data() + i, pl.data() + i, B, int(splits),
                                            f.data(), &best_k);
      A* o = m + i * N;
      for (i64 k = 0; k < N; ++k)
        o[k] = fk::field_merge_sum(f.data(), pacc.data() + i * N + k, B * N, int(splits)) / lsum;
      kb[i] = best_k;
      l[i] = lsum;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> field_mean(const Tensor& x_,
                                                          const Tensor& ref_,
                                                          const Tensor& qp_, int64_t kind,
                                                          double p0, double p1) {
  check_field_args(x_, ref_, qp_, kind);
  const auto acc = x_.scalar_type() == kDouble ? kDouble : kFloat;
  const auto x = contig(x_), ref = contig(ref_), qp = contig(qp_);
  auto mean = empty({x.size(0), x.size(1)}, acc, x.device());
  auto best = empty({x.size(0)}, acc, x.device());
  auto sumexp = empty({x.size(0)}, acc, x.device());
  dispatch_dtype(x, "field_mean", [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (kind) {
      case fk::FIELD_POISSON:
        return field_mean_impl<T, fk::PoissonScore>(x, ref, qp, p0, p1, mean, best, sumexp);
      case fk::FIELD_GAUSSIAN:
        return field_mean_impl<T, fk::GaussianScore>(x, ref, qp, p0, p1, mean, best, sumexp);
      default:
        return field_mean_impl<T, fk::UniformScore>(x, ref, qp, p0, p1, mean, best, sumexp);
    }
  });
  return {mean, best, sumexp};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) { m.impl("field_mean", TORCH_BOX(&field_mean)); }

}  // namespace flowkern_cpu
