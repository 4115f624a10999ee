"""The plan of a sampling loop (flowkern.sampling): the grid, churn, each
step's kernel, the step tables and the model's time vectors, all decided on
the host before the loop (docs/design.md §4 "Sampling")."""
from __future__ import annotations

import collections
import math

import torch

from .. import _validate as V
from .._rules import DIVIDES, default_form
from ..backend import resolve
from ..grids import make_grid, sigma_k, t_from_sigma_k
from ..ops.steps import noise_stream, step_table
from ..schedules import evaluate, get_schedule, native_spec

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
# plans already built: a sampler called again with the same arguments (the
# next batch) reuses the grid, the step tables (already on the device) and the
# step kinds instead of rebuilding them (~0.35 ms of host time at 20 steps
# here); the noise stream and the model's time vectors stay per run.

_PLANS: collections.OrderedDict = collections.OrderedDict()
_MAX_PLANS = 64


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cache_key(schedule, method, steps, grid, prediction, guidance, churn, g, t_start, t_end,
               backend, acc, device):
    """The key of a plan's grid part, or None where the arguments are not
    plain values (a grid tensor, a callable or tensor g, a schedule other than
    a built-in one: these may change between calls without a new identity)."""
    if not (isinstance(grid, str) and isinstance(steps, int) and not isinstance(steps, bool)
            and _number(t_start) and _number(t_end)):
        return None
    if method == "em":
        if not _number(g):
            return None
        g = float(g)
    else:
        g = None  # only em reads it
    spec = native_spec(schedule)  # a built-in's kind and parameters determine it
    if spec is None:
        return None
    return ((spec[0], tuple(spec[1])), method, steps, grid, prediction, guidance, float(churn), g, float(t_start),
            float(t_end), backend, acc, device)


def clear_plan_cache():
    """Drop the plans the samplers keep for repeated calls."""
    _PLANS.clear()


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
        self.method, self.prediction = method, prediction
        self.guidance = None if guidance is None else float(guidance)
        self.backend = resolve(backend, x.device)
        self.acc = V.acc_dtype(x.dtype)
        key = _cache_key(schedule, method, steps, grid, prediction, self.guidance, churn, g,
                         t_start, t_end, self.backend, self.acc, x.device)
        shared = _PLANS.get(key) if key is not None else None
        if shared is None:
            shared = self._build(x, schedule, steps, grid, churn, g, t_start, t_end)
            if key is not None:
                _PLANS[key] = shared
                if len(_PLANS) > _MAX_PLANS:
                    _PLANS.popitem(last=False)
        else:
            _PLANS.move_to_end(key)
        self.__dict__.update(shared)
        self.needs_noise = method == "em" or any(self.churn_at)
        self.noise = noise_stream(seed, per_sample_seeds, x, self.needs_noise)
        # the model's time vectors, fresh for each run (a model may write into
        # its t): row i = t_hat_i, row n + i = t_{i+1}
        self.t_model = self.times[:, None].expand(2 * self.n, x.shape[0]).contiguous().to(
            x.device)

    def _build(self, x, schedule, steps, grid, churn, g, t_start, t_end) -> dict:
        """What the plan takes from the grid, the same for every run with
        these arguments (_cache_key): {attribute: value}, none of which a run
        writes into."""
        method, prediction = self.method, self.prediction
        sched = get_schedule(schedule)
        ts = make_grid(grid, sched, steps, t_start, t_end)        # float64, CPU
        n = ts.numel() - 1

        # EDM churn: sigma_k -> sigma_k (1 + gamma) at an earlier time t_hat <= t.
        t_hat = ts[:-1].clone()
        churn_at = [False] * n
        if churn > 0:
            gamma = min(churn / n, math.sqrt(2.0) - 1.0)
            sk = sigma_k(sched, ts[:-1])
            ok = torch.isfinite(sk) & (sk > 0)
            if bool(ok.any()):
                th = t_from_sigma_k(sched, sk[ok] * (1.0 + gamma))
                t_hat[ok] = torch.minimum(th, ts[:-1][ok])
            churn_at = (t_hat < ts[:-1]).tolist()
        # t_hat: where each step starts (and the model runs)

        # coefficients at every evaluation time, float64 on the host
        c_t = torch.stack(evaluate(sched, t_hat, torch.float64), 1).tolist()
        c_s = torch.stack(evaluate(sched, ts[1:], torch.float64), 1).tolist()
        p = prediction
        kinds = []                                # per step: which kernel(s) run
        form = default_form(p)
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
                dst = "x1" if form == "data" else "eps"
                extra = ["sigma"] if form == "data" else ["alpha"]
                bad, kind = _defined(c_t[i], p, [dst], extra), "ei"
            else:  # dpmpp_2m
                prev_special = i > 0 and kinds[i - 1] == "ei"
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
            kinds.append(kind)

        # g for Euler-Maruyama: float, (steps,) tensor, or callable of t
        g_col = None
        if method == "em":
            if callable(g):
                g_col = torch.as_tensor(g(t_hat.clone()), dtype=torch.float64).reshape(-1)
            elif isinstance(g, torch.Tensor):
                g_col = g.detach().to("cpu", torch.float64).reshape(-1)
            elif _number(g):
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
        table64 = step_table(sched, t_hat, ts[1:], t_prev, g_col, torch.float64, "cpu",
                             check=False)  # the grid was validated above
        churn_table = (step_table(sched, ts[:-1], t_hat, None, None, torch.float64, "cpu",
                                  check=False).to(dev, self.acc)
                       if any(churn_at) else None)
        times = torch.cat([t_hat, ts[1:]]).to(self.acc)
        return dict(sched=sched, grid=ts, n=n, t_hat=t_hat, churn_at=churn_at, kind=kinds,
                    form=form, table64=table64, table=table64.to(dev, self.acc),
                    churn_table=churn_table, times=times, t_host=times.tolist())

    def key(self):
        return (self.method, self.prediction, self.guidance, self.noise.seed,
                self.noise.seeds is None,
                self.backend,
                tuple(self.grid.tolist()), tuple(self.t_hat.tolist()), repr(self.sched),
                tuple(self.table64.flatten().tolist()))
