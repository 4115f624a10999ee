"""Poisson flow generative models: PFGM (Xu et al. 2022, D = 1) and PFGM++
(Xu et al. 2023, D > 1 augmented dimensions), on flowkern's fused ops.

A data point x in R^N is augmented with D extra coordinates; only their
norm r matters (r = |z| for PFGM). The empirical Poisson field of a batch
of data drives x from a wide prior at r = r_max down to the data at r = 0.

* :func:`perturb` — training points (x~, r): PFGM's Algorithm 2 (M, tau,
  sigma) for D = 1; PFGM++'s r = sigma sqrt(D) with the radius drawn from the
  Beta(N/2, D/2) law for D > 1.
* :func:`target` — the regression target over a large reference batch:
  PFGM's normalised field sqrt(N) m / (||m|| + gamma) (flowkern.poisson_field),
  or the field's mean x̄ (a denoiser target, PFGM++'s "stable" alternative).
* :func:`prior` — samples at r = r_max: the papers' radius law
  ||x|| = r_max sqrt(b / (1 - b)), b ~ Beta(N/2, D/2), uniform direction.
* :func:`sample` — the backward ODE in log r,
  dx/d(log r) = r v_x / v_r  (a field model) or  x - D(x, r)  (a denoiser),
  integrated with flowkern.euler_step.

``model`` is any callable: a field model or a denoiser of the caller's
(flowkern.demo.pfgm_models trains small 2-D ones end to end).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .ops.fields import poisson_field
from .ops.steps import euler_step

__all__ = ["perturb", "target", "prior", "sample", "radius"]


def _unit_directions(B, N, like, generator):
    g = torch.randn(B, N, generator=generator, dtype=torch.float64, device=like.device)
    return g / g.norm(dim=1, keepdim=True)


def _check_D(D):
    if isinstance(D, bool) or not isinstance(D, (int, float)) or not D >= 1 or math.isinf(D):
        raise ValueError(f"D: expected a finite number >= 1 (1: PFGM, > 1: PFGM++), got {D!r}")


def radius(n: int, r, N: int, D: float, generator=None, dtype=torch.float64, device=None):
    """Norms ||x - y|| of PFGM++'s perturbation kernel at augmented norm r:
    R = r sqrt(b / (1 - b)), b ~ Beta(N/2, D/2) (D = 1: PFGM's p_radius)."""
    _check_D(D)
    # Beta(a, b) = G_a / (G_a + G_b) with Gamma draws; torch.distributions has no
    # generator argument, so draw the Gammas through torch._standard_gamma.
    a = torch.full((n,), N / 2.0, dtype=torch.float64, device=device)
    b = torch.full((n,), D / 2.0, dtype=torch.float64, device=device)
    if generator is not None:
        ga = _gamma(a, generator)
        gb = _gamma(b, generator)
    else:
        ga, gb = torch._standard_gamma(a), torch._standard_gamma(b)
    # b / (1 - b) = G_a / G_b: no cancellation near b = 1
    ratio = ga / gb
    r = torch.as_tensor(r, dtype=torch.float64, device=device)
    return (r * torch.sqrt(ratio)).to(dtype)


def _gamma(shape_param, generator):
    """Gamma(k, 1) draws from a generator (Marsaglia-Tsang with boosting)."""
    k = shape_param
    boost = k < 1
    kk = torch.where(boost, k + 1, k)
    d = kk - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(k)
    todo = torch.ones_like(k, dtype=torch.bool)
    while bool(todo.any()):
        z = torch.randn(k.shape, generator=generator, dtype=k.dtype, device=k.device)
        u = torch.rand(k.shape, generator=generator, dtype=k.dtype, device=k.device)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp(min=1e-300)) < 0.5 * z * z + d - d * v
                        + d * torch.log(v.clamp(min=1e-300)))
        take = todo & ok
        out = torch.where(take, d * v, out)
        todo = todo & ~ok
    if bool(boost.any()):
        u = torch.rand(k.shape, generator=generator, dtype=k.dtype, device=k.device)
        out = torch.where(boost, out * u ** (1.0 / k), out)
    return out


