"""Reference training ops: interpolation, targets, conversions, the loss.

Coefficients come as the (B, 4) table [alpha, sigma, d_alpha, d_sigma] of
flowkern.schedules.coefficients; every formula is docs/design.md §1, §3, §4 written
out, deliberately not sharing the kernels' coefficient tables, so that a
test against it can catch a wrong table entry.
"""
from __future__ import annotations

import torch


def _cols(coef: torch.Tensor, like: torch.Tensor):
    """alpha, sigma, d_alpha, d_sigma shaped (B, 1, ..., 1) to broadcast over like."""
    view = (coef.shape[0],) + (1,) * (like.dim() - 1)
    return [coef[:, k].reshape(view) for k in range(4)]


def target(x0, x1, coef, target: str):
    """The regression target y for prediction type `target` (docs/design.md §4)."""
    a, s, da, ds = _cols(coef, x1)
    if target == "velocity":
        return da * x1 + ds * x0
    if target == "x1":
        return x1 + 0 * x0
    if target == "eps":
        return x0 + 0 * x1
    if target == "score":
        return -x0 / s
    raise ValueError(target)


def interpolate(x0, x1, coef, target_type: str = "velocity"):
    """(x_t, y): x_t = alpha x1 + sigma x0 and the target y."""
    a, s, _, _ = _cols(coef, x1)
    return a * x1 + s * x0, target(x0, x1, coef, target_type)


def flow_matching_loss_rows(pred, x0, x1, coef, target_type: str = "velocity"):
    """Per-sample sum over features of (pred - y)^2, shape (B,)."""
    y = target(x0, x1, coef, target_type)
    return ((pred - y) ** 2).flatten(1).sum(1) if pred.dim() > 1 else (pred - y) ** 2


def flow_matching_loss(pred, x0, x1, coef, target_type="velocity", weight=None, reduction="mean"):
    """mean over elements of w_b (pred - y)^2; 'sum' sums them; 'none' gives
    the per-sample mean over features, shape (B,)."""
    rows = flow_matching_loss_rows(pred, x0, x1, coef, target_type)
    return reduce_rows(rows, pred, weight, reduction)


def reduce_rows(rows, like, weight=None, reduction="mean"):
    """The loss from per-sample sums of squares over the features of `like`:
    w_b times each, then mean over all elements / sum / per-sample mean."""
    inner = like[0].numel() if like.shape[0] else 1
    if weight is not None:
        rows = rows * weight
    if reduction == "none":
        return rows / inner
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(like.numel(), 1)


def convert(pred, x, coef, src: str, dst: str):
    """Prediction `pred` of type src at state x, as type dst (docs/design.md §3)."""
    a, s, da, ds = _cols(coef, x)
    if src == dst:
        return pred + 0 * x
    # Everything goes through (d, eps) computed by the direct formula of src.
    if src == "x1":
        d = pred
        eps = (x - a * d) / s
    elif src == "eps":
        eps = pred
        d = (x - s * eps) / a
    elif src == "score":
        eps = -s * pred
        d = (x - s * eps) / a
    else:  # velocity
        det = a * ds - s * da
        d = (ds * x - s * pred) / det
        eps = (a * pred - da * x) / det
    if dst == "x1":
        return d
    if dst == "eps":
        return eps
    if dst == "score":
        return -eps / s
    # velocity from the better-conditioned of the two forms
    if src == "x1":
        return (ds / s) * x + (da - a * ds / s) * d
    if src in ("eps", "score"):
        return (da / a) * x + (ds - s * da / a) * eps
    raise ValueError(dst)
