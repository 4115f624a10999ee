"""Sampler-step op family (docs/design.md §4 "Sampling"): euler_step, heun_step,
ei_step, dpmpp_2m_step, em_step, churn, and step_table.

Each public step validates, builds (or takes) the step table, picks a
backend and runs one fused pass over the state: the prediction is converted
in registers, classifier-free guidance p_u + w (p_c - p_u) is folded into the
coefficients, and noise (em_step, churn) is drawn in the kernel from
Philox4x32-10 keyed by (seed, offset + element index), so no noise tensor
exists and every backend draws the same numbers. Outputs may be given with
``out=`` (``out=x`` updates in place); samplers reuse buffers this way.
"""
from __future__ import annotations

import collections
import math
import types

import torch

from .. import _validate as V
from .._rules import FORM_NAMES, PREDICTIONS, TABLE_KIND
from ..backend import NATIVE_BACKENDS, cpu_built, resolve, resolve_for
from ..reference import steps as ref
from ..schedules import coefficients, evaluate, from_native, get_schedule, native_spec
from ..tables import ALPHA_S, ALPHA_T, AT_S, AT_T, G, H, PREV, SIGMA_T, STEP_COLS, step_row
from ._entries import ENTRIES, compiling
from ._registry import (CALLS, NATIVE_NS, NativeOps, TimedOp, calls_for, empty_output, lazy,
                        no_forward_mode, no_time_tangent, ops_for, refuse_grad, register,
                        retyped, transforms_active, triton_op)
from .training import check_conversion, check_tensors, fill_tangents

_T = "flowkern.triton.steps"

# ---------------------------------------------------------------------------
# flowkern_triton:: implementations (schemas: flowkern/ops/schemas.inc; every
# step takes its coefficients as `table, t, s, t_prev, times, kind, params`: a
# caller's table, or float times and a built-in schedule for the kernel to
# evaluate; times given as tensors become a table here, _py_coef)


def _py_coef(x, table, t, s, t_prev, times, kind, params):
    """(table, times, kind, params), the coefficients as the Python backends'
    kernels take them: a step's times given as tensors (per-sample times,
    which the native ops evaluate in their kernels) become the table
    step_table builds from them in x's accumulation dtype."""
    if t is None and s is None and t_prev is None:
        return table, times, kind, params
    if table is not None:
        raise ValueError("table: give a step table or the times t, s, t_prev as tensors, "
                         "not both")
    if kind == TABLE_KIND:
        raise ValueError("table: a custom schedule's step table is missing")
    tp = t_prev if t_prev is not None else (None if math.isnan(times[2]) else times[2])
    table = step_table(from_native(kind, params), times[0] if t is None else t,
                       times[1] if s is None else s, tp, times[3],
                       dtype=V.acc_dtype(x.dtype), device=x.device, check=False)
    return table, _NOTHING, TABLE_KIND, _NOTHING



@triton_op("euler_step")
def _t_euler(x, pred, pred_uncond, table, t, s, t_prev, times, kind, params, prediction, guidance,
             check, out):
    lazy(_T, "euler_step")(x, pred, pred_uncond, _py_coef(x, table, t, s, t_prev, times, kind,
                                                          params), prediction, guidance, out)


@triton_op("heun_step")
def _t_heun(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond, table, t, s, t_prev,
            times, kind, params, prediction, guidance, check, out):
    lazy(_T, "heun_step")(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond,
                          _py_coef(x, table, t, s, t_prev, times, kind, params), prediction,
                          guidance, out)


@triton_op("ei_step")
def _t_ei(x, pred, pred_uncond, table, t, s, t_prev, times, kind, params, prediction, form,
          guidance, check):
    out = torch.empty_like(x)
    lazy(_T, "ei_step")(x, pred, pred_uncond, _py_coef(x, table, t, s, t_prev, times, kind, params),
                        prediction, form, guidance, out)
    return out


@triton_op("ei_step_out")
def _t_ei_out(x, pred, pred_uncond, table, t, s, t_prev, times, kind, params, prediction, form,
              guidance, check, out):
    lazy(_T, "ei_step")(x, pred, pred_uncond, _py_coef(x, table, t, s, t_prev, times, kind, params),
                        prediction, form, guidance, out)


@triton_op("ei_step_backward")
def _t_ei_bwd(grad, table, t, s, t_prev, times, kind, params, prediction, form, guidance, cfg):
    grad = grad.contiguous()
    outs = [torch.empty_like(grad) for _ in range(3 if cfg else 2)]
    lazy(_T, "ei_step_backward")(grad, _py_coef(grad, table, t, s, t_prev, times, kind, params),
                                 prediction, form, guidance, cfg, outs)
    return outs


@triton_op("dpmpp_2m_step")
def _t_dpmpp(x, pred, d_prev, pred_uncond, table, t, s, t_prev, times, kind, params, prediction,
             guidance, check, out, d_out):
    lazy(_T, "dpmpp_2m_step")(x, pred, d_prev, pred_uncond,
                              _py_coef(x, table, t, s, t_prev, times, kind, params), prediction,
                              guidance, out, d_out)


@triton_op("em_step")
def _t_em(x, pred, pred_uncond, table, t, s, t_prev, times, kind, params, prediction, guidance,
          seed, offset, per_sample_seeds, check, out):
    lazy(_T, "em_step")(x, pred, pred_uncond, _py_coef(x, table, t, s, t_prev, times, kind, params),
                        prediction, guidance, seed, offset, per_sample_seeds, out)


@triton_op("churn")
def _t_churn(x, table, t, s, t_prev, times, kind, params, seed, offset, per_sample_seeds, check,
             out):
    lazy(_T, "churn")(x, _py_coef(x, table, t, s, t_prev, times, kind, params), seed, offset,
                      per_sample_seeds, out)


@triton_op("lms_step")
def _t_lms(x, pred, u1, u2, u3, pred_uncond, weights, table, t, s, t_prev, times, kind, params,
           prediction, guidance, check, out, u_out):
    lazy(_T, "lms_step")(x, pred, u1, u2, u3, pred_uncond, weights,
                         _py_coef(x, table, t, s, t_prev, times, kind, params), prediction,
                         guidance, out, u_out)


@triton_op("lincomb_step")
def _t_lincomb(x, terms, weights, noise_std, seed, offset, per_sample_seeds, check, out):
    lazy(_T, "lincomb_step")(x, terms, weights, noise_std, seed, offset, per_sample_seeds,
                             out)


# ---------------------------------------------------------------------------
# fake functions, autograd (ei_step: the flow-map parametrisation), CUDA kernels


def _none(*_):
    return None


def _ei_setup(ctx, inputs, output):
    _, _, pred_uncond, table, t, s, t_prev, times, kind, params, prediction, form, guidance, _ = \
        inputs
    ctx.coef = (table, t, s, t_prev, times, kind, params)
    ctx.prediction, ctx.form, ctx.guidance = prediction, form, guidance
    ctx.cfg = pred_uncond is not None
    ctx.shape = output.shape


