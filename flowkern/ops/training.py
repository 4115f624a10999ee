"""Training op family: interpolate, flow_matching_loss, convert (DESIGN §3-4).

Public functions validate, build the (B, 4) coefficient table from the
schedule, pick a backend and call a kernel-level op; the kernel-level ops
(flowkern::* and flowkern_triton::*) take dense (B, ...) tensors and the
table, and carry their autograd formulas (vector-Jacobian products that are
themselves one fused pass).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import reference as ref
from .._enums import PRED_CODE, PREDICTIONS
from ..backend import cpu_built, resolve
from ..schedules import coefficients
from ._registry import TRITON_NS, lazy, ops_for, register

_T = "flowkern.triton.training"
_C = "flowkern.cuda.training"

# ---------------------------------------------------------------------------
# flowkern_triton:: schemas (the flowkern:: twins are in csrc/cpu/training.cpp)


@torch.library.custom_op(f"{TRITON_NS}::interpolate", mutates_args=())
def _t_interpolate(x0: torch.Tensor, x1: torch.Tensor, coef: torch.Tensor,
                   target: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lazy(_T, "interpolate")(x0, x1, coef, target)


@torch.library.custom_op(f"{TRITON_NS}::interpolate_out", mutates_args=("xt", "y"))
def _t_interpolate_out(x0: torch.Tensor, x1: torch.Tensor, coef: torch.Tensor, target: int,
                       xt: torch.Tensor, y: torch.Tensor) -> None:
    lazy(_T, "interpolate")(x0, x1, coef, target, xt, y)


@torch.library.custom_op(f"{TRITON_NS}::interpolate_backward", mutates_args=())
def _t_interpolate_backward(grad_xt: torch.Tensor, grad_y: torch.Tensor, coef: torch.Tensor,
                            target: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lazy(_T, "interpolate_backward")(grad_xt.contiguous(), grad_y.contiguous(), coef, target)


@torch.library.custom_op(f"{TRITON_NS}::convert", mutates_args=())
def _t_convert(x: torch.Tensor, pred: torch.Tensor, coef: torch.Tensor, src: int,
               dst: int) -> torch.Tensor:
    return lazy(_T, "convert")(x, pred, coef, src, dst)


@torch.library.custom_op(f"{TRITON_NS}::convert_backward", mutates_args=())
def _t_convert_backward(grad: torch.Tensor, coef: torch.Tensor, src: int,
                        dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lazy(_T, "convert_backward")(grad.contiguous(), coef, src, dst)


@torch.library.custom_op(f"{TRITON_NS}::fm_loss_rows", mutates_args=())
def _t_fm_loss_rows(pred: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, coef: torch.Tensor,
                    target: int) -> torch.Tensor:
    return lazy(_T, "fm_loss_rows")(pred, x0, x1, coef, target)


@torch.library.custom_op(f"{TRITON_NS}::fm_loss_backward", mutates_args=())
def _t_fm_loss_backward(grad_rows: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor,
                        x1: torch.Tensor, coef: torch.Tensor,
                        target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lazy(_T, "fm_loss_backward")(grad_rows, pred, x0, x1, coef, target)


@torch.library.custom_op(f"{TRITON_NS}::fm_loss_backward_pred", mutates_args=())
def _t_fm_loss_backward_pred(grad_rows: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor,
                             x1: torch.Tensor, coef: torch.Tensor, target: int) -> torch.Tensor:
    return lazy(_T, "fm_loss_backward_pred")(grad_rows, pred, x0, x1, coef, target)


# ---------------------------------------------------------------------------
# fake functions, autograd, CUDA kernels: once for both namespaces


def _two_like(x, *_):
    return torch.empty_like(x), torch.empty_like(x)


def _rows_fake(pred, x0, x1, coef, target):
    return coef.new_empty(pred.shape[0])


def _interpolate_setup(ctx, inputs, output):
    ctx.coef, ctx.target = inputs[2], inputs[3]


def _interpolate_backward(ops):
    def backward(ctx, g_xt, g_y):
        like = g_xt if g_xt is not None else g_y
        g_xt = torch.zeros_like(like) if g_xt is None else g_xt
        g_y = torch.zeros_like(like) if g_y is None else g_y
        g_x0, g_x1 = ops.interpolate_backward(g_xt.contiguous(), g_y.contiguous(), ctx.coef,
                                              ctx.target)
        return g_x0, g_x1, None, None
    return backward


def _convert_setup(ctx, inputs, output):
    ctx.coef, ctx.src, ctx.dst = inputs[2], inputs[3], inputs[4]


def _convert_backward(ops):
    def backward(ctx, g):
        g_x, g_pred = ops.convert_backward(g.contiguous(), ctx.coef, ctx.src, ctx.dst)
        return g_x, g_pred, None, None, None
    return backward


def _loss_setup(ctx, inputs, output):
    pred, x0, x1, coef, target = inputs
    ctx.save_for_backward(pred, x0, x1, coef)
    ctx.target = target


def _loss_backward(ops):
    def backward(ctx, g_rows):
        pred, x0, x1, coef = ctx.saved_tensors
        need_pred, need_x0, need_x1 = ctx.needs_input_grad[:3]
        if not (need_x0 or need_x1):
            # The usual case (x0, x1 are noise and data): one tensor written, not three.
            g_pred = ops.fm_loss_backward_pred(g_rows.contiguous(), pred, x0, x1, coef,
                                               ctx.target) if need_pred else None
            return g_pred, None, None, None, None
        g_pred, g_x0, g_x1 = ops.fm_loss_backward(g_rows.contiguous(), pred, x0, x1, coef,
                                                  ctx.target)
        return (g_pred if need_pred else None, g_x0 if need_x0 else None,
                g_x1 if need_x1 else None, None, None)
    return backward


def _cuda_out(x0, x1, coef, target, xt, y):
    lazy(_C, "interpolate")(x0, x1, coef, target, xt, y)


register("interpolate", _two_like, _interpolate_backward, _interpolate_setup,
         cuda_impl=lazy(_C, "interpolate"))
register("interpolate_out", lambda *a: None, cuda_impl=_cuda_out)
register("interpolate_backward", _two_like, cuda_impl=lazy(_C, "interpolate_backward"))
register("convert", lambda x, *_: torch.empty_like(x), _convert_backward, _convert_setup,
         cuda_impl=lazy(_C, "convert"))
register("convert_backward", _two_like, cuda_impl=lazy(_C, "convert_backward"))
register("fm_loss_rows", _rows_fake, _loss_backward, _loss_setup,
         cuda_impl=lazy(_C, "fm_loss_rows"))
register("fm_loss_backward",
         lambda g, p, *_: (torch.empty_like(p), torch.empty_like(p), torch.empty_like(p)),
         cuda_impl=lazy(_C, "fm_loss_backward"))
register("fm_loss_backward_pred", lambda g, p, *_: torch.empty_like(p),
         cuda_impl=lazy(_C, "fm_loss_backward_pred"))

if cpu_built():
    # flowkern::schedule_table (csrc/cpu/schedules.cpp, CPU only): the table
    # builder flowkern.schedules.coefficients calls for built-in schedules.
    torch.library.register_fake("flowkern::schedule_table")(
        lambda t, kind, params, rows, dtype, check: t.new_empty((rows, 4), dtype=dtype))

# ---------------------------------------------------------------------------
# public API


def _prepare(names, tensors, t, schedule):
    """Validated dense tensors, their shape and the (B, 4) coefficient table."""
    tensors = [V.tensor(n, x) for n, x in zip(names, tensors)]
    shape = V.same_shape(names, tensors)
    like = tensors[0]
    t = V.time("t", t, shape[0], like, check_values=False)
    coef = coefficients(schedule, t, shape[0], V.acc_dtype(like.dtype),
                        check="t" if V.values_checked(t) else "")
    return tensors, shape, coef


def _upcast(x, coef, shape):
    """x broadcast to the batch shape (a view) in the coefficient dtype."""
    return x.expand(shape).to(coef.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t, schedule="linear",
                target: str = "velocity", out: Optional[tuple] = None,
                backend: Optional[str] = None):
    """Noisy sample and regression target in one pass.

    x_t = alpha_t * x1 + sigma_t * x0; y is the `target` ("velocity": u_t =
    d_alpha_t x1 + d_sigma_t x0, "x1", "eps": x0, "score": -x0 / sigma_t).

    Args:
        x0: noise, (B, ...). x1: data, broadcastable to the same (B, ...).
        t: times in [0, 1], shape (B,), (1,), () or a float.
        schedule: a name ("linear", "cosine", "polynomial", "vp", "ve", "edm")
            or a schedule object (flowkern.schedules).
        out: optional (x_t, y) buffers of the full shape, contiguous, written in
            place (no autograd); saves the allocation, which dominates on CPU.
        backend: "torch" | "cpu" | "cuda" | "triton" (default: auto).
    Returns:
        (x_t, y), each of shape (B, ...) and the input dtype. Gradients flow
        to x0 and x1 (not to t).
    """
    (x0, x1), shape, coef = _prepare(["x0", "x1"], [x0, x1], t, schedule)
    code = V.prediction("target", target)
    if code == PRED_CODE["score"]:
        V.nonzero("t", "sigma_t", coef[:, 1], "the score target -x0/sigma_t is undefined there")
    be = resolve(backend, x1.device)
    if out is not None:
        out = _check_out(out, shape, x1)
    if be == "torch":
        xt, y = ref.interpolate(_upcast(x0, coef, shape), _upcast(x1, coef, shape), coef, target)
        xt, y = xt.to(x1.dtype), y.to(x1.dtype)
        if out is None:
            return xt, y
        out[0].copy_(xt), out[1].copy_(y)
        return out
    x0, x1 = V.dense(x0, shape), V.dense(x1, shape)
    ops = ops_for(be)
    if out is None:
        return ops.interpolate(x0, x1, coef, code)
    ops.interpolate_out(x0, x1, coef, code, out[0], out[1])
    return out


def _check_out(out, shape, like):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out: expected a pair of tensors (x_t, y)")
    for name, o in zip(("out[0]", "out[1]"), out):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(o).__name__}")
        if o.shape != shape or o.dtype != like.dtype or o.device != like.device:
            raise ValueError(f"{name}: must have shape {tuple(shape)}, dtype {like.dtype} and "
                             f"device {like.device}; got {tuple(o.shape)}, {o.dtype}, {o.device}")
        if not o.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if torch.is_grad_enabled() and any(o.requires_grad for o in out):
        raise RuntimeError("out: interpolate(..., out=) does not support autograd; "
                           "call it without out= or under torch.no_grad()")
    return tuple(out)


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, t,
                       schedule="linear", target: str = "velocity",
                       weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                       backend: Optional[str] = None) -> torch.Tensor:
    """Flow-matching / denoising regression loss with the target built in
    registers: mean over all elements of w_b * (pred - y)^2.

    Args:
        pred: the model output, (B, ...). x0, x1, t, schedule, target: as in
            :func:`interpolate` (y is the target for those).
        weight: optional per-sample weights w_b, shape (B,) or scalar.
        reduction: "mean" (over all elements), "sum", or "none" (per-sample
            mean over the non-batch dims, shape (B,)).
    Returns:
        The loss in pred's dtype. Backward gives pred, x0 and x1 gradients in
        one pass; no full-size temporary besides them.
    """
    (pred, x0, x1), shape, coef = _prepare(["pred", "x0", "x1"], [pred, x0, x1], t, schedule)
    code = V.prediction("target", target)
    V.reduction(reduction)
    if code == PRED_CODE["score"]:
        V.nonzero("t", "sigma_t", coef[:, 1], "the score target -x0/sigma_t is undefined there")
    weight = V.sample_weight(weight, shape[0], pred)
    be = resolve(backend, pred.device)
    inner = shape.numel() // shape[0] if shape[0] else 0
    if be == "torch":
        rows = ref.training.flow_matching_loss_rows(
            *(_upcast(x, coef, shape) for x in (pred, x0, x1)), coef, target)
    else:
        rows = ops_for(be).fm_loss_rows(*(V.dense(x, shape) for x in (pred, x0, x1)), coef, code)
    return V.reduce_rows(rows, weight, reduction, inner).to(pred.dtype)


# Denominators each conversion divides by (DESIGN §3), for the value checks.
_DIVIDES = {("x1", "eps"): "sigma", ("x1", "velocity"): "sigma", ("x1", "score"): "sigma",
            ("eps", "x1"): "alpha", ("eps", "velocity"): "alpha", ("eps", "score"): "sigma",
            ("velocity", "x1"): "det", ("velocity", "eps"): "det",
            ("velocity", "score"): "det+sigma", ("score", "x1"): "alpha",
            ("score", "velocity"): "alpha"}


def convert(pred: torch.Tensor, x_t: torch.Tensor, t, schedule="linear", src: str = "x1",
            dst: str = "velocity", backend: Optional[str] = None) -> torch.Tensor:
    """Rewrite a model prediction of type `src` at state x_t as type `dst`
    (velocity, x1, eps, score) in one pass: dst = c_x(t) x_t + c_p(t) pred.

    Shapes: pred and x_t (B, ...); t (B,), (1,), () or a float. Gradients
    flow to pred and x_t.
    """
    (pred, x_t), shape, coef = _prepare(["pred", "x_t"], [pred, x_t], t, schedule)
    s, d = V.prediction("src", src), V.prediction("dst", dst)
    need = _DIVIDES.get((src, dst), "")
    al, sg, da, ds = coef.unbind(1)
    if "sigma" in need:
        V.nonzero("t", "sigma_t", sg, f"converting {src} -> {dst} divides by it")
    if "alpha" in need:
        V.nonzero("t", "alpha_t", al, f"converting {src} -> {dst} divides by it")
    if "det" in need:
        V.nonzero("t", "alpha*d_sigma - sigma*d_alpha", al * ds - sg * da,
                  f"converting {src} -> {dst} divides by it")
    be = resolve(backend, x_t.device)
    if be == "torch":
        out = ref.convert(_upcast(pred, coef, shape), _upcast(x_t, coef, shape), coef, src, dst)
        return out.to(x_t.dtype)
    return ops_for(be).convert(V.dense(x_t, shape), V.dense(pred, shape), coef, s, d)


__all__ = ["interpolate", "flow_matching_loss", "convert", "PREDICTIONS"]
