"""Empirical-field op family (docs/design.md §4 "Empirical fields"): poisson_field
(PFGM / PFGM++) and empirical_denoiser (Gaussian or uniform-box prior).

Both are one kernel-level op with a score `kind` (csrc/include/flowkern/fields.h):

    field_mean(x (B, N), ref (R, N), qp (B, 2), kind, p0, p1)
        -> (mean (B, N), best (B,), sumexp (B,))      all in the accumulation dtype

a flash-attention-style pass over the references with an online softmax; no
B x R tensor exists on any kernel backend. `best` and `sumexp` are the online
state (the key of the largest logit and sum_j exp(logit_j - max logit)), so
that states over disjoint reference sets merge exactly: ``group=`` shards the
references across torch.distributed ranks, each rank reduces its shard, and
the states are merged after one all-reduce (see _all_reduce).

Autograd: not supported (the outputs are regression targets and denoisers
used under no_grad; a gradient through the softmax would need a second pass
over the references). Inputs that require grad are accepted and the result
does not require grad.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from ..backend import resolve
from ..reference import fields as ref_fields
from ..schedules import coefficients
from ..tables import ALPHA, SIGMA
from ._registry import lazy, no_derivative, ops_for, register, triton_op

_T = "flowkern.triton.fields"
POISSON, GAUSSIAN, UNIFORM = ref_fields.POISSON, ref_fields.GAUSSIAN, ref_fields.UNIFORM
PRIORS = {"gaussian": GAUSSIAN, "uniform": UNIFORM}

# ---------------------------------------------------------------------------
# flowkern_triton:: implementation (schema: flowkern/ops/schemas.inc; the
# native kernels: csrc/cpu/fields.cpp, csrc/cuda/glue.h)


@triton_op("field_mean")
def _t_field_mean(x, ref, qp, kind, p0, p1):
    return lazy(_T, "field_mean")(x.contiguous(), ref.contiguous(), qp.contiguous(), kind, p0, p1)


def _fake(x, ref, qp, kind, p0, p1):
    acc = V.acc_dtype(x.dtype)
    B, N = x.shape
    return x.new_empty(B, N, dtype=acc), x.new_empty(B, dtype=acc), x.new_empty(B, dtype=acc)


def _reference(x, ref, qp, kind, p0, p1):
    """field_mean's torch formula with the op's signature (the torch backend)."""
    acc = qp.dtype
    return ref_fields.field_mean(x.to(acc), ref.to(acc), qp, kind, p0, p1)


register("field_mean", _fake, reference=_reference)

# ---------------------------------------------------------------------------
# validation


def _features(name, t):
    return t.shape[1:].numel() if t.dim() > 1 else 1


def _check_refs(x, ref, xname):
    V.tensor(xname, x)
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"ref: expected a torch.Tensor of references (R, ...), "
                        f"got {type(ref).__name__}")
    V.tensor("ref", ref)
    if ref.dtype != x.dtype:
        raise TypeError(f"ref: dtype {ref.dtype} differs from {xname}'s {x.dtype}; cast one of them")
    if ref.device != x.device:
        raise ValueError(f"ref: on {ref.device} but {xname} is on {x.device}; move them to one device")
    if ref.shape[1:] != x.shape[1:]:
        if _features("ref", ref) == _features(xname, x):
            pass  # same feature size, other layout: compared as flat vectors
        else:
            raise ValueError(f"ref: references have feature shape {tuple(ref.shape[1:])} "
                             f"({_features('ref', ref)} features) but the queries {xname} have "
                             f"{tuple(x.shape[1:])} ({_features(xname, x)}); they must match")


def _flat(t):
    return t.reshape(t.shape[0], t.shape[1:].numel())


def _per_query(name, v, rows, like, acc):
    """A float or a (B,)/()/(1,) tensor as a (B,) tensor in the accumulation dtype."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((rows,), float(v), dtype=acc, device=like.device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape ({rows},), "
                        f"got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {v.dtype}")
    if v.device != like.device:
        raise ValueError(f"{name}: on {v.device} but the queries are on {like.device}; "
                         f"move them to one device")
    if not (v.dim() == 0 or (v.dim() == 1 and v.shape[0] in (1, rows))):
        raise ValueError(f"{name}: expected shape () or ({rows},) for a batch of {rows}, "
                         f"got {tuple(v.shape)}")
    return v.to(acc).reshape(-1).expand(rows).contiguous()


