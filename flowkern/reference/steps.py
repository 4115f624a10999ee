"""Reference sampler steps (docs/design.md §4 "Sampling"), written like the papers.

Every step moves a state x at time t to time s (t -> s toward the data, t = 0
noise, t = 1 data) given the model's prediction `pred` of type `prediction`
at (x, t). Coefficient tables: `ct`, `cs` (and `cp` for the previous time of
DPM-Solver++(2M)) are (B, 4) rows [alpha, sigma, d_alpha, d_sigma] from
flowkern.schedules.coefficients; h = s - t comes as a (B,) tensor.
Classifier-free guidance: p = p_u + w (p_c - p_u) before any conversion.
"""
from __future__ import annotations

import math

import torch

from .training import _cols, convert


def guided(pred, pred_uncond=None, guidance=None):
    if pred_uncond is None:
        return pred
    return pred_uncond + guidance * (pred - pred_uncond)


def _col(v, like):
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))


def euler_step(x, pred, ct, h, prediction="velocity", pred_uncond=None, guidance=None):
    """x_s = x_t + h u_t."""
    u = convert(guided(pred, pred_uncond, guidance), x, ct, prediction, "velocity")
    return x + _col(h, x) * u


def heun_step(x, pred, x_euler, pred_euler, ct, cs, h, prediction="velocity",
              pred_uncond=None, pred_euler_uncond=None, guidance=None):
    """Second stage of Heun: x_s = x_t + h/2 (u_t(x_t) + u_s(x_euler))."""
    u_t = convert(guided(pred, pred_uncond, guidance), x, ct, prediction, "velocity")
    u_s = convert(guided(pred_euler, pred_euler_uncond, guidance), x_euler, cs, prediction,
                  "velocity")
    return x + 0.5 * _col(h, x) * (u_t + u_s)


def ei_step(x, pred, ct, cs, prediction="x1", form="data", pred_uncond=None, guidance=None):
    """First-order exponential integrator (DDIM) from t to s.
    data form:  x_s = (sigma_s/sigma_t) x_t + (alpha_s - sigma_s alpha_t/sigma_t) d
    noise form: x_s = (alpha_s/alpha_t) x_t + (sigma_s - alpha_s sigma_t/alpha_t) eps"""
    p = guided(pred, pred_uncond, guidance)
    at, st, _, _ = _cols(ct, x)
    as_, ss, _, _ = _cols(cs, x)
    if form == "data":
        d = convert(p, x, ct, prediction, "x1")
        return (ss / st) * x + (as_ - ss * at / st) * d
    e = convert(p, x, ct, prediction, "eps")
    return (as_ / at) * x + (ss - as_ * st / at) * e


