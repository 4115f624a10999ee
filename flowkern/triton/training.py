"""Triton kernels of the training family: the per-row coefficient matrices
(the twins of the row functors in csrc/include/flowkern/training.h) run by
the shared engine, and the launchers (same names as flowkern/ops/training.py).
Each row function returns M as a tuple of output rows of [ROWS, 1] tensors."""
import torch
import triton
import triton.language as tl

from ..schedules import native_spec
from .coeffs import ALPHA, SIGMA, convert_coeffs, target_coeffs
from .lincomb import launch_lincomb, launch_rowsum, sched_rows


@triton.jit
def interpolate_rows(TARGET: tl.constexpr, _P1: tl.constexpr, _P2: tl.constexpr, coef, _stride, aux, _w, r, rmask):
    """(x0, x1) -> (x_t, y)."""
    ya, yb = target_coeffs(TARGET, coef)
    return (coef[SIGMA], coef[ALPHA]), (yb, ya)


@triton.jit
def interpolate_bwd_rows(TARGET: tl.constexpr, _P1: tl.constexpr, _P2: tl.constexpr, coef, _stride, aux, _w, r, rmask):
    """(g_xt, g_y) -> (g_x0, g_x1)."""
    ya, yb = target_coeffs(TARGET, coef)
    return (coef[SIGMA], yb), (coef[ALPHA], ya)


@triton.jit
def convert_rows(SRC: tl.constexpr, DST: tl.constexpr, _P2: tl.constexpr, coef, _stride, aux, _w, r, rmask):
    """(x, pred) -> pred as DST."""
    ca, cb = convert_coeffs(SRC, DST, coef)
    return ((ca, cb),)


@triton.jit
def convert_bwd_rows(SRC: tl.constexpr, DST: tl.constexpr, _P2: tl.constexpr, coef, _stride, aux, _w, r, rmask):
    """(g,) -> (g_x, g_pred)."""
    ca, cb = convert_coeffs(SRC, DST, coef)
    return (ca,), (cb,)


@triton.jit
def loss_residual_rows(TARGET: tl.constexpr, _P1: tl.constexpr, _P2: tl.constexpr, coef, _stride, aux, _w, r, rmask):
    """(pred, x0, x1) -> pred - y."""
    ya, yb = target_coeffs(TARGET, coef)
    return ((coef[ALPHA] * 0.0 + 1.0, -yb, -ya),)


@triton.jit
def loss_bwd_rows(TARGET: tl.constexpr, PRED_ONLY: tl.constexpr, _P2: tl.constexpr, coef, _stride, grad_rows, _w, r, rmask):
    """(pred, x0, x1) -> 2 g rho * d rho / d(pred, x0, x1), rho = pred - y;
    the g_pred row alone when PRED_ONLY."""
    ya, yb = target_coeffs(TARGET, coef)
    g = 2.0 * tl.load(grad_rows + r.to(tl.int64)[:, None], mask=rmask[:, None], other=0.0)
    q1, q2 = -yb, -ya
    if PRED_ONLY:
        return ((g, g * q1, g * q2),)
    return (g, g * q1, g * q2), (g * q1, g * q1 * q1, g * q1 * q2), (g * q2, g * q2 * q1, g * q2 * q2)


# `sched` is (t, t_value, kind, params) as the ops take them (lincomb.sched_rows):
# a built-in schedule evaluated in the kernel, or kind TABLE with the table in t.


def interpolate(x0, x1, sched, target, xt=None, y=None):
    xt = torch.empty_like(x0) if xt is None else xt
    y = torch.empty_like(x0) if y is None else y
    launch_lincomb(interpolate_rows, target, 0, (x0, x1), (xt, y), sched_rows(*sched))
    return xt, y


def interpolate_backward(gxt, gy, sched, target):
    gx0, gx1 = torch.empty_like(gxt), torch.empty_like(gxt)
    launch_lincomb(interpolate_bwd_rows, target, 0, (gxt, gy), (gx0, gx1), sched_rows(*sched))
    return gx0, gx1


def convert(x, pred, sched, src, dst):
    out = torch.empty_like(x)
    launch_lincomb(convert_rows, src, dst, (x, pred), (out,), sched_rows(*sched))
    return out


def convert_backward(g, sched, src, dst):
    gx, gp = torch.empty_like(g), torch.empty_like(g)
    launch_lincomb(convert_bwd_rows, src, dst, (g,), (gx, gp), sched_rows(*sched))
    return gx, gp


def fm_loss_rows(pred, x0, x1, sched, target):
    return launch_rowsum(loss_residual_rows, target, 0, (pred, x0, x1), sched_rows(*sched))


def fm_loss_backward(grad_rows, pred, x0, x1, sched, target):
    gp, g0, g1 = (torch.empty_like(pred) for _ in range(3))
    launch_lincomb(loss_bwd_rows, target, 0, (pred, x0, x1), (gp, g0, g1),
                   sched_rows(*sched), aux=grad_rows.contiguous())
    return gp, g0, g1


def fm_loss_backward_pred(grad_rows, pred, x0, x1, sched, target):
    gp = torch.empty_like(pred)
    launch_lincomb(loss_bwd_rows, target, 1, (pred, x0, x1), (gp,),
                   sched_rows(*sched), aux=grad_rows.contiguous())
    return gp

# This family's kernels in the ahead-of-time report (flowkern/triton/aot.py
# _ops and _rowsums, which give the tuples' layout).
AOT_KERNELS = [("interpolate", interpolate_rows, 2, 2, False, 0, 0, 0),
               # each built-in schedule evaluated in the kernel (schedules.py)
               *((f"interpolate_{name}", interpolate_rows, 2, 2, False, 0, 0, 0,
                  native_spec(name)[0])
                 for name in ("linear", "cosine", "polynomial", "vp", "ve", "edm")),
               ("loss_bwd_edm", loss_bwd_rows, 3, 3, False, 3, 0, 0, 5),
               ("convert_score2v_vp", convert_rows, 2, 1, False, 3, 0, 0, 3),
               ("interpolate_bwd", interpolate_bwd_rows, 2, 2, False, 0, 0, 0),
               ("convert_v2x1", convert_rows, 2, 1, False, 0, 1, 0),
               ("convert_score2v", convert_rows, 2, 1, False, 3, 0, 0),
               ("convert_bwd", convert_bwd_rows, 1, 2, False, 1, 2, 0),
               ("loss_bwd", loss_bwd_rows, 3, 3, False, 3, 0, 0),
               ("loss_bwd_pred", loss_bwd_rows, 3, 1, False, 3, 1, 0)]
AOT_ROWSUMS = [("loss", loss_residual_rows, 3, 3, 0),
               ("loss_ve", loss_residual_rows, 3, 3, 0, 4)]
