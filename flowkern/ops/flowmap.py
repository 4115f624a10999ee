"""Flow-map op family: flowmap_loss, the squared error of the one-step flow
map g(t, s, x) against a target with g never stored (docs/design.md §4; the map is
ei_step's exponential-integrator step).

    g(t, s, x) = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄   (data form)

with d̄ the model's prediction converted to an x1-prediction in registers.
It is the hot loop of the flow map's semigroup loss (target: the
stop-gradient composition g(u, s, g(t, u, x))) and of k-step distillation
of a rectified flow (the last Euler step, which is this map for the linear
schedule and a velocity prediction, against the data x1).

On the native backends (cpu, cuda) a public call is one call of
flowkern::flowmap_loss, as flow_matching_loss is one of fm_loss: the C++ op
checks the arguments (csrc/cpu/flowmap_args.h, the messages of the Python
path below), evaluates a built-in schedule at t and s itself (each a tensor
or a float; no step table), runs the row-sum kernel and reduces. Its
backward writes the gradients of pred (and of x and the target when they
need one) in one pass. The torch and triton backends validate here and read
a step table.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .._rules import FORM_NAMES, PREDICTIONS, REDUCTION_CODE, TABLE_KIND
from ..backend import NATIVE_BACKENDS, cpu_built, resolve_for
from ..reference import flowmap as ref
from ..schedules import from_native, native_spec
from ..tables import ALPHA_T, AT_S, AT_T, SIGMA_T, STEP_COLS
from ._entries import ENTRIES, compiling
from ._registry import (CALLS, NATIVE_NS, NativeOps, calls_for, lazy, no_time_tangent, register,
                        retyped, transforms_active, triton_op)
from .steps import _as_times, _nonzero_for, check_table, step_table
from .training import (_grad_rows, _need_grad3, _reduce, _weigh_rows, check_tensors,
                       fill_tangents, loss_tangent)

_T = "flowkern.triton.flowmap"

# ---------------------------------------------------------------------------
# flowkern_triton:: implementations (schemas: flowkern/ops/schemas.inc): the
# triton row-sum and backward kernels over the step table of the arguments


@triton_op("flowmap_loss")
def _t_loss(x, pred, target, t, t_value, s, s_value, kind, params, prediction, form, weight,
            reduction, check):
    table = map_table(t, t_value, s, s_value, kind, params, x)
    rows = lazy(_T, "flowmap_loss_rows")(x.contiguous(), pred.contiguous(),
                                         V.dense(target, x.shape), table, prediction, form)
    return _reduce(rows, weight, reduction, x)


@triton_op("flowmap_loss_backward")
def _t_bwd(grad, x, pred, target, t, t_value, s, s_value, kind, params, prediction, form, weight,
           reduction, grad_x, grad_target):
    table = map_table(t, t_value, s, s_value, kind, params, x)
    grad_rows = _grad_rows(grad, weight, reduction, x, table.dtype)
    return lazy(_T, "flowmap_loss_backward")(grad_rows, x.contiguous(), pred.contiguous(),
                                             V.dense(target, x.shape), table, prediction, form,
                                             grad_x, grad_target)


def map_table(t, t_value, s, s_value, kind, params, like):
    """The (1 or B, STEP_COLS) step table of flowmap_loss's coefficient
    arguments in like's accumulation dtype, for what reads one (the triton
    kernels, the torch formula, the jvp): the caller's table (kind
    TABLE_KIND, in `t`), or the built-in schedule at t and s (t_value,
    s_value where they are absent). No value check: the op's caller made it."""
    acc = V.acc_dtype(like.dtype)
    if kind == TABLE_KIND:
        return check_table(t, like.shape[0], like.device, acc)
    tt = t_value if t is None else t
    ss = s_value if s is None else s
    if like.shape[0] == 0:  # step_table cannot broadcast an empty t against a float s
        tt = ss = 0.5  # a shared row that no sample reads
    return step_table(from_native(kind, params), tt, ss, dtype=acc, device=like.device,
                      check=False)


# ---------------------------------------------------------------------------
# fake functions, autograd: once for both namespaces


def _loss_fake(x, pred, target, t, t_value, s, s_value, kind, params, prediction, form, weight,
               reduction, check):
    return x.new_empty((x.shape[0],) if reduction == REDUCTION_CODE["none"] else ())