def _run(x2, ref2, qp, kind, p0, p1, backend, group):
    """(mean, best, sumexp) over all references (all ranks' shards with group=)."""
    if ref2.shape[0] == 0 and group is None:
        raise ValueError("ref: the reference set is empty; give at least one reference")
    if ref2.shape[0] == 0:  # an empty shard: the neutral state
        acc = qp.dtype
        B, N = x2.shape
        state = (x2.new_zeros(B, N, dtype=acc), x2.new_full((B,), math.inf, dtype=acc),
                 x2.new_zeros(B, dtype=acc))
    else:
        state = ops_for(backend).field_mean(x2, ref2, qp, kind, p0, p1)
    if group is None:
        return state
    return _all_reduce(state, qp, kind, p0, p1, group)


def _all_reduce(state, qp, kind, p0, p1, group):
    """Merges the ranks' states with ONE collective, a SUM all-reduce of a
    (world, B, N + 2) buffer in which each rank fills its own slot with
    (best, sumexp, mean). No reduction op of torch.distributed merges softmax
    states directly, and a single SUM of rescaled states would need a shift
    common to all ranks, i.e. a second collective for the global best key.
    The merge then runs on every rank in rank order, so all ranks get the same
    bits; the buffer is world x the (B, N + 2) state, small next to the
    B x R x N work of the field."""
    import torch.distributed as dist

    mean, best, sumexp = state
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    slots = mean.new_zeros(world, mean.shape[0], mean.shape[1] + 2)
    slots[rank, :, 0], slots[rank, :, 1], slots[rank, :, 2:] = best, sumexp, mean
    dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=group)
    bests, sums, means = slots[:, :, 0], slots[:, :, 1], slots[:, :, 2:]
    gbest = bests.amin(0)
    # w(best_k, gbest) * sumexp_k: rank k's weights rescaled to the global best key (fields.h)
    f = torch.stack([ref_fields.key_weight(kind, bests[k], gbest, qp, p0, p1) * sums[k]
                     for k in range(world)])
    f = torch.where(sums > 0, f, torch.zeros_like(f))  # empty shards contribute nothing
    tot = f.sum(0)
    return (f[:, :, None] * means).sum(0) / tot[:, None], gbest, tot


def _check_keys(name, best, finite_r):
    """The smallest key of a query (||x - y||^2 (+ r^2)) is +inf only when
    every squared distance overflowed the accumulation dtype (float32 with
    |x| or |y| around 1e19): the weights are then undefined and the field
    would come out 0, silently. A value check (CPU tensors; FLOWKERN_DEBUG=1
    on a GPU). r = inf is not this case: its field has the limit 0."""
    if V.values_checked(best) and best.numel():
        bad = (best == math.inf) & finite_r
        if bool(bad.any()):
            raise ValueError(f"{name}: the squared distance from some query to every reference "
                             f"overflows {best.dtype} (|{name}| or |ref| beyond about "
                             f"{math.sqrt(torch.finfo(best.dtype).max / 4):.0e}); rescale the "
                             f"data or compute in float64")


# ---------------------------------------------------------------------------
# public API


def poisson_field(x: torch.Tensor, r, ref: torch.Tensor, D: float = 1, normalize: bool = True,
                  gamma: float = 5.0, group=None, backend: Optional[str] = None):
    """The empirical Poisson field of PFGM (D = 1) and PFGM++ (D > 1).

    Queries are points (x_i, r_i) of the augmented space R^(N+D), where r_i >= 0
    is the norm of the D augmented coordinates (PFGM: r = |z|); the references
    are the data (y_j, 0). Weights w_ij = softmax_j(-(N+D)/2 log(||x_i - y_j||^2
    + r_i^2)), mean x̄_i = sum_j w_ij y_j, field direction m_i = (x̄_i - x_i, -r_i)
    (it points to the data).

    Args:
        x: queries (B, ...), N = prod(x.shape[1:]) features.
        r: the augmented norms, a float or a tensor of shape (B,); r >= 0.
        ref: references (R, ...) with N features, same dtype and device as x.
        D: augmented dimension (float >= 1).
        normalize: True: PFGM's target sqrt(N) m / (||m|| + gamma), returned as
            (x part (B, ...), r part (B,)); False: the weighted mean x̄ (B, ...).
        group: a torch.distributed process group over which `ref` is sharded
            (each rank passes its own references and the same queries).
        backend: "torch" | "cpu" | "cuda" | "triton" (default: auto).

    Memory O((B + R) N) on the kernel backends (no B x R x N or B x R tensor);
    the "torch" backend is the float64-capable reference (B x R scores).
    Degenerate inputs are finite: a query on a reference with r = 0 returns
    that reference (x̄ = x, so m = 0 and the target is 0); weights that all
    underflow are renormalised to the largest. Not differentiable on the
    kernel backends (an input that requires grad or carries a tangent is an
    error); the torch backend differentiates.
    """
    _check_refs(x, ref, "x")
    if isinstance(D, bool) or not isinstance(D, (int, float)) or not D >= 1 or math.isinf(D):
        raise ValueError(f"D: the augmented dimension must be a finite number >= 1, got {D!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma: expected a float >= 0, got {gamma!r}")
    B = x.shape[0]
    N = _features("x", x)
    acc = V.acc_dtype(x.dtype)
    rr = _per_query("r", r, B, x, acc)
    if V.values_checked(rr) and rr.numel() and not bool((rr >= 0).all()):
        raise ValueError(f"r: the augmented norms must be >= 0 (and not NaN); got values in "
                         f"[{rr.min().item():g}, {rr.max().item():g}]")
    be = resolve(backend, x.device)
    if be != "torch":
        no_derivative("poisson_field", x=x, r=r, ref=ref)
    qp = torch.stack([rr, torch.zeros_like(rr)], dim=1)
    x2, ref2 = _flat(x).contiguous(), _flat(ref).contiguous()
    if B == 0:
        mean = x2.new_empty(0, N, dtype=acc)
    else:
        mean, best, _ = _run(x2, ref2, qp, POISSON, 0.5 * (N + D), 0.0, be, group)
        _check_keys("x", best, rr.isfinite())
    if not normalize:
        return mean.to(x.dtype).reshape(x.shape)
    vx, vr = ref_fields.normalized_target(x2.to(acc), rr, mean, N, float(gamma))
    return vx.to(x.dtype).reshape(x.shape), vr.to(x.dtype)