# PFGM's restrict_M: the z below which m is redrawn (the official code's
# constant, for its sigma_end = 0.01; PFGM Appendix B.1.1)
RESTRICT_Z = 0.005


def perturb(x: torch.Tensor, D: float = 1, *, M: int = 291, tau: float = 0.03,
            sigma=None, m: Optional[torch.Tensor] = None, generator=None,
            P_mean: float = -1.2, P_std: float = 1.2, restrict_M: Optional[float] = None):
    """Perturbed training points (x~ (B, ...), r (B,)) for a batch of data x.

    D = 1 (PFGM, Algorithm 2): m ~ U[0, M] (or given), z = |N(0, sigma^2)|,
    x~ = x + ||eps|| (1 + tau)^m u with eps ~ N(0, sigma^2 I_N) and u uniform on
    the sphere, r = z (1 + tau)^m. sigma defaults to 0.01.
    restrict_M (D = 1 only): the official code's ``training.restrict_M``
    (PFGM Appendix B.1.1, used for CIFAR-10 with restrict_M=200, LSUN 250):
    where z < 0.005 the exponent m (drawn or given) is redrawn from
    U[0, restrict_M), which confines the norms of the perturbed points. The
    redraws come after every other draw, so the rows it leaves alone are the
    same as without it.
    D > 1 (PFGM++): sigma is the noise level (float or (B,); default drawn
    from EDM's log-normal(P_mean, P_std)), r = sigma sqrt(D), and
    x~ = x + R u with R from :func:`radius`.
    """
    if restrict_M is not None:
        if D != 1:
            raise ValueError(f"restrict_M: PFGM's redraw of m applies to D = 1 only, got D={D}")
        if isinstance(restrict_M, bool) or not isinstance(restrict_M, (int, float)) \
                or not 0 < restrict_M < math.inf:
            raise ValueError(f"restrict_M: expected a finite number > 0 (the official "
                             f"CIFAR-10 value is 200), got {restrict_M!r}")
    _check_D(D)
    B = x.shape[0]
    N = x[0].numel() if B else x.shape[1:].numel()
    dev = x.device
    u = _unit_directions(B, N, x, generator)
    if D == 1:
        s = 0.01 if sigma is None else sigma
        if m is None:
            m = torch.rand(B, generator=generator, dtype=torch.float64, device=dev) * M
        m = torch.as_tensor(m, dtype=torch.float64, device=dev).reshape(-1).expand(B)
        mult = (1.0 + tau) ** m
        z = (torch.randn(B, generator=generator, dtype=torch.float64, device=dev) * s).abs()
        eps = torch.randn(B, N, generator=generator, dtype=torch.float64, device=dev) * s
        if restrict_M is not None:
            redraw = torch.rand(B, generator=generator, dtype=torch.float64,
                                device=dev) * restrict_M
            mult = torch.where(z < RESTRICT_Z, (1.0 + tau) ** redraw, mult)
        norm = eps.norm(dim=1) * mult
        r = z * mult
    else:
        if sigma is None:
            sigma = torch.exp(torch.randn(B, generator=generator, dtype=torch.float64,
                                          device=dev) * P_std + P_mean)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=dev).reshape(-1).expand(B)
        r = sigma * math.sqrt(D)
        norm = radius(B, r, N, D, generator, device=dev)
    xt = x.reshape(B, -1).to(torch.float64) + u * norm[:, None]
    return xt.to(x.dtype).reshape(x.shape), r.to(x.dtype)