def _bwd_fake(grad, x, pred, target, t, t_value, s, s_value, kind, params, prediction, form,
              weight, reduction, grad_x, grad_target):
    return [torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(1 + int(grad_x) + int(grad_target))]


def _setup(ctx, inputs, output):
    x, pred, target, t, t_value, s, s_value, kind, params, prediction, form, weight = inputs[:12]
    ctx.save_for_backward(x, pred, target, t, s, weight)
    if transforms_active():  # only a jvp reads them (save_for_forward costs ~10 us)
        ctx.save_for_forward(x, pred, target, t, s, weight)
    ctx.args = (t_value, s_value, kind, params, prediction, form, inputs[12])


def _jvp(calls):
    """d/de of sum_b w_b |e_b|^2 (reduced) along d_e, e = g(x, pred) - target
    with g the ei_step map (linear in x, pred): 2 e . (g(d_x, d_pred) -
    d_target), plus |e_b|^2 d_w_b when the weights carry a tangent."""
    def jvp(ctx, d_x, d_pred, d_target, d_t, _tv, d_s, _sv, _kind, _params, _pred, _form, d_w,
            *_):
        no_time_tangent("flowmap_loss", "t", d_t)
        no_time_tangent("flowmap_loss", "s", d_s)
        x, pred, target, t, s, weight = ctx.saved_tensors
        t_value, s_value, kind, params, prediction, form, reduction = ctx.args
        table = map_table(t, t_value, s, s_value, kind, params, x)
        acc = table.dtype
        step = (None, table, None, None, None, [], TABLE_KIND, [], prediction, form, 1.0, False)
        err = calls.ei_step.call(x.to(acc), pred.to(acc), *step) - target.to(acc)
        d_err = None
        if d_x is not None or d_pred is not None or d_target is not None:
            d_err = 0
            if d_x is not None or d_pred is not None:
                d_x, d_pred = fill_tangents(x.shape, d_x, d_pred)
                d_err = calls.ei_step.call(d_x.to(acc), d_pred.to(acc), *step)
            if d_target is not None:
                d_err = d_err - d_target.to(acc)
        return loss_tangent(err, d_err, weight, d_w, reduction).to(x.dtype)
    return jvp


def _backward(ops):
    def backward(ctx, grad):
        x, pred, target, t, s, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[11]:
            raise RuntimeError("weight: the fused flow-map loss does not differentiate its "
                               "weight; flowkern.flowmap_loss does (it reduces the per-sample "
                               "losses with torch ops then)")
        t_value, s_value, kind, params, prediction, form, reduction = ctx.args
        need_x, need_target = bool(need[0]), bool(need[2])
        grads = ops.flowmap_loss_backward(grad, x, pred, target, t, t_value, s, s_value, kind,
                                          params, prediction, form, weight, reduction, need_x,
                                          need_target)
        g_x = grads[1] if need_x else None
        g_target = grads[-1] if need_target else None
        return (g_x, grads[0] if need[1] else None, g_target) + (None,) * 11
    return backward


def _reference(x, pred, target, t, t_value, s, s_value, kind, params, prediction, form, weight,
               reduction, check):
    """flowmap_loss's torch formula with the op's signature (the torch backend;
    DiffOp's double backward): differentiable in a step table given as `t`."""
    table = map_table(t, t_value, s, s_value, kind, params, x)
    acc = table.dtype
    rows = x.shape[0]
    full = table.expand(rows, STEP_COLS) if rows else table[:0]
    r = ref.flowmap_loss_rows(x.to(acc), pred.to(acc), target.expand(x.shape).to(acc),
                              full[:, AT_T], full[:, AT_S], PREDICTIONS[prediction],
                              FORM_NAMES[form])
    inner = x[0].numel() if rows else 0
    return V.reduce_rows(r, weight, list(REDUCTION_CODE)[reduction], inner).to(x.dtype)


register("flowmap_loss", _loss_fake, _backward, _setup, nograd=True, jvp=_jvp,
         reference=_reference, diff=(0, 1, 2, 11),
         saved_at=(0, 1, 2, 3, 5, 11))  # _setup saves x, pred, target, t, s, weight
register("flowmap_loss_backward", _bwd_fake)

