"""The plan of a sampling loop (flowkern.sampling): the grid, churn, each
step's kernel, the step tables and the model's time vectors, all decided on
the host before the loop (docs/design.md §4 "Sampling")."""
from __future__ import annotations

import math

import torch

from .. import _validate as V
from .._rules import DIVIDES, default_form
from ..backend import resolve
from ..grids import make_grid, sigma_k, t_from_sigma_k
from ..ops.steps import noise_stream, step_table
from ..schedules import evaluate, get_schedule

METHODS = ("euler", "heun", "ei", "dpmpp_2m", "em")
DEFAULT_STEPS = 50


# ---------------------------------------------------------------------------
# which conversions divide by what


def _divisors(src: str, dst: str) -> set:
    """The ops' rule (flowkern._rules.DIVIDES), and one of the sampler's own: a
    score model is not evaluated where sigma = 0 (the score of the data is
    infinite there), except to convert it to eps (-sigma score), as before
    this rule book; Heun then takes an Euler step into sigma = 0."""
    need = set(DIVIDES[src, dst])
    if src == "score" and dst not in ("score", "eps"):
        need.add("sigma")
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


class Plan:
    """Everything a sampling loop needs that depends only on the grid, decided
    on the host before the loop: the grid, EDM churn times, each step's kernel
    (the order fallbacks), the step tables, the model's time vectors and the
    noise stream. A time where the method cannot convert the prediction is a
    ValueError here, before any model call."""

    def __init__(self, x, schedule, method, steps, grid, prediction, guidance, churn, seed, g,
                 t_start, t_end, backend, per_sample_seeds=None):
        if method not in METHODS:
            raise ValueError(f"method: unknown method {method!r}; expected one of {METHODS}")
        V.prediction("prediction", prediction)
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
        self.form = default_form(p)
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
