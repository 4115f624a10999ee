"""What every sampling loop shares (flowkern.sampling): the state buffers it
updates in place, the model calls with their checks, churn and the noise
draws, and the per-step bookkeeping (callback, trajectory, progress).

The buffers: one state buffer, plus Heun's predictor and DPM-Solver's d when
the plan needs them. Every step reads each element before it writes it, in
the same thread, so out may equal x (and d_out d_prev). The first step reads
x_init and writes the buffer, which becomes the result: no copy, and the
only full-size allocation that is not a scratch buffer.
"""
from __future__ import annotations

import os

import torch

from .. import _validate as V
from ..ops._registry import empty_output
from ..ops.steps import churn as _churn


class Run:
    """One run of a plan: the method's loop calls run.churn, run.model, a
    fused step into run.buf, then run.record, for each step i < run.n."""

    def __init__(self, plan, model, x_init, checks, callback=None, trajectory=None, bar=None):
        self.p, self.n, self.table, self.kind = plan, plan.n, plan.table, plan.kind
        self.model_fn, self.checks = model, checks
        self.callback, self.trajectory, self.bar = callback, trajectory, bar
        self.kw = dict(prediction=plan.prediction, guidance=plan.guidance, backend=plan.backend)
        self.buf = empty_output(x_init)
        self.xe = empty_output(self.buf) if "heun" in plan.kind else None
        self.d = empty_output(self.buf) if plan.method == "dpmpp_2m" else None
        self.first_call = True
        self.draws = 0  # the noise draws so far (flowkern.ops.steps.NoiseStream)

    def noise(self):
        """The next draw's noise arguments (em_step, churn)."""
        self.draws += 1
        return self.p.noise.at(self.draws - 1)

    def churn(self, i, x):
        """x renoised from t_i to the plan's t_hat_i (EDM churn), or x."""
        if not self.p.churn_at[i]:
            return x
        return _churn(x, table=self.p.churn_table[i], **self.noise(), out=self.buf,
                      backend=self.p.backend)

    def model(self, x, i, end=False):
        """(cond, uncond or None): the model at t_hat_i, or at t_{i+1} (end)."""
        p = self.p
        row = p.n + i if end else i
        with V.values_prechecked(False):  # the model's own flowkern calls are checked
            out = self.model_fn(x, p.t_model[row])
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
            _check_prediction(pc, pu, x)
            self.first_call = False
        if self.checks:
            for v in (pc, pu):
                if v is not None and has_nan(v):
                    raise ValueError(f"model: returned NaN at step {i} of {p.n} "
                                     f"(t={p.t_host[row]:g}, the first time it happened)")
        return pc, pu

    def record(self, i, x):
        """After step i: the trajectory, the callback, the progress bar."""
        if self.trajectory is not None:
            self.trajectory.append(x.clone())
        if self.callback is not None:
            with V.values_prechecked(False):
                self.callback(i, self.p.t_host[self.p.n + i], x)
        if self.bar is not None:
            self.bar.update(1)

    def __call__(self, loop, x_init):
        """loop(run, x_init) -> the final state, its fused steps' value checks
        off: the plan checked the grid's divisions before the loop."""
        if self.trajectory is not None:
            self.trajectory.append(x_init.clone())
        with V.values_prechecked():
            return loop(self, x_init)


def _check_prediction(pc, pu, x):
    for name, v in (("model", pc), ("model (uncond)", pu)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor prediction, got {type(v).__name__}")
        if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise ValueError(
                f"{name}: the prediction must match the state in shape, dtype and "
                f"device; got {tuple(v.shape)} {v.dtype} {v.device}, the state is "
                f"{tuple(x.shape)} {x.dtype} {x.device}")


def has_nan(v):
    # One reduction instead of a full-size isnan mask; confirm on the rare hit
    # (a sum can be NaN from +inf and -inf, or overflow to inf).
    s = v.sum()
    if bool(torch.isfinite(s)):
        return False
    return bool(torch.isnan(v).any())


def checks_on(x):
    """Per-step NaN checks cost a full pass over every model output (as much as
    the fused step itself), so they run only in debug mode; on CPU the final
    state is checked once instead (flowkern.sampling.sample)."""
    return os.environ.get("FLOWKERN_DEBUG") == "1" and not torch.compiler.is_compiling()
