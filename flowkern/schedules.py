"""Schedules: maps from time t to (alpha_t, sigma_t, d_alpha_t, d_sigma_t).

Convention (docs/design.md §1): t in [0, 1], t = 0 is noise and t = 1 is data,
x_t = alpha_t * x1 + sigma_t * x0 and u_t = d_alpha_t * x1 + d_sigma_t * x0.

Any object with ``__call__(t) -> (alpha, sigma, d_alpha, d_sigma)`` (tensors
shaped like t) is a schedule; subclass :class:`Schedule` and implement
``alpha_sigma`` to get analytic-or-autograd derivatives for free.
Kernels never see a schedule: they get the (B, 4) coefficient table from
:func:`coefficients`.
"""
from __future__ import annotations

import math

import torch

from ._validate import check_unit_interval
from .backend import cpu_built
from .ops._registry import retyped, transforms_active

__all__ = [
    "Schedule", "Linear", "Cosine", "Polynomial", "VP", "VE", "EDM",
    "get_schedule", "coefficients",
]


class Schedule:
    """Base class. Subclasses implement ``alpha_sigma(t)``; they may override
    ``derivatives(t)`` with analytic forms (the built-ins do)."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"schedule: {type(self).__name__} must implement "
                                  f"alpha_sigma(t) -> (alpha, sigma)")

    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Fallback for user schedules: forward-mode derivative of alpha_sigma.
        with torch.enable_grad():
            _, (da, ds) = torch.func.jvp(self.alpha_sigma, (t,), (torch.ones_like(t),))
        return da, ds

    def __call__(self, t: torch.Tensor):
        alpha, sigma = self.alpha_sigma(t)
        d_alpha, d_sigma = self.derivatives(t)
        return alpha, sigma, d_alpha, d_sigma

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _reals(schedule: str, **params) -> list:
    """A built-in schedule's parameters as floats; anything that is not a real
    number (a string, a tensor of several values, None) is a TypeError naming
    the parameter, before the range checks compare it."""
    out = []
    for name, v in params.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: the {schedule} schedule's {name} must be a real number, "
                            f"got {type(v).__name__}")
        out.append(float(v))
    return out


class Linear(Schedule):
    """CondOT / rectified flow: alpha = t, sigma = 1 - t."""

    def alpha_sigma(self, t):
        return t, 1 - t

    def derivatives(self, t):
        return torch.ones_like(t), -torch.ones_like(t)


class Cosine(Schedule):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2), written sigma =
    sin(pi (1 - t) / 2): exactly 0 at t = 1 (cos(fl(pi/2)) is 6.1e-17, which
    passed the sigma = 0 checks and gave scores of 1e16), and accurate near it."""

    def alpha_sigma(self, t):
        h = 0.5 * math.pi
        return torch.sin(h * t), torch.sin(h * (1 - t))

    def derivatives(self, t):
        h = 0.5 * math.pi
        alpha, sigma = self.alpha_sigma(t)
        return h * sigma, -h * alpha


class Polynomial(Schedule):
    """alpha = t^n, sigma = 1 - t^n."""

    def __init__(self, n: float = 2.0):
        n, = _reals("polynomial", n=n)
        if not 0 < n < math.inf:
            raise ValueError(f"polynomial schedule: n must be finite and > 0, got {n}")
        self.n = float(n)

    def alpha_sigma(self, t):
        a = t ** self.n
        return a, 1 - a

    def derivatives(self, t):
        d = self.n * t ** (self.n - 1)
        return d, -d


