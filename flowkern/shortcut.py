"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut
Models") on the fused ops, in flowkern's time (t = 0 noise, t = 1 data, the
linear path x_t = t x1 + (1 - t) x0, as in the paper; docs/design.md §12).

The model s(x, t, d) is the direction of a jump of size d: x_{t+d} = x_t + d s.
At d = 0 it is the velocity (flow matching); for d > 0 it is trained to be
self-consistent, one jump of 2d equal to two of d:

    s(x_t, t, 2d) = sg((s_1 + s_2) / 2),   s_1 = s(x_t, t, d),
                                           s_2 = s(x_t + d s_1, t + d, d).

* :func:`loss` — the fused objective over a batch split into flow-matching
  rows (target x1 - x0) and self-consistency rows (target (s_1 + s_2)/2): both
  are the flow-matching loss kernel's velocity target d_alpha x1 + d_sigma x0,
  with (d_alpha, d_sigma) = (1, -1) over (data, noise) and (1/2, 1/2) over
  (s_1, s_2): one pass each forward, one backward pass writing d/dpred; the
  target is never stored.
* :func:`training_loss` — the paper's recipe from a model and data: a fraction
  `fm_fraction` of the batch at d = 0, the rest at dyadic jumps 2d = 2^-k
  (k uniform in 0 .. log2(max_steps) - 1) from times on the jump's grid, the
  midpoint x_t + d s_1 by one fused Euler step.
* :func:`sample` — `steps` jumps of size 1/steps, one fused Euler step each.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate as V
from .backend import resolve
from .ops._registry import calls_for
from .ops.steps import euler_step
from ._rules import PRED_CODE, REDUCTION_CODE, TABLE_KIND
from .ops.training import interpolate

__all__ = ["loss", "training_loss", "sample_jumps", "sample"]


def _sum_of_squares(pred, a, b, coef_a, coef_b, backend):
    """sum over all elements of (pred - (coef_a a + coef_b b))^2, differentiable
    in pred (a and b are not differentiated): the fm_loss kernel's velocity
    target d_alpha x1 + d_sigma x0 with x1 = a, x0 = b."""
    rows = pred.shape[0]
    if rows == 0:
        return pred.new_zeros((), dtype=V.acc_dtype(pred.dtype))
    be = resolve(backend, pred.device)
    table = torch.tensor([[0.0, 0.0, coef_a, coef_b]], dtype=V.acc_dtype(pred.dtype),
                         device=pred.device).expand(rows, 4).contiguous()  # triton: a row each
    # the mean (in pred's dtype: a float16 sum could overflow), then the count
    mean = calls_for(be).fm_loss.call(pred.contiguous(), b.detach().contiguous(),
                                      a.detach().contiguous(), table, 0.0, TABLE_KIND, [],
                                      PRED_CODE["velocity"], None, REDUCTION_CODE["mean"], False)
    return mean.to(table.dtype) * pred.numel()


def _check_like(ref_name, ref, **named):
    for name, x in named.items():
        V.tensor(name, x)
        if x.shape[1:] != ref.shape[1:] or x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"{name}: must match {ref_name} in feature shape, dtype and device; "
                             f"got {tuple(x.shape)} {x.dtype} {x.device}, {ref_name} is "
                             f"{tuple(ref.shape)} {ref.dtype} {ref.device}")