def _ei_jvp(calls):
    # x_s is linear in (x, pred, pred_uncond): the tangent is the step of the tangents.
    def jvp(ctx, d_x, d_pred, d_uncond, d_table, d_t, d_s, d_t_prev, *_):
        # a table is made of the times (on triton, the public times' table)
        for name, d in (("t", d_table), ("t", d_t), ("s", d_s), ("t_prev", d_t_prev)):
            no_time_tangent("ei_step", name, d)
        if ctx.cfg:
            d_x, d_pred, d_uncond = fill_tangents(ctx.shape, d_x, d_pred, d_uncond)
        else:
            d_x, d_pred = fill_tangents(ctx.shape, d_x, d_pred)
        return calls.ei_step.call(d_x, d_pred, d_uncond, *ctx.coef, ctx.prediction, ctx.form,
                                  ctx.guidance, False)
    return jvp


def _ei_backward(ops):
    def backward(ctx, g):
        grads = ops.ei_step_backward(g.contiguous(), *ctx.coef, ctx.prediction, ctx.form,
                                     ctx.guidance, ctx.cfg)
        return (grads[0], grads[1], grads[2] if ctx.cfg else None) + (None,) * 11
    return backward


def _ei_bwd_fake(grad, table, t, s, t_prev, times, kind, params, prediction, form, guidance, cfg):
    return [torch.empty_like(grad) for _ in range(3 if cfg else 2)]

def _ei_reference(x, pred, pred_uncond, table, t, s, t_prev, times, kind, params, prediction,
                  form, guidance, check):
    """ei_step's torch formula with the op's signature (DiffOp's double backward)."""
    acc = V.acc_dtype(x.dtype)
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    cfg = pred_uncond is not None
    return ref.ei_step(x.to(acc), pred.to(acc), table[:, AT_T], table[:, AT_S],
                       PREDICTIONS[prediction], FORM_NAMES[form],
                       pred_uncond.to(acc) if cfg else None,
                       guidance if cfg else None).to(x.dtype)


register("ei_step", lambda x, *_: torch.empty_like(x), _ei_backward, _ei_setup,
         nograd=True, jvp=_ei_jvp, reference=_ei_reference, diff=(0, 1, 2))
register("ei_step_backward", _ei_bwd_fake)

# ---------------------------------------------------------------------------
# step tables