def dpmpp_2m_step(x, pred, ct, cs, prediction="x1", d_prev=None, cp=None,
                  pred_uncond=None, guidance=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), returning (x_s, d_t).
    lambda = log(alpha/sigma), h = lambda_s - lambda_t, r = (lambda_t - lambda_p)/h,
    D = (1 + 1/(2r)) d_t - d_prev/(2r), x_s = (sigma_s/sigma_t) x_t - alpha_s expm1(-h) D.
    First order (D = d_t) without d_prev, or when h is infinite (sigma_s = 0)."""
    d = convert(guided(pred, pred_uncond, guidance), x, ct, prediction, "x1")
    at, st, _, _ = _cols(ct, x)
    as_, ss, _, _ = _cols(cs, x)
    lam_t, lam_s = torch.log(at / st), torch.log(as_ / ss)
    h = lam_s - lam_t
    D = d
    if d_prev is not None:
        ap, sp, _, _ = _cols(cp, x)
        r = (lam_t - torch.log(ap / sp)) / h
        second = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
        D = torch.where(torch.isfinite(h), second, d)
    return (ss / st) * x - as_ * torch.expm1(-h) * D, d


def em_step(x, pred, ct, h, g, noise, prediction="velocity", pred_uncond=None, guidance=None):
    """Euler-Maruyama for dX = [u + g^2/2 s] dt + g dW:
    x_s = x + h (u + g^2/2 s) + g sqrt(h) xi, with the noise xi given."""
    p = guided(pred, pred_uncond, guidance)
    u = convert(p, x, ct, prediction, "velocity")
    score = convert(p, x, ct, prediction, "score")
    h, g = _col(h, x), _col(g, x)
    return x + h * (u + 0.5 * g * g * score) + g * torch.sqrt(h) * noise


def lms_step(x, pred, ct, weights, history=(), prediction="velocity", pred_uncond=None,
             guidance=None):
    """Linear multistep (k-diffusion's sample_lms), returning (x_s, u_t):
    u_t = the velocity at t, x_s = x_t + weights[0] u_t + sum_j weights[j] u_{t_{i-j}},
    with the earlier velocities `history` (newest first)."""
    u = convert(guided(pred, pred_uncond, guidance), x, ct, prediction, "velocity")
    xs = x + weights[0] * u
    for w, uj in zip(weights[1:], history):
        xs = xs + w * uj
    return xs, u


def lincomb_step(x, terms, weights, noise=None, noise_std=0.0):
    """x_s = weights[0] x + sum_k weights[k+1] terms[k] (+ noise_std noise): a
    step whose coefficients the caller computed (csrc/include/flowkern/steps.h
    LincombStepFn)."""
    xs = weights[0] * x
    for w, p in zip(weights[1:], terms):
        xs = xs + w * p
    if noise_std:
        xs = xs + noise_std * noise
    return xs


def churn(x, ct, chat, noise):
    """Renoise from t back to an earlier t_hat (EDM churn in our convention):
    x_hat = (alpha_that/alpha_t) x + sqrt(sigma_that^2 - (alpha_that sigma_t/alpha_t)^2) xi."""
    at, st, _, _ = _cols(ct, x)
    ah, sh, _, _ = _cols(chat, x)
    var = (sh * sh - (ah * st / at) ** 2).clamp_min(0)
    return (ah / at) * x + torch.sqrt(var) * noise


def _mul32(a: int, c: torch.Tensor):
    """(high, low) 32-bit words of a * c for a, c < 2^32, in int64 arithmetic
    (the product itself would overflow int64): c is split into 16-bit halves."""
    x = a * (c & 0xFFFF)                      # < 2^48
    y = a * (c >> 16)                         # < 2^48; a*c = y*2^16 + x
    t = ((y & 0xFFFF) << 16) + (x & 0xFFFFFFFF)
    return (y >> 16) + (x >> 32) + (t >> 32), t & 0xFFFFFFFF


def philox_normal(seed, offset: int, shape, dtype=torch.float32, device="cpu"):
    """The noise the kernels draw: element e of a contiguous tensor is stream
    index n = offset + e; Philox4x32-10(key = seed, counter = n // 4 as (lo,
    hi, 0, 0)) gives four words, n % 4 picks the uniform pair (0, 1) or (2, 3)
    and the cosine (n even) or sine (n odd) output of Box-Muller on it
    (flowkern/triton/philox.py, philox.h). `seed` a (B,) int64 tensor:
    per-sample seeds, sample b drawn as a batch of one with seed seed[b] (e
    counted within the sample; docs/design.md §4)."""
    n = math.prod(shape)
    if isinstance(seed, torch.Tensor):
        rows = shape[0]
        inner = n // rows if rows else 0
        idx = (torch.arange(inner, dtype=torch.int64, device=device) + offset).expand(rows, inner)
        key = seed.to(device=device, dtype=torch.int64).reshape(rows, 1)
        k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    else:
        idx = torch.arange(n, dtype=torch.int64, device=device) + offset  # drawn where it is used
        k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    ctr = idx >> 2
    c = [ctr & 0xFFFFFFFF, (ctr >> 32) & 0xFFFFFFFF, torch.zeros_like(ctr), torch.zeros_like(ctr)]
    M = 0xFFFFFFFF
    for _ in range(10):
        hi0, lo0 = _mul32(0xD2511F53, c[0])
        hi2, lo2 = _mul32(0xCD9E8D57, c[2])
        c = [hi2 ^ c[1] ^ k0, lo2, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
    second = (idx & 2) != 0
    u = []
    for w in (torch.where(second, c[2], c[0]), torch.where(second, c[3], c[1])):
        s = torch.where(w >= 2 ** 31, w - 2 ** 32, w)      # as int32
        s = torch.where(s < 0, -s - 1, s)                   # ~s
        u.append(s.to(torch.float32) * 4.6566127342e-10)
    u1 = torch.clamp(u[0], min=1.0e-7)
    angle = 6.283185307179586 * u[1]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.where((idx & 1) != 0, torch.sin(angle),
                                                        torch.cos(angle))
    return z.reshape(shape).to(dtype)
