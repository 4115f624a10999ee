"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling")
on the fused ops, in flowkern's conventions (docs/design.md §1, §11).

Time runs from t = 0 (noise x0) to t = 1 (data x1); z_t = alpha_t x1 + sigma_t x0
and v = d z_t / dt (``interpolate(..., target="velocity")``). The model
u(z, t, s) predicts the *average* velocity from t to s,

    u(z_t, t, s) = (z_s - z_t) / (s - t),  so one step is  z_s = z_t + (s - t) u.

Differentiating (s - t) u = integral_t^s v in t gives the MeanFlow identity

    u(z_t, t, s) = v(z_t, t) + (s - t) du/dt,   du/dt = (d/dz u) v + d/dt u

(the total derivative along the trajectory: a Jacobian-vector product of the
model along (v, 1, 0) in (z, t, s)). Training regresses u on the stop-gradient
target v + (s - t) du/dt with the conditional velocity v; at s = t it is flow
matching. The paper's (r, t) with its time reversed is our (t, s).

* :func:`loss` — the fused target-and-loss pass: per sample the squared error
  |u - sg(v + (s - t) du/dt)|^2 in one kernel pass (the flow-matching loss
  kernel with per-row coefficients (d_alpha, d_sigma) = (1, s - t) over
  (v, du/dt)), the adaptive weight sg((|.|^2 + eps)^-power), the batch mean;
  its backward writes d/du in one pass.
* :func:`training_loss` — the whole objective from a model and data: times,
  z_t and v in one pass, the JVP through the model, the loss.
* :func:`sample_times` — the paper's (t, s) sampling: two logit-normal times,
  ordered, and s = t for a fraction 1 - ratio of the batch.
* :func:`sample` — 1- or k-step generation, z_s = z_t + (s - t) u (one
  fused Euler step with a velocity prediction each).

**JVP and DDP.** ``jvp="forward_ad"`` (default) evaluates the model once on
dual tensors (``torch.autograd.forward_ad``); ``jvp="func"`` uses
``torch.func.jvp``. Either way the primal output u carries the ordinary
autograd graph through the model, so with a DistributedDataParallel model
the gradients are all-reduced — pass the DDP wrapper itself. The pitfall is
calling the JVP on ``ddp.module`` (a common way around wrappers in
functional code): that skips DDP's forward, its reducer never runs, and each
rank keeps its own gradient without a word. tests/test_meanflow.py runs both
on two gloo ranks (torch 2.14, CPU): through the wrapper the ranks' gradients
agree and equal the average of their local ones; through ``.module`` they differ.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwad

from . import _validate as V
from .backend import resolve
from .ops._registry import calls_for
from .ops.steps import euler_step
from ._rules import PRED_CODE, REDUCTION_CODE, TABLE_KIND
from .ops.training import interpolate
from .tables import D_ALPHA, D_SIGMA

__all__ = ["loss", "training_loss", "sample_times", "sample"]


def _times(name, v, rows, like):
    """v as a (rows,) tensor in like's accumulation dtype (floats allowed)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = torch.full((rows,), float(v), dtype=V.acc_dtype(like.dtype), device=like.device)
    v = V.time(name, v, rows, like)
    return v.to(V.acc_dtype(like.dtype)).expand(rows)


def _squared_error_rows(u, v, dudt, t, s, backend):
    """Per sample, the sum over features of (u - (v + (s - t) du/dt))^2, in the
    accumulation dtype, differentiable in u."""
    rows = u.shape[0]
    inner = u[0].numel() if rows else 0
    be = resolve(backend, u.device)
    h = (s - t).to(V.acc_dtype(u.dtype))
    # The flow-matching loss kernel with per-row coefficients: its velocity
    # target d_alpha x1 + d_sigma x0 with x1 = v, x0 = du/dt, (d_alpha, d_sigma) = (1, h).
    # (B, 4) rows (alpha, sigma, d_alpha, d_sigma) = (0, 0, 1, h): zeros and two
    # column writes cost ~15 us at B = 4096, torch.stack of four columns ~55 us
    table = h.new_zeros(rows, 4)
    table[:, D_ALPHA] = 1
    table[:, D_SIGMA] = h
    dense = [x.contiguous() for x in (u, dudt, v)]
    per_row_mean = calls_for(be).fm_loss.call(*dense, table, 0.0, TABLE_KIND, [],
                                              PRED_CODE["velocity"], None,
                                              REDUCTION_CODE["none"], False)
    return per_row_mean.to(h.dtype) * inner


def loss(u: torch.Tensor, v: torch.Tensor, dudt: torch.Tensor, t, s, power: float = 1.0,
         eps: float = 1e-3, backend: Optional[str] = None) -> torch.Tensor:
    """The MeanFlow loss, fused: mean over the batch of w_b |Delta_b|^2 with

        Delta = u - sg(v + (s - t) du/dt),   w_b = sg((|Delta_b|^2 + eps)^-power)

    (|.|^2 the sum over features; power = 0 gives the plain squared error).

    Args:
        u: the model's average velocity u(z_t, t, s), (B, ...).
        v: the velocity d z_t/dt of the interpolation; dudt: the model's total
            derivative along (v, 1, 0) in (z, t, s). Same shape, dtype and
            device as u; neither is differentiated (the target is stop-gradient).
        t, s: start and end times, floats or (B,) tensors in [0, 1].
    Returns:
        A scalar in u's dtype; backward gives d/du in one pass.
    """
    for name, x in (("u", u), ("v", v), ("dudt", dudt)):
        V.tensor(name, x)
        if x.shape != u.shape or x.dtype != u.dtype or x.device != u.device:
            raise ValueError(f"{name}: must match u in shape, dtype and device; got "
                             f"{tuple(x.shape)} {x.dtype} {x.device}, u is {tuple(u.shape)} "
                             f"{u.dtype} {u.device}")
    for name, x in (("power", power), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or x == float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {x!r}")
    if power > 0 and eps == 0:
        raise ValueError("eps: must be > 0 when power > 0 (the weight (|Delta|^2 + eps)^-power "
                         "is infinite where Delta = 0)")
    rows = u.shape[0]
    t, s = _times("t", t, rows, u), _times("s", s, rows, u)
    sq = _squared_error_rows(u, v.detach(), dudt.detach(), t, s, backend)
    if power:
        sq = sq * (sq.detach() + eps).pow(-power)
    return sq.mean().to(u.dtype)


def sample_times(n: int, ratio: float = 0.25, mean: float = 0.4, std: float = 1.0,
                 generator: Optional[torch.Generator] = None, device=None,
                 dtype: torch.dtype = torch.float32):
    """(t, s), each (n,), t <= s: two logit-normal times (of mean and std
    before the sigmoid), ordered, and s = t for all but a `ratio` of the
    batch. The paper's best is 25% with s != t and logit-normal(-0.4, 1) in
    its time, where t = 1 is noise; mirrored into flowkern's (t = 1 data) that
    is a mean of +0.4 (logit(1 - t) = -logit(t)). With -0.4 here a small 2-D
    model's samples came out with 0.6x the data's spread (too little
    training near the data end); tests/test_meanflow.py trains one."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if not (isinstance(ratio, (int, float)) and 0 <= ratio <= 1):
        raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
    if not (isinstance(std, (int, float)) and std > 0 and std != float("inf")):
        raise ValueError(f"std: expected a finite number > 0, got {std!r}")
    if not (isinstance(mean, (int, float)) and abs(mean) != float("inf") and mean == mean):
        raise ValueError(f"mean: expected a finite number, got {mean!r}")
    g = dict(generator=generator, device=generator.device if generator else device)
    a, b = (torch.sigmoid(torch.randn(n, **g) * std + mean) for _ in range(2))
    t, s = torch.minimum(a, b), torch.maximum(a, b)
    same = torch.rand(n, **g) >= ratio
    s = torch.where(same, t, s)
    return t.to(dtype), s.to(dtype)


