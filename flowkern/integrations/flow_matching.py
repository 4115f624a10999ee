"""flow_matching-compatible path and ODE solver backed by flowkern.

flow_matching (facebookresearch) uses flowkern's convention as is (docs/design.md
§1: x_t = alpha_t x1 + sigma_t x0, t = 0 noise), so nothing is remapped:

- :class:`AffineProbPath` / :class:`CondOTProbPath`: ``sample(x_0, x_1, t)``
  returns a PathSample (x_1, x_0, t, x_t, dx_t) from ONE fused pass
  (:func:`flowkern.interpolate`, differentiable in x_0 and x_1); the
  conversions (``target_to_velocity`` and friends) are :func:`flowkern.convert`.
  The scheduler may be a flow_matching scheduler (anything returning an object
  with alpha_t, sigma_t, d_alpha_t, d_sigma_t) or a flowkern schedule / name.
- :class:`ODESolver`: ``sample(x_init, step_size, method, time_grid=...)`` and
  ``compute_likelihood(x_1, log_p0, step_size, ...)`` over a velocity model
  called as ``velocity_model(x=x, t=t, **model_extras)`` with a 0-dim t, like
  flow_matching's (every extra keyword goes to the model; flowkern's backend
  is an argument of the constructor). Fixed-step methods "euler", "midpoint"
  and "heun2" run on the fused Euler/Heun steps; the step grid and the linear
  interpolation onto time_grid follow torchdiffeq exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import acc_dtype
from ..ops.steps import euler_step, heun_step, step_table
from ..ops.training import convert, interpolate
from ..schedules import Schedule, get_schedule

try:  # use flow_matching's own output class when it is installed
    from flow_matching.path.path_sample import PathSample
except ImportError:  # pragma: no cover - exercised without the peer
    @dataclass
    class PathSample:
        x_1: torch.Tensor
        x_0: torch.Tensor
        t: torch.Tensor
        x_t: torch.Tensor
        dx_t: torch.Tensor

__all__ = ["AffineProbPath", "CondOTProbPath", "ODESolver", "PathSample", "as_schedule"]


class _FMSchedule(Schedule):
    """A flow_matching scheduler as a flowkern schedule."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __call__(self, t):
        out = self.scheduler(t)
        return out.alpha_t, out.sigma_t, out.d_alpha_t, out.d_sigma_t

    def alpha_sigma(self, t):
        out = self.scheduler(t)
        return out.alpha_t, out.sigma_t

    def __repr__(self):
        return f"FlowMatchingScheduler({self.scheduler!r})"


def as_schedule(scheduler):
    """A flowkern schedule from a flowkern name/schedule or a flow_matching
    scheduler (an object whose call returns alpha_t, sigma_t, d_alpha_t, d_sigma_t)."""
    if isinstance(scheduler, (str, Schedule)):
        return get_schedule(scheduler)
    if callable(scheduler) and type(scheduler).__module__.startswith("flow_matching"):
        return _FMSchedule(scheduler)
    if callable(scheduler):
        probe = scheduler(torch.zeros(1))
        if all(hasattr(probe, k) for k in ("alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t")):
            return _FMSchedule(scheduler)
        return get_schedule(scheduler)
    raise TypeError(f"scheduler: expected a flow_matching scheduler or a flowkern schedule, "
                    f"got {type(scheduler).__name__}")


def _t_rows(t, x):
    """t as a float, or a (B,) tensor (accepting flow_matching's (B, 1, ..., 1))."""
    if isinstance(t, torch.Tensor) and t.dim() > 1 and t.numel() == x.shape[0]:
        return t.reshape(-1)
    return t


