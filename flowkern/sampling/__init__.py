"""Sampling loops over the fused step ops (docs/design.md §4 "Sampling"), one
short function per method in k-diffusion's shape: sample_euler, sample_heun,
sample_ei, sample_dpmpp_2m, sample_em; :func:`sample` dispatches to them.

Everything that depends only on the grid is decided on the host before the
loop (plan.py): the grid, one step table for all steps, the churn times and
their table, which steps fall back to a lower order, the model's time
vectors and the Philox noise offsets. A loop then only calls the model and
one fused kernel per stage, updating one state buffer in place (run.py).
It never synchronises with the host on GPU, so it can be captured in a CUDA
graph (``cuda_graph=True``, graphs.py). With FLOWKERN_DEBUG=1 each model
output is checked for NaN (one reduction per call); otherwise CPU samples
are checked once, at the end.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from .._progress import progress_bar
from ..ops.steps import dpmpp_2m_step, ei_step, em_step, euler_step, heun_step
from .graphs import clear_graph_cache, run_graphed
from .plan import METHODS, Plan, clear_plan_cache
from .run import Run, checks_on, has_nan

__all__ = ["sample", "sample_euler", "sample_heun", "sample_ei", "sample_dpmpp_2m", "sample_em",
           "METHODS", "clear_graph_cache", "clear_plan_cache"]


def _euler(run, x):
    """x <- x + (t_{i+1} - t_i) u(x, t_i): one fused pass a step."""
    for i in range(run.n):
        x = run.churn(i, x)
        pc, pu = run.model(x, i)
        x = euler_step(x, pc, pred_uncond=pu, table=run.table[i], out=run.buf, **run.kw)
        run.record(i, x)
    return x


def _heun(run, x):
    """Euler to x_e, the model there, then the trapezoid (two fused passes);
    Euler alone where the conversion at t_{i+1} divides by 0 (the plan)."""
    for i in range(run.n):
        x = run.churn(i, x)
        pc, pu = run.model(x, i)
        if run.kind[i] == "euler":
            x = euler_step(x, pc, pred_uncond=pu, table=run.table[i], out=run.buf, **run.kw)
        else:
            euler_step(x, pc, pred_uncond=pu, table=run.table[i], out=run.xe, **run.kw)
            pe, peu = run.model(run.xe, i, end=True)
            x = heun_step(x, pc, run.xe, pe, pred_uncond=pu, pred_euler_uncond=peu,
                          table=run.table[i], out=run.buf, **run.kw)
        run.record(i, x)
    return x


def _ei(run, x):
    """The first-order exponential integrator (DDIM): data form for x1 and
    velocity predictions, noise form for eps and score."""
    for i in range(run.n):
        x = run.churn(i, x)
        pc, pu = run.model(x, i)
        x = ei_step(x, pc, pred_uncond=pu, form=run.p.form, table=run.table[i], out=run.buf,
                    **run.kw)
        run.record(i, x)
    return x


def _dpmpp_2m(run, x):
    """DPM-Solver++(2M): first order at the first step and after a pure-noise
    level ("dpm1"), the data-form DDIM step from alpha = 0 ("ei"), second
    order with the previous d otherwise ("dpm2"); run.d holds d."""
    for i in range(run.n):
        x = run.churn(i, x)
        pc, pu = run.model(x, i)
        if run.kind[i] == "ei":
            x = ei_step(x, pc, pred_uncond=pu, form="data", table=run.table[i], out=run.buf,
                        **run.kw)
        else:
            x, _ = dpmpp_2m_step(x, pc, d_prev=run.d if run.kind[i] == "dpm2" else None,
                                 pred_uncond=pu, table=run.table[i], out=run.buf, d_out=run.d,
                                 **run.kw)
        run.record(i, x)
    return x


def _em(run, x):
    """Euler-Maruyama for dX = [u + g^2/2 score] dt + g dW, its noise drawn in
    the kernel (one fused pass a step)."""
    for i in range(run.n):
        x = run.churn(i, x)
        pc, pu = run.model(x, i)
        x = em_step(x, pc, pred_uncond=pu, **run.noise(), table=run.table[i], out=run.buf,
                    **run.kw)
        run.record(i, x)
    return x


_LOOPS = {"euler": _euler, "heun": _heun, "ei": _ei, "dpmpp_2m": _dpmpp_2m, "em": _em}


def _sample(model, x_init, method, schedule="linear", steps=None, grid="uniform",
            prediction="velocity", guidance=None, churn=0.0, seed=None, progress=True,
            callback=None, return_trajectory=False, t_start=0.0, t_end=1.0, g=1.0,
            backend=None, cuda_graph=False, per_sample_seeds=None):
    V.tensor("x_init", x_init)
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    plan = Plan(x_init, schedule, method, steps, grid, prediction, guidance, churn, seed, g,
                t_start, t_end, backend, per_sample_seeds)
    loop = _LOOPS[method]
    if cuda_graph:
        if callback is not None or return_trajectory:
            raise ValueError("cuda_graph: callback and return_trajectory run Python code per "
                             "step and cannot be captured; use cuda_graph=False with them")
        if plan.needs_noise and seed is None and per_sample_seeds is None:
            raise ValueError("seed: cuda_graph=True with noise (method='em' or churn > 0) needs "
                             "an explicit seed: a captured graph replays the same noise")
        return run_graphed(plan, model, x_init, loop)
    trajectory = [] if return_trajectory else None
    bar = progress_bar(plan.n, progress, desc=f"flowkern {method}", leave=False)
    try:
        run = Run(plan, model, x_init, checks_on(x_init), callback, trajectory, bar)
        out = run(loop, x_init)
    finally:
        if bar is not None:
            bar.close()
    if not run.checks and V.values_checked(out) and has_nan(out):
        raise ValueError("model: the samples contain NaN (the model returned NaN at some step); "
                         "rerun with FLOWKERN_DEBUG=1 to find the step and time")
    return (out, trajectory) if return_trajectory else out


def _public(method, loop):
    """sample_<method>(model, x_init, schedule, steps, grid, **options): the
    loop `loop` (its docstring) with sample()'s options (g: em only)."""
    @torch.no_grad()
    def sample_method(model, x_init, schedule="linear", steps=None, grid="uniform", **options):
        if method != "em" and "g" in options:
            raise TypeError("g: only method 'em' takes a diffusion coefficient")
        return _sample(model, x_init, method, schedule, steps, grid, **options)
    sample_method.__name__ = sample_method.__qualname__ = f"sample_{method}"
    sample_method.__doc__ = (f"{loop.__doc__}\n\n    sample(model, x_init, schedule, "
                             f"method={method!r}, steps, grid, **options): the options as "
                             f":func:`sample`.")
    return sample_method


sample_euler = _public("euler", _euler)
sample_heun = _public("heun", _heun)
sample_ei = _public("ei", _ei)
sample_dpmpp_2m = _public("dpmpp_2m", _dpmpp_2m)
sample_em = _public("em", _em)


@torch.no_grad()
def sample(model, x_init, schedule="linear", method="euler", steps=None, grid="uniform",
           prediction="velocity", guidance=None, churn=0.0, seed=None, progress=True,
           callback=None, return_trajectory=False, t_start=0.0, t_end=1.0, g=1.0,
           backend=None, cuda_graph=False, per_sample_seeds=None):
    """Integrate from noise x_init at t_start toward data at t_end (t = 0 is
    noise, t = 1 data; docs/design.md §1) with fused steps: the method's
    sample_* function (sample_euler, sample_heun, sample_ei, sample_dpmpp_2m,
    sample_em).

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
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {METHODS}")
    return _sample(model, x_init, method, schedule, steps, grid, prediction, guidance, churn,
                   seed, progress, callback, return_trajectory, t_start, t_end, g, backend,
                   cuda_graph, per_sample_seeds)
