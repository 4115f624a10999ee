"""Sampler-step op family on the CUDA C++ kernels (csrc/cuda/steps.cu).

These are the flowkern:: CUDA kernels that flowkern/ops/steps.py registers by
name: same names and argument order as the schemas (csrc/cpu/steps.cpp) and
the Triton launchers (flowkern/triton/steps.py). Mutating steps write `out`
(and `d_out`) in place and return None; ``ei_step`` and ``ei_step_backward``
return new tensors unless given outputs. `coef` is a step table
(flowkern.step_table) of 1 row for the batch or one per sample; prediction
codes as flowkern/_enums.py. Launches are asynchronous on the current stream.
"""
from __future__ import annotations

import torch

from . import _launch

STEP_COLS = 12  # must match fk::STEP_COLS (flowkern/steps.h)


def _table(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The step table as the kernels read it: (1 or B, 12) on like's device
    in its accumulation dtype, contiguous."""
    rows = like.shape[0] if like.dim() else 1
    if (coef.dim() != 2 or coef.shape[1] != STEP_COLS or coef.shape[0] not in (1, rows)
            or coef.device != like.device):
        raise ValueError(f"table: expected a step table of shape (1, {STEP_COLS}) or "
                         f"({rows}, {STEP_COLS}) on {like.device}, got {tuple(coef.shape)} "
                         f"on {coef.device}")
    return coef.to(_launch.acc_dtype(like.dtype)).contiguous()


def _coef(table, times, kind, params, like):
    """The step table of the schema's coefficient arguments (csrc/cpu/steps.cpp)."""
    coef = table
    if coef is None:
        import math

        from ..ops.steps import step_table
        from ..schedules import from_native
        t, s, tp, g = times
        coef = step_table(from_native(kind, params), t, s, None if math.isnan(tp) else tp, g,
                          dtype=_launch.acc_dtype(like.dtype), device=like.device)
    return _table(coef, like)


def euler_step(x, pred, pred_uncond, table, times, kind, params, prediction, guidance, check,
               out):
    """out = x + h u_t (steps.h EulerFn)."""
    x, pred, pred_uncond = _launch.inputs(x=x, pred=pred, pred_uncond=pred_uncond)
    coef = _coef(table, times, kind, params, x)
    out = _launch.output(out, x, "out")
    _launch.launch("euler_step", x, x, pred, pred_uncond, coef, coef.shape[0], prediction,
                   float(guidance), out)


def heun_step(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond, table, times, kind,
              params, prediction, guidance, check, out):
    """out = x + h/2 (u_t + u_s) (steps.h HeunFn)."""
    if (pred_uncond is None) != (pred_euler_uncond is None):
        raise ValueError("pred_euler_uncond: give both unconditional predictions or neither")
    x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond = _launch.inputs(
        x=x, pred=pred, x_euler=x_euler, pred_euler=pred_euler, pred_uncond=pred_uncond,
        pred_euler_uncond=pred_euler_uncond)
    coef = _coef(table, times, kind, params, x)
    out = _launch.output(out, x, "out")
    _launch.launch("heun_step", x, x, pred, x_euler, pred_euler, pred_uncond,
                   pred_euler_uncond, coef, coef.shape[0], prediction, float(guidance), out)


def ei_step(x, pred, pred_uncond, table, times, kind, params, prediction, form, guidance,
            check=False, out=None):
    """First-order exponential integrator (steps.h EIFn) into `out`, a new
    tensor when None (the functional flowkern::ei_step); returns it."""
    x, pred, pred_uncond = _launch.inputs(x=x, pred=pred, pred_uncond=pred_uncond)
    coef = _coef(table, times, kind, params, x)
    out = _launch.output(out, x, "out")
    _launch.launch("ei_step", x, x, pred, pred_uncond, coef, coef.shape[0], prediction, form,
                   float(guidance), out)
    return out


def ei_step_out(x, pred, pred_uncond, table, times, kind, params, prediction, form, guidance,
                check, out):
    """flowkern::ei_step_out: ei_step written into `out`."""
    ei_step(x, pred, pred_uncond, table, times, kind, params, prediction, form, guidance, check,
            out)


def ei_step_backward(grad, table, times, kind, params, prediction, form, guidance, cfg,
                     outs=None):
    """[g_x, g_pred(, g_pred_uncond when cfg)] of ei_step from the gradient of
    its output (steps.h EIBwdFn), into `outs` or new tensors; returns them."""
    (grad,) = _launch.inputs(grad=grad)
    coef = _coef(table, times, kind, params, grad)
    n = 3 if cfg else 2
    outs = [None] * n if outs is None else list(outs)
    if len(outs) != n:
        raise ValueError(f"outs: expected {n} gradients (cfg={bool(cfg)}), got {len(outs)}")
    outs = [_launch.output(o, grad, f"outs[{k}]") for k, o in enumerate(outs)]
    _launch.launch("ei_step_backward", grad, grad, coef, coef.shape[0], prediction, form,
                   float(guidance), outs[0], outs[1], outs[2] if cfg else None)
    return outs


def dpmpp_2m_step(x, pred, d_prev, pred_uncond, table, times, kind, params, prediction, guidance,
                  check, out, d_out):
    """(out, d_out) = (x_s, d_t) of DPM-Solver++(2M) (steps.h DPMpp2MFn); first
    order without d_prev."""
    x, pred, d_prev, pred_uncond = _launch.inputs(x=x, pred=pred, d_prev=d_prev,
                                                  pred_uncond=pred_uncond)
    coef = _coef(table, times, kind, params, x)
    out, d_out = _launch.output(out, x, "out"), _launch.output(d_out, x, "d_out")
    _launch.launch("dpmpp_2m_step", x, x, pred, d_prev, pred_uncond, coef, coef.shape[0],
                   prediction, float(guidance), out, d_out)


def em_step(x, pred, pred_uncond, table, times, kind, params, prediction, guidance, seed, offset,
            check, out):
    """Euler-Maruyama step (steps.h EMFn); element e draws Philox(seed, offset + e)."""
    x, pred, pred_uncond = _launch.inputs(x=x, pred=pred, pred_uncond=pred_uncond)
    coef = _coef(table, times, kind, params, x)
    out = _launch.output(out, x, "out")
    _launch.launch("em_step", x, x, pred, pred_uncond, coef, coef.shape[0], prediction,
                   float(guidance), _seed(seed), offset, out)


def churn(x, table, times, kind, params, seed, offset, check, out):
    """Renoising from t to t_hat (steps.h ChurnFn), noise as em_step."""
    (x,) = _launch.inputs(x=x)
    coef = _coef(table, times, kind, params, x)
    out = _launch.output(out, x, "out")
    _launch.launch("churn", x, x, coef, coef.shape[0], _seed(seed), offset, out)


def _seed(seed) -> int:
    """The Philox key as the launchers' uint64 (the schemas carry it as int64)."""
    return int(seed) & 0xFFFFFFFFFFFFFFFF
