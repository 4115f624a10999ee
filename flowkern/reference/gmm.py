"""A Gaussian-mixture data distribution with exact marginal fields, for
testing samplers against the true ODE (float64).

Data x1 ~ sum_k pi_k N(mu_k, s_k^2 I) in R^D, noise x0 ~ N(0, I) and x_t =
alpha_t x1 + sigma_t x0 (docs/design.md §1). Given component k, x_t is Gaussian:

    x_t | k ~ N(alpha mu_k, v_k I),   v_k = alpha^2 s_k^2 + sigma^2,

so the posterior over components is w_k(x) = softmax_k(log pi_k + log N(x;
alpha mu_k, v_k I)) and, by Gaussian conditioning,

    E[x1 | x_t, k] = mu_k + (alpha s_k^2 / v_k) (x - alpha mu_k)
    E[x0 | x_t, k] = (sigma / v_k) (x - alpha mu_k)
    score          = -sum_k w_k (x - alpha mu_k) / v_k
    u_t(x)         = d_alpha E[x1 | x_t] + d_sigma E[x0 | x_t].

Every field is finite wherever some v_k > 0 (always, if every s_k > 0), in
particular at t = 0 (alpha = 0) and t = 1 (sigma = 0) of the linear schedule.
"""
from __future__ import annotations

import math

import torch

from .._rules import prediction as prediction_code
from ..schedules import get_schedule

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Mixture of isotropic Gaussians: means (K, D), stds (K,), weights (K,)
    (normalised here). All computations in float64."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means: expected shape (K, D), got {tuple(self.means.shape)}")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(K).clone()
        if not bool((self.stds >= 0).all()):
            raise ValueError("stds: must be >= 0")
        w = (torch.ones(K, dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64).reshape(-1))
        if w.numel() != K or not bool((w > 0).all()):
            raise ValueError(f"weights: expected {K} positive values")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """n draws of x1, (n, D) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    # -- the marginal at time t ------------------------------------------------

    def _parts(self, x, t, schedule):
        """x (B, D) float64, t (B,) or scalar -> per-component pieces."""
        x = x.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
        t = t.expand(x.shape[0])
        a, s, da, ds = (c.to(torch.float64)[:, None] for c in get_schedule(schedule)(t))
        mu, sd = self.means.to(x.device), self.stds.to(x.device)
        v = a * a * sd[None] ** 2 + s * s                              # (B, K)
        diff = x[:, None, :] - a[:, :, None] * mu[None]                 # (B, K, D)
        logp = (torch.log(self.weights.to(x.device))[None]
                - 0.5 * (diff * diff).sum(-1) / v - 0.5 * self.dim * torch.log(2 * math.pi * v))
        w = torch.softmax(logp, dim=1)                                  # (B, K)
        return a, s, da, ds, mu, sd, v, diff, w, logp

    def log_prob(self, x, t, schedule="linear") -> torch.Tensor:
        """log p_t(x), (B,)."""
        logp = self._parts(x, t, schedule)[-1]
        return torch.logsumexp(logp, dim=1)

    def denoiser(self, x, t, schedule="linear") -> torch.Tensor:
        """E[x1 | x_t = x] (the x1 prediction)."""
        a, s, da, ds, mu, sd, v, diff, w, _ = self._parts(x, t, schedule)
        gain = (a * sd[None] ** 2 / v)[:, :, None]
        return (w[:, :, None] * (mu[None] + gain * diff)).sum(1)

    def eps(self, x, t, schedule="linear") -> torch.Tensor:
        """E[x0 | x_t = x] (the eps prediction)."""
        a, s, da, ds, mu, sd, v, diff, w, _ = self._parts(x, t, schedule)
        return (w[:, :, None] * (s / v)[:, :, None] * diff).sum(1)

    def score(self, x, t, schedule="linear") -> torch.Tensor:
        """grad_x log p_t(x)."""
        a, s, da, ds, mu, sd, v, diff, w, _ = self._parts(x, t, schedule)
        return -(w[:, :, None] * diff / v[:, :, None]).sum(1)

    def velocity(self, x, t, schedule="linear") -> torch.Tensor:
        """The marginal velocity u_t(x) = E[d_alpha x1 + d_sigma x0 | x_t = x]."""
        a, s, da, ds, mu, sd, v, diff, w, _ = self._parts(x, t, schedule)
        gain1 = (a * sd[None] ** 2 / v)[:, :, None]
        gain0 = (s / v)[:, :, None]
        d = (w[:, :, None] * (mu[None] + gain1 * diff)).sum(1)
        e = (w[:, :, None] * gain0 * diff).sum(1)
        return da * d + ds * e

    def field(self, prediction: str, x, t, schedule="linear") -> torch.Tensor:
        fn = {"velocity": self.velocity, "x1": self.denoiser, "eps": self.eps,
              "score": self.score}
        try:
            return fn[prediction](x, t, schedule)
        except KeyError:
            raise ValueError(f"prediction: unknown prediction type {prediction!r}") from None

    def model(self, prediction: str = "velocity", schedule="linear"):
        """A ``model(x, t)`` for flowkern.sample returning the exact
        `prediction`, in x's dtype (computed in float64); x may be (B, D) or
        any (B, ...) with prod(...) = D."""
        prediction_code("prediction", prediction)

        def model(x, t):
            flat = x.reshape(x.shape[0], -1)
            return self.field(prediction, flat, t, schedule).to(x.dtype).reshape(x.shape)
        return model