def _as_times(name, v, device, dtype):
    if isinstance(v, (int, float)):
        return torch.tensor([float(v)], device=device, dtype=dtype)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"{name}: expected a float or a floating tensor of shape (B,), "
                        f"got {type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
    if v.dim() > 1:
        raise ValueError(f"{name}: expected shape () or (B,), got {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype).reshape(-1)


def step_table(schedule, t, s, t_prev=None, g=None, dtype=torch.float32,
               device=None, check: bool = True, h=None) -> torch.Tensor:
    """The coefficient table the step kernels read, shape (R, 12):
    [alpha_t, sigma_t, d_alpha_t, d_sigma_t, alpha_s, sigma_s, d_alpha_s, d_sigma_s,
     alpha_prev, sigma_prev, h, g] (column names: flowkern.tables). t, s (and
    t_prev, g, h) are floats or tensors of shape (R,); R = 1 serves a whole
    batch. h is the step size the kernels multiply by: s - t unless given (an
    adapter that counts time in other units, e.g. diffusers' sigma_next -
    sigma). Samplers build one table for all steps up front and pass
    ``table=table[i]`` to each step."""
    device = device or (t.device if isinstance(t, torch.Tensor) else "cpu")
    sched = get_schedule(schedule)
    vals = [_as_times(n, v, device, dtype) for n, v in (("t", t), ("s", s))]
    tp = _as_times("t_prev", t_prev, device, dtype) if t_prev is not None else None
    gg = _as_times("g", g, device, dtype) if g is not None else torch.zeros(1, device=device,
                                                                         dtype=dtype)
    hh = _as_times("h", h, device, dtype) if h is not None else vals[1] - vals[0]
    for name, v in (("t", vals[0]), ("s", vals[1]), ("t_prev", tp)):
        # a table the steps trust: its times are checked here, unless the caller
        # checked them already (check=False: the samplers validate their grid)
        if check and v is not None and V.values_checked(v):
            V.check_unit_interval(name, v)
    if check and h is not None and V.values_checked(hh) and not bool(hh.isfinite().all()):
        raise ValueError("h: expected finite step sizes")
    sizes = [v.numel() for v in vals + [gg, hh] + ([tp] if tp is not None else [])]
    rows = 0 if 0 in sizes else max(sizes)  # an empty batch broadcasts the scalars to 0 rows
    cols = [*evaluate(sched, vals[0], dtype), *evaluate(sched, vals[1], dtype)]
    if tp is not None:
        cols += evaluate(sched, tp, dtype)[:2]
    else:
        cols += [torch.ones_like(vals[0]), torch.ones_like(vals[0])]
    cols += [hh, gg]
    return torch.stack([c.to(dtype).expand(rows) for c in cols], dim=1).contiguous()


# ---------------------------------------------------------------------------
# validation shared by the public steps


def _check_like_x(named, x):
    """csrc/cpu/step_args.h check_like_x for the Python backends: each given
    tensor matches the state x in shape, dtype and device."""
    for name, p in named.items():
        if p is not None and (p.shape != x.shape or p.dtype != x.dtype
                              or p.device != x.device):
            raise ValueError(f"{name}: the model output must match the state x in shape, "
                             f"dtype and device; got {tuple(p.shape)} {p.dtype} {p.device}, "
                             f"x is {tuple(x.shape)} {x.dtype} {x.device}")


class _Step:
    """Validated tensors, table and backend of one step call."""

    def __init__(self, op, x, preds, t, s, schedule, table, backend, t_prev=None, g=None,
                 check_times=True, writes=True):
        self.op = op
        V.tensor("x", x)
        check_tensors(**preds)  # one rule for which tensors may be absent (ops/training.py)
        _check_like_x(preds, x)
        self.acc = V.acc_dtype(x.dtype)
        rows = x.shape[0]
        self.backend = resolve(backend, x.device)
        # The op's coefficient arguments (table, times, kind, params): the table,
        # or, on triton, float times and a built-in schedule that the kernel
        # evaluates (lincomb.step_rows); then `table` is the host's copy of the
        # row, for the value checks only (docs/design.md §8).
        kernel_row = self.backend == "triton" and table is None and _kernel_times(
            t, s, t_prev, g, schedule)
        if kernel_row:
            table = _host_row(schedule, t, s, t_prev, g, self.acc, check_times)
            kind, params = native_spec(schedule)
            self.coef = (None, None, None, None,
                         [float(t), float(s), _NAN if t_prev is None else float(t_prev),
                          0.0 if g is None else float(g)], kind, params)
        elif table is None:
            if t is None or s is None:
                raise TypeError(f"{op}: give the times t and s (or a precomputed table=)")
            times = {"t": t, "s": s, "t_prev": t_prev}
            for name, v in times.items():
                if v is None:
                    continue
                v = _as_times(name, v, x.device, self.acc)
                if v.numel() not in (1, rows):
                    raise ValueError(f"{name}: expected shape () or ({rows},), got {tuple(v.shape)}")
                if check_times:
                    V.time(name, v, rows, x)
            table = step_table(schedule, t, s, t_prev, g, self.acc, x.device)
        else:
            table = check_table(table, rows, x.device, self.acc)
        self.table = table
        if not kernel_row:
            self.coef = (table, None, None, None, _NOTHING, TABLE_KIND, _NOTHING)
        if writes and self.backend == "triton":  # the torch backend differentiates steps
            no_forward_mode(op, x, *preds.values())
            refuse_grad(op, "this op writes into a buffer and has no derivative; call it under "
                        "torch.no_grad() or on detached tensors (ei_step without out= is the "
                        "differentiable step)", x=x, **preds)
            if torch.is_grad_enabled() and table.requires_grad:
                raise RuntimeError(f"{op}: argument 't' requires grad, and the fused ops do "
                                   f"not differentiate in the times; detach it, or use "
                                   f"backend='torch' for derivatives in t")

    def dense(self, *ts):
        return [None if t is None else t.contiguous() for t in ts]


def check_table(table, rows, device, acc):
    """A step table from flowkern.step_table for a batch of `rows`, as a
    contiguous (1 or rows, STEP_COLS) tensor in `acc` on `device`."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table: expected a tensor from flowkern.step_table, "
                        f"got {type(table).__name__}")
    table = table.reshape(-1, STEP_COLS) if table.dim() == 1 else table
    if table.dim() != 2 or table.shape[1] != STEP_COLS or table.shape[0] not in (1, rows):
        raise ValueError(f"table: expected shape ({STEP_COLS},), (1, {STEP_COLS}) or "
                         f"({rows}, {STEP_COLS}), got {tuple(table.shape)}")
    return table.to(device=device, dtype=acc).contiguous()


def _guidance(pred_uncond, guidance):
    if pred_uncond is None and guidance is not None:
        raise ValueError("guidance: a guidance weight needs the unconditional prediction "
                         "pred_uncond")
    if pred_uncond is not None and guidance is None:
        raise ValueError("pred_uncond: give the guidance weight `guidance` with it")
    if guidance is not None and not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance: expected a float, got {type(guidance).__name__}")
    return 1.0 if guidance is None else float(guidance)


def _out(name, out, x, st=None):
    """The output buffer `name` (a new one when None). With st (the Python
    backends' plan), the rule csrc/autograd/nograd.cpp applies to the native ops:
    on triton, a buffer that requires grad is an error (the kernel's write is
    invisible to autograd); the torch backend's copy_ differentiates."""
    if out is None:
        return empty_output(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    if st is not None and st.backend == "triton":
        refuse_grad(st.op, "this op writes into a buffer and has no derivative; call it under "
                    "torch.no_grad()", **{name: out})
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name}: must match x in shape, dtype and device")
    if not out.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    return out


def _native_out(name, out, x):
    """An output buffer of a native step: a new one when None; a given one the
    op itself checks (csrc/cpu/step_args.h check_step_out, _out's messages)."""
    if out is None:
        return empty_output(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    return out


def _direction(table, forward):
    """csrc/cpu/step_args.h check_step_direction: em_step needs s >= t (sqrt(h)
    scales its noise), churn t_hat <= t (value check, as V.nonzero)."""
    h = table[:, H]
    if not (V.values_checked(h) and h.numel()):
        return
    if forward and not bool((h >= 0).all()):
        raise ValueError(f"s: em_step integrates forward in time and needs s >= t; "
                         f"got s - t = {float(h.min())}")
    if not forward and not bool((h <= 0).all()):
        raise ValueError(f"t_hat: churn renoises to an earlier time and needs t_hat <= t; "
                         f"got t_hat - t = {float(h.max())}")


def _pred(prediction):
    return V.prediction("prediction", prediction)


def _nonzero_for(st, prediction, dst, at="t"):
    """Value check of the divisions the conversion to dst needs (CPU / debug):
    the training ops' rule (flowkern._rules.DIVIDES) on the step's schedule
    row at t or s."""
    check_conversion(st.table[:, AT_T if at == "t" else AT_S], prediction, dst, at)


# ---------------------------------------------------------------------------
# the native (cpu) fast path: one op call, arguments checked in C++

Tensor = torch.Tensor
_NOTHING: list = []
_NAN = float("nan")
# The overloads the native path calls, looked up once (an OpOverloadPacket
# call costs an extra Python frame on every step; NativeOps: and the OpOverload's).
_STEP_OPS = ("euler_step", "heun_step", "ei_step", "ei_step_out", "dpmpp_2m_step", "em_step",
             "churn", "lms_step", "lincomb_step")
# Each takes the full (`.times`) signature and calls the overload its times need
# (TimedOp: the default one, ~0.15 us cheaper, without per-sample time tensors).


def _native_steps():
    ops = torch.ops.flowkern
    steps = {name: TimedOp(getattr(ops, name).default, getattr(ops, name).times)
             for name in _STEP_OPS if name != "lincomb_step"}
    return NativeOps(ei_step_nograd=TimedOp(ops.ei_step.nograd, ops.ei_step.times_nograd),
                     lincomb_step=ops.lincomb_step.default, **steps)


_NATIVE = _native_steps() if cpu_built() else None
_EI_DIFF = CALLS[NATIVE_NS]  # .ei_step: its DiffOp


def _check_preds(pred, pred_uncond):
    """check_tensors(pred=, pred_uncond=) (its named TypeError), called only
    when a cheap isinstance test fails: its kwargs dict costs ~0.6 us of a
    step's few us."""
    if not (isinstance(pred, Tensor) and (pred_uncond is None or isinstance(pred_uncond, Tensor))):
        check_tensors(pred=pred, pred_uncond=pred_uncond)


def _pred_code(pred, pred_uncond, prediction):
    """A native step's prediction code after _check_preds: one call of the
    few a step's Python makes (~0.05 us each, of a ~2.5 us call)."""
    _check_preds(pred, pred_uncond)
    return V.prediction("prediction", prediction)


def _native_ops(x, backend):
    """(ops, check) (_NATIVE.now_checked) when this step is one call of its
    flowkern:: op (CPU kernel, or the CUDA glue of csrc/cuda/glue.h); None
    when it runs on triton or torch, which read a Python-built table."""
    if isinstance(x, torch.Tensor) and resolve_for(backend, x) in NATIVE_BACKENDS:
        return _NATIVE.now_checked()
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float))


def _time_arg(v) -> bool:
    return isinstance(v, (int, float, Tensor))


def _native_coef(op, x, t, s, schedule, table, t_prev=None, g=None):
    """(table, t, s, t_prev, times, kind, params) of a native step: the
    caller's table; or, for a built-in schedule and a float g, the times,
    each a float or a tensor (per-sample times: the op evaluates the schedule
    at each row's times, on CUDA in its kernel, and builds no table), as
    times = [t, s, t_prev, g] (0 where a tensor is given, t_prev NaN when
    absent) with the schedule's kind and parameters; otherwise (a custom
    schedule, or g as a tensor) the table step_table builds here."""
    if table is not None:
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"table: expected a tensor from flowkern.step_table, "
                            f"got {type(table).__name__}")
        return table, None, None, None, _NOTHING, TABLE_KIND, _NOTHING
    if t is None or s is None:
        raise TypeError(f"{op}: give the times t and s (or a precomputed table=)")
    if (_time_arg(t) and _time_arg(s) and (t_prev is None or _time_arg(t_prev))
            and (g is None or _number(g))):
        spec = native_spec(schedule)
        if spec is not None:
            tensors = [v if isinstance(v, Tensor) else None for v in (t, s, t_prev)]
            times = [0.0 if tensors[0] is not None else float(t),
                     0.0 if tensors[1] is not None else float(s),
                     _NAN if t_prev is None else 0.0 if tensors[2] is not None else float(t_prev),
                     0.0 if g is None else float(g)]
            return (None, *tensors, times, spec[0], spec[1])
    st = _Step(op, x, {}, t, s, schedule, None, x.device.type, t_prev=t_prev, g=g)
    return st.table, None, None, None, _NOTHING, TABLE_KIND, _NOTHING


