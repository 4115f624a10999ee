"""Time grids for the samplers (docs/design.md §1: t in [0, 1], t = 0 noise, t = 1 data).

A grid is an increasing float64 CPU tensor ``t_0 < t_1 < ... < t_N`` in
[0, 1]; a sampler steps from t_i to t_{i+1}. Built-in spacings:

- ``uniform``: equal steps in t.
- ``karras``: the EDM spacing (Karras et al. 2022, rho = 7) of the
  k-diffusion noise level sigma_k = sigma_t / alpha_t (docs/design.md §1), mapped back
  to t for the schedule (closed form for the built-in schedules, bisection
  for any other schedule with sigma_k decreasing in t).
- ``logsnr``: equal steps in lambda = log(alpha_t / sigma_t) = -log sigma_k.

Endpoints. Where the schedule reaches pure noise (alpha_t = 0, sigma_k = inf,
e.g. t = 0 on ``linear``/``cosine``) or clean data (sigma_t = 0, sigma_k = 0,
t = 1 on most schedules), a spacing in sigma_k cannot reach the endpoint. As
in k-diffusion (``get_sigmas_karras`` + ``append_zero``), such an endpoint,
and any endpoint beyond [sigma_min, sigma_max] (default [0.002, 80], EDM's),
stays in the grid as its own point and the spaced points run between
sigma_max and sigma_min. Call :func:`karras` / :func:`logsnr` with other
bounds and pass the tensor to change them.
"""
from __future__ import annotations

import math

import torch

from .schedules import EDM, VE, VP, Cosine, Linear, Polynomial, get_schedule

GRIDS = ("uniform", "karras", "logsnr")
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

__all__ = ["GRIDS", "make_grid", "uniform", "karras", "logsnr", "sigma_k", "t_from_sigma_k"]


def _f64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu()


def sigma_k(schedule, t) -> torch.Tensor:
    """k-diffusion / EDM noise level sigma_t / alpha_t at times t (float64;
    inf where alpha_t = 0)."""
    t = _f64(t)
    alpha, sigma = get_schedule(schedule)(t)[:2]
    alpha, sigma = alpha.to(torch.float64), sigma.to(torch.float64)
    out = sigma / alpha
    return torch.where(alpha == 0, torch.full_like(out, math.inf), out)


def t_from_sigma_k(schedule, sig) -> torch.Tensor:
    """The time t in [0, 1] where sigma_t / alpha_t = sig (float64): closed
    form for the built-in schedules, else bisection (sigma_k must decrease in t)."""
    sched = get_schedule(schedule)
    sig = _f64(sig)
    kind = type(sched)
    if kind is Linear:
        t = 1.0 / (1.0 + sig)
    elif kind is Polynomial:
        t = (1.0 / (1.0 + sig)) ** (1.0 / sched.n)
    elif kind is Cosine:
        t = (2.0 / math.pi) * torch.atan2(torch.ones_like(sig), sig)
    elif kind is VE:
        t = 1.0 - torch.log(sig / sched.sigma_min) / math.log(sched.sigma_max / sched.sigma_min)
    elif kind is EDM:
        lo, hi = sched.sigma_min ** (1 / sched.rho), sched.sigma_max ** (1 / sched.rho)
        t = (sig ** (1 / sched.rho) - hi) / (lo - hi)
    elif kind is VP:
        # alpha^2 = 1 / (1 + sig^2): quarter s^2 (bmax - bmin) + half s bmin = half log1p(sig^2)
        L = torch.log1p(sig * sig)
        a, b = 0.25 * (sched.beta_max - sched.beta_min), 0.5 * sched.beta_min
        if a == 0:
            s = 0.5 * L / b
        else:
            s = (-b + torch.sqrt(b * b + 2.0 * a * L)) / (2.0 * a)
        t = 1.0 - s
    else:
        lo, hi = torch.zeros_like(sig), torch.ones_like(sig)
        for _ in range(64):          # float64: 2^-64 of the interval
            mid = 0.5 * (lo + hi)
            above = sigma_k(sched, mid) > sig      # sigma_k decreasing: the root is later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        t = 0.5 * (lo + hi)
    return torch.nan_to_num(t, nan=0.0).clamp(0.0, 1.0)


