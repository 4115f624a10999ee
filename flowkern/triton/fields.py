"""Triton kernel of the empirical-field family (twin of csrc/cpu/fields.cpp;
the score functions mirror csrc/include/flowkern/fields.h).

Flash-attention-style: a program owns BQ queries and loops over the
references in tiles of BR. For each tile it
  1. reduces the feature differences d = x - a y to a [BQ, BR] score tile in
     registers, BK features at a time, as direct differences (a [BQ, BR, BK]
     broadcast): the exponent multiplies distance error by up to (N + D)/2
     (3073 for CIFAR), so no ||x||^2 + ||y||^2 - 2 x.y cancellation;
  2. updates the online state (kb = smallest key, l = sum of weights) of
     each query, weights computed from key ratios/differences (fields.h);
  3. rescales and accumulates acc[BQ, :] += p @ y_tile, BN features at a
     time, with tl.dot(input_precision="ieee") for fp32 accumulation (TF32
     would cost ~1e-3 relative in the mean, the accuracy target itself; fp64
     uses a broadcast-sum instead of a dot).
The [BQ, BR] tile never leaves registers. The accumulator is the fp32/fp64
`mean` output (B x N, owned row-block-wise by one program, so there are no
races; a barrier orders one tile's stores before the next tile's loads):
feature vectors of thousands of elements do not fit in registers. Memory:
O((B + R) N).
"""
import triton
import triton.language as tl

from .lincomb import launchable

POISSON: tl.constexpr = tl.constexpr(0)
GAUSSIAN: tl.constexpr = tl.constexpr(1)
UNIFORM: tl.constexpr = tl.constexpr(2)

# Shipped tile configurations (BQ, BR, BK, BN, num_warps) by accumulation
# dtype; flowkern.triton.aot compiles them for sm_80/sm_90 (no spills). fp64
# has no tensor-core-free dot here and reduces [BQ, BR, BN] broadcasts in
# registers, so its feature chunks are narrower.
TILES = {"fp32": (16, 32, 8, 64, 8), "fp64": (16, 32, 4, 8, 8)}


@triton.jit
def _weight(k, kb, c, inv, KIND: tl.constexpr):
    """w(k, kb) = exp(logit(k) - logit(kb)) for k >= kb (fields.h)."""
    if KIND == POISSON:
        w = tl.where(k == kb, 1.0, tl.exp(c * tl.log(kb / k)))
    elif KIND == GAUSSIAN:
        w = tl.where(k > kb, tl.exp(-(k - kb) * inv), 1.0)
    else:
        w = tl.where(tl.maximum(k, 0.0) <= tl.maximum(kb, 0.0), 1.0, 0.0)
    return w