# ---------------------------------------------------------------------------
# public steps


def euler_step(x, pred, t=None, s=None, schedule="linear", prediction="velocity",
               pred_uncond=None, guidance=None, out=None, table=None, backend=None):
    """One Euler step of the probability-flow ODE: x_s = x_t + (s - t) u_t.

    Args:
        x: state at time t, (B, ...). pred: the model's output at (x, t) of type
            `prediction` ("velocity", "x1", "eps", "score"); same shape/dtype as x.
        t, s: current and next time (floats or (B,) tensors); or table=.
        pred_uncond, guidance: classifier-free guidance p_u + w (p_c - p_u).
        out: output buffer (may be x itself).
    Returns: x_s, shape of x.
    """
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.euler_step(x, pred, t, s, schedule, prediction, pred_uncond, guidance, out,
                                   table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            code = _pred_code(pred, pred_uncond, prediction)
            coef = _native_coef("euler_step", x, t, s, schedule, table)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops, check = native
            ops.euler_step(x, pred, pred_uncond, *coef, code, w, check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    st = _Step("euler_step", x, {"pred": pred, "pred_uncond": pred_uncond}, t, s, schedule,
               table, backend)
    code = _pred(prediction)
    _nonzero_for(st, prediction, "velocity")
    out = _out("out", out, x, st)
    V.check_no_overlap({"out": out}, {"x": x, "pred": pred, "pred_uncond": pred_uncond})
    x, pred, pu = st.dense(x, pred, pred_uncond)
    _steps_for(st.backend).euler_step(x, pred, pu, *_table_args(st), code, w, False, out)
    return out


def heun_step(x, pred, x_euler, pred_euler, t=None, s=None, schedule="linear",
              prediction="velocity", pred_uncond=None, pred_euler_uncond=None, guidance=None,
              out=None, table=None, backend=None):
    """Second stage of Heun's method: x_s = x_t + (s - t)/2 (u_t + u_s), with
    u_t from (x, pred) at t and u_s from the Euler predictor (x_euler,
    pred_euler) at s. Shapes as :func:`euler_step`."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.heun_step(x, pred, x_euler, pred_euler, t, s, schedule, prediction,
                                  pred_uncond, pred_euler_uncond, guidance, out, table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    if (pred_uncond is None) != (pred_euler_uncond is None):
        raise ValueError("pred_euler_uncond: give both unconditional predictions or neither")
    native = _native_ops(x, backend)
    if native is not None:
        try:
            if not (isinstance(pred, Tensor) and isinstance(x_euler, Tensor)
                    and isinstance(pred_euler, Tensor)
                    and (pred_uncond is None or isinstance(pred_uncond, Tensor))
                    and (pred_euler_uncond is None or isinstance(pred_euler_uncond, Tensor))):
                check_tensors(pred=pred, x_euler=x_euler, pred_euler=pred_euler,
                              pred_uncond=pred_uncond, pred_euler_uncond=pred_euler_uncond)
            code = _pred(prediction)
            coef = _native_coef("heun_step", x, t, s, schedule, table)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops, check = native
            ops.heun_step(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond, *coef,
                          code, w, check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    V.tensor("x_euler", x_euler)
    st = _Step("heun_step", x, {"pred": pred, "x_euler": x_euler, "pred_euler": pred_euler,
                                "pred_uncond": pred_uncond,
                                "pred_euler_uncond": pred_euler_uncond},
               t, s, schedule, table, backend)
    code = _pred(prediction)
    _nonzero_for(st, prediction, "velocity")
    _nonzero_for(st, prediction, "velocity", at="s")
    out = _out("out", out, x, st)
    V.check_no_overlap({"out": out}, {"x": x, "pred": pred, "x_euler": x_euler,
                                      "pred_euler": pred_euler, "pred_uncond": pred_uncond,
                                      "pred_euler_uncond": pred_euler_uncond})
    args = st.dense(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond)
    _steps_for(st.backend).heun_step(*args, *_table_args(st), code, w, False, out)
    return out


def ei_step(x, pred, t=None, s=None, schedule="linear", prediction="x1", form="data",
            pred_uncond=None, guidance=None, out=None, table=None, backend=None):
    """First-order exponential integrator (DDIM) from t to s:
    data form  x_s = (sigma_s/sigma_t) x_t + (alpha_s - sigma_s alpha_t/sigma_t) d,
    noise form x_s = (alpha_s/alpha_t) x_t + (sigma_s - alpha_s sigma_t/alpha_t) eps.
    Differentiable in x and pred (without out=): it is also the one-step
    flow-map parametrisation g(t, s, x). Shapes as :func:`euler_step`."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.ei_step(x, pred, t, s, schedule, prediction, form, pred_uncond, guidance,
                                out, table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    fcode = V.form(form)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            code = _pred_code(pred, pred_uncond, prediction)
            ops, check = native
            coef = _native_coef("ei_step", x, t, s, schedule, table)
            if out is None:
                args = (x, pred, pred_uncond, *coef, code, fcode, w, check)
                grad = torch.is_grad_enabled() and (x.requires_grad or pred.requires_grad or (
                    pred_uncond is not None and pred_uncond.requires_grad)) or transforms_active()
                return _EI_DIFF.ei_step(*args) if grad else ops.ei_step_nograd(*args)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops.ei_step_out(x, pred, pred_uncond, *coef, code, fcode, w, check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    st = _Step("ei_step", x, {"pred": pred, "pred_uncond": pred_uncond}, t, s, schedule,
               table, backend, writes=out is not None)
    code = _pred(prediction)
    if form == "data":
        V.nonzero("t", "sigma_t", st.table[:, SIGMA_T], "the data form divides by it")
        _nonzero_for(st, prediction, "x1")
    else:
        V.nonzero("t", "alpha_t", st.table[:, ALPHA_T], "the noise form divides by it")
        _nonzero_for(st, prediction, "eps")
    if out is not None:
        out = _out("out", out, x, st)
        V.check_no_overlap({"out": out}, {"x": x, "pred": pred, "pred_uncond": pred_uncond})
    x, pred, pu = st.dense(x, pred, pred_uncond)
    steps = _steps_for(st.backend)
    if out is None:
        return steps.ei_step(x, pred, pu, *_table_args(st), code, fcode, w, False)
    steps.ei_step_out(x, pred, pu, *_table_args(st), code, fcode, w, False, out)
    return out


def dpmpp_2m_step(x, pred, t=None, s=None, schedule="linear", prediction="x1", d_prev=None,
                  t_prev=None, pred_uncond=None, guidance=None, out=None, d_out=None,
                  table=None, backend=None):
    """DPM-Solver++(2M) step from t to s (Lu et al. 2022): returns (x_s, d_t),
    where d_t (the guided x1-prediction at t) is what the next step passes as
    d_prev, with t_prev = t. Without d_prev (the first step) or when sigma_s = 0
    the step is first order. Shapes as :func:`euler_step`."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.dpmpp_2m_step(x, pred, t, s, schedule, prediction, d_prev, t_prev,
                                      pred_uncond, guidance, out, d_out, table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    if (d_prev is None) != (t_prev is None) and table is None:
        raise ValueError("t_prev: give d_prev and t_prev together (both None for the first step)")
    native = _native_ops(x, backend)
    if native is not None:
        try:
            _check_preds(pred, pred_uncond)
            if not (d_prev is None or isinstance(d_prev, Tensor)):
                check_tensors(d_prev=d_prev)
            code = _pred(prediction)
            coef = _native_coef("dpmpp_2m_step", x, t, s, schedule, table, t_prev=t_prev)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            d_out = d_out if type(d_out) is Tensor else _native_out("d_out", d_out, x)
            ops, check = native
            ops.dpmpp_2m_step(x, pred, d_prev, pred_uncond, *coef, code, w, check, out, d_out)
            return out, d_out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    st = _Step("dpmpp_2m_step", x, {"pred": pred, "pred_uncond": pred_uncond, "d_prev": d_prev},
               t, s, schedule, table, backend, t_prev=t_prev)
    code = _pred(prediction)
    V.nonzero("t", "sigma_t", st.table[:, SIGMA_T], "the data form divides by it")
    # alpha_t = 0 is the first-order limit (csrc/cpu/step_ops.h dpmpp_2m_step)
    V.nonzero("t", "each of alpha_t, alpha_s",
              st.table[:, ALPHA_T].abs() + st.table[:, ALPHA_S].abs(),
              "the step between two pure-noise levels (lambda = -inf) is undefined")
    _nonzero_for(st, prediction, "x1")
    out, d_out = _out("out", out, x, st), _out("d_out", d_out, x, st)
    V.check_no_overlap({"out": out, "d_out": d_out},
                       {"x": x, "pred": pred, "d_prev": d_prev, "pred_uncond": pred_uncond})
    x, pred, dp, pu = st.dense(x, pred, d_prev, pred_uncond)
    _steps_for(st.backend).dpmpp_2m_step(x, pred, dp, pu, *_table_args(st), code, w, False,
                                         out, d_out)
    return out, d_out


def em_step(x, pred, t=None, s=None, schedule="linear", prediction="velocity", g=1.0,
            seed=None, offset=0, pred_uncond=None, guidance=None, out=None, table=None,
            backend=None, per_sample_seeds=None):
    """Euler-Maruyama step of dX = [u + g^2/2 score] dt + g dW (which keeps the
    marginals of the flow for any g):  x_s = x + h (u + g^2/2 score) + g sqrt(h) xi.

    xi is drawn in the kernel: element e uses Philox4x32-10(seed, offset + e)
    (seed None: 0): the same Philox bits on every backend, the normals
    within ~2 float32 ulps of each other (README "Sampling steps"). Advance
    `offset` by x.numel() per step (the samplers do). per_sample_seeds
    (instead of seed): B ints, or a (B,) int64 tensor on x's device; sample b
    then draws as a batch of one with seed per_sample_seeds[b] (counter
    offset + its element index), so its noise does not depend on the batch;
    advance `offset` by x[0].numel() per step.
    Shapes as :func:`euler_step`; g a float or (B,) tensor."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.em_step(x, pred, t, s, schedule, prediction, g, seed, offset, pred_uncond,
                                guidance, out, table, backend, per_sample_seeds)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    seed, per_sample_seeds = _noise_args(seed, offset, per_sample_seeds, x)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            code = _pred_code(pred, pred_uncond, prediction)
            coef = _native_coef("em_step", x, t, s, schedule, table, g=g)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops, check = native
            ops.em_step(x, pred, pred_uncond, *coef, code, w, seed, offset, per_sample_seeds,
                        check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    st = _Step("em_step", x, {"pred": pred, "pred_uncond": pred_uncond}, t, s, schedule, table,
               backend, g=g)
    code = _pred(prediction)
    _nonzero_for(st, prediction, "velocity")
    _nonzero_for(st, prediction, "score")
    _direction(st.table, forward=True)
    out = _out("out", out, x, st)
    V.check_no_overlap({"out": out}, {"x": x, "pred": pred, "pred_uncond": pred_uncond})
    seeds = _per_sample_seeds(per_sample_seeds, x)
    x, pred, pu = st.dense(x, pred, pred_uncond)
    _steps_for(st.backend).em_step(x, pred, pu, *_table_args(st), code, w, seed, offset, seeds,
                                   False, out)
    return out


def churn(x, t=None, t_hat=None, schedule="linear", seed=None, offset=0, out=None, table=None,
          backend=None, per_sample_seeds=None):
    """EDM "churn" in this convention: renoise x from time t back to an earlier
    t_hat <= t, x_hat = (alpha_that/alpha_t) x + sqrt(sigma_that^2 -
    (alpha_that sigma_t/alpha_t)^2) xi, xi from Philox(seed, offset + e), or
    with per_sample_seeds as :func:`em_step`."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.churn(x, t, t_hat, schedule, seed, offset, out, table, backend,
                              per_sample_seeds)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    seed, per_sample_seeds = _noise_args(seed, offset, per_sample_seeds, x)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            coef = _native_coef("churn", x, t, t_hat, schedule, table)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops, check = native
            ops.churn(x, *coef, seed, offset, per_sample_seeds, check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    st = _Step("churn", x, {}, t, t_hat, schedule, table, backend)
    V.nonzero("t", "alpha_t", st.table[:, ALPHA_T], "churn divides by it")
    _direction(st.table, forward=False)
    out = _out("out", out, x, st)
    V.check_no_overlap({"out": out}, {"x": x})
    seeds = _per_sample_seeds(per_sample_seeds, x)
    _steps_for(st.backend).churn(x.contiguous(), *_table_args(st), seed, offset, seeds, False,
                                 out)
    return out


def lms_step(x, pred, weights, history=(), t=None, schedule="linear", prediction="velocity",
             pred_uncond=None, guidance=None, out=None, u_out=None, table=None, backend=None):
    """One linear multistep (Adams-Bashforth) step, k-diffusion's sample_lms:
    x_s = x_t + weights[0] u_t + sum_j weights[j] history[j-1], with u_t the
    velocity of the (guided) prediction at t. Returns (x_s, u_t); u_t is the
    next step's newest history entry. One fused pass reads x, pred and the
    history and writes both outputs.

    Args:
        weights: 1 + len(history) floats, the integrals over [t, s] of the
            Lagrange basis on the nodes (k-diffusion's linear_multistep_coeff):
            they carry the step size, so the step needs no s.
        history: up to 3 earlier velocities u_{t_{i-1}}, u_{t_{i-2}}, ... (newest
            first), each shaped like x.
        t: the current time (float or (B,) tensor), or table= (its t columns
            are read). u_out: output buffer for u_t (not a history entry).
    Other arguments as :func:`euler_step`.
    """
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.lms_step(x, pred, weights, history, t, schedule, prediction, pred_uncond,
                                 guidance, out, u_out, table, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    w = 1.0 if pred_uncond is None and guidance is None else _guidance(pred_uncond, guidance)
    hist = _lms_history(history)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            code = _pred_code(pred, pred_uncond, prediction)
            coef = _native_coef("lms_step", x, t, t, schedule, table)
            out = out if type(out) is Tensor else _native_out("out", out, x)
            u_out = u_out if type(u_out) is Tensor else _native_out("u_out", u_out, x)
            ops, check = native
            u1, u2, u3 = hist
            ops.lms_step(x, pred, u1, u2, u3, pred_uncond, _floats("weights", weights), *coef,
                         code, w, check, out, u_out)
            return out, u_out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    wts = _lms_weights(weights, hist)
    named = {"pred": pred, "u1": hist[0], "u2": hist[1], "u3": hist[2],
             "pred_uncond": pred_uncond}
    st = _Step("lms_step", x, named, t, t, schedule, table, backend)
    code = _pred(prediction)
    _nonzero_for(st, prediction, "velocity")
    out, u_out = _out("out", out, x, st), _out("u_out", u_out, x, st)
    V.check_no_overlap({"out": out, "u_out": u_out}, {"x": x, **named})
    args = st.dense(x, pred, *hist, pred_uncond)
    _steps_for(st.backend).lms_step(*args[:5], args[5], wts, *_table_args(st), code, w, False,
                                    out, u_out)
    return out, u_out


LMS_MAX_HISTORY = 3  # csrc/include/flowkern/steps.h


def lincomb_step(x, terms, weights, noise_std=0.0, seed=None, offset=0, per_sample_seeds=None,
                 out=None, backend=None):
    """A step whose coefficients the caller computed:
    x_s = weights[0] x + sum_k weights[k+1] terms[k] + noise_std xi, in one fused
    pass (the lincomb engine with a single row for the batch; no table, no
    schedule). It serves the multistep samplers whose update is a fixed linear
    combination of the state and the model's recent outputs, e.g. k-diffusion's
    DPM-Solver++(3M) SDE over its last three denoised outputs.

    Args:
        x: the state (B, ...). terms: 1 to 4 tensors shaped like x (the model's
            outputs, a noise tensor of the caller's, ...); at most 3 with
            noise_std > 0.
        weights: 1 + len(terms) finite floats, x's first.
        noise_std: std of the in-kernel Gaussian xi (0: none); xi is drawn as in
            :func:`em_step` from Philox(seed, offset + e), or per_sample_seeds.
    Returns out (a new tensor unless given; ``out=x`` updates in place)."""
    if ENTRIES is not None and not compiling():  # the usual call, in C (_entries.py)
        try:
            r = ENTRIES.lincomb_step(x, terms, weights, noise_std, seed, offset, per_sample_seeds,
                                     out, backend)
        except (ValueError, RuntimeError) as e:  # the op's errors: _registry.retyped
            raise retyped(e) from None
        if r is not None:
            return r
    seed, per_sample_seeds = _noise_args(seed, offset, per_sample_seeds, x)
    native = _native_ops(x, backend)
    if native is not None:
        try:
            out = out if type(out) is Tensor else _native_out("out", out, x)
            ops, check = native
            ops.lincomb_step(x, _terms(terms), _floats("weights", weights),
                             _float("noise_std", noise_std), seed, offset, per_sample_seeds,
                             check, out)
            return out
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    V.tensor("x", x)
    terms = _terms(terms)
    named = {f"terms[{k}]": V.tensor(f"terms[{k}]", p) for k, p in enumerate(terms)}
    wts, noise_std = _lincomb_weights(terms, weights, noise_std)
    _check_like_x(named, x)
    be = resolve(backend, x.device)
    st = _StepPlan("lincomb_step", be, V.acc_dtype(x.dtype))
    if be == "triton":
        no_forward_mode("lincomb_step", x, *terms)
        refuse_grad("lincomb_step", "this op writes into a buffer and has no derivative; call "
                    "it under torch.no_grad() or on detached tensors", x=x, **named)
    out = _out("out", out, x, st)
    V.check_no_overlap({"out": out}, {"x": x, **named})
    seeds = _per_sample_seeds(per_sample_seeds, x)
    _steps_for(be).lincomb_step(x.contiguous(), [p.contiguous() for p in terms], wts,
                                noise_std, seed, offset, seeds, False, out)
    return out


def _terms(terms):
    """lincomb_step's terms as a list of tensors (each named in errors; their
    dtypes and shapes are checked by the op, or by lincomb_step's Python path)."""
    if type(terms) is list:  # the usual call, passed on as it is
        for p in terms:
            if not isinstance(p, torch.Tensor):
                break
        else:
            return terms
    if isinstance(terms, torch.Tensor) or not isinstance(terms, (list, tuple)):
        raise TypeError(f"terms: expected a list or tuple of tensors, got "
                        f"{type(terms).__name__}")
    for k, p in enumerate(terms):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"terms[{k}]: expected a torch.Tensor, got {type(p).__name__}")
    return list(terms)


def _float(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    return float(v)


def _lincomb_weights(terms, weights, noise_std):
    """csrc/cpu/step_args.h lincomb_terms for the Python backends."""
    if not 1 <= len(terms) <= LINCOMB_MAX_TERMS:
        raise ValueError(f"terms: expected 1 to {LINCOMB_MAX_TERMS} tensors, got {len(terms)}")
    wts = _floats("weights", weights)
    if len(wts) != len(terms) + 1:
        raise ValueError(f"weights: expected {len(terms) + 1} weights (one for x and one per "
                         f"term), got {len(wts)}")
    _finite_weights(wts)
    noise_std = _float("noise_std", noise_std)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std: expected a finite value >= 0, got {noise_std}")
    if noise_std and len(terms) > LINCOMB_MAX_NOISY_TERMS:
        raise ValueError(f"terms: at most {LINCOMB_MAX_NOISY_TERMS} with the in-kernel noise "
                         f"(noise_std > 0), got {len(terms)}; a noise tensor of your own can be "
                         f"a term")
    return wts, noise_std


LINCOMB_MAX_TERMS, LINCOMB_MAX_NOISY_TERMS = 4, 3  # csrc/include/flowkern/steps.h
# What _out reads of a step without a table (a tuple: torch.compile traces it).
_StepPlan = collections.namedtuple("_StepPlan", "op backend acc")


# history padded to (u1, u2, u3), by its length
_LMS_PAD = tuple((None,) * (LMS_MAX_HISTORY - n) for n in range(LMS_MAX_HISTORY + 1))


def _lms_history(history):
    """(u1, u2, u3) with None for the absent ones."""
    if type(history) is list or type(history) is tuple:  # the usual call, first (~0.1 us)
        if len(history) <= LMS_MAX_HISTORY:
            for h in history:
                if not isinstance(h, torch.Tensor):
                    break
            else:
                return (*history, *_LMS_PAD[len(history)])
    if isinstance(history, torch.Tensor) or not isinstance(history, (list, tuple)):
        raise TypeError(f"history: expected a list or tuple of tensors (newest first), got "
                        f"{type(history).__name__}")
    if len(history) > LMS_MAX_HISTORY:
        raise ValueError(f"history: lms_step keeps at most {LMS_MAX_HISTORY} earlier "
                         f"velocities, got {len(history)}")
    for j, h in enumerate(history):  # dtypes and shapes: the op, or _Step on the Python path
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"u{j + 1}: expected a torch.Tensor, got {type(h).__name__}")
    return tuple(history) + (None,) * (LMS_MAX_HISTORY - len(history))


def _floats(name, v):
    if type(v) is list:  # the usual call: a list of floats, passed on as it is (~0.1 us)
        for f in v:
            if type(f) is not float:
                break
        else:
            return v
    if isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of floats, got {type(v).__name__}")
    for f in v:
        if not isinstance(f, (int, float)):
            raise TypeError(f"{name}: expected floats, got {type(f).__name__}")
    return [float(f) for f in v]


def _lms_weights(weights, hist):
    """csrc/cpu/step_args.h lms_history's weight rule for the Python backends."""
    wts = _floats("weights", weights)
    nh = sum(h is not None for h in hist)
    if len(wts) != nh + 1:
        raise ValueError(f"weights: expected {nh + 1} weights (one for u_t and one per earlier "
                         f"velocity), got {len(wts)}")
    return _finite_weights(wts)


def _finite_weights(wts):
    """csrc/cpu/step_args.h check_finite_weights (lms_step, lincomb_step)."""
    for j, f in enumerate(wts):
        if not math.isfinite(f):
            raise ValueError(f"weights: expected finite weights, got {f} at {j}")
    return wts


def _table_args(st):
    """The coefficient arguments of a step checked here (_Step.coef)."""
    return st.coef


def _host_row(schedule, t, s, t_prev, g, acc, check):
    """The (1, STEP_COLS) CPU table of a step at float times: the host's copy of
    the row a triton kernel evaluates, which the step's value checks read. The
    times are range-checked as step_table checks them; one schedule evaluation
    of the three times (flowkern::schedule_table where built: ~20 us, where
    step_table's torch ops take 150-450 us). Under torch.compile or a fake
    mode, step_table (no host read to trace or fake)."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return step_table(schedule, t, s, t_prev, g, acc, "cpu", check=check)
    if check and V.check_flag():
        for name, v in (("t", t), ("s", s), ("t_prev", t_prev)):
            if v is not None and not 0.0 <= v <= 1.0:
                V.check_unit_interval(name, torch.tensor([float(v)], dtype=torch.float64))
    tp = t if t_prev is None else t_prev
    at = coefficients(schedule, torch.tensor([float(t), float(s), float(tp)], dtype=torch.float64),
                      3, torch.float64).tolist()
    prev = (1.0, 1.0) if t_prev is None else at[2][:2]
    row = step_row(at[0], at[1], prev, float(s) - float(t), 0.0 if g is None else float(g))
    return torch.tensor([row], dtype=acc)


def _kernel_times(t, s, t_prev, g, schedule) -> bool:
    """Whether a triton step's kernel evaluates its row: float times and a
    built-in schedule (as the native ops' `times`)."""
    return (_number(t) and _number(s) and (t_prev is None or _number(t_prev))
            and (g is None or _number(g)) and native_spec(schedule) is not None)


def _noise_args(seed, offset, per_sample_seeds, x):
    """(the int seed the ops pass, their per_sample_seeds): seed 0 with
    per-sample seeds, which replace it; B ints (a list or tuple) as a (B,)
    int64 tensor on x's device (per_sample_seed_tensor); a tensor or None
    passed on, checked by the op."""
    if seed is not None and per_sample_seeds is not None:
        raise ValueError("per_sample_seeds: give seed or per_sample_seeds, not both")
    V.seed("offset", offset)
    if isinstance(per_sample_seeds, (list, tuple)) and isinstance(x, torch.Tensor):
        per_sample_seeds = per_sample_seed_tensor(per_sample_seeds, x)
    return (0 if seed is None else V.seed("seed", seed)), per_sample_seeds


def _per_sample_seeds(seeds, x):
    """csrc/cpu/step_args.h step_seeds for the Python backends: a (B,) int64
    tensor on x's device with values in [0, 2^63) (read where values are)."""
    if seeds is None:
        return None
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"per_sample_seeds: expected a torch.Tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"per_sample_seeds: expected dtype torch.int64, got {seeds.dtype}")
    if seeds.dim() != 1 or seeds.shape[0] != x.shape[0]:
        raise ValueError(f"per_sample_seeds: expected shape ({x.shape[0]},) (one seed per "
                         f"sample of x), got {tuple(seeds.shape)}")
    if seeds.device != x.device:
        raise ValueError(f"per_sample_seeds: on {seeds.device} but x is on {x.device}; move "
                         f"them to one device")
    if V.values_checked(seeds) and seeds.numel() and bool((seeds < 0).any()):
        i = int((seeds < 0).nonzero()[0, 0])
        V.seed("per_sample_seeds", int(seeds[i]), at=i)
    return seeds.contiguous()


def per_sample_seed_tensor(per_sample_seeds, x):
    """A sampler's per_sample_seeds (B ints, or a (B,) int64 tensor on any
    device) as a new (B,) int64 tensor on x's device, checked as the ops check
    their per_sample_seeds (ints on the host are checked always)."""
    s = per_sample_seeds
    if isinstance(s, torch.Tensor):
        return _per_sample_seeds(s.to(x.device, copy=True), x)
    if not isinstance(s, (list, tuple)):
        raise TypeError(f"per_sample_seeds: expected a list of ints or an int64 tensor, got "
                        f"{type(s).__name__}")
    for i, v in enumerate(s):
        V.seed("per_sample_seeds", v, at=i)
    return _per_sample_seeds(torch.tensor(s, dtype=torch.int64, device=x.device).reshape(-1), x)



class NoiseStream:
    """A sampler's in-kernel noise, draw by draw: draw k is Philox(seed, k n),
    n = x.numel(); with per-sample seeds, sample b's own stream at k n_1, n_1
    one sample's size (:func:`em_step`), so a sample's noise does not depend
    on its batch. ``at(k)`` gives the noise arguments of em_step / churn."""

    def __init__(self, seed, seeds, x):
        self.seed, self.seeds = seed, seeds
        self.stride = x.numel() if seeds is None else (x[0].numel() if len(x) else 0)

    def at(self, k):
        if self.seeds is None:
            return dict(seed=self.seed, offset=k * self.stride)
        return dict(per_sample_seeds=self.seeds, offset=k * self.stride)


def noise_stream(seed, per_sample_seeds, x, needed=True):
    """A sampler's NoiseStream from its seed= or per_sample_seeds= (not both);
    seed None draws one from torch's generator when noise is `needed`."""
    if per_sample_seeds is not None:
        if seed is not None:
            raise ValueError("per_sample_seeds: give seed or per_sample_seeds, not both")
        return NoiseStream(None, per_sample_seed_tensor(per_sample_seeds, x), x)
    if V.seed("seed", seed, optional=True) is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if needed else 0  # CPU, no sync
    return NoiseStream(seed, None, x)

# ---------------------------------------------------------------------------
# the torch backend: the reference with the ops' signatures (as the triton ops
# take them from the public functions: a table built and checked there). Each
# writes out with copy_, which torch differentiates; the public steps have no
# branch per backend (_steps_for).


def _acc(p, acc):
    return None if p is None else p.to(acc)


def _pad_prev(table):
    """The previous time's (alpha, sigma) as a (R, 4) schedule block for the reference."""
    return torch.cat([table[:, PREV], table[:, PREV]], dim=1)


def _noise(seed, offset, seeds, x, acc):
    """The kernels' draws for a step of x (per-sample seeds replace the seed)."""
    return ref.philox_normal(seed if seeds is None else seeds, offset, x.shape, acc, x.device)


def _ref_table(x, table, t, s, t_prev, times, kind, params):
    """A step's coefficient arguments as the (R, STEP_COLS) table of the torch
    formulas, in x's accumulation dtype: the caller's, or step_table's at
    the times (floats or tensors)."""
    table, times, kind, params = _py_coef(x, table, t, s, t_prev, times, kind, params)
    acc = V.acc_dtype(x.dtype)
    if kind != TABLE_KIND:
        table = step_table(from_native(kind, params), times[0], times[1],
                           None if math.isnan(times[2]) else times[2], times[3], dtype=acc,
                           device=x.device, check=False)
    return table.to(acc).reshape(-1, STEP_COLS)


def _torch_euler(x, pred, pu, table, t, s, t_prev, times, kind, params, code, w, check, out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    out.copy_(ref.euler_step(x.to(a), pred.to(a), table[:, AT_T], table[:, H],
                             PREDICTIONS[code], _acc(pu, a), w))


def _torch_heun(x, pred, xe, pe, pu, peu, table, t, s, t_prev, times, kind, params, code, w,
                check, out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    out.copy_(ref.heun_step(x.to(a), pred.to(a), xe.to(a), pe.to(a), table[:, AT_T],
                            table[:, AT_S], table[:, H], PREDICTIONS[code], _acc(pu, a),
                            _acc(peu, a), w))


def _torch_ei_out(x, pred, pu, table, t, s, t_prev, times, kind, params, code, form, w, check,
                  out):
    out.copy_(_ei_reference(x, pred, pu, table, t, s, t_prev, times, kind, params, code, form, w,
                            check))


def _torch_dpmpp_2m(x, pred, dp, pu, table, t, s, t_prev, times, kind, params, code, w, check,
                    out, d_out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    xs, d = ref.dpmpp_2m_step(x.to(a), pred.to(a), table[:, AT_T], table[:, AT_S],
                              PREDICTIONS[code], _acc(dp, a), _pad_prev(table), _acc(pu, a), w)
    out.copy_(xs), d_out.copy_(d)


def _torch_em(x, pred, pu, table, t, s, t_prev, times, kind, params, code, w, seed, offset, seeds,
              check, out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    out.copy_(ref.em_step(x.to(a), pred.to(a), table[:, AT_T], table[:, H], table[:, G],
                          _noise(seed, offset, seeds, x, a), PREDICTIONS[code], _acc(pu, a), w))


def _torch_churn(x, table, t, s, t_prev, times, kind, params, seed, offset, seeds, check, out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    out.copy_(ref.churn(x.to(a), table[:, AT_T], table[:, AT_S],
                        _noise(seed, offset, seeds, x, a)))


def _torch_lms(x, pred, u1, u2, u3, pu, wts, table, t, s, t_prev, times, kind, params, code, w,
               check, out, u_out):
    table = _ref_table(x, table, t, s, t_prev, times, kind, params)
    a = table.dtype
    given = [h.to(a) for h in (u1, u2, u3) if h is not None]
    xs, u = ref.lms_step(x.to(a), pred.to(a), table[:, AT_T], wts, given, PREDICTIONS[code],
                         _acc(pu, a), w)
    out.copy_(xs), u_out.copy_(u)


def _torch_lincomb(x, terms, wts, noise_std, seed, offset, seeds, check, out):
    a = V.acc_dtype(x.dtype)
    xi = _noise(seed, offset, seeds, x, a) if noise_std else None
    out.copy_(ref.lincomb_step(x.to(a), [p.to(a) for p in terms], wts, xi, noise_std))


# The fake kernels, and the torch backend's steps: the formulas above with the
# ops' signatures (each writes out with copy_, which torch differentiates).
for _name, _formula in {"euler_step": _torch_euler, "heun_step": _torch_heun,
                        "ei_step_out": _torch_ei_out, "dpmpp_2m_step": _torch_dpmpp_2m,
                        "em_step": _torch_em, "churn": _torch_churn, "lms_step": _torch_lms,
                        "lincomb_step": _torch_lincomb}.items():
    register(_name, _none, reference=_formula)


def _steps_for(backend):
    """The step implementations of a Python backend, with the ops' signatures:
    ops_for(backend) (the triton ops, or the torch formulas), ei_step without
    out= its differentiable call. Built at import for eager calls and for
    torch.compile (ops_for differs there), so Dynamo only reads them."""
    return _STEPS[backend, torch.compiler.is_compiling()]


def _step_impls(backend, compiling):
    ops = torch.ops.flowkern_triton if (backend == "triton" and compiling) else ops_for(backend)
    impls = {n: getattr(ops, n) for n in _STEP_OPS}
    impls["ei_step"] = calls_for(backend).ei_step.call
    return types.SimpleNamespace(**impls)


_STEPS = {(b, c): _step_impls(b, c) for b in ("torch", "triton") for c in (False, True)}


__all__ = ["euler_step", "heun_step", "ei_step", "dpmpp_2m_step", "em_step", "churn",
           "lms_step", "lincomb_step", "step_table"]