def target(x: torch.Tensor, r: torch.Tensor, data: torch.Tensor, D: float = 1,
           gamma: float = 5.0, normalize: bool = True, group=None, backend=None):
    """The empirical field of the reference batch `data` at the perturbed
    points: PFGM's normalised target (x part, r part) or, with
    normalize=False, the field mean x̄ (a denoiser target). See
    flowkern.poisson_field."""
    return poisson_field(x, r, data, D=D, normalize=normalize, gamma=gamma, group=group,
                         backend=backend)


def prior(n: int, shape, r_max: float, D: float = 1, generator=None, dtype=torch.float32,
          device=None, max_norm: Optional[float] = None):
    """n samples of the prior on the hyperplane r = r_max: x = R u with
    R = r_max sqrt(b/(1 - b)), b ~ Beta(N/2, D/2) (PFGM Appendix A.4, PFGM++
    eq. for p_r), u uniform on the unit sphere. shape: a sample's shape.

    max_norm: if given, R is clamped to it (directions kept). The radius law
    has a power tail, P(R > k r_max) ~ k^-D: for D = 1 and N = 2 exactly
    1 / sqrt(1 + k^2), with an infinite mean. Far from the data the field
    mean is about the data mean, so the ODE keeps ||x|| / r about constant
    and a point drawn at k r_max reaches the data only at r ~ (data scale) / k;
    a cap of k r_max (e.g. 100 r_max for D = 1) bounds how small r_min must
    be, at the price of a truncated tail (for D = 1, N = 2: ~1/k of the mass
    moved onto the sphere R = k r_max).
    """
    _check_D(D)
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm: expected a float > 0 or None, got {max_norm!r}")
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    N = math.prod(shape)
    like = torch.empty(0, device=device)
    u = _unit_directions(n, N, like, generator)
    R = radius(n, r_max, N, D, generator, device=device)
    if max_norm is not None:
        R = R.clamp(max=float(max_norm))
    return (u * R[:, None]).to(dtype).reshape(n, *shape)


def sample(model: Callable, x: torch.Tensor, r_max: float, r_min: float = 1e-3,
           steps: int = 100, prediction: str = "field", backend=None):
    """Integrate the backward ODE from r = r_max to r = r_min in log r.

    prediction="field": model(x, r) -> (v_x (B, ...), v_r (B,)), the
        normalised Poisson field (PFGM); dx/d(log r) = r v_x / v_r, with v_r
        clamped to <= -1e-5 (the field points to the data, v_r < 0).
    prediction="denoiser": model(x, r) -> x̂ (B, ...), the field mean (PFGM++,
        EDM-style); dx/d(log r) = x - x̂.
    Each step is one fused flowkern.euler_step (in place) on the time
    s = (log r_max - log r) / (log r_max - log r_min) in [0, 1].
    Returns the samples (a new tensor; x is not modified).
    """
    if prediction not in ("field", "denoiser"):
        raise ValueError(f"prediction: expected 'field' or 'denoiser', got {prediction!r}")
    if not (r_max > r_min > 0):
        raise ValueError(f"r_max, r_min: need r_max > r_min > 0, got {r_max}, {r_min}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of prior samples, got {type(x).__name__}")
    x = x.clone()
    B = x.shape[0]
    span = math.log(r_max) - math.log(r_min)
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    col = (B,) + (1,) * (x.dim() - 1)
    for k in range(steps):
        t, s = float(ts[k]), float(ts[k + 1])
        r = math.exp(math.log(r_max) - t * span)
        rr = torch.full((B,), r, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            out = model(x, rr)
            if prediction == "field":
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError("model: with prediction='field' it must return the pair "
                                    "(v_x, v_r); for a model returning the field mean x̂ use "
                                    "prediction='denoiser'")
                vx, vr = out
                vr = vr.reshape(-1).clamp(max=-1e-5)
                drift = r * vx / vr.reshape(col)
            else:
                drift = x - out
            u = (-span * drift).to(x.dtype)  # dx/ds = dx/d(log r) * d(log r)/ds
            euler_step(x, u, t, s, "linear", "velocity", out=x, backend=backend)
    return x
