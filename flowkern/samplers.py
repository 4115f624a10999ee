"""Sampling loops over the fused step ops (docs/design.md §4 "Sampling").

:func:`sample` integrates from noise (t = 0) toward data (t = 1) with one of
the fused steps. Everything that depends only on the grid is decided on the
host before the loop: the grid itself, one step table for all steps
(:func:`flowkern.step_table`), the churn times and their table, which steps
fall back to a lower order, the model's time vectors and the Philox noise
offsets. The loop then only calls the model and one fused kernel per stage,
updating one state buffer in place (``out=x``: each element is read before
it is written). The first step reads x_init and writes that buffer, which
becomes the result; besides Heun's predictor and DPM-Solver's d no other
full-size tensor is allocated (nor what the model allocates; the ``torch``
backend, being the readable reference, does allocate temporaries). It never
synchronises with the host on GPU, so it can be captured in a CUDA graph
(``cuda_graph=True``). With FLOWKERN_DEBUG=1 each model
output is checked for NaN (one reduction per call); otherwise CPU samples
are checked once, at the end.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch

from . import _validate as V
from ._progress import progress_bar
from ._enums import PREDICTIONS
from .backend import resolve
from .grids import make_grid, sigma_k, t_from_sigma_k
from .ops.steps import churn as _churn
from .ops.steps import (dpmpp_2m_step, ei_step, em_step, euler_step, heun_step,
                        noise_stream, step_table)
from .ops._registry import empty_output
from .schedules import evaluate, get_schedule

METHODS = ("euler", "heun", "ei", "dpmpp_2m", "em")
DEFAULT_STEPS = 50
_GRAPHS: "OrderedDict[tuple, _Graphed]" = OrderedDict()
_GRAPH_CACHE_SIZE = 4

__all__ = ["sample", "METHODS", "clear_graph_cache"]


# ---------------------------------------------------------------------------
# which conversions divide by what (mirrors flowkern.ops.steps._nonzero_for)


def _divisors(src: str, dst: str) -> set:
    if src == dst:
        return set()
    need = set()
    if "score" in (src, dst) and not (src == "score" and dst == "eps"):
        need.add("sigma")
    if src == "x1" and dst in ("velocity", "eps"):
        need.add("sigma")
    if src in ("eps", "score") and dst in ("velocity", "x1"):
        need.add("alpha")
    if src == "velocity" and dst in ("x1", "eps", "score"):
        need.add("det")
    return need


def _zero(coef, what):
    """coef: (4,) float64 [alpha, sigma, d_alpha, d_sigma] at one time."""
    a, s, da, ds = coef
    if what == "alpha":
        return a == 0
    if what == "sigma":
        return s == 0
    return a * ds - s * da == 0


def _defined(coef, src, dsts, extra=()):
    """Why the conversions src -> dsts (and the divisions in `extra`) are
    undefined at a time with coefficients coef, or None when they are fine."""
    need = set(extra)
    for d in dsts:
        need |= _divisors(src, d)
    if (need or any(d != src for d in dsts)) and not all(math.isfinite(c) for c in coef):
        return "a schedule coefficient (alpha, sigma or a derivative) is infinite"
    for what in ("alpha", "sigma", "det"):
        if what in need and _zero(coef, what):
            name = {"det": "alpha*d_sigma - sigma*d_alpha"}.get(what, what + "_t")
            return f"the step divides by {name}, which is 0"
    return None


# ---------------------------------------------------------------------------
# the plan: everything decided before the loop


class _Plan:
    def __init__(self, x, schedule, method, steps, grid, prediction, guidance, churn, seed, g,
                 t_start, t_end, backend, per_sample_seeds=None):
        if method not in METHODS:
            raise ValueError(f"method: unknown method {method!r}; expected one of {METHODS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown prediction type {prediction!r}; expected one "
                             f"of {PREDICTIONS}")
        if guidance is not None and (isinstance(guidance, bool)
                                     or not isinstance(guidance, (int, float))):
            raise TypeError(f"guidance: expected a float (the CFG weight w) or None, "
                            f"got {type(guidance).__name__}")
        if isinstance(churn, bool) or not isinstance(churn, (int, float)) or not churn >= 0:
            raise ValueError(f"churn: expected a float >= 0 (EDM's S_churn), got {churn!r}")
        if isinstance(grid, str) and steps is None:
            steps = DEFAULT_STEPS
        self.sched = get_schedule(schedule)
        self.method, self.prediction = method, prediction
        self.guidance = None if guidance is None else float(guidance)
        self.backend = resolve(backend, x.device)
        self.acc = V.acc_dtype(x.dtype)

        ts = make_grid(grid, self.sched, steps, t_start, t_end)        # float64, CPU
        n = self.n = ts.numel() - 1
        self.grid = ts

        # EDM churn: sigma_k -> sigma_k (1 + gamma) at an earlier time t_hat <= t.
        t_hat = ts[:-1].clone()
        self.churn_at = [False] * n
        if churn > 0:
            gamma = min(churn / n, math.sqrt(2.0) - 1.0)
            sk = sigma_k(self.sched, ts[:-1])
            ok = torch.isfinite(sk) & (sk > 0)
            if bool(ok.any()):
                th = t_from_sigma_k(self.sched, sk[ok] * (1.0 + gamma))
                t_hat[ok] = torch.minimum(th, ts[:-1][ok])
            self.churn_at = (t_hat < ts[:-1]).tolist()
        self.t_hat = t_hat                       # where each step starts (and the model runs)

        self.needs_noise = method == "em" or any(self.churn_at)
        self.noise = noise_stream(seed, per_sample_seeds, x, self.needs_noise)

        # coefficients at every evaluation time, float64 on the host
        c_t = torch.stack(evaluate(self.sched, t_hat, torch.float64), 1).tolist()
        c_s = torch.stack(evaluate(self.sched, ts[1:], torch.float64), 1).tolist()
        p = prediction
        self.kind = []                            # per step: which kernel(s) run
        self.form = "data" if p in ("x1", "velocity") else "noise"
        for i in range(n):
            ti = float(t_hat[i])
            if method == "euler":
                bad, kind = _defined(c_t[i], p, ["velocity"]), "euler"
            elif method == "em":
                bad, kind = _defined(c_t[i], p, ["velocity", "score"]), "em"
            elif method == "heun":
                bad, kind = _defined(c_t[i], p, ["velocity"]), "heun"
                if bad is None and _defined(c_s[i], p, ["velocity"]) is not None:
                    kind = "euler"                # the conversion at s divides by 0: Euler
            elif method == "ei":
                dst = "x1" if self.form == "data" else "eps"
                extra = ["sigma"] if self.form == "data" else ["alpha"]
                bad, kind = _defined(c_t[i], p, [dst], extra), "ei"
            else:  # dpmpp_2m
                prev_special = i > 0 and self.kind[i - 1] == "ei"
                if c_t[i][0] == 0:
                    # alpha_t = 0 (pure noise): lambda_t = -inf and the first-order
                    # DPM-Solver++ step is its limit, the data-form DDIM step.
                    bad, kind = _defined(c_t[i], p, ["x1"], ["sigma"]), "ei"
                else:
                    bad = _defined(c_t[i], p, ["x1"], ["sigma"])
                    kind = "dpm1" if i == 0 or prev_special else "dpm2"
            if bad is not None:
                raise ValueError(
                    f"prediction: method={method!r} with prediction={p!r} is undefined at "
                    f"t={ti:g} (step {i} of {n}) on this schedule: {bad} there; "
                    f"start later (t_start > 0) or end earlier (t_end < 1), or use another "
                    f"prediction type")
            self.kind.append(kind)

        # g for Euler-Maruyama: float, (steps,) tensor, or callable of t
        g_col = None
        if method == "em":
            if callable(g):
                g_col = torch.as_tensor(g(t_hat.clone()), dtype=torch.float64).reshape(-1)
            elif isinstance(g, torch.Tensor):
                g_col = g.detach().to("cpu", torch.float64).reshape(-1)
            elif isinstance(g, (int, float)) and not isinstance(g, bool):
                g_col = torch.full((n,), float(g), dtype=torch.float64)
            else:
                raise TypeError(f"g: expected a float, a tensor of shape ({n},) or a callable "
                                f"of t, got {type(g).__name__}")
            if g_col.numel() == 1:
                g_col = g_col.expand(n)
            if g_col.numel() != n or not bool(torch.isfinite(g_col).all()):
                raise ValueError(f"g: expected {n} finite values (one per step), got "
                                 f"{g_col.numel()}")

        # one step table for all steps (and one for churn), on the state's device
        dev = x.device
        t_prev = torch.cat([t_hat[:1], t_hat[:-1]])
        self.table64 = step_table(self.sched, t_hat, ts[1:], t_prev, g_col, torch.float64, "cpu",
                                  check=False)  # the grid was validated above
        self.table = self.table64.to(dev, self.acc)
        self.churn_table = (step_table(self.sched, ts[:-1], t_hat, None, None, torch.float64,
                                       "cpu", check=False).to(dev, self.acc)
                            if any(self.churn_at) else None)
        # the model's time vectors: row i = t_hat_i, row n + i = t_{i+1}
        tdt = self.acc
        times = torch.cat([t_hat, ts[1:]]).to(tdt)
        self.t_model = times[:, None].expand(2 * n, x.shape[0]).contiguous().to(dev)
        self.t_host = times.tolist()

    def key(self):
        return (self.method, self.prediction, self.guidance, self.noise.seed,
                self.noise.seeds is None,
                self.backend,
                tuple(self.grid.tolist()), tuple(self.t_hat.tolist()), repr(self.sched),
                tuple(self.table64.flatten().tolist()))


# ---------------------------------------------------------------------------
# the loop


class _Loop:
    """Buffers and the per-step body; run() is the whole sampling loop."""

    def __init__(self, plan, model, x_init, checks, callback=None, trajectory=None, bar=None):
        self.p, self.model = plan, model
        self.checks, self.callback, self.trajectory, self.bar = checks, callback, trajectory, bar
        # One state buffer and one DPM-Solver buffer, updated in place: every
        # step reads each element before it writes it, in the same thread, so
        # out may equal x (and d_out d_prev). The first step reads x_init and
        # writes the buffer, which becomes the result: no copy, and the only
        # full-size allocation that is not a scratch buffer.
        self.buf = empty_output(x_init)
        self.xe = empty_output(self.buf) if "heun" in plan.kind else None
        self.d = empty_output(self.buf) if plan.method == "dpmpp_2m" else None
        self.first_call = True

    # -- the model ---------------------------------------------------------

    def call(self, x, row, step):
        p = self.p
        t = p.t_model[row]
        out = self.model(x, t)
        if p.guidance is not None:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(f"guidance: with guidance={p.guidance} the model must return "
                                 f"a pair (cond, uncond) of predictions; it returned "
                                 f"{type(out).__name__}")
            pc, pu = out
        else:
            if isinstance(out, (tuple, list)):
                raise ValueError("model: returned a tuple; a model that returns (cond, uncond) "
                                 "needs the guidance weight, e.g. guidance=3.0")
            pc, pu = out, None
        if self.first_call:                          # metadata only: no sync
            for name, v in (("model", pc), ("model (uncond)", pu)):
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{name}: expected a tensor prediction, got "
                                    f"{type(v).__name__}")
                if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
                    raise ValueError(
                        f"{name}: the prediction must match the state in shape, dtype and "
                        f"device; got {tuple(v.shape)} {v.dtype} {v.device}, the state is "
                        f"{tuple(x.shape)} {x.dtype} {x.device}")
            self.first_call = False
        if self.checks:
            for v in (pc, pu):
                if v is not None and _has_nan(v):
                    raise ValueError(f"model: returned NaN at step {step} of {p.n} "
                                     f"(t={p.t_host[row]:g}, the first time it happened)")
        return pc, pu

    # -- one step ----------------------------------------------------------

    def step(self, i, x, pc, pu, tab, out, draw, kw):
        """Step i from x (with the model's predictions) into out (may be x)."""
        p = self.p
        kind = p.kind[i]
        if kind == "euler":
            euler_step(x, pc, pred_uncond=pu, table=tab, out=out, **kw)
        elif kind == "heun":
            euler_step(x, pc, pred_uncond=pu, table=tab, out=self.xe, **kw)
            with V.values_prechecked(False):  # the model's own flowkern calls are checked
                pe, peu = self.call(self.xe, p.n + i, i)
            heun_step(x, pc, self.xe, pe, pred_uncond=pu, pred_euler_uncond=peu, table=tab,
                      out=out, **kw)
        elif kind == "ei":
            ei_step(x, pc, pred_uncond=pu, form=p.form if p.method == "ei" else "data",
                    table=tab, out=out, **kw)
        elif kind in ("dpm1", "dpm2"):
            dpmpp_2m_step(x, pc, d_prev=self.d if kind == "dpm2" else None, pred_uncond=pu,
                          table=tab, out=out, d_out=self.d, **kw)
        else:  # em
            em_step(x, pc, pred_uncond=pu, **p.noise.at(draw), table=tab, out=out, **kw)

    def run(self, x_init):
        p, be = self.p, self.p.backend
        x, out = x_init, self.buf
        kw = dict(prediction=p.prediction, guidance=p.guidance, backend=be)
        draw = 0  # the noise draws so far (flowkern.ops.steps.NoiseStream)
        if self.trajectory is not None:
            self.trajectory.append(x.clone())
        for i in range(p.n):
            if p.churn_at[i]:
                with V.values_prechecked():
                    _churn(x, table=p.churn_table[i], **p.noise.at(draw), out=out,
                           backend=be)
                draw += 1
                x = out
            tab = p.table[i]
            pc, pu = self.call(x, i, i)
            with V.values_prechecked():  # the plan checked the grid's divisions before the loop
                self.step(i, x, pc, pu, tab, out, draw, kw)
            if p.kind[i] == "em":
                draw += 1
            x = out
            if self.trajectory is not None:
                self.trajectory.append(x.clone())
            if self.callback is not None:
                self.callback(i, p.t_host[p.n + i], x)
            if self.bar is not None:
                self.bar.update(1)
        return x


def _has_nan(v):
    # One reduction instead of a full-size isnan mask; confirm on the rare hit
    # (a sum can be NaN from +inf and -inf, or overflow to inf).
    s = v.sum()
    if bool(torch.isfinite(s)):
        return False
    return bool(torch.isnan(v).any())


def _checks_on(x):
    """Per-step NaN checks cost a full pass over every model output (as much as
    the fused step itself), so they run only in debug mode; on CPU the final
    state is checked once instead (see sample)."""
    return os.environ.get("FLOWKERN_DEBUG") == "1" and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# CUDA graphs


class _Graphed:
    """A captured loop. It keeps everything the graph's kernels read or write
    alive: the loop (its buffers, and through the plan the step tables and
    time vectors), the input and output buffers, and the model."""

    def __init__(self, graph, loop, x_in, x_out, model):
        self.graph, self.loop, self.x_in, self.x_out, self.model = graph, loop, x_in, x_out, model


def clear_graph_cache():
    """Drop the CUDA graphs (and their memory) that ``sample(cuda_graph=True)`` keeps."""
    _GRAPHS.clear()


def _run_graphed(plan, model, x_init):
    if x_init.device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need CUDA tensors, x_init is on "
                         f"{x_init.device}; use cuda_graph=False on CPU")
    if os.environ.get("FLOWKERN_DEBUG") == "1":
        raise ValueError("cuda_graph: FLOWKERN_DEBUG=1 turns on value checks that synchronise "
                         "with the host and cannot be captured; unset it or use cuda_graph=False")
    key = (id(model), tuple(x_init.shape), x_init.dtype, x_init.device, plan.key())
    with torch.cuda.device(x_init.device):
        hit = _GRAPHS.get(key)
        if hit is not None and hit.model is model:
            _GRAPHS.move_to_end(key)
            hit.x_in.copy_(x_init)
            if plan.noise.seeds is not None:  # the graph reads the first call's seeds
                hit.loop.p.noise.seeds.copy_(plan.noise.seeds)
            hit.graph.replay()
            return hit.x_out.clone()
        x_in = empty_output(x_init).copy_(x_init)
        loop = _Loop(plan, model, x_in, checks=False)
        # Warm up on a side stream: the whole loop once, so that every kernel
        # variant is compiled (Triton) and the model's lazy state exists before
        # capture. Its result is discarded; the replay below recomputes it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop.run(x_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_out = loop.run(x_in)          # reads x_in, writes the loop's static buffers
        graph.replay()
        _GRAPHS[key] = _Graphed(graph, loop, x_in, x_out, model)
        while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        return x_out.clone()


