"""Flow-map op family: flowmap_loss, the squared error of the one-step flow
map g(t, s, x) against a target with g never stored (docs/design.md §4; the map is
ei_step's exponential-integrator step).

    g(t, s, x) = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄   (data form)

with d̄ the model's prediction converted to an x1-prediction in registers.
It is the hot loop of the flow map's semigroup loss (target: the
stop-gradient composition g(u, s, g(t, u, x))) and of k-step distillation
of a rectified flow (the last Euler step, which is this map for the linear
schedule and a velocity prediction, against the data x1). The kernel-level
ops (flowkern::flowmap_loss_rows / flowkern_triton::flowmap_loss_rows) sum
the squared residual per row; their backward writes the gradients of pred
(and of x and the target when they need one) in one pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .._rules import FORM_NAMES, PREDICTIONS, TABLE_KIND
from ..backend import resolve
from ..reference import flowmap as ref
from ..tables import ALPHA_T, AT_S, AT_T, SIGMA_T, STEP_COLS
from ._registry import calls_for, lazy, no_time_tangent, register, transforms_active, triton_op
from .steps import _as_times, _nonzero_for, check_table, step_table
from .training import fill_tangents

_T = "flowkern.triton.flowmap"

# ---------------------------------------------------------------------------
# flowkern_triton:: implementations (schemas: flowkern/ops/schemas.inc)


@triton_op("flowmap_loss_rows")
def _t_rows(x, pred, target, coef, prediction, form):
    return lazy(_T, "flowmap_loss_rows")(x.contiguous(), pred.contiguous(), target.contiguous(),
                                         coef.contiguous(), prediction, form)


@triton_op("flowmap_loss_backward")
def _t_bwd(grad_rows, x, pred, target, coef, prediction, form, grad_x, grad_target):
    return lazy(_T, "flowmap_loss_backward")(grad_rows, x.contiguous(), pred.contiguous(),
                                             target.contiguous(), coef.contiguous(), prediction,
                                             form, grad_x, grad_target)


# ---------------------------------------------------------------------------
# fake functions, autograd, CUDA kernels: once for both namespaces


def _rows_fake(x, pred, target, coef, prediction, form):
    return coef.new_empty(x.shape[0])


def _bwd_fake(grad_rows, x, pred, target, coef, prediction, form, grad_x, grad_target):
    return [torch.empty_like(x) for _ in range(1 + int(grad_x) + int(grad_target))]


def _setup(ctx, inputs, output):
    x, pred, target, coef, prediction, form = inputs
    ctx.save_for_backward(x, pred, target, coef)
    if transforms_active():  # only a jvp reads them (save_for_forward costs ~10 us)
        ctx.save_for_forward(x, pred, target, coef)
    ctx.prediction, ctx.form = prediction, form


def _jvp(calls):
    """d/de of |e_b|^2 per row along d_e, e = g(x, pred) - target with g the
    ei_step map (linear in x, pred): 2 e . (g(d_x, d_pred) - d_target)."""
    def jvp(ctx, d_x, d_pred, d_target, d_coef, *_):
        no_time_tangent("flowmap_loss", "t", d_coef)
        x, pred, target, coef = ctx.saved_tensors
        acc = coef.dtype
        step = (None, coef, [], TABLE_KIND, [], ctx.prediction, ctx.form, 1.0, False)
        err = calls.ei_step.call(x.to(acc), pred.to(acc), *step) - target.to(acc)
        d_err = 0
        if d_x is not None or d_pred is not None:
            d_x, d_pred = fill_tangents(x.shape, d_x, d_pred)
            d_err = calls.ei_step.call(d_x.to(acc), d_pred.to(acc), *step)
        if d_target is not None:
            d_err = d_err - d_target.to(acc)
        return (2 * err * d_err).reshape(x.shape[0], -1).sum(1)
    return jvp


def _backward(ops):
    def backward(ctx, g_rows):
        x, pred, target, coef = ctx.saved_tensors
        need_x, _, need_t = ctx.needs_input_grad[:3]
        grads = ops.flowmap_loss_backward(g_rows.contiguous(), x, pred, target, coef,
                                          ctx.prediction, ctx.form, bool(need_x), bool(need_t))
        g_x = grads[1] if need_x else None
        g_t = grads[-1] if need_t else None
        return g_x, grads[0], g_t, None, None, None
    return backward


def _reference(x, pred, target, coef, prediction, form):
    """flowmap_loss_rows' torch formula with the op's signature (DiffOp's double backward)."""
    acc = coef.dtype
    full = coef.expand(x.shape[0], STEP_COLS) if x.shape[0] else coef[:0]
    return ref.flowmap_loss_rows(x.to(acc), pred.to(acc), target.expand(x.shape).to(acc),
                                 full[:, AT_T], full[:, AT_S], PREDICTIONS[prediction],
                                 FORM_NAMES[form])


register("flowmap_loss_rows", _rows_fake, _backward, _setup, jvp=_jvp, reference=_reference,
         diff=(0, 1, 2), saved_at=(0, 1, 2, 3))  # _setup saves x, pred, target, coef
register("flowmap_loss_backward", _bwd_fake)

# ---------------------------------------------------------------------------
# public API


def flowmap_loss(x: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, t=None, s=None,
                 schedule="linear", prediction: str = "x1", form: str = "data",
                 weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                 table: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Squared error of the one-step flow map against a target, fused:
    mean over all elements of w_b (g(t, s, x) - target)^2 with

        g(t, s, x) = ei_step(x, pred, t, s, schedule, prediction, form)
                   = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄   (data form)

    computed in registers: the mapped tensor is never written.

    Args:
        x: the state at time t, (B, ...). pred: the model's output at (x, t, s)
            of type `prediction` ("x1": d̄ itself; "velocity", "eps", "score"
            are converted at t in registers). target: what g(t, s, x) should
            equal (e.g. the stop-gradient two-jump map, or the data x1).
            All three of one shape, dtype and device (target may broadcast).
        t, s: start and end times (floats or (B,) tensors); or a step table
            ``table=flowkern.step_table(schedule, t, s)``.
        form: "data" (divides by sigma_t) or "noise" (divides by alpha_t).
        weight: optional per-sample weights w_b, shape (B,) or scalar.
        reduction: "mean" (over all elements), "sum", or "none" (per-sample
            mean over the non-batch dims, shape (B,)).
    Returns:
        The loss in x's dtype. Backward: the gradient of pred, and of x and
        target when they require one, in one pass (no full-size temporary).
    """
    V.tensor("x", x)
    V.tensor("pred", pred)
    V.tensor("target", target)
    if pred.shape != x.shape or pred.dtype != x.dtype or pred.device != x.device:
        raise ValueError(f"pred: the model output must match the state x in shape, dtype and "
                         f"device; got {tuple(pred.shape)} {pred.dtype} {pred.device}, x is "
                         f"{tuple(x.shape)} {x.dtype} {x.device}")
    if target.dtype != x.dtype or target.device != x.device:
        raise ValueError(f"target: must match x in dtype and device; got {target.dtype} "
                         f"{target.device}, x is {x.dtype} {x.device}")
    try:
        if torch.broadcast_shapes(target.shape, x.shape) != x.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"target: shape {tuple(target.shape)} does not broadcast to x's "
                         f"{tuple(x.shape)}") from None
    fcode = V.form(form)
    code = V.prediction("prediction", prediction)
    V.reduction(reduction)
    acc = V.acc_dtype(x.dtype)
    rows = x.shape[0]
    table = _table(x, t, s, schedule, table, acc)
    if form == "data":
        V.nonzero("t", "sigma_t", table[:, SIGMA_T], "the data form divides by it")
    else:
        V.nonzero("t", "alpha_t", table[:, ALPHA_T], "the noise form divides by it")
    _nonzero_for(_TableView(table), prediction, "x1" if form == "data" else "eps")
    weight = V.sample_weight(weight, rows, x)
    be = resolve(backend, x.device)
    inner = x.numel() // rows if rows else 0
    r = calls_for(be).flowmap_loss_rows.call(x.contiguous(), pred.contiguous(),
                                             V.dense(target, x.shape), table, code, fcode)
    return V.reduce_rows(r, weight, reduction, inner).to(x.dtype)


class _TableView:
    """The attribute _nonzero_for reads from a validated step."""

    def __init__(self, table):
        self.table = table


def _table(x, t, s, schedule, table, acc):
    rows = x.shape[0]
    if table is None:
        if t is None or s is None:
            raise TypeError("flowmap_loss: give the times t and s (or a precomputed table=)")
        for name, v in (("t", t), ("s", s)):
            v = _as_times(name, v, x.device, acc)
            if v.numel() not in (1, rows):
                raise ValueError(f"{name}: expected shape () or ({rows},), got {tuple(v.shape)}")
            V.time(name, v, rows, x)
        if rows == 0:  # step_table cannot broadcast an empty t against a float s
            t = s = 0.5  # a shared row that no sample reads
        return step_table(schedule, t, s, dtype=acc, device=x.device)
    return check_table(table, rows, x.device, acc)


__all__ = ["flowmap_loss"]