def _jvp(model, z, t, s, v, mode):
    """(u, du/dt): the model and its derivative along (v, 1, 0) in (z, t, s)."""
    ones, zeros = torch.ones_like(t), torch.zeros_like(s)
    if mode == "func":
        return torch.func.jvp(model, (z, t, s), (v, ones, zeros))
    if mode != "forward_ad":
        raise ValueError(f"jvp: expected 'forward_ad' or 'func', got {mode!r}")
    with fwad.dual_level():
        out = model(fwad.make_dual(z, v), fwad.make_dual(t, ones), s)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected it to return a tensor, got {type(out).__name__}")
        u, dudt = fwad.unpack_dual(out)
    if dudt is None:  # nothing in the model depends on z or t
        dudt = torch.zeros_like(u)
    return u, dudt


def training_loss(model, x1: torch.Tensor, x0: Optional[torch.Tensor] = None, t=None, s=None,
                  schedule="linear", power: float = 1.0, eps: float = 1e-3,
                  ratio: float = 0.25, jvp: str = "forward_ad",
                  generator: Optional[torch.Generator] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """The MeanFlow objective of `model(z, t, s) -> u` on a data batch x1.

    x0: the noise (default: standard normal like x1). t, s: (B,) times with
    t <= s (default: :func:`sample_times` with `ratio`). z_t and v come from
    one interpolate pass; (u, du/dt) from one JVP through the model (see the
    module docstring for `jvp` and DDP); then :func:`loss`.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable model(z, t, s), got {type(model).__name__}")
    V.tensor("x1", x1)
    rows = x1.shape[0]
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype,
                         device=generator.device if generator else x1.device)
    if (t is None) != (s is None):
        raise ValueError("s: give t and s together (or neither, to sample them)")
    if t is None:
        t, s = sample_times(rows, ratio, generator=generator, device=x1.device,
                            dtype=V.acc_dtype(x1.dtype))
    t, s = _times("t", t, rows, x1), _times("s", s, rows, x1)
    if V.values_checked(s) and bool((s < t).any()):
        raise ValueError("s: every s must be >= its t (the average velocity from t to s)")
    z, v = interpolate(x0, x1, t, schedule, "velocity", backend=backend)
    u, dudt = _jvp(model, z, t.to(x1.dtype), s.to(x1.dtype), v, jvp)
    return loss(u, v, dudt, t, s, power, eps, backend)


@torch.no_grad()
def sample(model, x0: torch.Tensor, steps: int = 1, times=None,
           backend: Optional[str] = None) -> torch.Tensor:
    """Generate from noise x0 with `steps` average-velocity jumps on a uniform
    grid from 0 to 1 (or the increasing `times` from 0 to 1):
    z_s = z_t + (s - t) u(z_t, t, s), one fused Euler step each."""
    V.tensor("x0", x0)
    if times is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        times = torch.linspace(0.0, 1.0, steps + 1).tolist()
    times = [float(v) for v in times]
    if len(times) < 2 or any(b <= a for a, b in zip(times, times[1:])) or times[0] < 0 \
            or times[-1] > 1:
        raise ValueError(f"times: expected an increasing grid in [0, 1], got {times}")
    rows = x0.shape[0]
    z = x0.clone()
    for a, b in zip(times, times[1:]):
        ta = torch.full((rows,), a, dtype=x0.dtype, device=x0.device)
        tb = torch.full((rows,), b, dtype=x0.dtype, device=x0.device)
        u = model(z, ta, tb)
        euler_step(z, u, a, b, "linear", "velocity", out=z, backend=backend)
    return z
