"""Triton kernels of the flow-map family: per-row coefficient matrices (twins
of the functors in csrc/include/flowkern/flowmap.h) for the shared row-sum
and lincomb engines, and the launchers (same names as flowkern/ops/flowmap.py).

P0 is the prediction type, P1 the EI form, P2 the backward's output flags
(bit 0: g_x, bit 1: g_target; g_pred is always written)."""
import torch
import triton
import triton.language as tl

from .lincomb import TABLE, launch_lincomb, launch_rowsum, step_rows
from .steps import _ei


@triton.jit
def flowmap_residual_rows(PRED: tl.constexpr, FORM: tl.constexpr, _P2: tl.constexpr, coef,
                          stride, aux, w, r, rmask):
    """(x, p, target) -> a x + b p - target, the EI map's residual."""
    a, b = _ei(PRED, FORM, coef)
    return ((a, b, a * 0.0 - 1.0),)


@triton.jit
def flowmap_bwd_rows(PRED: tl.constexpr, FORM: tl.constexpr, FLAGS: tl.constexpr, coef,
                     stride, grad_rows, w, r, rmask):
    """(x, p, target) -> (g_p[, g_x][, g_target]) = 2 g rho * d rho / d(p, x, target)."""
    a, b = _ei(PRED, FORM, coef)
    g = 2.0 * tl.load(grad_rows + r.to(tl.int64)[:, None], mask=rmask[:, None], other=0.0)
    ga, gb = g * a, g * b
    row_p = (gb * a, gb * b, -gb)
    row_x = (ga * a, ga * b, -ga)
    row_t = (-g * a, -g * b, g)
    if FLAGS == 3:
        return row_p, row_x, row_t
    elif FLAGS == 1:
        return row_p, row_x
    elif FLAGS == 2:
        return row_p, row_t
    else:
        return (row_p,)


def flowmap_loss_rows(x, pred, target, coef, prediction, form):
    return launch_rowsum(flowmap_residual_rows, prediction, form, (x, pred, target),
                         step_rows(coef, [], TABLE, []))


def flowmap_loss_backward(grad_rows, x, pred, target, coef, prediction, form, grad_x,
                          grad_target):
    n = 1 + int(grad_x) + int(grad_target)
    outs = [torch.empty_like(x) for _ in range(n)]
    launch_lincomb(flowmap_bwd_rows, prediction, form, (x, pred, target), tuple(outs),
                   step_rows(coef, [], TABLE, []), aux=grad_rows.contiguous(),
                   p2=int(grad_x) | (int(grad_target) << 1))
    return outs

# This family's kernels in the ahead-of-time report (flowkern/triton/aot.py
# _ops and _rowsums, which give the tuples' layout).
AOT_KERNELS = [("flowmap_bwd_v", flowmap_bwd_rows, 3, 3, False, 0, 0, 3),
               ("flowmap_bwd_x1", flowmap_bwd_rows, 3, 1, False, 1, 0, 0)]
AOT_ROWSUMS = [("flowmap_score_noise", flowmap_residual_rows, 3, 3, 1),
               ("flowmap_v", flowmap_residual_rows, 3, 0, 0)]
