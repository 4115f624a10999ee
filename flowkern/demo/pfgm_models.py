"""Small PFGM / PFGM++ models for 2-D data and their trainer, for the demo
and the tests (flowkern.pfgm holds the method; this is one use of it):

* :func:`train_toy` — end to end on 2-D data: a small MLP regressing the
  field mean x̄ over a reference batch, :class:`ToyPFGMDenoiser` for PFGM
  (D = 1, Algorithm 2 perturbations) or :class:`ToyDenoiser` (EDM
  preconditioning) for PFGM++ (D > 1); sample it with
  ``flowkern.pfgm.sample(..., prediction="denoiser")``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .._progress import progress_iter
from ..pfgm import perturb, target

__all__ = ["ToyDenoiser", "ToyPFGMDenoiser", "train_toy", "toy_sampling_range"]


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
    for _ in progress_iter(range(steps), progress, desc=f"train {name} D={D:g}", leave=False):
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

