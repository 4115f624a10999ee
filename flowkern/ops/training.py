"""Training op family: interpolate, flow_matching_loss, convert (docs/design.md §3-4).

On the native backends (cpu, cuda) a public call is one call of one
flowkern:: op: the C++ op checks the arguments (same messages as
flowkern/_validate.py), evaluates a built-in schedule at the times itself
(kind and parameters, no table tensor), broadcasts, runs the kernel and, for
the loss, reduces. The Python function only picks the op: the `.nograd`
overload when no input needs a gradient (no autograd kernel on the way), the
default overload, whose autograd formula is registered here, otherwise.
The torch and triton backends validate here. The triton kernels, like the
native ones, evaluate a built-in schedule at the times themselves (no table
and no launch before theirs; a value check that needs the coefficients
builds their table where values are checked: CPU data, FLOWKERN_DEBUG=1);
the torch backend reads a coefficient table.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import reference as ref
from .._rules import DIVIDES, PRED_CODE, PREDICTIONS, REDUCTION_CODE, TABLE_KIND
from ..backend import NATIVE_BACKENDS, cpu_built, resolve_for
from ..schedules import coefficients, from_native, native_spec
from ..tables import SIGMA
from ._entries import ENTRIES, compiling
from ._registry import (CALLS, NATIVE_NS, NativeOps, calls_for, direct, lazy, no_forward_mode,
                        no_time_tangent, ops_for, refuse_grad, register, retyped,
                        transforms_active, triton_op)

_T = "flowkern.triton.training"

# ---------------------------------------------------------------------------
# flowkern_triton:: implementations (schemas: flowkern/ops/schemas.inc)


@triton_op("interpolate")
def _t_interpolate(x0, x1, t, t_value, kind, params, target, check):
    return lazy(_T, "interpolate")(x0, x1, (t, t_value, kind, params), target)


@triton_op("interpolate_out")
def _t_interpolate_out(x0, x1, t, t_value, kind, params, target, check, xt, y):
    lazy(_T, "interpolate")(x0, x1, (t, t_value, kind, params), target, xt, y)


@triton_op("interpolate_backward")
def _t_interpolate_backward(grad_xt, grad_y, t, t_value, kind, params, target):
    return lazy(_T, "interpolate_backward")(grad_xt.contiguous(), grad_y.contiguous(),
                                            (t, t_value, kind, params), target)


@triton_op("convert")
def _t_convert(pred, x_t, t, t_value, kind, params, src, dst, check):
    return lazy(_T, "convert")(x_t, pred, (t, t_value, kind, params), src, dst)


@triton_op("convert_backward")
def _t_convert_backward(grad, t, t_value, kind, params, src, dst):
    g_x, g_pred = lazy(_T, "convert_backward")(grad.contiguous(), (t, t_value, kind, params),
                                               src, dst)
    return g_pred, g_x


@triton_op("fm_loss")
def _t_fm_loss(pred, x0, x1, t, t_value, kind, params, target, weight, reduction, check):
    rows = lazy(_T, "fm_loss_rows")(pred, x0, x1, (t, t_value, kind, params), target)
    return _reduce(rows, weight, reduction, pred)


@triton_op("fm_loss_backward")
def _t_fm_loss_backward(grad, pred, x0, x1, t, t_value, kind, params, target, weight, reduction,
                        nout):
    grad_rows = _grad_rows(grad, weight, reduction, pred, V.acc_dtype(pred.dtype))
    sched = (t, t_value, kind, params)
    if nout == 1:
        return [lazy(_T, "fm_loss_backward_pred")(grad_rows, pred, x0, x1, sched, target)]
    return list(lazy(_T, "fm_loss_backward")(grad_rows, pred, x0, x1, sched, target))


def _reduce(rows, weight, reduction, pred):
    """The loss from per-sample sums of squares (the kernels' (B,) output)."""
    inner = pred[0].numel() if pred.shape[0] else 0
    return V.reduce_rows(rows, weight, list(REDUCTION_CODE)[reduction], inner).to(pred.dtype)


def _grad_rows(grad, weight, reduction, pred, acc):
    """d loss / d (row sum of squares), shape (B,), in the accumulation dtype."""
    rows = pred.shape[0]
    inner = pred[0].numel() if rows else 0
    scale = {0: 1.0 / max(rows * inner, 1), 1: 1.0, 2: 1.0 / max(inner, 1)}[reduction]
    g = grad.to(acc).reshape(-1).expand(rows) * scale
    if weight is not None:
        g = g * weight.to(acc).reshape(-1)
    return g.contiguous()


# ---------------------------------------------------------------------------
# fake functions, autograd, CUDA kernels: once for both namespaces


def _broadcast(*xs):
    return torch.broadcast_shapes(*(x.shape for x in xs))


def _two_like_bcast(a, b, *_):
    shape = _broadcast(a, b)
    return a.new_empty(shape), a.new_empty(shape)


def _loss_fake(pred, x0, x1, t, t_value, kind, params, target, weight, reduction, check):
    return pred.new_empty((pred.shape[0],) if reduction == 2 else ())


def _loss_bwd_fake(grad, pred, x0, x1, t, t_value, kind, params, target, weight, reduction,
                   nout):
    shape = _broadcast(pred, x0, x1)
    return [pred.new_empty(shape) for _ in range(nout)]


def _interpolate_setup(ctx, inputs, output):
    ctx.coef = inputs[2:6]
    ctx.target = inputs[6]
    ctx.shape = output[0].shape


def fill_tangents(shape, *tangents):
    """The tangents with each missing one (None) as zeros of the op's
    broadcast shape, like the present ones (at least one is present)."""
    like = next(d for d in tangents if d is not None)
    return [like.new_zeros(shape) if d is None else d for d in tangents]


def _interpolate_jvp(calls):
    # x_t and y are linear in (x0, x1): their tangents are the op on the tangents.
    def jvp(ctx, d_x0, d_x1, d_t, *_):
        no_time_tangent("interpolate", "t", d_t)
        d_x0, d_x1 = fill_tangents(ctx.shape, d_x0, d_x1)
        return calls.interpolate.call(d_x0, d_x1, *ctx.coef, ctx.target, False)
    return jvp


def _interpolate_backward(ops):
    def backward(ctx, g_xt, g_y):
        like = g_xt if g_xt is not None else g_y
        g_xt = torch.zeros_like(like) if g_xt is None else g_xt
        g_y = torch.zeros_like(like) if g_y is None else g_y
        g_x0, g_x1 = ops.interpolate_backward(g_xt, g_y, *ctx.coef, ctx.target)
        return g_x0, g_x1, None, None, None, None, None, None
    return backward


def _convert_setup(ctx, inputs, output):
    ctx.coef = inputs[2:6]
    ctx.src, ctx.dst = inputs[6], inputs[7]
    ctx.shape = output.shape


def _convert_jvp(calls):
    # dst = c_x x_t + c_p pred is linear in (pred, x_t).
    def jvp(ctx, d_pred, d_x, d_t, *_):
        no_time_tangent("convert", "t", d_t)
        d_pred, d_x = fill_tangents(ctx.shape, d_pred, d_x)
        return calls.convert.call(d_pred, d_x, *ctx.coef, ctx.src, ctx.dst, False)
    return jvp


def _convert_backward(ops):
    def backward(ctx, g):
        g_pred, g_x = ops.convert_backward(g.contiguous(), *ctx.coef, ctx.src, ctx.dst)
        return g_pred, g_x, None, None, None, None, None, None, None
    return backward


def _loss_setup(ctx, inputs, output):
    pred, x0, x1, t, t_value, kind, params, target, weight, reduction, _ = inputs
    ctx.save_for_backward(pred, x0, x1, t, weight)
    if transforms_active():  # only a jvp reads them (save_for_forward costs ~10 us)
        ctx.save_for_forward(pred, x0, x1, t, weight)
    ctx.args = (t_value, kind, params, target)
    ctx.reduction = reduction


def _loss_jvp(calls):
    """d/de of sum_b w_b |e_b|^2 (reduced) along d_e, e = pred - y(x0, x1):
    2 e . (d_pred - y(d_x0, d_x1)), plus |e_b|^2 d_w_b when the weights carry
    a tangent; y is the interpolate op's target (linear in x0, x1)."""
    def jvp(ctx, d_pred, d_x0, d_x1, d_t, _tv, _kind, _params, _target, d_w, *_):
        no_time_tangent("flow_matching_loss", "t", d_t)
        pred, x0, x1, t, weight = ctx.saved_tensors
        t_value, kind, params, target = ctx.args
        coef = (t, t_value, kind, params)
        acc = V.acc_dtype(pred.dtype)
        err = pred.to(acc) - calls.interpolate.call(x0, x1, *coef, target, False)[1].to(acc)
        d_err = None
        if d_pred is not None or d_x0 is not None or d_x1 is not None:
            d_err = 0
            if d_pred is not None:
                d_err = d_pred.to(acc)
            if d_x0 is not None or d_x1 is not None:
                d_x0, d_x1 = fill_tangents(torch.broadcast_shapes(x0.shape, x1.shape), d_x0,
                                           d_x1)
                d_err = d_err - calls.interpolate.call(d_x0, d_x1, *coef, target,
                                                       False)[1].to(acc)
        return loss_tangent(err, d_err, weight, d_w, ctx.reduction).to(pred.dtype)
    return jvp


def loss_tangent(err, d_err, weight, d_w, reduction: int):
    """The tangent of a fused loss, sum_b w_b |e_b|^2 reduced (code
    `reduction`), for the tangent d_err of its residual e = err (None: none)
    and d_w of its weights (None: none): 2 e . d_e weighed, plus |e_b|^2 d_w_b."""
    rows = err.shape[0] if err.dim() else 1
    inner = err.numel() // rows if rows else 0
    name = list(REDUCTION_CODE)[reduction]
    tangent = None
    if d_err is not None:
        tangent = V.reduce_rows((2 * err * d_err).reshape(rows, -1).sum(1), weight, name, inner)
    if d_w is not None:
        by_w = V.reduce_rows((err * err).reshape(rows, -1).sum(1), d_w, name, inner)
        tangent = by_w if tangent is None else tangent + by_w
    return tangent


def _loss_backward(ops):
    def backward(ctx, grad):
        pred, x0, x1, t, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_pred, need_x0, need_x1 = need[0], need[1], need[2]
        if need[8]:
            raise RuntimeError("weight: the fused flow-matching loss does not differentiate "
                               "its weight; flowkern.flow_matching_loss does (it reduces "
                               "the per-sample losses with torch ops then)")
        t_value, kind, params, target = ctx.args
        nout = 3 if (need_x0 or need_x1) else 1  # the usual case writes g_pred alone
        g = ops.fm_loss_backward(grad, pred, x0, x1, t, t_value, kind, params, target, weight,
                                 ctx.reduction, nout)
        g_pred, g_x0, g_x1 = (g[0], g[1], g[2]) if nout == 3 else (g[0], None, None)
        return (g_pred if need_pred else None, g_x0 if need_x0 else None,
                g_x1 if need_x1 else None) + (None,) * 8
    return backward


# The ops' torch formulas with the ops' signatures (the differentiable backward
# of DiffOp: double backward).


def _reference_table(t, t_value, kind, params, shape, like):
    return table_from_args(t, t_value, kind, params, shape[0], like, False)


def _interpolate_reference(x0, x1, t, t_value, kind, params, target, check):
    shape = _broadcast(x0, x1)
    coef = _reference_table(t, t_value, kind, params, shape, x0)
    xt, y = ref.interpolate(_upcast(x0, coef, shape), _upcast(x1, coef, shape), coef,
                            PREDICTIONS[target])
    return xt.to(x0.dtype), y.to(x0.dtype)


def _interpolate_out_reference(x0, x1, t, t_value, kind, params, target, check, xt, y):
    a, b = _interpolate_reference(x0, x1, t, t_value, kind, params, target, check)
    xt.copy_(a), y.copy_(b)


def _convert_reference(pred, x_t, t, t_value, kind, params, src, dst, check):
    shape = _broadcast(pred, x_t)
    coef = _reference_table(t, t_value, kind, params, shape, x_t)
    return ref.convert(_upcast(pred, coef, shape), _upcast(x_t, coef, shape), coef,
                       PREDICTIONS[src], PREDICTIONS[dst]).to(x_t.dtype)


def _loss_reference(pred, x0, x1, t, t_value, kind, params, target, weight, reduction, check):
    shape = _broadcast(pred, x0, x1)
    coef = _reference_table(t, t_value, kind, params, shape, pred)
    rows = ref.training.flow_matching_loss_rows(*(_upcast(x, coef, shape) for x in (pred, x0, x1)),
                                                coef, PREDICTIONS[target])
    inner = shape[1:].numel()
    return V.reduce_rows(rows, weight, list(REDUCTION_CODE)[reduction], inner).to(pred.dtype)


register("interpolate", _two_like_bcast, _interpolate_backward, _interpolate_setup,
         nograd=True, jvp=_interpolate_jvp, reference=_interpolate_reference, diff=(0, 1))
register("interpolate_out", lambda *a: None, reference=_interpolate_out_reference)
register("interpolate_backward", _two_like_bcast)
register("convert", lambda p, x, *_: x.new_empty(_broadcast(p, x)), _convert_backward,
         _convert_setup, nograd=True, jvp=_convert_jvp, reference=_convert_reference,
         diff=(0, 1))
register("convert_backward", lambda g, *_: (torch.empty_like(g), torch.empty_like(g)))
register("fm_loss", _loss_fake, _loss_backward, _loss_setup,
         nograd=True, jvp=_loss_jvp, reference=_loss_reference, diff=(0, 1, 2, 8),
         saved_at=(0, 1, 2, 3, 8))  # _loss_setup saves pred, x0, x1, t, weight
register("fm_loss_backward", _loss_bwd_fake)

if cpu_built():
    # flowkern::schedule_table (csrc/cpu/schedules.cpp, CPU only): the table
    # builder flowkern.schedules.coefficients calls for built-in schedules.
    torch.library.register_fake("flowkern::schedule_table")(
        lambda t, kind, params, rows, dtype, check: t.new_empty((rows, 4), dtype=dtype))

_DIFF = CALLS[NATIVE_NS]  # DiffOp of each native op
# the overloads the public functions call when nothing needs a gradient
_NATIVE = NativeOps(
    interpolate=torch.ops.flowkern.interpolate.nograd,
    interpolate_out=torch.ops.flowkern.interpolate_out.default,
    convert=torch.ops.flowkern.convert.nograd,
    fm_loss=torch.ops.flowkern.fm_loss.nograd) if cpu_built() else None

if cpu_built():
    torch.library.register_fake("flowkern::fm_loss_with_grad.nograd")(
        lambda pred, x0, x1, *args: (_loss_fake(pred, x0, x1, *args),
                                     pred.new_empty(_broadcast(pred, x0, x1))))


class _LossAndGrad(torch.autograd.Function):
    """flow_matching_loss on a native backend when pred alone needs a gradient:
    the forward's one pass over (pred, x0, x1) also writes d loss / d pred for
    a loss gradient of 1 (flowkern::fm_loss_with_grad, fk::RowStore), and the
    backward scales that buffer in place by the loss's gradient and returns
    it: 24 bytes an element for forward and backward instead of 28, and no
    second pass over the three inputs -- what Liger-Kernel does with its
    losses. It saves what fm_loss's own node saves (DiffOp.setup), so a
    differentiable backward (create_graph), a second one (retain_graph) and
    jvp take fm_loss's formulas instead."""

    @staticmethod
    def forward(ctx, *args):
        loss, ctx.g = _LOSS_WITH_GRAD(*args)
        _DIFF.fm_loss.setup(ctx, args, loss)
        return loss

    @staticmethod
    def backward(ctx, grad):
        g = ctx.g
        if g is not None and grad is not None and not torch.is_grad_enabled():
            ctx.g = None  # handed out once; another backward recomputes it
            if grad.dim():  # reduction 'none': one gradient per sample
                grad = grad.reshape(grad.shape + (1,) * (g.dim() - 1))
            elif grad.device.type == "cpu" and grad.item() == 1.0:
                # loss.backward(): g is the answer as it is (g * 1, bit for
                # bit). Reading the value is free on CPU only; on CUDA it
                # would synchronise, so there the multiply always runs.
                return (g,) + (None,) * (ctx.n_inputs - 1)
            return (g.mul_(grad),) + (None,) * (ctx.n_inputs - 1)
        ctx.g = None
        return _DIFF.fm_loss.backward_or_none(ctx, grad)


_LOSS_WITH_GRAD = direct(torch.ops.flowkern.fm_loss_with_grad.nograd) if cpu_built() else None
_FUSED_GRAD_DTYPES = (torch.float32, torch.float64)


def _loss_grad_in_forward(pred, x0, x1, t) -> bool:
    """Whether _LossAndGrad serves a differentiable native loss call: pred
    alone needs a gradient (not x0, x1 or t), no transform or dual level, the
    broadcast shape is pred's own, and pred is float32/64 (a float16 d loss /
    d pred for a unit loss gradient, ~1/N, would lose the precision that the
    loss scale brings to the usual backward)."""
    return (pred.requires_grad and not x0.requires_grad and not x1.requires_grad
            and pred.dtype in _FUSED_GRAD_DTYPES and x0.shape == pred.shape
            and x1.shape == pred.shape and not (t is not None and t.requires_grad)
            and not transforms_active() and not compiling())


# ---------------------------------------------------------------------------
# argument helpers


_grad_on = torch.is_grad_enabled


def _need_grad2(a, b) -> bool:
    """Whether the differentiable call is needed: a gradient, or a transform
    (forward-mode AD, torch.func) that the `.nograd` kernel would not see."""
    return (_grad_on() and (a.requires_grad or b.requires_grad)) or transforms_active()


def _need_grad3(a, b, c) -> bool:
    return (_grad_on() and (a.requires_grad or b.requires_grad or c.requires_grad)
            or transforms_active())


# The tensor arguments that may be absent (None) in a public call.
_OPTIONAL_TENSORS = frozenset({"pred_uncond", "pred_euler_uncond", "d_prev", "weight", "u1", "u2",
                               "u3"})


def check_tensors(**named):
    """TypeError naming the first argument that is not a tensor (None only for
    an optional one: the native ops would take a missing required tensor for
    an undefined one and fail without naming it)."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) and not (x is None and name in _OPTIONAL_TENSORS):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def _code(name, value, codes=PRED_CODE):
    code = codes.get(value) if isinstance(value, str) else None
    return V.prediction(name, value) if code is None else code


def _native_coef(schedule, t, like):
    """(t, t_value, kind, params) of a native op: the times and a built-in
    schedule's kind and parameters, or (table, 0, TABLE_KIND, []) for any
    other schedule (its table built here for like's rows, with the [0, 1]
    check)."""
    if isinstance(t, torch.Tensor):
        tt, tv = t, 0.0
    elif isinstance(t, (int, float)):
        tt, tv = None, float(t)
    else:
        raise TypeError(f"t: expected a float or a tensor of shape (B,), got {type(t).__name__}")
    spec = native_spec(schedule)
    if spec is not None:
        return tt, tv, spec[0], spec[1]
    rows = like.shape[0] if like.dim() else 1
    t = V.time("t", t, rows, like, check_values=False)
    table = coefficients(schedule, t, rows, V.acc_dtype(like.dtype),
                         check="t" if V.values_checked(t) and V.check_flag() else "")
    return table, 0.0, TABLE_KIND, []


def table_from_args(t, t_value, kind, params, rows, like, check):
    """The (rows, 4) coefficient table of a native op's arguments, for the
    backends that read one (the CUDA glue): range-checked when `check` and
    values are checked on like's device (FLOWKERN_DEBUG=1 on a GPU)."""
    if kind == TABLE_KIND:
        return t
    tt = V.time("t", t if t is not None else t_value, rows, like, check_values=False)
    do_check = check and V.values_checked(tt)
    return coefficients(from_native(kind, params), tt, rows, V.acc_dtype(like.dtype),
                        check="t" if do_check else "")


def _validated(names, tensors):
    """Validated tensors and their broadcast shape (torch and triton backends)."""
    tensors = [V.tensor(n, x) for n, x in zip(names, tensors)]
    return tensors, V.same_shape(names, tensors)


def _kernel_coef(schedule, t, rows, like, check):
    """(t, t_value, kind, params) of the triton ops: a built-in schedule as its
    kind and parameters with the times (a float t as t_value), evaluated in
    the kernel; any other schedule as its (rows, 4) table, kind TABLE_KIND.
    check(table): the op's value checks, run on the coefficients where values
    are checked (V.values_checked; a float t everywhere, on the host)."""
    spec = native_spec(schedule)
    if spec is None or not isinstance(t, (torch.Tensor, int, float)):
        coef = _table(schedule, t, rows, like)
        check(coef)
        return coef, 0.0, TABLE_KIND, []
    acc = V.acc_dtype(like.dtype)
    if isinstance(t, torch.Tensor):
        tt = V.time("t", t, rows, like, check_values=False)
        if V.values_checked(tt):
            check(coefficients(from_native(*spec), tt, rows, acc, check="t"))
        return tt, 0.0, spec[0], spec[1]
    # A float time is known on the host: checked on every device (docs/design.md §6).
    if V.check_flag() and not torch.compiler.is_compiling():
        times = torch.tensor([float(t)], dtype=torch.float64)
        check(coefficients(from_native(*spec), times, 1, acc, check="t"))
    return None, float(t), spec[0], spec[1]


def _table(schedule, t, rows, like):
    """The (rows, 4) coefficient table at t, range-checked where values are checked."""
    t = V.time("t", t, rows, like, check_values=False)
    return coefficients(schedule, t, rows, V.acc_dtype(like.dtype),
                        check="t" if V.values_checked(t) else "")


def _upcast(x, coef, shape):
    """x broadcast to the batch shape (a view) in the coefficient dtype."""
    return x.expand(shape).to(coef.dtype)


def check_target(coef, code):
    """Value checks of a regression target (torch and triton; csrc/cpu/coef_checks.h
    check_target for the native ops)."""
    if code == PRED_CODE["score"]:
        V.nonzero("t", "sigma_t", coef[:, SIGMA], "the score target -x0/sigma_t is undefined there")
    if code == PRED_CODE["velocity"]:
        V.finite_rates(coef, "the velocity target d_alpha x1 + d_sigma x0 is infinite there")


# Denominators each conversion divides by (docs/design.md §3), for the value checks;
# csrc/cpu/training.cpp kDivides is the same table.
def check_conversion(coef, src: str, dst: str, at: str = "t"):
    """The value checks converting src to dst needs, for coefficients coef
    (R, 4) at time `at` (flowkern._rules.DIVIDES; csrc/cpu/coef_checks.h
    check_convert and step_args.h check_conversion for the native ops)."""
    if "velocity" in (src, dst) and src != dst:
        V.finite_rates(coef, f"converting {src} -> {dst} reads them", at)
    need = DIVIDES[src, dst]
    if not need:
        return
    al, sg, da, ds = coef.unbind(1)
    why = f"converting {src} -> {dst} divides by it"
    if "sigma" in need:
        V.nonzero(at, f"sigma_{at}", sg, why)
    if "alpha" in need:
        V.nonzero(at, f"alpha_{at}", al, why)
    if "det" in need:
        V.nonzero(at, "alpha*d_sigma - sigma*d_alpha", al * ds - sg * da, why)


# ---------------------------------------------------------------------------
# public API


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
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.interpolate(x0, x1, t, schedule, target, out, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    if not (isinstance(x0, torch.Tensor) and isinstance(x1, torch.Tensor)):
        check_tensors(x0=x0, x1=x1)
    code = _code("target", target)
    be = resolve_for(backend, x1)
    if out is not None:
        out = _check_out(out)
    if be in NATIVE_BACKENDS:
        try:
            ops, check = _NATIVE.now_checked()
            args = (x0, x1, *_native_coef(schedule, t, x0), code, check)
            if out is not None:
                ops.interpolate_out(*args, *out)
                return out
            if _need_grad2(x0, x1):
                return _DIFF.interpolate(*args)
            return ops.interpolate(*args)
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    (x0, x1), shape = _validated(["x0", "x1"], [x0, x1])
    coef = _kernel_coef(schedule, t, shape[0], x1, lambda c: check_target(c, code))
    x0, x1 = V.dense(x0, shape), V.dense(x1, shape)
    if out is None:
        return calls_for(be).interpolate.call(x0, x1, *coef, code, False)
    _check_out_shape(out, shape, x1)
    V.check_no_overlap({"out[0]": out[0], "out[1]": out[1]}, {"x0": x0, "x1": x1})
    no_forward_mode("interpolate", x0, x1)
    refuse_grad("interpolate", "interpolate(..., out=) writes into buffers and has no "
                "derivative; call it without out= or under torch.no_grad()", x0=x0, x1=x1)
    ops_for(be).interpolate_out(x0, x1, *coef, code, False, *out)
    return out


def _check_out(out):
    """Types of the out= pair (the native op checks shapes, dtypes, layout)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out: expected a pair of tensors (x_t, y)")
    for name, o in zip(("out[0]", "out[1]"), out):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(o).__name__}")
    if torch.is_grad_enabled() and (out[0].requires_grad or out[1].requires_grad):
        raise RuntimeError("out: interpolate(..., out=) does not support autograd; "
                           "call it without out= or under torch.no_grad()")
    return tuple(out)


def _check_out_shape(out, shape, like):
    """csrc/cpu/args.h check_out, for the backends that do not come through it."""
    for name, o in zip(("out[0]", "out[1]"), out):
        if o.shape != shape or o.dtype != like.dtype or o.device != like.device:
            raise ValueError(f"{name}: must have shape {tuple(shape)}, dtype {like.dtype} and "
                             f"device {like.device}; got {tuple(o.shape)}, {o.dtype}, {o.device}")
        if not o.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")


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
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.flow_matching_loss(pred, x0, x1, t, schedule, target, weight, reduction,
                                           backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    if not (isinstance(pred, torch.Tensor) and isinstance(x0, torch.Tensor)
            and isinstance(x1, torch.Tensor)):
        check_tensors(pred=pred, x0=x0, x1=x1)
    code = _code("target", target)
    red = REDUCTION_CODE.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        V.reduction(reduction)
    be = resolve_for(backend, pred)
    if weight is not None and not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, device=pred.device)
    if be in NATIVE_BACKENDS:
        try:
            coef = _native_coef(schedule, t, pred)
            ops, check = _NATIVE.now_checked()
            if weight is not None and weight.requires_grad and torch.is_grad_enabled():
                rows = _DIFF.fm_loss(pred, x0, x1, *coef, code, None, 2, check)
                return _weigh_rows(rows, pred, weight, reduction)
            if not _need_grad3(pred, x0, x1):
                return ops.fm_loss(pred, x0, x1, *coef, code, weight, red, check)
            if _loss_grad_in_forward(pred, x0, x1, coef[0]):
                return _LossAndGrad.apply(pred, x0, x1, *coef, code, weight, red, check)
            return _DIFF.fm_loss(pred, x0, x1, *coef, code, weight, red, check)
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    (pred, x0, x1), shape = _validated(["pred", "x0", "x1"], [pred, x0, x1])
    coef = _kernel_coef(schedule, t, shape[0], pred, lambda c: check_target(c, code))
    weight = V.sample_weight(weight, shape[0], pred)
    loss = calls_for(be).fm_loss.call
    dense = [V.dense(x, shape) for x in (pred, x0, x1)]
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        rows = loss(*dense, *coef, code, None, 2, False)
        return _weigh_rows(rows, pred, weight, reduction)
    return loss(*dense, *coef, code, weight, red, False)


def _weigh_rows(rows, pred, weight, reduction):
    """The loss from the fused per-sample losses (reduction "none", no weight)
    reduced with torch ops: the fused op does not differentiate w, these do."""
    inner = pred[0].numel() if pred.shape[0] else 0
    acc = V.acc_dtype(pred.dtype)
    return V.reduce_rows(rows.to(acc) * inner, V.sample_weight(weight, rows.shape[0], pred),
                         reduction, inner).to(pred.dtype)


def convert(pred: torch.Tensor, x_t: torch.Tensor, t, schedule="linear", src: str = "x1",
            dst: str = "velocity", backend: Optional[str] = None) -> torch.Tensor:
    """Rewrite a model prediction of type `src` at state x_t as type `dst`
    (velocity, x1, eps, score) in one pass: dst = c_x(t) x_t + c_p(t) pred.

    Shapes: pred and x_t (B, ...); t (B,), (1,), () or a float. Gradients
    flow to pred and x_t.
    """
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.convert(pred, x_t, t, schedule, src, dst, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    if not (isinstance(pred, torch.Tensor) and isinstance(x_t, torch.Tensor)):
        check_tensors(pred=pred, x_t=x_t)
    s, d = _code("src", src), _code("dst", dst)
    be = resolve_for(backend, x_t)
    if be in NATIVE_BACKENDS:
        try:
            ops, check = _NATIVE.now_checked()
            args = (pred, x_t, *_native_coef(schedule, t, x_t), s, d, check)
            if _need_grad2(pred, x_t):
                return _DIFF.convert(*args)
            return ops.convert(*args)
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    (pred, x_t), shape = _validated(["pred", "x_t"], [pred, x_t])
    coef = _kernel_coef(schedule, t, shape[0], x_t, lambda c: check_conversion(c, src, dst))
    return calls_for(be).convert.call(V.dense(pred, shape), V.dense(x_t, shape), *coef, s, d, False)


__all__ = ["interpolate", "flow_matching_loss", "convert", "PREDICTIONS"]