@triton.jit
def field_kernel(x, ref, qp, mean, best, sumexp, B, R, N, p0, p1,
                 KIND: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, USE_DOT: tl.constexpr):
    ACC: tl.constexpr = mean.dtype.element_ty
    INF = float("inf")
    pid = tl.program_id(0)
    qi = pid * BQ + tl.arange(0, BQ)
    qmask = qi < B
    qrow = qi.to(tl.int64) * N
    c0 = tl.load(qp + qi.to(tl.int64) * 2, mask=qmask, other=1.0).to(ACC)
    c1 = tl.load(qp + qi.to(tl.int64) * 2 + 1, mask=qmask, other=1.0).to(ACC)
    # per-query constants of the score (fields.h *Score::make)
    a = c0
    r2 = c0 * c0
    inv = c1
    if KIND == GAUSSIAN:
        inv = 1.0 / (2.0 * c1 * c1)
    lo = c1 * p0
    hi = c1 * p1
    c = p0
    tiny = 1.1754943508222875e-38  # FLT_MIN (also used in fp64: never a binding floor there)
    if ACC == tl.float64:
        tiny = 2.2250738585072014e-308

    kb = tl.full([BQ], INF, ACC)
    l = tl.zeros([BQ], ACC)
    for k0 in range(0, N, BN):
        kk = k0 + tl.arange(0, BN)
        m2 = qmask[:, None] & (kk < N)[None, :]
        tl.store(mean + qrow[:, None] + kk[None, :], tl.zeros([BQ, BN], ACC), mask=m2)
    tl.debug_barrier()

    for r0 in range(0, R, BR):
        rj = r0 + tl.arange(0, BR)
        rmask = rj < R
        rrow = rj.to(tl.int64) * N
        if KIND == UNIFORM:
            red = tl.full([BQ, BR], -INF, ACC)
        else:
            red = tl.zeros([BQ, BR], ACC)
        for k0 in range(0, N, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < N
            xv = tl.load(x + qrow[:, None] + kk[None, :], mask=qmask[:, None] & kmask[None, :],
                         other=0.0).to(ACC)
            yv = tl.load(ref + rrow[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0).to(ACC)
            x3 = tl.broadcast_to(xv[:, None, :], (BQ, BR, BK))
            y3 = tl.broadcast_to(yv[None, :, :], (BQ, BR, BK))
            if KIND == POISSON:
                d = x3 - y3
            else:
                na = tl.broadcast_to(-a[:, None, None], (BQ, BR, BK))
                d = tl.fma(na, y3, x3)
            if KIND == UNIFORM:
                v = tl.maximum(lo[:, None, None] - d, d - hi[:, None, None])
                v = tl.where(kmask[None, None, :], v, -INF)
                red = tl.maximum(red, tl.max(v, axis=2))
            else:
                red += tl.sum(d * d, axis=2)
        if KIND == POISSON:
            key = red + r2[:, None]
            key = tl.where(key < tiny, tiny, key)
        else:
            key = red
        key = tl.where(rmask[None, :], key, INF)
        nb = tl.minimum(kb, tl.min(key, axis=1))
        scale = _weight(kb, nb, c, inv, KIND)
        kb = nb
        p = _weight(key, kb[:, None], c, inv[:, None], KIND)
        p = tl.where(rmask[None, :], p, 0.0).to(ACC)
        l = l * scale + tl.sum(p, axis=1)
        for k0 in range(0, N, BN):
            kk = k0 + tl.arange(0, BN)
            kmask = kk < N
            yv = tl.load(ref + rrow[:, None] + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0).to(ACC)
            if USE_DOT:
                contrib = tl.dot(p, yv, input_precision="ieee")
            else:
                contrib = tl.sum(p[:, :, None] * yv[None, :, :], axis=1)
            ptrs = mean + qrow[:, None] + kk[None, :]
            m2 = qmask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=m2, other=0.0) * scale[:, None] + contrib
            tl.store(ptrs, acc, mask=m2)
        tl.debug_barrier()

    for k0 in range(0, N, BN):
        kk = k0 + tl.arange(0, BN)
        ptrs = mean + qrow[:, None] + kk[None, :]
        m2 = qmask[:, None] & (kk < N)[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) / l[:, None], mask=m2)
    tl.store(best + qi, kb, mask=qmask)
    tl.store(sumexp + qi, l, mask=qmask)


def field_mean(x, ref, qp, kind, p0, p1):
    """(mean, best, sumexp) in the accumulation dtype (flowkern/ops/fields.py)."""
    import torch

    from .._validate import acc_dtype
    acc = acc_dtype(x.dtype)
    B, N = x.shape
    R = ref.shape[0]
    mean = torch.empty(B, N, dtype=acc, device=x.device)
    best = torch.empty(B, dtype=acc, device=x.device)
    sumexp = torch.empty(B, dtype=acc, device=x.device)
    if B == 0:
        return mean, best, sumexp
    if R == 0:
        raise ValueError("field_mean: the reference set is empty")
    bq, br, bk, bn, warps = TILES["fp64" if acc == torch.float64 else "fp32"]
    launchable(field_kernel)[(triton.cdiv(B, bq),)](
        x, ref, qp, mean, best, sumexp, B, R, N, float(p0), float(p1),
        KIND=int(kind), BQ=bq, BR=br, BK=bk, BN=bn, USE_DOT=acc == torch.float32,
        num_warps=warps)
    return mean, best, sumexp


AOT_DTYPES = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp32"), "bf16": ("bf16", "fp32"),
              "fp64": ("fp64", "fp64")}


def aot_configs(full: bool = True):
    """The shipped configurations for flowkern.triton.aot: every kind and
    dtype with the one tile shape (the quick set: fp32 and fp64, every kind)."""
    out = []
    for dname, (io_t, acc_t) in AOT_DTYPES.items():
        if not full and dname not in ("fp32", "fp64"):
            continue
        for kind, kname in ((0, "poisson"), (1, "gaussian"), (2, "uniform")):
            sig = {"x": f"*{io_t}", "ref": f"*{io_t}", "qp": f"*{acc_t}", "mean": f"*{acc_t}",
                   "best": f"*{acc_t}", "sumexp": f"*{acc_t}", "B": "i32", "R": "i32", "N": "i32",
                   "p0": "fp32", "p1": "fp32"}
            bq, br, bk, bn, warps = TILES[acc_t]
            const = dict(KIND=kind, BQ=bq, BR=br, BK=bk, BN=bn, USE_DOT=acc_t == "fp32")
            sig.update({k: "constexpr" for k in const})
            out.append((f"fields/{kname}/{dname}/{bq}x{br}x{bk}x{bn}/w{warps}", field_kernel, sig,
                        const, warps))
    return out
