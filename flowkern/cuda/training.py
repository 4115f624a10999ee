"""Training op family on the CUDA C++ kernels (csrc/cuda/training.cu).

Each function takes CUDA tensors of one shape (B, ...) and dtype, per-sample
coefficients `coef` (B, 4) = (alpha, sigma, d_alpha, d_sigma), and integer
prediction codes (0 velocity, 1 x1, 2 eps, 3 score; flowkern/_enums.py).
Inputs are made contiguous; outputs are new contiguous tensors. Launches are
asynchronous on the current stream. Autograd and torch.library registration
live in flowkern/ops/training.py.
"""
from __future__ import annotations

import torch

from . import _launch


def interpolate(x0, x1, coef, target: int, xt=None, y=None):
    """x_t = alpha*x1 + sigma*x0 and the training target y; returns (x_t, y).
    `xt`/`y` may be given as contiguous outputs to write into."""
    x0, x1 = _launch.inputs(x0=x0, x1=x1)
    coef = _launch.per_row(coef, x0, "coef", 4)
    xt, y = _launch.output(xt, x0, "xt"), _launch.output(y, x0, "y")
    _launch.launch("interpolate", x0, x0, x1, coef, int(target), xt, y)
    return xt, y


def interpolate_backward(gxt, gy, coef, target: int):
    """Gradients (g_x0, g_x1) of interpolate from those of (x_t, y)."""
    gxt, gy = _launch.inputs(gxt=gxt, gy=gy)
    coef = _launch.per_row(coef, gxt, "coef", 4)
    gx0, gx1 = _launch.output(None, gxt, "gx0"), _launch.output(None, gxt, "gx1")
    _launch.launch("interpolate_backward", gxt, gxt, gy, coef, int(target), gx0, gx1)
    return gx0, gx1


def convert(x, pred, coef, src: int, dst: int):
    """A prediction of type `src` at state x rewritten as type `dst` (DESIGN §3)."""
    x, pred = _launch.inputs(x=x, pred=pred)
    coef = _launch.per_row(coef, x, "coef", 4)
    out = _launch.output(None, x, "out")
    _launch.launch("convert", x, x, pred, coef, int(src), int(dst), out)
    return out


def convert_backward(g, coef, src: int, dst: int):
    """Gradients (g_x, g_pred) of convert from that of its output."""
    (g,) = _launch.inputs(g=g)
    coef = _launch.per_row(coef, g, "coef", 4)
    gx, gp = _launch.output(None, g, "gx"), _launch.output(None, g, "gpred")
    _launch.launch("convert_backward", g, g, coef, int(src), int(dst), gx, gp)
    return gx, gp


def fm_loss_rows(pred, x0, x1, coef, target: int):
    """Per-sample sum of (pred - y)^2, shape (B,), in the accumulation dtype;
    y is built in-register. Deterministic: fixed per-chunk partials, then a sum."""
    pred, x0, x1 = _launch.inputs(pred=pred, x0=x0, x1=x1)
    coef = _launch.per_row(coef, pred, "coef", 4)
    rows, inner = _launch.rows_inner(pred)
    _, chunk_len, nchunks, _ = _launch.lib().plan_rowsum(rows, inner, 0)
    partial = torch.empty((rows, nchunks), dtype=coef.dtype, device=pred.device)
    _launch.launch("fm_loss_partial", pred, pred, x0, x1, coef, int(target), partial,
                   chunk_len, capped=False)
    return partial.sum(1)


def fm_loss_backward(grad_rows, pred, x0, x1, coef, target: int):
    """Gradients (g_pred, g_x0, g_x1) of fm_loss_rows given that of its rows."""
    pred, x0, x1 = _launch.inputs(pred=pred, x0=x0, x1=x1)
    coef = _launch.per_row(coef, pred, "coef", 4)
    grad_rows = _launch.per_row(grad_rows, pred, "grad_rows", None)
    gp, g0, g1 = (_launch.output(None, pred, n) for n in ("g_pred", "g_x0", "g_x1"))
    _launch.launch("fm_loss_backward", pred, grad_rows, pred, x0, x1, coef, int(target),
                   gp, g0, g1)
    return gp, g0, g1


def fm_loss_backward_pred(grad_rows, pred, x0, x1, coef, target: int):
    """g_pred alone (x0 and x1 need no gradient): one output written, not three."""
    pred, x0, x1 = _launch.inputs(pred=pred, x0=x0, x1=x1)
    coef = _launch.per_row(coef, pred, "coef", 4)
    grad_rows = _launch.per_row(grad_rows, pred, "grad_rows", None)
    gp = _launch.output(None, pred, "g_pred")
    _launch.launch("fm_loss_backward_pred", pred, grad_rows, pred, x0, x1, coef, int(target), gp)
    return gp