def empirical_denoiser(x_t: torch.Tensor, t, ref: torch.Tensor, schedule="linear",
                       prior: str = "gaussian", box=(-1.0, 1.0), group=None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """E[x1 | x_t] when the data distribution is the references (the ideal
    denoiser; the stable-target-field target), for x_t = alpha_t x1 + sigma_t x0.

    prior="gaussian": x0 ~ N(0, I), weights softmax_j(-||x_t - alpha_t y_j||^2 /
    (2 sigma_t^2)). At sigma_t = 0 it returns the nearest reference (the limit).
    prior="uniform": x0 uniform on the box [lo, hi]^N: equal weights over the
    references with (x_t - alpha_t y_j)/sigma_t inside the box. When no
    reference is inside (x_t off the support, e.g. after a coarse ODE step) it
    returns the reference(s) with the smallest box violation (max-norm
    distance to the box), so the result is always a finite reference mean.

    Args:
        x_t: states (B, ...). t: times in [0, 1] (float or (B,)).
        ref: references (R, ...) with the same number of features.
        schedule: a schedule name or object (flowkern.schedules).
        box: (lo, hi) of the uniform prior, lo < hi.
        group, backend: as in :func:`poisson_field`.
    Returns:
        x̂1 of x_t's shape and dtype. Not differentiable on the kernel backends
        (an input that requires grad or carries a tangent is an error); the
        torch backend differentiates.
    """
    _check_refs(x_t, ref, "x_t")
    if prior not in PRIORS:
        raise ValueError(f"prior: expected 'gaussian' or 'uniform', got {prior!r}")
    kind = PRIORS[prior]
    lo = hi = 0.0
    if kind == UNIFORM:
        if not (isinstance(box, (tuple, list)) and len(box) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in box)):
            raise TypeError(f"box: expected a pair of floats (lo, hi), got {box!r}")
        lo, hi = float(box[0]), float(box[1])
        if not lo < hi:
            raise ValueError(f"box: need lo < hi, got ({lo:g}, {hi:g})")
    B = x_t.shape[0]
    N = _features("x_t", x_t)
    acc = V.acc_dtype(x_t.dtype)
    tt = V.time("t", t, B, x_t)
    coef = coefficients(schedule, tt, B, acc)
    sigma = coef[:, SIGMA]
    if V.values_checked(sigma) and sigma.numel() and not bool((sigma >= 0).all()):
        raise ValueError("t: the schedule gives sigma_t < 0 (or NaN); the denoiser needs "
                         "sigma_t >= 0")
    be = resolve(backend, x_t.device)
    if be != "torch":
        no_derivative("empirical_denoiser", x_t=x_t, t=t, ref=ref)
    qp = coef[:, ALPHA:SIGMA + 1].contiguous()  # (alpha_t, sigma_t) per sample
    x2, ref2 = _flat(x_t).contiguous(), _flat(ref).contiguous()
    if B == 0:
        return x_t.new_empty(x_t.shape)
    mean, best, _ = _run(x2, ref2, qp, kind, lo, hi, be, group)
    if kind == GAUSSIAN:
        _check_keys("x_t", best, True)
    return mean.to(x_t.dtype).reshape(x_t.shape)


__all__ = ["poisson_field", "empirical_denoiser"]
