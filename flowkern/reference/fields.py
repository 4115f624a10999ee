"""Reference empirical fields (docs/design.md §4 "Empirical fields").

Three things live here:

* :func:`field_mean` — the ground truth of the kernels' contract, written
  like the formulas: for queries x (B, N), references y (R, N) and a score
  `kind`, the weights w_ij = softmax_j(logit_ij) and the weighted mean
  sum_j w_ij y_j, returned as the kernels return it, (mean, best, sumexp)
  (csrc/include/flowkern/fields.h). Run it in float64 for the ground truth.
  Distances are direct differences, evaluated in query chunks so that the
  B x R x N broadcast stays bounded (it is a reference, not a kernel: it
  still holds B x R scores).
* :func:`key_weight` — w(k, kb) = exp(logit(k) - logit(kb)) from the keys,
  used to merge partial states (tiles, R-splits, shards across ranks).
* :func:`pfgm_field` — the PFGM reference formulation, as the PFGM code
  writes the empirical field: broadcast B x R x (N+1) differences, row-min
  normalisation (min_j ||.|| / ||.||_j)^(N+D), + 1e-7 in the denominators.
  It is what the benchmarks and the accuracy tests compare against.
"""
from __future__ import annotations

import math

import torch

POISSON, GAUSSIAN, UNIFORM = 0, 1, 2
KINDS = {"poisson": POISSON, "gaussian": GAUSSIAN, "uniform": UNIFORM}

# B x R x N elements per chunk of the reference broadcast (float64: 256 MB).
_CHUNK = 1 << 25


def _tiny(dtype):
    return torch.finfo(dtype).tiny


