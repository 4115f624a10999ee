"""Rectified flow (Liu et al. 2022, "Flow straight and fast"): reflow and
distillation on the fused ops, and the minibatch-OT coupling of OT-CFM.

Conventions (docs/design.md §1): t = 0 is noise x0, t = 1 is data x1; a rectified
flow is the ``linear`` schedule x_t = t x1 + (1 - t) x0 with the velocity
target u = x1 - x0, and is sampled from t = 0 to t = 1.

* 1-rectified flow: flow matching on independent (noise, data) pairs
  (:func:`flowkern.demo.toy.train_flow`, or :func:`reflow_loss` on any pairs;
  with :func:`ot_pairs` applied to each minibatch it is OT-CFM).
* reflow: :func:`reflow_pairs` couples noise with the endpoints of the
  current model's ODE (the fused samplers, batched); training a fresh or the
  same model with :func:`reflow_loss` on those pairs gives the (k+1)-rectified
  flow, whose paths are straighter, so few Euler steps suffice.
* distillation: :func:`distill_loss` trains ``x0 + v(x0, 0)`` (one step) or
  a k-step Euler solve to land on the paired endpoint x1.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from ._rules import default_form
from ._progress import progress_bar
from .ops.flowmap import flowmap_loss
from .ops.steps import ei_step, step_table
from .ops.training import flow_matching_loss, interpolate
from .samplers import METHODS, sample

__all__ = ["reflow_pairs", "reflow_loss", "distill_loss", "ot_pairs", "straightness"]


def _check_model(model):
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


def _check_pairs(x0, x1):
    V.tensor("x0", x0)
    V.tensor("x1", x1)
    if x1.shape != x0.shape or x1.dtype != x0.dtype or x1.device != x0.device:
        raise ValueError(f"x1: the pairs must share shape, dtype and device; x0 is "
                         f"{tuple(x0.shape)} {x0.dtype} {x0.device}, x1 is "
                         f"{tuple(x1.shape)} {x1.dtype} {x1.device}")


@torch.no_grad()
def reflow_pairs(model, x0: torch.Tensor, steps: int = 100, method: str = "euler",
                 batch_size: int = 8192, progress: bool = True, schedule="linear",
                 prediction: str = "velocity", desc: str = "reflow pairs", **sample_kw):
    """Couple noise with the endpoints of the model's ODE: x1 = ODE(x0), the
    training pairs of the next rectified flow (reflow) or of distillation.

    Args:
        model: ``model(x, t) -> prediction`` as for :func:`flowkern.sample`.
        x0: the noise, (N, ...). It is not modified.
        steps, method: the fused sampler and its number of steps ("euler",
            "heun", "ei", "dpmpp_2m"; "em" would make the coupling random).
        batch_size: samples per sampler call (bounds memory; the model sees
            batches of at most this size).
        progress: one tqdm bar over the N samples.
        schedule, prediction, **sample_kw: passed to :func:`flowkern.sample`
            (e.g. grid="karras", backend=...).
    Returns:
        (x0, x1): x0 itself and the ODE endpoints, same shape and dtype.
    """
    _check_model(model)
    V.tensor("x0", x0)
    _check_int("steps", steps)
    _check_int("batch_size", batch_size)
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {METHODS}")
    n = x0.shape[0]
    bar = progress_bar(n, progress, desc=desc, unit="sample", leave=False)
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    try:
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            out[lo:hi] = sample(model, x0[lo:hi], schedule, method, steps=steps,
                                prediction=prediction, progress=False, **sample_kw)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    return x0, out


def _times(t, rows, like, generator):
    acc = V.acc_dtype(like.dtype)
    if t is None:
        return torch.rand(rows, generator=generator, dtype=acc).to(like.device)
    return t


def reflow_loss(model, x0: torch.Tensor, x1: torch.Tensor, t=None, schedule="linear",
                target: str = "velocity", weight=None, reduction: str = "mean",
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None):
    """Flow-matching loss on stored pairs (x0, x1) (reflow; with independent
    pairs it is 1-rectified flow, with :func:`ot_pairs` OT-CFM):
    ``mean(w_b (model(x_t, t) - y)^2)`` with x_t = alpha_t x1 + sigma_t x0 and
    the target y (velocity: x1 - x0 for the linear schedule) built in the
    fused :func:`flowkern.flow_matching_loss` (y never stored; one fused
    backward pass to the model output).

    Args:
        model: ``model(x_t, t)`` returning a prediction of type `target`.
        x0, x1: the coupled noise and data, (B, ...).
        t: times (B,) in [0, 1]; None draws U[0, 1] from `generator` (a CPU
            generator; the times are moved to x0's device).
    """
    _check_model(model)
    _check_pairs(x0, x1)
    t = _times(t, x0.shape[0], x0, generator)
    with torch.no_grad():
        xt, _ = interpolate(x0, x1, t, schedule, "x1", backend=backend)
    return flow_matching_loss(model(xt, t), x0, x1, t, schedule, target, weight=weight,
                              reduction=reduction, backend=backend)


def distill_loss(model, x0: torch.Tensor, x1: torch.Tensor, steps: int = 1, schedule="linear",
                 prediction: str = "velocity", weight=None, reduction: str = "mean",
                 backend: Optional[str] = None):
    """Distillation of a rectified flow into `steps` Euler steps:
    ``‖x1 - solve(x0)‖²`` averaged over elements, where (x0, x1) are pairs of
    the teacher's ODE (:func:`reflow_pairs`) and solve is `steps` uniform
    steps of the student from t = 0 to 1, differentiated end to end.

    One step: ``‖x1 - (x0 + v(x0, 0))‖²``. Each step is the first-order
    exponential integrator :func:`flowkern.ei_step` (differentiable in the
    state and the prediction); for the linear schedule and a velocity model
    it *is* the Euler step, x + (s - t) v, exactly:
    (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d with
    d = x + (1 - t) v gives x + (s - t) v. (For other schedules and
    predictions it is the DDIM step that ``sample(method="ei")`` takes.) The
    last step and its squared error against x1 are one fused pass
    (:func:`flowkern.flowmap_loss`): the final state is never stored.

    Args:
        model: ``model(x, t) -> prediction`` (the student; t a (B,) tensor).
        x0, x1: the teacher's (noise, endpoint) pairs, (B, ...).
        steps: number of student steps k >= 1 (k model calls).
    """
    _check_model(model)
    _check_pairs(x0, x1)
    _check_int("steps", steps)
    V.prediction("prediction", prediction)
    acc = V.acc_dtype(x0.dtype)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    table = step_table(schedule, grid[:-1], grid[1:], dtype=acc, device=x0.device)
    rows = x0.shape[0]
    form = default_form(prediction)
    x = x0
    for i in range(steps):
        t = torch.full((rows,), float(grid[i]), dtype=x0.dtype, device=x0.device)
        p = model(x, t)
        if i < steps - 1:
            x = ei_step(x, p, table=table[i], prediction=prediction, form=form, backend=backend)
        else:
            return flowmap_loss(x, p, x1, table=table[i], prediction=prediction, form=form,
                                weight=weight, reduction=reduction, backend=backend)


def ot_pairs(x0: torch.Tensor, x1: torch.Tensor, num_iter_max: int = 1_000_000):
    """Minibatch optimal-transport coupling (OT-CFM, Tong et al. 2023;
    Pooladian et al. 2023): x1 reordered so that (x0[i], x1[i]) is the exact
    squared-Euclidean optimal assignment of the batch, from POT's network
    simplex ``ot.emd`` (its plan between two uniform batches of one size is
    a permutation matrix). Cost O(B^3): meant for minibatches (B ~ 256-1024).

    Returns (x0, x1[perm]). Needs POT (``pip install pot``)."""
    _check_pairs(x0, x1)
    try:
        import ot
    except ImportError:
        raise ImportError("ot_pairs needs POT: pip install pot") from None
    n = x0.shape[0]
    if n == 0:
        return x0, x1
    a = x0.detach().reshape(n, -1).double().cpu()
    b = x1.detach().reshape(n, -1).double().cpu()
    cost = torch.cdist(a, b) ** 2
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    plan = torch.as_tensor(ot.emd(w.numpy(), w.numpy(), cost.numpy(), numItermax=num_iter_max))
    perm = plan.argmax(1)
    if not torch.equal(torch.sort(perm).values, torch.arange(n)):  # pragma: no cover
        raise RuntimeError("ot_pairs: ot.emd did not return a permutation (did it converge? "
                           "raise num_iter_max)")
    return x0, x1[perm.to(x1.device)]


@torch.no_grad()
def straightness(model, x0: torch.Tensor, steps: int = 32, schedule="linear",
                 prediction: str = "velocity", backend: Optional[str] = None) -> float:
    """Liu et al.'s straightness of the model's ODE from x0:
    S = ∫_0^1 E ‖(x_1 - x_0) - v(x_t, t)‖² dt / dim, over an Euler solve of
    `steps` uniform steps (0 for perfectly straight paths; reported per
    dimension). Velocity models only (prediction="velocity")."""
    _check_model(model)
    if prediction != "velocity":
        raise ValueError("prediction: straightness is defined for velocity models")
    vs = []

    def rec(x, t):
        v = model(x, t)
        vs.append(v.clone())
        return v

    x1 = sample(rec, x0, schedule, "euler", steps=steps, prediction=prediction, progress=False,
                backend=backend)
    d = (x1 - x0).double()
    return float(sum(((d - v.double()) ** 2).mean() for v in vs) / len(vs))