_DIFF = CALLS[NATIVE_NS]  # .flowmap_loss: its DiffOp
# the overload the public function calls when nothing needs a gradient
_NATIVE = NativeOps(flowmap_loss=torch.ops.flowkern.flowmap_loss.nograd) if cpu_built() else None
_NOTHING: list = []

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
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.flowmap_loss(x, pred, target, t, s, schedule, prediction, form, weight,
                                     reduction, table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    if not (isinstance(x, torch.Tensor) and isinstance(pred, torch.Tensor)
            and isinstance(target, torch.Tensor)):
        check_tensors(x=x, pred=pred, target=target)
    fcode = V.form(form)
    code = V.prediction("prediction", prediction)
    red = REDUCTION_CODE[V.reduction(reduction)]
    be = resolve_for(backend, x)
    if weight is not None and not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, device=x.device)
    if be != "torch":
        _no_time_grad(t, s, table)
    if be in NATIVE_BACKENDS:
        try:
            coef = _native_coef(x, t, s, schedule, table)
            ops, check = _NATIVE.now_checked()
            if weight is not None and weight.requires_grad and torch.is_grad_enabled():
                rows = _DIFF.flowmap_loss(x, pred, target, *coef, code, fcode, None,
                                          REDUCTION_CODE["none"], check)
                return _weigh_rows(rows, x, weight, reduction)
            if not _need_grad3(x, pred, target):
                return ops.flowmap_loss(x, pred, target, *coef, code, fcode, weight, red, check)
            return _DIFF.flowmap_loss(x, pred, target, *coef, code, fcode, weight, red, check)
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
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
    rows = x.shape[0]
    table = _table(x, t, s, schedule, table, V.acc_dtype(x.dtype))
    if form == "data":
        V.nonzero("t", "sigma_t", table[:, SIGMA_T], "the data form divides by it")
    else:
        V.nonzero("t", "alpha_t", table[:, ALPHA_T], "the noise form divides by it")
    _nonzero_for(_TableView(table), prediction, "x1" if form == "data" else "eps")
    weight = V.sample_weight(weight, rows, x)
    loss = calls_for(be).flowmap_loss.call
    args = (x.contiguous(), pred.contiguous(), V.dense(target, x.shape), table, 0.0, None, 0.0,
            TABLE_KIND, _NOTHING, code, fcode)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        rows = loss(*args, None, REDUCTION_CODE["none"], False)
        return _weigh_rows(rows, x, weight, reduction)
    return loss(*args, weight, red, False)


def _no_time_grad(t, s, table):
    """The fused ops do not differentiate in the times: a time (or a step
    table) that requires grad is an error naming it (DiffOp's rule for its
    `t`, here for each public argument), not a gradient silently left out."""
    if not torch.is_grad_enabled():
        return
    for name, v in (("t", t), ("s", s), ("table", table)):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise RuntimeError(
                f"flowmap_loss: argument '{name}' requires grad, and the fused op does not "
                f"differentiate in the times; detach {name}, or use backend='torch' for "
                f"derivatives in the times (docs/design.md §10)")


def _time_arg(name, v):
    """(tensor, 0.0) or (None, float): a time as the native op takes it."""
    if isinstance(v, torch.Tensor):
        return v, 0.0
    if isinstance(v, (int, float)):
        return None, float(v)
    raise TypeError(f"{name}: expected a float or a floating tensor of shape (B,), "
                    f"got {type(v).__name__}")


def _native_coef(x, t, s, schedule, table):
    """(t, t_value, s, s_value, kind, params) of flowkern::flowmap_loss: the
    caller's step table (kind TABLE_KIND); or the times, each a tensor or a
    float, with a built-in schedule's kind and parameters (the op evaluates
    it); or, for any other schedule, the step table built here."""
    if table is not None:
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"table: expected a tensor from flowkern.step_table, "
                            f"got {type(table).__name__}")
        return table, 0.0, None, 0.0, TABLE_KIND, _NOTHING
    if t is None or s is None:
        raise TypeError("flowmap_loss: give the times t and s (or a precomputed table=)")
    spec = native_spec(schedule)
    if spec is None:
        V.tensor("x", x)
        return _table(x, t, s, schedule, None, V.acc_dtype(x.dtype)), 0.0, None, 0.0, \
            TABLE_KIND, _NOTHING
    return (*_time_arg("t", t), *_time_arg("s", s), spec[0], spec[1])


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
