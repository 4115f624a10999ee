"""One-step flow maps: a model of the ODE's solution operator g(t, s, x) (the
state at time s of the ODE trajectory through x at time t), so that
generation is one evaluation g(0, 1, x0), or a few jumps.

Parametrisation (the "one-step generative ODE flow" in docs/design.md §1's
convention: its alpha is our sigma, its beta our alpha):

    g(t, s, x) = (sigma_s/sigma_t) x + (alpha_s - sigma_s alpha_t/sigma_t) d̄(t, s, x)

which is exactly the exponential-integrator (DDIM) step of
:func:`flowkern.ei_step` with the x1-prediction d̄: :class:`FlowMap` calls
it, so the map costs one fused pass over x after the network (and the
network may output d̄ as any prediction type; ei_step converts it in
registers). g(t, t, x) = x for any d̄, and the map solves the ODE to first
order in s - t exactly when d̄(t, t, x) is the denoiser E[x1 | x_t = x]
(then d/ds g(t, s, x) at s = t is the ODE's velocity). For the linear
schedule with a velocity output v̄ the map is g = x + (s - t) v̄(t, s, x): an
Euler step with the average velocity over [t, s].

Training (Boffi et al. 2024, "Flow map matching"; Frans et al. 2024,
"shortcut models", at toy scale):
* :func:`local_loss` (s = t): d̄(t, t, x_t) matches the data (the
  flow-matching/denoising loss through the fused flow_matching_loss) or a
  teacher denoiser.
* :func:`semigroup_loss`: g(t, s, x) matches the stop-gradient composition
  g(u, s, g(t, u, x)) for t <= u <= s, through the fused
  :func:`flowkern.flowmap_loss` (the map and its squared error in one pass,
  with a fused backward to x and d̄).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from ._rules import default_form
from .ops.flowmap import flowmap_loss
from .ops.steps import ei_step, step_table
from .ops.training import convert, flow_matching_loss, interpolate
from .schedules import native_spec

__all__ = ["FlowMap", "local_loss", "semigroup_loss", "flowmap_loss"]


def _time_vec(name, v, x):
    """v as a (B,) tensor in x's dtype on x's device (floats broadcast)."""
    rows = x.shape[0]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((rows,), float(v), dtype=x.dtype, device=x.device)
    t = V.time(name, v, rows, x)
    return t.to(x.dtype).expand(rows)


class FlowMap(torch.nn.Module):
    """The flow map g(t, s, x) = ei_step(x, net(x, t, s), t, s): a wrapper of a
    network ``net(x, t, s)`` with a second time input s.

    Args:
        net: ``net(x, t, s) -> prediction`` of type `prediction` at (x, t) for
            the jump to s (t, s: (B,) tensors). "x1" outputs d̄ directly;
            "velocity" outputs the average velocity v̄ (linear schedule:
            g = x + (s - t) v̄); "eps" and "score" use the noise form.
        schedule: the schedule of the ODE (default "linear", rectified flow).
    Calling the module returns g(t, s, x) (differentiable in x and the
    network). :meth:`from_pretrained` builds one from a one-time model.
    """

    def __init__(self, net, schedule="linear", prediction: str = "x1",
                 backend: Optional[str] = None):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net: expected a callable net(x, t, s), got {type(net).__name__}")
        V.prediction("prediction", prediction)
        self.net = net
        self.schedule, self.prediction, self.backend = schedule, prediction, backend
        self.form = default_form(prediction)

    @classmethod
    def from_pretrained(cls, model, schedule="linear", prediction: str = "velocity",
                        backend: Optional[str] = None, extend=None) -> "FlowMap":
        """A flow map whose d̄(t, s, x) starts as a pretrained one-time model
        D(x, t) (any network, of type `prediction`) for every s.

        The flow-map network is ``extend(model)``: a network net(x, t, s)
        with net(x, t, s) = model(x, t) at initialisation, usually a copy of
        the model with a second time embedding whose output weights are zero
        (as ControlNet and adaLN-zero initialise a new input), so that its
        s-dependence is learnt from the pretrained function. Without
        `extend`, the model's own ``extend_time_input()`` builds it
        (flowkern.demo.toy.MLP has one). Then d̄(t, t, x) = D(t, x) exactly,
        and g(t, s, x) starts as the DDIM step of the pretrained model from t
        to s (for a rectified flow with velocity output, its Euler step): the
        first-order expansion of the true map, which training improves."""
        if extend is None:
            extend = getattr(model, "extend_time_input", None)
            if not callable(extend):
                raise TypeError(
                    f"model: a {type(model).__name__} has no extend_time_input(); pass "
                    f"extend=, a function model -> net(x, t, s) with net(x, t, s) = "
                    f"model(x, t) at initialisation (e.g. a copy with a zero-initialised "
                    f"second time embedding), or build net yourself and use FlowMap(net)")
            return cls(extend(), schedule, prediction, backend)
        if not callable(extend):
            raise TypeError(f"extend: expected a function model -> net(x, t, s), got "
                            f"{type(extend).__name__}")
        return cls(extend(model), schedule, prediction, backend)

    def pred(self, x, t, s):
        """The network's output at (x, t, s) (t, s: floats or (B,) tensors)."""
        return self.net(x, _time_vec("t", t, x), _time_vec("s", s, x))

    def forward(self, x, t, s):
        """g(t, s, x): one fused EI pass after the network."""
        tt, ss = _time_vec("t", t, x), _time_vec("s", s, x)
        return self.jump(x, self.net(x, tt, ss), **self.coef(x, tt, ss))

    def table(self, x, t, s):
        """The step table of the jumps t -> s ((B,) tensors of validated times)."""
        if x.shape[0] == 0:  # step_table cannot broadcast empty times; no row is read
            t = s = 0.5
        return step_table(self.schedule, t, s, dtype=V.acc_dtype(x.dtype), device=x.device)

    def coef(self, x, t, s):
        """The jumps t -> s ((B,) tensors) as the ops take them: the times, for a
        built-in schedule (the op evaluates it at each row: no table is
        built), else the step table."""
        if native_spec(self.schedule) is not None:
            return dict(t=t, s=s)
        return dict(table=self.table(x, t, s))

    def jump(self, x, pred, t=None, s=None, table=None):
        """g = ei_step(x, pred) from t to s, or with a step table (coef)."""
        return ei_step(x, pred, t, s, self.schedule, prediction=self.prediction, form=self.form,
                       table=table, backend=self.backend)

    @torch.no_grad()
    def sample(self, x0, steps: int = 1, t_start: float = 0.0, t_end: float = 1.0):
        """Generation by `steps` uniform jumps of the map from t_start to t_end
        (one network call per jump)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).tolist()
        x = x0
        for i in range(steps):
            x = self(x, grid[i], grid[i + 1])
        return x


def local_loss(fm: FlowMap, x0: torch.Tensor, x1: torch.Tensor, t=None, teacher=None,
               teacher_prediction: str = "velocity", generator: Optional[torch.Generator] = None):
    """The local (s = t) consistency loss: at x_t = alpha_t x1 + sigma_t x0 the
    network's output net(x_t, t, t) is the flow-matching regression of its
    prediction type (d̄(t, t, x_t) -> x1, i.e. the denoiser), through the
    fused :func:`flowkern.flow_matching_loss`. With a `teacher` model(x, t)
    (of type `teacher_prediction`), it matches the teacher's prediction
    converted to the flow map's type instead (distillation of the denoiser).

    t: (B,) times, or None for U[0, 1) from `generator`."""
    V.tensor("x0", x0)
    V.tensor("x1", x1)
    rows = x0.shape[0]
    if t is None:
        t = torch.rand(rows, generator=generator, dtype=V.acc_dtype(x0.dtype)).to(x0.device)
    with torch.no_grad():
        xt, _ = interpolate(x0, x1, t, fm.schedule, "x1", backend=fm.backend)
    tt = _time_vec("t", t, xt)
    p = fm.net(xt, tt, tt)
    if teacher is None:
        return flow_matching_loss(p, x0, x1, t, fm.schedule, fm.prediction, backend=fm.backend)
    with torch.no_grad():
        y = convert(teacher(xt, tt), xt, t, fm.schedule, teacher_prediction, fm.prediction,
                    backend=fm.backend)
    return ((p - y) ** 2).mean()


def semigroup_loss(fm: FlowMap, x: torch.Tensor, t, s, u=None,
                   generator: Optional[torch.Generator] = None, weight=None):
    """The semigroup (composition) loss ‖g(t, s, x) - sg[g(u, s, g(t, u, x))]‖²,
    mean over elements, t <= u <= s: one jump must land where two shorter
    jumps land. The target is computed without gradient (stop-gradient); the
    one-jump map and its squared error are one fused pass
    (:func:`flowkern.flowmap_loss`, backward to x and the network output).

    Args:
        x: states at time t, (B, ...). t, s: floats or (B,) tensors.
        u: the intermediate time; None draws u uniformly in [t, s] per
            sample from `generator`.
    """
    V.tensor("x", x)
    tt, ss = _time_vec("t", t, x), _time_vec("s", s, x)
    if u is None:
        r = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device)
        uu = tt + r * (ss - tt)
    else:
        uu = _time_vec("u", u, x)
    # the three jumps t -> u, u -> s, t -> s: their times (a built-in schedule,
    # evaluated in the ops), or their coefficients in one step table
    if native_spec(fm.schedule) is not None:
        t_u, u_s, t_s = dict(t=tt, s=uu), dict(t=uu, s=ss), dict(t=tt, s=ss)
    else:
        rows = x.shape[0]
        tab = fm.table(x, torch.cat([tt, uu, tt]), torch.cat([uu, ss, ss]))
        t_u, u_s, t_s = (dict(table=tab[k * rows:(k + 1) * rows] if rows else tab)
                         for k in range(3))
    with torch.no_grad():
        mid = fm.jump(x, fm.net(x, tt, uu), **t_u)
        target = fm.jump(mid, fm.net(mid, uu, ss), **u_s)
    p = fm.net(x, tt, ss)
    return flowmap_loss(x, p, target, **t_s, schedule=fm.schedule, prediction=fm.prediction,
                        form=fm.form, weight=weight, backend=fm.backend)