# ---------------------------------------------------------------------------
# public API


@torch.no_grad()
def sample(model, x_init, schedule="linear", method="euler", steps=None, grid="uniform",
           prediction="velocity", guidance=None, churn=0.0, seed=None, progress=True,
           callback=None, return_trajectory=False, t_start=0.0, t_end=1.0, g=1.0,
           backend=None, cuda_graph=False, per_sample_seeds=None):
    """Integrate from noise x_init at t_start toward data at t_end (t = 0 is
    noise, t = 1 data; docs/design.md §1) with fused steps.

    Args:
        model: ``model(x, t) -> prediction``, x shaped like x_init, t a (B,)
            tensor (float32; float64 for float64 states). Its output has the
            state's shape, dtype and device, of type `prediction`. With
            ``guidance=w`` it returns the pair ``(cond, uncond)`` and the
            steps use ``uncond + w (cond - uncond)`` (classifier-free guidance,
            fused into each step).
        x_init: the initial state (B, ...), e.g. torch.randn for t_start = 0.
            It is not modified.
        schedule: a name ("linear", "cosine", "polynomial", "vp", "ve", "edm")
            or a schedule object (flowkern.schedules).
        method: "euler" | "heun" (2nd order, 2 model calls per step) | "ei"
            (first-order exponential integrator / DDIM; data form for x1 and
            velocity predictions, noise form for eps and score) | "dpmpp_2m"
            (DPM-Solver++(2M), 2nd order multistep) | "em" (Euler-Maruyama for
            dX = [u + g^2/2 score] dt + g dW, which has the same marginals).
        steps: number of steps (default 50 with a named grid).
        grid: "uniform" (in t) | "karras" (EDM rho = 7 in sigma_t/alpha_t) |
            "logsnr" (uniform in log(alpha/sigma)) | an increasing tensor of
            times in [0, 1] (see flowkern.grids).
        prediction: "velocity" | "x1" | "eps" | "score": what the model outputs.
        guidance: the CFG weight w, or None.
        churn: EDM's S_churn: before step i the state is renoised from t_i to
            t_hat_i with sigma_k(t_hat) = (1 + gamma) sigma_k(t_i), gamma =
            min(churn/steps, sqrt(2) - 1) (flowkern.churn); the step then runs
            from t_hat_i. Not at pure noise (alpha = 0) or clean data.
        seed: Philox seed of the noise (em, churn); None draws one from torch's
            default generator once. Step noise uses offsets 0, n, 2n, ... (n =
            x.numel()), one per draw, in loop order.
        progress: a tqdm bar (if tqdm is installed).
        callback: ``callback(i, t, x)`` after step i, with t = t_{i+1} (a
            float) and x the state there. x is a buffer the sampler reuses:
            clone it to keep it.
        return_trajectory: also return the list of the steps + 1 states
            (x_init first), as copies.
        t_start, t_end: the time range of a named grid.
        g: the EM diffusion coefficient: a float, a (steps,) tensor, or a
            callable of the (steps,) float64 start times.
        backend: "torch" | "cpu" | "cuda" | "triton" (default: auto).
        cuda_graph: capture the whole loop in a CUDA graph (CUDA tensors only)
            and replay it; the graph is cached per (model, shape, dtype,
            settings), so later calls only replay. Needs a capturable model
            (static shapes, no host synchronisation), no callback or
            trajectory, and an explicit seed for em/churn (a graph replays its
            noise). The first call runs the loop twice (warm-up, capture).
        per_sample_seeds: instead of `seed`, one seed per sample (B ints or a
            (B,) int64 tensor): sample b's noise is then that of a batch of one
            with seed per_sample_seeds[b] (offsets 0, m, 2m, ..., m =
            x_init[0].numel()), so a sample does not change with the batch it
            is drawn in or its position there.

    Order fallbacks, decided from the grid before the loop: Heun takes an
    Euler step where the conversion at the step's end divides by zero (e.g.
    an x1 or score model at sigma = 0, t = 1); DPM-Solver++(2M) takes a
    first-order step first and from a time where alpha = 0 (the
    data-form DDIM step, which is its limit), and the kernel takes a first
    order step into sigma = 0. A prediction the method cannot convert at a
    time on the grid (e.g. eps at alpha = 0) is a ValueError before any
    model call.

    Errors: unknown method/prediction/grid, steps < 1, a grid that is not
    increasing or outside [0, 1], a model output of the wrong shape, dtype or
    device (checked on the first call, metadata only), guidance without a
    (cond, uncond) pair. With FLOWKERN_DEBUG=1 a model output with NaN
    raises a ValueError naming the step and time; without it (a per-step
    check costs a full pass per model call) NaN samples on CPU raise a
    ValueError at the end that says how to find the step.

    Returns:
        the final state (B, ...) in x_init's dtype, or (final, trajectory).
    """
    V.tensor("x_init", x_init)
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    plan = _Plan(x_init, schedule, method, steps, grid, prediction, guidance, churn, seed, g,
                 t_start, t_end, backend, per_sample_seeds)
    if cuda_graph:
        if callback is not None or return_trajectory:
            raise ValueError("cuda_graph: callback and return_trajectory run Python code per "
                             "step and cannot be captured; use cuda_graph=False with them")
        if plan.needs_noise and seed is None and per_sample_seeds is None:
            raise ValueError("seed: cuda_graph=True with noise (method='em' or churn > 0) needs "
                             "an explicit seed: a captured graph replays the same noise")
        return _run_graphed(plan, model, x_init)
    trajectory = [] if return_trajectory else None
    bar = progress_bar(plan.n, progress, desc=f"flowkern {method}", leave=False)
    try:
        loop = _Loop(plan, model, x_init, _checks_on(x_init), callback, trajectory, bar)
        out = loop.run(x_init)
    finally:
        if bar is not None:
            bar.close()
    if not loop.checks and V.values_checked(out) and _has_nan(out):
        raise ValueError("model: the samples contain NaN (the model returned NaN at some step); "
                         "rerun with FLOWKERN_DEBUG=1 to find the step and time")
    return (out, trajectory) if return_trajectory else out
