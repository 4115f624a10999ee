"""Triton launchers of the training family (same names as flowkern/ops/training.py)."""
import torch

from . import rows as R
from .lincomb import launch_lincomb, launch_rowsum


def interpolate(x0, x1, coef, target, xt=None, y=None):
    xt = torch.empty_like(x0) if xt is None else xt
    y = torch.empty_like(x0) if y is None else y
    launch_lincomb(R.INTERPOLATE, target, 0, (x0, x1), (xt, y), coef)
    return xt, y


def interpolate_backward(gxt, gy, coef, target):
    gx0, gx1 = torch.empty_like(gxt), torch.empty_like(gxt)
    launch_lincomb(R.INTERPOLATE_BWD, target, 0, (gxt, gy), (gx0, gx1), coef)
    return gx0, gx1


def convert(x, pred, coef, src, dst):
    out = torch.empty_like(x)
    launch_lincomb(R.CONVERT, src, dst, (x, pred), (out,), coef)
    return out


def convert_backward(g, coef, src, dst):
    gx, gp = torch.empty_like(g), torch.empty_like(g)
    launch_lincomb(R.CONVERT_BWD, src, dst, (g,), (gx, gp), coef)
    return gx, gp


def fm_loss_rows(pred, x0, x1, coef, target):
    return launch_rowsum(R.LOSS_RESIDUAL, target, 0, (pred, x0, x1), coef)


def fm_loss_backward(grad_rows, pred, x0, x1, coef, target):
    gp, g0, g1 = (torch.empty_like(pred) for _ in range(3))
    launch_lincomb(R.LOSS_BWD, target, 0, (pred, x0, x1), (gp, g0, g1), coef,
                   aux=grad_rows.contiguous())
    return gp, g0, g1