def uniform(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> torch.Tensor:
    """steps + 1 equally spaced times from t_start to t_end."""
    g = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    g[0], g[-1] = t_start, t_end
    return g


def _spaced(schedule, steps, t_start, t_end, ramp, sigma_min, sigma_max):
    """steps + 1 times whose sigma_k follow ramp(hi, lo, m) (m points, hi -> lo)."""
    sched = get_schedule(schedule)
    s_hi, s_lo = sigma_k(sched, [t_start, t_end]).tolist()
    # An endpoint beyond [sigma_min, sigma_max] (pure noise sigma_k = inf, clean
    # data sigma_k = 0, or just very far) stays in the grid as its own point and
    # the spaced points stop at sigma_max / sigma_min.
    head = not math.isfinite(s_hi) or (s_hi > sigma_max and s_lo < sigma_max)
    tail = not s_lo > 0 or (s_lo < sigma_min and s_hi > sigma_min)
    hi = s_hi if not head else (sigma_max if (tail or s_lo < sigma_max) else 10.0 * s_lo)
    lo = s_lo if not tail else (sigma_min if hi > sigma_min else hi / 10.0)
    m = steps + 1 - head - tail
    if m <= 0:
        return torch.tensor([t_start, t_end], dtype=torch.float64)
    if m == 1:
        sig = torch.tensor([lo if head and not tail else hi], dtype=torch.float64)
    else:
        sig = ramp(hi, lo, m)
    mid = t_from_sigma_k(sched, sig)
    if not head:
        mid[0] = t_start
    if not tail:
        mid[-1] = t_end
    parts = ([_f64(t_start)] if head else []) + [mid] + ([_f64(t_end)] if tail else [])
    return torch.cat(parts)


def karras(schedule, steps: int, t_start: float = 0.0, t_end: float = 1.0,
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
           rho: float = RHO) -> torch.Tensor:
    """EDM spacing: sigma_k,i = (hi^(1/rho) + i/(m-1) (lo^(1/rho) - hi^(1/rho)))^rho,
    hi/lo = sigma_k at t_start/t_end (sigma_max/sigma_min where those are
    infinite/zero, the endpoint then kept as its own point), mapped to t."""
    def ramp(hi, lo, m):
        r = torch.linspace(0, 1, m, dtype=torch.float64)
        a, b = hi ** (1 / rho), lo ** (1 / rho)
        return (a + r * (b - a)) ** rho
    return _spaced(schedule, steps, t_start, t_end, ramp, sigma_min, sigma_max)


def logsnr(schedule, steps: int, t_start: float = 0.0, t_end: float = 1.0,
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Equal steps in lambda = log(alpha/sigma) = -log sigma_k (DPM-Solver's
    spacing); infinite endpoints as in :func:`karras`."""
    def ramp(hi, lo, m):
        return torch.exp(torch.linspace(math.log(hi), math.log(lo), m, dtype=torch.float64))
    return _spaced(schedule, steps, t_start, t_end, ramp, sigma_min, sigma_max)


def make_grid(grid, schedule="linear", steps=None, t_start: float = 0.0,
              t_end: float = 1.0) -> torch.Tensor:
    """The validated float64 CPU grid (steps + 1 increasing times in [0, 1]).

    grid: "uniform" | "karras" | "logsnr" (with `steps`, t_start < t_end), or
    an increasing 1-D tensor/sequence of times in [0, 1] (then `steps` is
    len - 1 and t_start/t_end are not used).
    """
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"grid: unknown grid {grid!r}; expected one of {GRIDS} or an "
                             f"increasing tensor of times in [0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps: expected an int >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps}")
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: expected a float in [0, 1] (0 = noise, 1 = data), "
                                 f"got {v!r}")
        if not t_start < t_end:
            raise ValueError(f"t_start, t_end: need t_start < t_end (sampling runs from noise "
                             f"at 0 toward data at 1), got {t_start} and {t_end}")
        t_start, t_end = float(t_start), float(t_end)
        if grid == "uniform":
            g = uniform(steps, t_start, t_end)
        elif grid == "karras":
            g = karras(schedule, steps, t_start, t_end)
        else:
            g = logsnr(schedule, steps, t_start, t_end)
        if not bool((g[1:] > g[:-1]).all()):
            raise ValueError(f"grid: the {grid!r} grid of {steps} steps on [{t_start}, {t_end}] "
                             f"is not strictly increasing for this schedule (too many steps "
                             f"for the range, or sigma_t/alpha_t is not decreasing in t); "
                             f"use grid='uniform' or pass a tensor")
        return g
    if isinstance(grid, (list, tuple)):
        grid = torch.tensor(grid, dtype=torch.float64)
    if not isinstance(grid, torch.Tensor):
        raise TypeError(f"grid: expected a name {GRIDS} or a 1-D tensor of times, "
                        f"got {type(grid).__name__}")
    if not grid.is_floating_point() or grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid: expected a 1-D floating tensor of at least 2 times, got "
                         f"{grid.dtype} of shape {tuple(grid.shape)}")
    g = grid.detach().to("cpu", torch.float64)     # one copy, before any sampling loop
    if steps is not None and steps != g.numel() - 1:
        raise ValueError(f"steps: {steps} disagrees with the grid's {g.numel()} times "
                         f"({g.numel() - 1} steps); leave steps=None with a tensor grid")
    if not bool(((g >= 0) & (g <= 1)).all()):
        raise ValueError(f"grid: times must lie in [0, 1] (0 = noise, 1 = data); got values "
                         f"in [{g.min().item():g}, {g.max().item():g}]")
    if not bool((g[1:] > g[:-1]).all()):
        i = int(torch.nonzero(~(g[1:] > g[:-1]))[0])
        raise ValueError(f"grid: times must be strictly increasing (noise -> data); "
                         f"t[{i}] = {g[i].item():g} >= t[{i + 1}] = {g[i + 1].item():g}")
    return g
