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
* :func:`train_toy` — end to end on 2-D data: a small MLP regressing the
  field mean x̄ over a reference batch, :class:`ToyPFGMDenoiser` for PFGM
  (D = 1, Algorithm 2 perturbations) or :class:`ToyDenoiser` (EDM
  preconditioning) for PFGM++ (D > 1); sample it with
  ``sample(..., prediction="denoiser")``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .ops.fields import poisson_field
from .ops.steps import euler_step

__all__ = ["perturb", "target", "prior", "sample", "radius", "ToyDenoiser",
           "ToyPFGMDenoiser", "train_toy", "toy_sampling_range"]


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


class ToyDenoiser(torch.nn.Module):
    """A small MLP field-mean model for 2-D PFGM++ with EDM preconditioning
    (Karras et al. 2022, Table 1) in the noise level s = r/sqrt(D):
    x̂ = c_skip x + c_out F([c_in x, log(s)/4]). sd is the data's std."""

    def __init__(self, dim: int = 2, hidden: int = 128, D: float = 128, sd: float = 0.5):
        super().__init__()
        self.D, self.sd = float(D), float(sd)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim))

    def forward(self, x, r):
        s = r / math.sqrt(self.D)
        v = s ** 2 + self.sd ** 2
        o = self.net(torch.cat([x / torch.sqrt(v)[:, None], torch.log(s)[:, None] / 4], 1))
        return (self.sd ** 2 / v)[:, None] * x + (s * self.sd / torch.sqrt(v))[:, None] * o

    def weight(self, r):
        """EDM loss weight 1/c_out^2 at radius r."""
        s = r / math.sqrt(self.D)
        return (s ** 2 + self.sd ** 2) / (s * self.sd) ** 2


class ToyPFGMDenoiser(torch.nn.Module):
    """A small MLP field-mean model for 2-D PFGM (D = 1): x̂ = sd F(features).

    No EDM skip. PFGM's perturbation kernel p_r(x | y) ~ r / (||x - y||^2 +
    r^2)^((N+1)/2) has no variance (P(||x - y|| > k r) ~ 1/k), so r does not
    set how far x is from its data point, and the EDM residual target
    (x̄ - c_skip x) / c_out with c_out ~ r is heavy tailed: over Algorithm 2's
    range its 99.9% quantile is ~300 and its mean square ~1500 (median ~1);
    trained that way the sampler misses the modes (sliced W2 ~5x the noise
    floor). The field mean itself is a convex combination of the data, so
    x̄ / sd is bounded at every r: the network predicts it directly and the
    loss weight is the constant 1/sd^2.

    Inputs are bounded as well, since ||x|| / r is heavy tailed too:
    u = x / sqrt(r^2 + sd^2) (EDM's c_in with noise level r) squashed to norm
    < bound, log(1 + ||u||^2) / 4 (how far out, growing slowly) and log(r) / 4;
    `fourier` random Fourier features (fixed, N(0, fourier_scale^2)
    frequencies) of these let the MLP resolve the modes at small r. sd is about
    the data's std per coordinate.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, sd: float = 1.0, fourier: int = 32,
                 fourier_scale: float = 1.0, bound: float = 4.0):
        super().__init__()
        self.sd, self.bound = float(sd), float(bound)
        nin = dim + 2
        self.register_buffer("freqs", torch.randn(fourier, nin) * fourier_scale)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(nin + 2 * fourier, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x, r):
        u = x / torch.sqrt(r ** 2 + self.sd ** 2)[:, None]
        n2 = (u * u).sum(1, keepdim=True)
        f = torch.cat([u / torch.sqrt(1 + n2 / self.bound ** 2), torch.log1p(n2) / 4,
                       torch.log(r.clamp(min=1e-12))[:, None] / 4], 1)
        p = f @ self.freqs.T
        return self.sd * self.net(torch.cat([f, torch.sin(p), torch.cos(p)], 1))

    def weight(self, r):
        """Loss weight at radius r: 1/sd^2 (unit scale on the network output)."""
        return torch.full_like(r, 1.0 / self.sd ** 2)


def train_toy(data_fn: Callable, D: float = 128, steps: int = 1000, batch: int = 256,
              ref_batch: Optional[int] = None, lr: float = 2e-3, generator=None, progress=False):
    """Train a field-mean model on a 2-D data stream data_fn(n, generator):
    each step perturbs `batch` points of a fresh data batch (perturb) and
    regresses the empirical field mean over the whole `ref_batch` (target,
    normalize=False: the fused poisson_field), weighted by model.weight(r).

    D = 1: PFGM, Algorithm 2 perturbations (M = 291, tau = 0.03, sigma =
    0.01: r from ~1e-3 to ~60) and a :class:`ToyPFGMDenoiser`; ref_batch
    defaults to 2048 (the D = 1 field weights ||x - y||^-3 lean on the few
    nearest references, so the target is noisier than at large D).
    D > 1: PFGM++ with EDM's log-normal noise levels and a :class:`ToyDenoiser`;
    ref_batch defaults to 1024.
    Returns the trained model (sample it with prediction="denoiser")."""
    if D == 1:
        model = ToyPFGMDenoiser()
        name = "PFGM"
    else:
        model = ToyDenoiser(D=D)
        name = "PFGM++"
    if ref_batch is None:
        ref_batch = 2048 if D == 1 else 1024
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    it = range(steps)
    if progress:
        try:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"train {name} D={D:g}", leave=False)
        except ImportError:
            pass
    for _ in it:
        ref = data_fn(ref_batch, generator)
        xq, r = perturb(ref[:batch], D=D, generator=generator)
        with torch.no_grad():
            xbar = target(xq, r, ref, D=D, normalize=False)
        loss = (model.weight(r)[:, None] * (model(xq, r) - xbar) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def toy_sampling_range(D: float) -> tuple[float, float, Optional[float]]:
    """(r_max, r_min, max_norm) for sampling a :func:`train_toy` model on 2-D
    data of unit scale: pass r_max and max_norm to :func:`prior`, r_max and
    r_min to :func:`sample`.

    D = 1 (PFGM): from r_max = 40 down to r_min = 1e-3, the prior radius
    capped at 100 r_max (its law has a 1/k tail; see :func:`prior`).
    D > 1 (PFGM++): r = sigma sqrt(D) over EDM's noise levels 80 -> 0.002, no
    cap (the radius law's tail falls as k^-D).
    """
    if D == 1:
        return 40.0, 1e-3, 100 * 40.0
    return 80 * math.sqrt(D), 0.002 * math.sqrt(D), None