class VP(Schedule):
    """Variance preserving (score-SDE VP with linear beta), in our time:
    s = 1 - t, alpha = exp(-s^2 (b_max - b_min)/4 - s b_min/2), sigma = sqrt(1 - alpha^2)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        beta_min, beta_max = _reals("vp", beta_min=beta_min, beta_max=beta_max)
        if not 0 <= beta_min <= beta_max < math.inf:
            raise ValueError(f"vp schedule: need 0 <= beta_min <= beta_max < inf, got {beta_min}, "
                             f"{beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s * s * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha_sigma(self, t):
        la = self._log_alpha(t)
        # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha): accurate near t = 1.
        return torch.exp(la), torch.sqrt(-torch.expm1(2 * la))

    def derivatives(self, t):
        s = 1 - t
        la = self._log_alpha(t)
        dla = 0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min  # d log(alpha)/dt
        alpha = torch.exp(la)
        sigma = torch.sqrt(-torch.expm1(2 * la))
        return alpha * dla, -alpha * alpha * dla / sigma


class VE(Schedule):
    """Variance exploding (heat equation): alpha = 1,
    sigma = sigma_min (sigma_max / sigma_min)^(1 - t)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        sigma_min, sigma_max = _reals("ve", sigma_min=sigma_min, sigma_max=sigma_max)
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"ve schedule: need 0 < sigma_min < sigma_max < inf, got {sigma_min}, "
                             f"{sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha_sigma(self, t):
        r = math.log(self.sigma_max / self.sigma_min)
        return torch.ones_like(t), self.sigma_min * torch.exp(r * (1 - t))

    def derivatives(self, t):
        r = math.log(self.sigma_max / self.sigma_min)
        return torch.zeros_like(t), -r * self.sigma_min * torch.exp(r * (1 - t))