def reduce_dist(x, ref, qp, kind, p0=0.0, p1=0.0):
    """red_ij (fields.h): sum_k d^2 or max_k max(lo' - d, d - hi') with
    d = x_ik - a_i y_jk; shape (B, R), in x's dtype."""
    B, N = x.shape
    R = ref.shape[0]
    a = torch.ones(B, dtype=x.dtype, device=x.device) if kind == POISSON else qp[:, 0]
    out = torch.empty(B, R, dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK // max(1, R * N))
    for b0 in range(0, B, step):
        xs, al = x[b0:b0 + step], a[b0:b0 + step]
        d = xs[:, None, :] - al[:, None, None] * ref[None, :, :]
        if kind == UNIFORM:
            s = qp[b0:b0 + step, 1][:, None, None]
            v = torch.maximum(s * p0 - d, d - s * p1)
            out[b0:b0 + step] = v.amax(-1) if N else -math.inf
        else:
            out[b0:b0 + step] = (d * d).sum(-1)
    return out


def keys(red, qp, kind):
    if kind == POISSON:
        r = qp[:, 0:1]
        return torch.clamp(red + r * r, min=_tiny(red.dtype))
    return red


def logits(k, qp, kind, p0=0.0):
    """The logit of a key, as docs/design.md §4 writes it (uniform: 0 inside the box,
    -inf outside)."""
    if kind == POISSON:
        return -p0 * torch.log(k)
    if kind == GAUSSIAN:
        s = qp[:, 1:2]
        return -k / (2 * s * s)
    return torch.where(k <= 0, 0.0, -math.inf).to(k.dtype)


def key_weight(kind, k, kb, qp, p0=0.0, p1=0.0):
    """w(k, kb) = exp(logit(k) - logit(kb)) for k >= kb (fields.h); k, kb
    broadcast against qp's rows (shape (B,) or (B, R))."""
    col = (lambda v: v) if k.dim() == 1 else (lambda v: v[:, None])
    if kb.dim() < k.dim():
        kb = kb[:, None]
    if kind == POISSON:
        w = torch.exp(p0 * torch.log(kb / k))
        return torch.where(k == kb, torch.ones_like(w), w)
    if kind == GAUSSIAN:
        s = col(qp[:, 1])
        w = torch.exp(-(k - kb) / (2 * s * s))
        return torch.where(k > kb, w, torch.ones_like(w))
    return (k.clamp(min=0) <= kb.clamp(min=0)).to(k.dtype)


def field_mean(x, ref, qp, kind, p0=0.0, p1=0.0):
    """(mean, best, sumexp) of every query (the kernels' contract) in x's
    dtype: best = min_j key_ij, sumexp = sum_j w(key_ij, best),
    mean = sum_j w(key_ij, best) y_j / sumexp."""
    k = keys(reduce_dist(x, ref, qp, kind, p0, p1), qp, kind)
    best = k.amin(1)
    w = key_weight(kind, k, best, qp, p0, p1)
    sumexp = w.sum(1)
    return (w @ ref) / sumexp[:, None], best, sumexp


def softmax_mean(x, ref, qp, kind, p0=0.0, p1=0.0):
    """sum_j softmax_j(logit_ij) y_j straight from docs/design.md §4's logits (a
    second, independent path to the same mean; -inf everywhere -> NaN)."""
    k = keys(reduce_dist(x, ref, qp, kind, p0, p1), qp, kind)
    return torch.softmax(logits(k, qp, kind, p0), dim=1) @ ref


def merge(kind, states, qp, p0=0.0, p1=0.0):
    """Merge partial states [(mean, best, sumexp), ...] of the same queries
    over disjoint reference sets (what an all-reduce over ranks computes)."""
    best = torch.stack([s[1] for s in states]).amin(0)
    tot = torch.zeros_like(states[0][2])
    acc = torch.zeros_like(states[0][0])
    for mean, kb, l in states:
        f = key_weight(kind, kb, best, qp, p0, p1) * l
        tot = tot + f
        acc = acc + f[:, None] * mean
    return acc / tot[:, None], best, tot


def normalized_target(x, r, mean, N, gamma):
    """PFGM's target sqrt(N) m / (||m|| + gamma) with m = (mean - x, -r)."""
    mx = mean - x
    norm = torch.sqrt((mx * mx).sum(1) + r * r)
    f = math.sqrt(N) / (norm + gamma)
    return mx * f[:, None], -r * f


def pfgm_field(x, r, data, D=1, gamma=5.0, normalize=True):
    """The PFGM code's empirical field (Xu et al. 2022, losses.py) for
    perturbed samples (x, r) in N + D dimensions and data (R, N) at r = 0:

        gt_distance = ||x~_i - y~_j||, distance = (min_j gt / (gt + 1e-7))^(N + D),
        coeff = distance / (sum_j distance + 1e-7),
        gt_direction = sum_j coeff_ij (y~_j - x~_i),
        target = sqrt(N) gt_direction / (||gt_direction|| + gamma).

    Memory: a B x R x (N + 1) tensor (and several B x R); any dtype.
    Returns (x part (B, N), r part (B,)), or with normalize=False the weighted
    mean of the data (B, N)."""
    N = x.shape[1]
    xt = torch.cat([x, r[:, None]], dim=1)
    yt = torch.cat([data, torch.zeros(data.shape[0], 1, dtype=data.dtype, device=data.device)],
                   dim=1)
    gt_distance = torch.sum((xt.unsqueeze(1) - yt) ** 2, dim=[-1]).sqrt()
    distance = torch.min(gt_distance, dim=1, keepdim=True)[0] / (gt_distance + 1e-7)
    distance = distance ** (N + D)
    distance = distance[:, :, None]
    coeff = distance / (torch.sum(distance, dim=1, keepdim=True) + 1e-7)
    if not normalize:
        return (coeff * yt[None, :, :N]).sum(1)
    diff = -(xt.unsqueeze(1) - yt)
    gt_direction = torch.sum(coeff * diff, dim=1)
    gt_norm = gt_direction.norm(p=2, dim=1)
    gt_direction = gt_direction / (gt_norm.view(-1, 1) + gamma)
    gt_direction = gt_direction * math.sqrt(N)
    return gt_direction[:, :N], gt_direction[:, N]
