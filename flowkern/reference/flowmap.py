"""Reference flow-map loss (flowkern.ops.flowmap): the one-step flow map
g(t, s, x), written as the reference EI step, and its squared error against
a target. Coefficient blocks ct, cs are (B, 4) [alpha, sigma, d_alpha, d_sigma]
at t and s."""
from __future__ import annotations

from .steps import ei_step
from .training import reduce_rows


def flowmap(x, pred, ct, cs, prediction="x1", form="data"):
    """g(t, s, x) = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄ (data form)."""
    return ei_step(x, pred, ct, cs, prediction, form)


def flowmap_loss_rows(x, pred, target, ct, cs, prediction="x1", form="data"):
    """Per-sample sum over features of (g(t, s, x) - target)^2, shape (B,)."""
    r = flowmap(x, pred, ct, cs, prediction, form) - target
    return (r * r).flatten(1).sum(1) if r.dim() > 1 else r * r


def flowmap_loss(x, pred, target, ct, cs, prediction="x1", form="data", weight=None,
                 reduction="mean"):
    rows = flowmap_loss_rows(x, pred, target, ct, cs, prediction, form)
    return reduce_rows(rows, x, weight, reduction)
