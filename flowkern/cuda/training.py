"""Training op family on the CUDA C++ kernels (csrc/cuda/training.cu).

Each function is the CUDA kernel of the flowkern:: op of its name (same
arguments as the schemas in csrc/cpu/training.cpp): the coefficient table
is built from (t, t_value, kind, params) with torch ops, then one launch.
Inputs are made contiguous; outputs are new contiguous tensors. Launches are
asynchronous on the current stream. Autograd and torch.library registration
live in flowkern/ops/training.py.
"""
from __future__ import annotations

import torch

from . import _launch


def _table(t, t_value, kind, params, like, check):
    """The (B, 4) coefficient table of the native schema's arguments."""
    from ..ops.training import table_from_args
    rows, _ = _launch.rows_inner(like)
    return _launch.per_row(table_from_args(t, t_value, kind, params, rows, like, check),
                           like, "coef", 4)


def _dense(**named):
    """The named tensors broadcast to one shape, then checked and contiguous."""
    try:
        shape = torch.broadcast_shapes(*(x.shape for x in named.values()))
    except RuntimeError:
        shapes = ", ".join(f"{n}{tuple(x.shape)}" for n, x in named.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    return _launch.inputs(**{k: v.expand(shape) for k, v in named.items()})


def interpolate(x0, x1, t, t_value, kind, params, target: int, check=False, xt=None, y=None):
    """x_t = alpha*x1 + sigma*x0 and the training target y; returns (x_t, y).
    `xt`/`y` may be given as contiguous outputs to write into."""
    from ..ops.training import check_target
    x0, x1 = _dense(x0=x0, x1=x1)
    coef = _table(t, t_value, kind, params, x0, check)
    if check:
        check_target(coef, int(target))
    xt, y = _launch.output(xt, x0, "xt"), _launch.output(y, x0, "y")
    _launch.launch("interpolate", x0, x0, x1, coef, int(target), xt, y)
    return xt, y


def interpolate_out(x0, x1, t, t_value, kind, params, target, check, xt, y):
    interpolate(x0, x1, t, t_value, kind, params, target, check, xt, y)


def interpolate_backward(gxt, gy, t, t_value, kind, params, target: int):
    """Gradients (g_x0, g_x1) of interpolate from those of (x_t, y)."""
    gxt, gy = _dense(gxt=gxt, gy=gy)
    coef = _table(t, t_value, kind, params, gxt, False)
    gx0, gx1 = _launch.output(None, gxt, "gx0"), _launch.output(None, gxt, "gx1")
    _launch.launch("interpolate_backward", gxt, gxt, gy, coef, int(target), gx0, gx1)
    return gx0, gx1


def convert(pred, x, t, t_value, kind, params, src: int, dst: int, check=False):
    """A prediction of type `src` at state x rewritten as type `dst` (docs/design.md §3)."""
    from .._enums import PREDICTIONS
    from ..ops.training import check_conversion
    x, pred = _dense(x=x, pred=pred)
    coef = _table(t, t_value, kind, params, x, check)
    if check:
        check_conversion(coef, PREDICTIONS[src], PREDICTIONS[dst])
    out = _launch.output(None, x, "out")
    _launch.launch("convert", x, x, pred, coef, int(src), int(dst), out)
    return out


def convert_backward(g, t, t_value, kind, params, src: int, dst: int):
    """Gradients (g_pred, g_x) of convert from that of its output."""
    (g,) = _launch.inputs(g=g)
    coef = _table(t, t_value, kind, params, g, False)
    gx, gp = _launch.output(None, g, "gx"), _launch.output(None, g, "gpred")
    _launch.launch("convert_backward", g, g, coef, int(src), int(dst), gx, gp)
    return gp, gx


def fm_loss_rows(pred, x0, x1, coef, target: int):
    """Per-sample sum of (pred - y)^2, shape (B,), in the accumulation dtype;
    y is built in-register. Deterministic: fixed per-chunk partials, then a sum."""
    rows, inner = _launch.rows_inner(pred)
    _, chunk_len, nchunks, _ = _launch.lib().plan_rowsum(rows, inner, 0)
    partial = torch.empty((rows, nchunks), dtype=coef.dtype, device=pred.device)
    _launch.launch("fm_loss_partial", pred, pred, x0, x1, coef, int(target), partial,
                   chunk_len, capped=False)
    return partial.sum(1)


def fm_loss(pred, x0, x1, t, t_value, kind, params, target, weight, reduction, check=False):
    """The flow-matching loss (flowkern::fm_loss) from the per-sample sums."""
    from ..ops.training import _reduce, check_target
    pred, x0, x1 = _dense(pred=pred, x0=x0, x1=x1)
    coef = _table(t, t_value, kind, params, pred, check)
    if check:
        check_target(coef, int(target))
    if weight is not None:
        _launch.per_row(weight.reshape(-1).expand(pred.shape[0]), pred, "weight", None)
    return _reduce(fm_loss_rows(pred, x0, x1, coef, target), weight, reduction, pred)


def fm_loss_backward(grad, pred, x0, x1, t, t_value, kind, params, target, weight, reduction,
                     nout):
    """[g_pred] (nout 1) or [g_pred, g_x0, g_x1] (nout 3) of flowkern::fm_loss."""
    from ..ops.training import _grad_rows
    pred, x0, x1 = _dense(pred=pred, x0=x0, x1=x1)
    coef = _table(t, t_value, kind, params, pred, False)
    grad_rows = _grad_rows(grad, weight, reduction, pred, coef.dtype)
    if nout == 1:
        gp = _launch.output(None, pred, "g_pred")
        _launch.launch("fm_loss_backward_pred", pred, grad_rows, pred, x0, x1, coef,
                       int(target), gp)
        return [gp]
    gp, g0, g1 = (_launch.output(None, pred, n) for n in ("g_pred", "g_x0", "g_x1"))
    _launch.launch("fm_loss_backward", pred, grad_rows, pred, x0, x1, coef, int(target),
                   gp, g0, g1)
    return [gp, g0, g1]
