"""Flow-map op family on the CUDA C++ kernels (csrc/cuda/flowmap.cu).

The flowkern:: CUDA kernels that flowkern/ops/flowmap.py registers by name:
same names, argument order and results as the schemas (csrc/cpu/flowmap.cpp)
and the Triton launchers (flowkern/triton/flowmap.py). x, pred and target are
CUDA tensors of one shape (B, ...) and dtype; `coef` is a step table
(flowkern.step_table) of 1 row for the batch or one per sample; prediction
and form codes as flowkern/_enums.py and fk::EIForm. Launches are
asynchronous on the current stream.
"""
from __future__ import annotations

import torch

from . import _launch
from .steps import _table


def flowmap_loss_rows(x, pred, target, coef, prediction: int, form: int):
    """Per-sample sum of (a x + b pred - target)^2, shape (B,), in the
    accumulation dtype, with (a, b) the EI map's coefficients (the one-step
    flow map g(t, s, x), docs/design.md §4). Deterministic: fixed per-chunk partials,
    then a sum."""
    x, pred, target = _launch.inputs(x=x, pred=pred, target=target)
    coef = _table(coef, x)
    rows, inner = _launch.rows_inner(x)
    _, chunk_len, nchunks, _ = _launch.lib().plan_rowsum(rows, inner, 0)
    partial = torch.empty((rows, nchunks), dtype=coef.dtype, device=x.device)
    _launch.launch("flowmap_loss_partial", x, x, pred, target, coef, coef.shape[0],
                   int(prediction), int(form), partial, chunk_len, capped=False)
    return partial.sum(1)


def flowmap_loss_backward(grad_rows, x, pred, target, coef, prediction: int, form: int,
                          grad_x: bool, grad_target: bool):
    """[g_pred, g_x (if grad_x), g_target (if grad_target)] of flowmap_loss_rows
    given the gradient of its rows, in one pass over (x, pred, target)."""
    x, pred, target = _launch.inputs(x=x, pred=pred, target=target)
    coef = _table(coef, x)
    grad_rows = _launch.per_row(grad_rows, x, "grad_rows", None)
    names = ["g_pred"] + ["g_x"] * bool(grad_x) + ["g_target"] * bool(grad_target)
    outs = {n: _launch.output(None, x, n) for n in names}
    _launch.launch("flowmap_loss_backward", x, grad_rows, x, pred, target, coef,
                   coef.shape[0], int(prediction), int(form), outs["g_pred"],
                   outs.get("g_x"), outs.get("g_target"))
    return list(outs.values())