class AffineProbPath:
    """flow_matching's AffineProbPath on flowkern's fused interpolation."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.schedule = as_schedule(scheduler)

    def assert_sample_shape(self, x_0, x_1, t):
        if not (isinstance(t, torch.Tensor) and t.dim() == 1):
            raise ValueError(f"t: the time vector must have shape [batch_size], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.shape[0] == x_0.shape[0] == x_1.shape[0]:
            raise ValueError(f"t: time dimension must match the batch size [{x_1.shape[0]}], "
                             f"got {tuple(t.shape)}")

    def sample(self, x_0, x_1, t) -> PathSample:
        """x_t = alpha_t x_1 + sigma_t x_0 and dx_t = d_alpha_t x_1 + d_sigma_t x_0
        in one fused pass."""
        self.assert_sample_shape(x_0, x_1, t)
        x_t, dx_t = interpolate(x_0, x_1, t, self.schedule, target="velocity")
        return PathSample(x_t=x_t, dx_t=dx_t, x_1=x_1, x_0=x_0, t=t)

    def _convert(self, pred, x_t, t, src, dst):
        return convert(pred, x_t, _t_rows(t, x_t), self.schedule, src=src, dst=dst)

    def target_to_velocity(self, x_1, x_t, t):
        return self._convert(x_1, x_t, t, "x1", "velocity")

    def epsilon_to_velocity(self, epsilon, x_t, t):
        return self._convert(epsilon, x_t, t, "eps", "velocity")

    def velocity_to_target(self, velocity, x_t, t):
        return self._convert(velocity, x_t, t, "velocity", "x1")

    def epsilon_to_target(self, epsilon, x_t, t):
        return self._convert(epsilon, x_t, t, "eps", "x1")

    def velocity_to_epsilon(self, velocity, x_t, t):
        return self._convert(velocity, x_t, t, "velocity", "eps")

    def target_to_epsilon(self, x_1, x_t, t):
        return self._convert(x_1, x_t, t, "x1", "eps")


class CondOTProbPath(AffineProbPath):
    """The CondOT (linear, rectified flow) path: alpha_t = t, sigma_t = 1 - t."""

    def __init__(self):
        super().__init__("linear")


_METHODS = ("euler", "midpoint", "heun2")


def _grid_from_step_size(t, step_size):
    """torchdiffeq's fixed grid: start + k * step_size, the last point = end
    (built on -t for a decreasing time_grid, as torchdiffeq does)."""
    rev = len(t) > 1 and bool(t[0] > t[1])
    tt = -t if rev else t
    start, end = tt[0], tt[-1]
    niters = torch.ceil((end - start) / step_size + 1).item()
    grid = torch.arange(0, niters, dtype=tt.dtype, device=tt.device) * step_size + start
    grid[-1] = tt[-1]
    return -grid if rev else grid


class ODESolver:
    """flow_matching's ODESolver for fixed-step methods, on the fused steps.

    Args:
        velocity_model: called as ``velocity_model(x=x, t=t, **model_extras)``
            with t a 0-dim tensor; returns u_t(x).
        backend: flowkern's backend for the fused steps (default: auto). It is
            an argument of the solver, not of ``sample``: every keyword of
            ``sample`` past the peer's own goes to the model, as in
            flow_matching.
    """

    def __init__(self, velocity_model, *, backend=None):
        self.velocity_model = velocity_model
        self.backend = backend

    def sample(self, x_init, step_size, method="euler", atol=1e-5, rtol=1e-5,
               time_grid=torch.tensor([0.0, 1.0]), return_intermediates=False,
               enable_grad=False, **model_extras):
        """Solve dx/dt = u_t(x) from time_grid[0] to time_grid[-1].

        step_size: fixed step (the grid is start + k step_size, as in
        torchdiffeq), or None to step on time_grid itself. method: "euler",
        "midpoint" or "heun2" (adaptive methods: use flow_matching's solver).
        atol/rtol are accepted for compatibility and unused. Returns the final
        state, or with return_intermediates the states at every time_grid point
        (linear interpolation between solver steps, as torchdiffeq), stacked.
        """
        grid, time_grid = self._grid(x_init, step_size, method, time_grid, enable_grad)
        with torch.no_grad():
            x, _ = self._integrate(x_init, grid, time_grid, method, return_intermediates,
                                   model_extras)
        return x

    def compute_likelihood(self, x_1, log_p0, step_size, method="euler", atol=1e-5, rtol=1e-5,
                           time_grid=torch.tensor([1.0, 0.0]), return_intermediates=False,
                           exact_divergence=False, enable_grad=False, **model_extras):
        """log p_1(x_1) by the instantaneous change of variables (Chen et al.
        2018): integrate (x, L) backwards from t = 1 to t = 0 with dx/dt = u_t(x),
        dL/dt = div u_t(x); then log p_1(x_1) = log_p0(x_0) + L(0).

        The divergence is exact (one backward per feature) or Hutchinson's
        estimate z^T (du/dx) z with one Rademacher z drawn from torch's global
        generator, fixed for the whole solve, as flow_matching draws it. The
        x update of each step is the fused Euler/Heun step; L is a (B,)
        vector updated alongside. Returns (x_0, log p_1(x_1)), or with
        return_intermediates (the states at every time_grid point, log p_1).
        """
        if not (float(time_grid[0]) == 1.0 and float(time_grid[-1]) == 0.0):
            raise ValueError(f"time_grid: must start at 1.0 and end at 0.0 for the likelihood, "
                             f"got {time_grid}")
        grid, time_grid = self._grid(x_1, step_size, method, time_grid, enable_grad)
        z = None
        if not exact_divergence:  # flow_matching's draw, same generator calls
            z = ((torch.randn_like(x_1).to(x_1.device) < 0) * 2.0 - 1.0).to(x_1.dtype)
        field = _with_divergence(self.velocity_model, model_extras, z, enable_grad)
        with torch.no_grad():
            x, log_det = self._integrate(x_1, grid, time_grid, method, return_intermediates,
                                         model_extras, field)
        x_0 = x[-1] if return_intermediates else x
        return x, log_p0(x_0) + log_det

    def _grid(self, x_init, step_size, method, time_grid, enable_grad):
        if method not in _METHODS:
            raise ValueError(f"method: {method!r} is not a fixed-step method flowkern fuses; "
                             f"expected one of {_METHODS} (use flow_matching's ODESolver for "
                             f"adaptive solvers)")
        if enable_grad:
            raise NotImplementedError("enable_grad: the fused sampler steps write in place and "
                                      "do not record autograd; use flow_matching's ODESolver")
        time_grid = torch.as_tensor(time_grid).to(x_init.device)
        if time_grid.dim() != 1 or time_grid.numel() < 2:
            raise ValueError(f"time_grid: expected a 1-D tensor of at least 2 times, got shape "
                             f"{tuple(time_grid.shape)}")
        grid = time_grid if step_size is None else _grid_from_step_size(time_grid, step_size)
        if not (grid[0] == time_grid[0] and grid[-1] == time_grid[-1]):
            raise ValueError("time_grid: the solver grid must start and end on time_grid")
        return grid, time_grid


    def _integrate(self, x_init, grid, out_t, method, return_intermediates, extras,
                   field=None):
        """The fixed-step solve on grid: (x at the end, or the states at out_t
        stacked; the integral of div u, (B,), when field gives it). field(x, t)
        -> (u, div u) replaces the plain model call for the likelihood."""
        backend = self.backend
        if field is None:
            def field(x, t):
                return self.velocity_model(x=x, t=t, **extras), None
        # one step table for all steps (and the midpoint half steps); velocity
        # needs no schedule coefficients, so any schedule serves for the rows.
        t0, t1 = grid[:-1], grid[1:]
        dtype = acc_dtype(x_init.dtype)
        # only h is read: any times serve (check=False)
        table = step_table("linear", t0, t1, h=t1 - t0, dtype=dtype, device=x_init.device,
                           check=False)
        dt = (t1 - t0).to(x_init.dtype)  # the log-det's steps (a (B,) vector each)
        if method == "midpoint":
            half = 0.5 * (t1 - t0)
            tmid = t0 + half
            half_table = step_table("linear", t0, t1, h=half, dtype=dtype,
                                    device=x_init.device, check=False)
        n_out = out_t.numel()
        sol = (torch.empty((n_out,) + tuple(x_init.shape), dtype=x_init.dtype,
                           device=x_init.device) if return_intermediates else None)
        if sol is not None:
            sol[0] = x_init
        x = x_init.contiguous()
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        j = 1
        ta_host, out_host = grid.tolist(), out_t.tolist()      # host copies, once
        rev = ta_host[0] > ta_host[-1]
        buf = torch.empty_like(x)
        for i in range(len(ta_host) - 1):
            u, div = field(x, grid[i])
            if method == "euler":
                y = euler_step(x, u, prediction="velocity", table=table[i], backend=backend)
            elif method == "midpoint":
                euler_step(x, u, prediction="velocity", table=half_table[i], out=buf,
                           backend=backend)
                um, div = field(buf, tmid[i])
                y = euler_step(x, um, prediction="velocity", table=table[i], backend=backend)
            else:  # heun2
                euler_step(x, u, prediction="velocity", table=table[i], out=buf, backend=backend)
                ue, div_e = field(buf, grid[i + 1])
                y = heun_step(x, u, buf, ue, prediction="velocity", table=table[i],
                              backend=backend)
                if div is not None:
                    div = 0.5 * (div + div_e)
            if div is not None:
                log_det = log_det + dt[i] * div
            if sol is not None:
                a, b = ta_host[i], ta_host[i + 1]
                while j < n_out and ((b >= out_host[j]) if not rev else (b <= out_host[j])):
                    tj = out_host[j]
                    if tj == a:
                        sol[j] = x
                    elif tj == b:
                        sol[j] = y
                    else:
                        sol[j] = x + ((tj - a) / (b - a)) * (y - x)
                    j += 1
            x = y
        return (sol if return_intermediates else x), log_det


def _with_divergence(model, extras, z, enable_grad):
    """field(x, t) -> (u, div u) for the likelihood ODE: u = model(x=x, t=t,
    **extras) and its divergence in x, exact (z None) or Hutchinson's z^T J z."""
    def field(x, t):
        with torch.enable_grad():
            xt = x.detach().requires_grad_()
            u = model(x=xt, t=t, **extras)
            flat = u.flatten(1)
            if z is None:
                div = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
                for i in range(flat.shape[1]):
                    g = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=True,
                                            create_graph=enable_grad)[0]
                    div = div + g.flatten(1)[:, i]
            else:
                u_z = (flat * z.flatten(1)).sum(1)
                g = torch.autograd.grad(u_z.sum(), xt)[0]
                div = (g.flatten(1) * z.flatten(1)).sum(1)
        return u.detach(), div.detach()
    return field