def loss(pred_fm: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, pred_sc: torch.Tensor,
         s1: torch.Tensor, s2: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """The shortcut objective, fused: the mean over all elements of both parts,

        flow matching     (pred_fm - (x1 - x0))^2            rows of pred_fm
        self-consistency  (pred_sc - sg((s1 + s2) / 2))^2    rows of pred_sc

    pred_fm = s(x_t, t, 0) on (x0, x1) pairs; pred_sc = s(x_t, t, 2d) with s1, s2
    the two d-jumps from the same x_t. Either part may have 0 rows. Returns a
    scalar in pred_fm's dtype; gradients flow to pred_fm and pred_sc only."""
    _check_like("pred_fm", pred_fm, x0=x0, x1=x1, pred_sc=pred_sc, s1=s1, s2=s2)
    for name, x in (("x0", x0), ("x1", x1)):
        if x.shape != pred_fm.shape:
            raise ValueError(f"{name}: must have pred_fm's shape {tuple(pred_fm.shape)}, "
                             f"got {tuple(x.shape)}")
    for name, x in (("s1", s1), ("s2", s2)):
        if x.shape != pred_sc.shape:
            raise ValueError(f"{name}: must have pred_sc's shape {tuple(pred_sc.shape)}, "
                             f"got {tuple(x.shape)}")
    total = pred_fm.numel() + pred_sc.numel()
    if total == 0:
        raise ValueError("pred_fm: the batch is empty (no flow-matching and no "
                         "self-consistency rows)")
    fm = _sum_of_squares(pred_fm, x1, x0, 1.0, -1.0, backend)
    sc = _sum_of_squares(pred_sc, s1, s2, 0.5, 0.5, backend)
    return ((fm + sc) / total).to(pred_fm.dtype)


def sample_jumps(n: int, max_steps: int = 128, generator: Optional[torch.Generator] = None,
                 device=None, dtype: torch.dtype = torch.float32):
    """(t, d), each (n,): the half-jump d = 2^-k / 2 with k uniform in
    0 .. log2(max_steps) - 1 (so the trained jump 2d runs from 2/max_steps to
    1), and t uniform on the grid of the jump 2d in [0, 1 - 2d]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 2
            or max_steps & (max_steps - 1)):
        raise ValueError(f"max_steps: expected a power of two >= 2, got {max_steps!r}")
    levels = int(math.log2(max_steps))
    g = dict(generator=generator, device=generator.device if generator else device)
    k = torch.randint(0, levels, (n,), **g)
    jump = torch.pow(2.0, -k.double())
    slots = torch.floor(torch.rand(n, dtype=torch.float64, **g) / jump)  # 0 .. 1/jump - 1
    return (slots * jump).to(dtype), (jump / 2).to(dtype)


def training_loss(model, x1: torch.Tensor, x0: Optional[torch.Tensor] = None,
                  fm_fraction: float = 0.75, max_steps: int = 128,
                  generator: Optional[torch.Generator] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """The shortcut-model objective of `model(x, t, d) -> s` on a data batch x1
    (x0: the noise, default standard normal). The first round(fm_fraction * B)
    rows train flow matching (d = 0, t uniform); the others self-consistency
    (:func:`sample_jumps`), their targets built without gradient."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t, d), got {type(model).__name__}")
    V.tensor("x1", x1)
    if not (isinstance(fm_fraction, (int, float)) and 0 <= fm_fraction <= 1):
        raise ValueError(f"fm_fraction: expected a number in [0, 1], got {fm_fraction!r}")
    rows = x1.shape[0]
    dev = generator.device if generator else x1.device
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=dev)
    _check_like("x1", x1, x0=x0)
    n_fm = int(round(fm_fraction * rows))
    t_fm = torch.rand(n_fm, generator=generator, device=dev).to(x1.dtype)
    t_sc, d = sample_jumps(rows - n_fm, max_steps, generator, dev, x1.dtype)
    t = torch.cat([t_fm, t_sc])
    x_t, _ = interpolate(x0, x1, t, "linear", backend=backend)
    xt_fm, xt_sc = x_t[:n_fm], x_t[n_fm:]
    with torch.no_grad():  # the self-consistency target: two d-jumps, stop-gradient
        s1 = model(xt_sc, t_sc, d)
        x_mid = euler_step(xt_sc, s1, t_sc, t_sc + d, "linear", "velocity", backend=backend)
        s2 = model(x_mid, t_sc + d, d)
    pred = model(x_t, t, torch.cat([torch.zeros_like(t_fm), 2 * d]))
    return loss(pred[:n_fm], x0[:n_fm], x1[:n_fm], pred[n_fm:], s1, s2, backend)


@torch.no_grad()
def sample(model, x0: torch.Tensor, steps: int = 1, backend: Optional[str] = None):
    """Generate from noise x0 with `steps` jumps of size d = 1/steps:
    x <- x + d s(x, t, d), one fused Euler step each."""
    V.tensor("x0", x0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    rows, d = x0.shape[0], 1.0 / steps
    x = x0.clone()
    step = torch.full((rows,), d, dtype=x0.dtype, device=x0.device)
    for i in range(steps):
        a, b = i * d, min((i + 1) * d, 1.0)
        s = model(x, torch.full((rows,), a, dtype=x0.dtype, device=x0.device), step)
        euler_step(x, s, a, b, "linear", "velocity", out=x, backend=backend)
    return x