class EDM(Schedule):
    """Karras et al. (2022) noise levels as a schedule: alpha = 1,
    sigma = (smax^(1/rho) + t (smin^(1/rho) - smax^(1/rho)))^rho."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        sigma_min, sigma_max, rho = _reals("edm", sigma_min=sigma_min, sigma_max=sigma_max,
                                           rho=rho)
        if not 0 < sigma_min < sigma_max < math.inf or not 0 < rho < math.inf:
            raise ValueError(f"edm schedule: need 0 < sigma_min < sigma_max < inf and "
                             f"0 < rho < inf, "
                             f"got {sigma_min}, {sigma_max}, {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def _base(self, t):
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return hi + t * (lo - hi), lo - hi

    def alpha_sigma(self, t):
        b, _ = self._base(t)
        return torch.ones_like(t), b ** self.rho

    def derivatives(self, t):
        b, db = self._base(t)
        return torch.zeros_like(t), self.rho * b ** (self.rho - 1) * db


_BUILTIN = {"linear": Linear, "cosine": Cosine, "polynomial": Polynomial,
            "vp": VP, "ve": VE, "edm": EDM}


def get_schedule(schedule) -> Schedule:
    """A schedule from a name (``"linear"``, ``"cosine"``, ``"polynomial"``,
    ``"vp"``, ``"ve"``, ``"edm"``), a Schedule, or any callable returning
    ``(alpha, sigma, d_alpha, d_sigma)``."""
    if isinstance(schedule, str):
        try:
            return _BUILTIN[schedule]()
        except KeyError:
            raise ValueError(f"schedule: unknown name {schedule!r}; expected one of "
                             f"{sorted(_BUILTIN)} or a Schedule object") from None
    if callable(schedule):
        return schedule
    raise TypeError(f"schedule: expected a name or a callable returning (alpha, sigma, "
                    f"d_alpha, d_sigma), got {type(schedule).__name__}")


# What flowkern::schedule_table needs of each built-in: its kind (SchedKind
# in csrc/include/flowkern/schedules.h) and its parameters in that header's
# order. Keyed by the exact class: a subclass may redefine the formulas.
_NATIVE = {Linear: (0, lambda s: []), Cosine: (1, lambda s: []),
           Polynomial: (2, lambda s: [s.n]), VP: (3, lambda s: [s.beta_min, s.beta_max]),
           VE: (4, lambda s: [s.sigma_min, s.sigma_max]),
           EDM: (5, lambda s: [s.sigma_min, s.sigma_max, s.rho])}


def native_args(sched):
    """(kind, params) of flowkern::schedule_table for a built-in schedule
    object, or None for any other schedule."""
    entry = _NATIVE.get(type(sched))
    return None if entry is None else (entry[0], entry[1](sched))


# The native ops' (kind, params) of each built-in name, computed once: a
# public call with schedule="cosine" costs a dict look-up.
_NATIVE_BY_NAME = {name: native_args(cls()) for name, cls in _BUILTIN.items()}
_BY_KIND = {kind: cls for cls, (kind, _) in _NATIVE.items()}


def native_spec(schedule):
    """(kind, params) for a built-in schedule given by name or object, None for
    any other schedule (its kernels read a coefficient table instead). An
    unknown name or a non-schedule raises as :func:`get_schedule` does."""
    if type(schedule) is str:
        spec = _NATIVE_BY_NAME.get(schedule)
        return spec if spec is not None else native_args(get_schedule(schedule))
    entry = _NATIVE.get(type(schedule))
    if entry is not None:
        return entry[0], entry[1](schedule)
    get_schedule(schedule)  # TypeError for what is no schedule at all
    return None


def from_native(kind: int, params) -> Schedule:
    """The built-in schedule object of a native (kind, params) pair."""
    return _BY_KIND[kind](*params)


def _native_table(sched, t: torch.Tensor):
    """Whether flowkern::schedule_table (one C++ call, ~3 us) can build the
    table: a built-in schedule, float32/float64 CPU times, eager mode, the
    extension built."""
    if (type(sched) not in _NATIVE or t.device.type != "cpu" or t.requires_grad
            or t.dtype not in (torch.float32, torch.float64)):
        return False
    if transforms_active():  # t may carry a tangent: the torch ops below differentiate
        return False
    return not torch.compiler.is_compiling() and cpu_built()


def coefficients(schedule, t: torch.Tensor, rows: int, dtype: torch.dtype,
                 check: str = "") -> torch.Tensor:
    """The (rows, 4) table [alpha, sigma, d_alpha, d_sigma] the kernels read.

    t: shape () or (1,) (broadcast to every row) or (rows,); evaluated in
    `dtype` (float32 for 16/32-bit inputs, float64 for float64 inputs).
    check: if given, the name under which times outside [0, 1] (or NaN) are
    reported as a ValueError (flowkern._validate.check_unit_interval).
    Built-in schedules on CPU take one C++ call (computed in float64 and
    rounded to `dtype`); other schedules and devices the torch ops below.
    """
    sched = get_schedule(schedule)
    t = t.reshape(-1)
    if _native_table(sched, t):
        try:
            return torch.ops.flowkern.schedule_table(t, *native_args(sched), rows, dtype, check)
        except (ValueError, RuntimeError) as e:  # the C++ op's errors: _registry.retyped
            raise retyped(e) from None
    if check:
        check_unit_interval(check, t)
    t = t.to(dtype)
    coef = torch.stack(evaluate(sched, t, dtype), dim=1)
    if coef.shape[0] != rows:
        coef = coef.expand(rows, 4)
    return coef.contiguous()


_COLUMNS = ("alpha", "sigma", "d_alpha", "d_sigma")


def evaluate(sched, t: torch.Tensor, dtype: torch.dtype) -> list:
    """A schedule's (alpha, sigma, d_alpha, d_sigma) at the n times t (1-d) as
    four (n,) columns in `dtype`. A callable returning anything else is an
    error naming `schedule` (a bare tensor of 4 rows would otherwise be read
    as four columns)."""
    out = sched(t)
    if not (isinstance(out, (tuple, list)) and len(out) == 4):
        got = f"{len(out)} values" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(f"schedule: a schedule callable must return the 4-tuple (alpha, "
                         f"sigma, d_alpha, d_sigma); got {got}")
    cols = []
    for name, c in zip(_COLUMNS, out):
        if not isinstance(c, (torch.Tensor, int, float)) or isinstance(c, bool):
            raise TypeError(f"schedule: its {name} must be a tensor or a float, "
                            f"got {type(c).__name__}")
        c = torch.as_tensor(c, dtype=dtype, device=t.device).reshape(-1)
        if c.numel() not in (1, t.numel()):
            raise ValueError(f"schedule: its {name} has {c.numel()} values for "
                             f"{t.numel()} times")
        cols.append(c.expand(t.numel()))
    return cols
