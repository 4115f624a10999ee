"""k-diffusion-compatible samplers backed by flowkern's fused steps.

``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``,
``sample_euler_ancestral``, ``sample_dpm_2``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``,
``sample_dpmpp_3m_sde``, ``sample_lms``, ``sample_dpm_fast`` and
``sample_dpm_adaptive`` take k-diffusion's arguments:
``model(x, sigma,
**extra_args)`` returns the denoised x (E[x1 | x]), ``sigmas`` decreasing to
(usually) 0, ``extra_args``, ``callback`` (called with k-diffusion's dict),
``disable`` (the progress bar), and the churn/ancestral options.

Convention (docs/design.md §1): k-diffusion's state is x_k = x_t / alpha_t at noise
level sigma_k = sigma_t / alpha_t, i.e. a VE/EDM schedule with alpha = 1 and
sigma = sigma_k, and its denoiser is our x1 prediction. The step tables are
filled with those values directly: per step alpha = 1, sigma = sigma_i,
d_alpha = 0, and a time that runs linearly in sigma over the step, in units
of sigma_i (sigma = sigma_i (1 - t'), so d_sigma = -sigma_i and h = (sigma_i -
sigma_{i+1})/sigma_i). The fused Euler step is then k-diffusion's
``x + (sigma_next - sigma) (x - denoised)/sigma`` (with an exact 0 coefficient
of x into sigma = 0), Heun's second stage its ``x + dt (d + d_2)/2``, and the
fused DPM-Solver++ step k-diffusion's (lambda = -log sigma).

The DPM-Solver samplers reuse the fused Euler, Heun and churn steps with
rows chosen so that each kernel computes k-diffusion's update exactly
(_euler_row, _second_stage_row say how), and lincomb_step where the update
is a combination whose weights the host computes: the ancestral (DDIM)
steps with their noise (_ddim, _affine: euler_ancestral, dpm_2_ancestral's
second stage, dpmpp_2s_ancestral, dpmpp_sde) and the multistep SDE solvers
(dpmpp_2m_sde, dpmpp_3m_sde over the model's last denoised outputs); one
fused pass per model call, the noise included. sample_lms is one fused
lms_step per step (its velocity history in the kernel). sample_dpm_fast and sample_dpm_adaptive
(k-diffusion's DPMSolver: its own grid in t = -log sigma, sigma_min and
sigma_max in place of sigmas) make each DPM-Solver-1/2/3 update one fused
Euler or Heun pass (_dpm_rows); the adaptive one reads its error norm on
the host once per attempt, as k-diffusion does.

Noise: k-diffusion draws ``torch.randn_like``; the fused kernels draw
Philox4x32-10 in the kernel, so with churn (``s_churn > 0``) or ancestral
noise the samples differ from k-diffusion's draw for draw but have the same
distribution. The noise of step i is Philox(seed, i * x.numel()), seed given
by the extra ``seed=`` argument (None: one draw from torch's generator;
sample_dpmpp_sde's two stages use 2i and 2i + 1, the second's draw
correlated with the first's as the increments of k-diffusion's default
Brownian tree are (over [sigma_s, sigma] and [sigma_next, sigma]), so that
its law is k-diffusion's default's; sample_dpm_adaptive's k-th accepted
step k). ``per_sample_seeds=`` (B ints or a (B,) int64 tensor)
instead of ``seed=`` gives each sample its own stream, Philox(seed_b, i n_1)
with n_1 one sample's size: a sample's noise then does not depend on its
batch (flowkern.em_step). Or pass ``noise_sampler=``
(k-diffusion's, e.g. its ``BrownianTreeNoiseSampler``, the default of its
dpmpp_sde and dpmpp_2m_sde) to use your own noise: its draw is one more term
of the fused pass (sample_dpm_fast's too, in the step's last pass).
sample_dpm_adaptive (eta > 0) adds its noise, the kernel's or the
noise_sampler's, in a separate pass once the step is accepted.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _validate as V
from .._progress import progress_bar, progress_iter
from ..ops.steps import churn as _churn
from ..ops.steps import (dpmpp_2m_step, euler_step, heun_step, lincomb_step, lms_step,
                         noise_stream)
from ..tables import AT_S, AT_T, D_SIGMA, SIGMA
from ..tables import ve_row as _ve  # one row in k-diffusion's VE state

__all__ = ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral",
           "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
           "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lms",
           "sample_dpm_fast", "sample_dpm_adaptive", "get_ancestral_step",
           "linear_multistep_coeff", "denoiser_to_x1_model"]


def _range(n, disable):
    """k-diffusion's trange(n, disable=disable) (None: tqdm decides)."""
    return progress_iter(range(n), disable=disable)


def _host(sigmas, x):
    """(sigmas, their host copy, the state dtype of the Euler-type samplers).
    That dtype is k-diffusion's: its to_d divides by append_dims(sigma), a
    float32 tensor of x's rank for float32 sigmas, so a float16/bfloat16 x is
    promoted at the first step and the state (and the result) stays float32;
    the adapters keep the state in that dtype too, for the peer's accuracy
    (the model still sees the caller's x at the first call). k-diffusion's
    DPM-Solver++(2M) multiplies by 0-dim tensors only and keeps x's dtype:
    sample_dpmpp_2m does too."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of at least 2 noise levels, got shape "
                         f"{tuple(sigmas.shape)}")
    V.tensor("x", x)
    state = torch.promote_types(x.dtype, sigmas.dtype) if sigmas.is_floating_point() else x.dtype
    return sigmas, sigmas.detach().to("cpu", torch.float64).tolist(), state   # one copy


def _rows(rows, x, state):
    return torch.tensor(rows, dtype=torch.float64).to(x.device, V.acc_dtype(state))


def _euler_row(s_t, s_s):
    """An Euler/Heun row from sigma s_t to s_s: x + (s_s - s_t)(x - d)/s_t.
    Time runs in units of s_t (sigma = s_t (1 - t')): d_sigma = -s_t and
    h = (s_t - s_s)/s_t, so the kernel's coefficient of x, 1 + h d_sigma/s_t =
    1 - h, is exact where it matters (0 into sigma = 0) instead of
    1 - (s_t - s_s) * (1/s_t) rounded."""
    return _ve(s_t, s_s, -s_t, -s_t, h=(s_t - s_s) / s_t)


def _ddim(s, down, mix=(1.0,)):
    """Weights of x and the predictions of the ancestral (DDIM) step from
    sigma s to `down`: (down/s) x + (1 - down/s) sum_k mix_k p_k, as
    k-diffusion's x + (down - s)(x - d)/s with d = sum_k mix_k p_k."""
    return [down / s, *((s - down) / s * m for m in mix)]


def _affine(x, terms, weights, std, key_at, noise, backend, out=None):
    """weights[0] x + sum_k weights[k+1] terms[k] + std xi in one fused
    lincomb_step pass: xi drawn in the kernel (key_at: a NoiseStream.at(k)),
    or `noise`, the caller's noise_sampler draw (k-diffusion's), as one more
    term (None: no draw), scaled in the kernel's accumulation dtype (where
    k-diffusion's noise * s_noise * sigma_up rounds in the draw's dtype)."""
    if std and noise is not None:
        return lincomb_step(x, [*terms, noise.to(x.dtype)], [*weights, std], out=out,
                            backend=backend)
    kw = key_at if std and noise is None else {}
    return lincomb_step(x, terms, weights, noise_std=std if kw else 0.0, out=out,
                        backend=backend, **kw)


def _second_stage_row(s_t, s_mid, s_to):
    """heun_step row for DPM-Solver-2's second stage x + (s_to - s_t)(x_2 -
    d_2)/s_mid: d_sigma_t = 0 makes u_t (from x and d) vanish, and h = 1 with
    d_sigma_s = 2 (s_to - s_t) makes h/2 u_s exactly that term."""
    return _ve(s_t, s_mid, 0.0, 2.0 * (s_to - s_t), h=1.0)


def _noise_row(std):
    """churn row adding std * xi: renoise from sigma 0 to sigma std (alpha = 1)."""
    return _ve(0.0, std)


def _add_noise(x, i, k, rows, key, noise_sampler, sigma, sigma_next, scale, backend):
    """x + scale xi: the fused churn pass on draw k of `key` (rows[i] adds
    scale xi), or the caller's noise_sampler(sigma, sigma_next) * scale."""
    if noise_sampler is None:
        return _churn(x, table=rows[i], **key.at(k), backend=backend)
    return x + (noise_sampler(sigma, sigma_next) * scale).to(x.dtype)


def _buffer(buf, x):
    if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return buf


def _noise_key(seed, per_sample_seeds, x, needed=True, noise_sampler=None):
    """The sampler's noise (flowkern.ops.steps.noise_stream) from its seed= or
    per_sample_seeds=, neither of which goes with a noise_sampler (it replaces
    the in-kernel noise)."""
    if noise_sampler is not None and (seed is not None or per_sample_seeds is not None):
        name = "seed" if seed is not None else "per_sample_seeds"
        raise ValueError(f"{name}: the noise comes from noise_sampler here; give one of them")
    return noise_stream(seed, per_sample_seeds, x, needed)


def _denoise(model, x, sigma, s_in, extra_args, state=None):
    """The model's denoised x, in the state dtype (x's without `state`)."""
    d = model(x, sigma * s_in, **extra_args)
    if not isinstance(d, torch.Tensor) or d.shape != x.shape:
        raise ValueError(f"model: expected the denoised x of shape {tuple(x.shape)}, got "
                         f"{getattr(d, 'shape', type(d).__name__)}")
    want = x.dtype if state is None else state
    return d if d.dtype == want else d.to(want)


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step, as in k-diffusion (floats)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                    / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _churn_plan(sig, s_churn, s_tmin, s_tmax, s_noise):
    """Per step (gamma, sigma_hat, sigma' for the churn op or None), k-diffusion's rule."""
    n = len(sig) - 1
    plan = []
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        s_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            # x + s_noise sqrt(s_hat^2 - s^2) xi is churn from sigma to the level sigma'
            # with sigma'^2 - sigma^2 = s_noise^2 (s_hat^2 - s^2).
            plan.append((gamma, s_hat,
                         math.sqrt(sig[i] ** 2 + s_noise ** 2 * (s_hat ** 2 - sig[i] ** 2))))
        else:
            plan.append((gamma, s_hat, None))
    return plan


def _churn_table(sig, plan, x, state):
    """(n, 12) churn rows, row i from sigma_i to the level sigma' of plan[i]
    (alpha = 1; unused rows stay at sigma_i), or None without churn. Built
    once before the loop: a row made per step would be a blocking
    host->device copy per churned step on a GPU."""
    if all(c is None for _, _, c in plan):
        return None
    return _rows([_ve(sig[i], sig[i] if c is None else c, -1.0, -1.0)
                  for i, (_, _, c) in enumerate(plan)], x, state)


def _churn_step(x, i, row, key, backend):
    return _churn(x, table=row, **key.at(i), backend=backend)


def _churn_and_denoise(model, x, i, sigmas, plan, churn_rows, key, s_in, extra_args, state,
                       callback, backend):
    """Step i's start in the churning samplers (Euler, Heun, DPM-2): churn to
    sigma_hat where planned, the model's denoised x there, k-diffusion's
    callback, and x in the state dtype (_host). Returns (x, denoised)."""
    gamma, _, target = plan[i]
    sigma_hat = sigmas[i] * (gamma + 1)
    if target is not None:
        x = _churn_step(x, i, churn_rows[i], key, backend)
    denoised = _denoise(model, x, sigma_hat, s_in, extra_args, state)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                  "denoised": denoised})
    return x.to(state), denoised


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.,
                 s_tmin=0., s_tmax=float("inf"), s_noise=1., seed=None, backend=None,
                 per_sample_seeds=None):
    """Euler steps (Karras et al. 2022, Alg. 2) on the fused Euler step."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    plan = _churn_plan(sig, s_churn, s_tmin, s_tmax, s_noise)
    key = _noise_key(seed, per_sample_seeds, x, any(c is not None for _, _, c in plan))
    table = _rows([_euler_row(sh, sig[i + 1]) for i, (_, sh, _) in enumerate(plan)], x, state)
    churn_rows = _churn_table(sig, plan, x, state)
    for i in _range(len(sig) - 1, disable):
        x, denoised = _churn_and_denoise(model, x, i, sigmas, plan, churn_rows, key, s_in,
                                         extra_args, state, callback, backend)
        x = euler_step(x, denoised, prediction="x1", table=table[i], backend=backend)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.,
                s_tmin=0., s_tmax=float("inf"), s_noise=1., seed=None, backend=None,
                per_sample_seeds=None):
    """Heun steps (Karras et al. 2022, Alg. 2) on the fused Euler and Heun
    steps; Euler into sigma = 0."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    plan = _churn_plan(sig, s_churn, s_tmin, s_tmax, s_noise)
    key = _noise_key(seed, per_sample_seeds, x, any(c is not None for _, _, c in plan))
    table = _rows([_euler_row(sh, sig[i + 1]) for i, (_, sh, _) in enumerate(plan)], x, state)
    churn_rows = _churn_table(sig, plan, x, state)
    xe = None
    for i in _range(len(sig) - 1, disable):
        x, denoised = _churn_and_denoise(model, x, i, sigmas, plan, churn_rows, key, s_in,
                                         extra_args, state, callback, backend)
        if sig[i + 1] == 0:
            x = euler_step(x, denoised, prediction="x1", table=table[i], backend=backend)
        else:
            xe = _buffer(xe, x)
            euler_step(x, denoised, prediction="x1", table=table[i], out=xe, backend=backend)
            denoised_2 = _denoise(model, xe, sigmas[i + 1], s_in, extra_args, state)
            x = heun_step(x, denoised, xe, denoised_2, prediction="x1", table=table[i],
                          backend=backend)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    backend=None):
    """DPM-Solver++(2M) on the fused step: first order at the first step and
    into sigma = 0, lambda = -log sigma."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, _ = _host(sigmas, x)
    state = x.dtype  # k-diffusion's dpmpp_2m keeps x's dtype (_host)
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    table = _rows([_ve(sig[i], sig[i + 1], -sig[i], -sig[i], sigma_p=sig[i - 1] if i else 1.0)
                   for i in range(n)], x, state)
    d = [torch.empty_like(x, dtype=state, memory_format=torch.contiguous_format)
         for _ in range(2)]
    k = 0
    for i in _range(n, disable):
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        x = x.to(state)  # k-diffusion's promotion (_host)
        d_prev = d[1 - k] if i > 0 and sig[i + 1] != 0 else None
        x, _ = dpmpp_2m_step(x, denoised, prediction="x1", d_prev=d_prev, table=table[i],
                             d_out=d[k], backend=backend)
        k = 1 - k
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1., s_noise=1., noise_sampler=None, seed=None, backend=None,
                           per_sample_seeds=None):
    """Ancestral Euler: Euler to sigma_down plus noise of std s_noise
    sigma_up, ONE fused lincomb_step pass a step: (down/s) x + (1 - down/s)
    denoised + std xi, xi = Philox(seed, i * x.numel()) in the kernel, or the
    draw of the caller's ``noise_sampler(sigma, sigma_next)`` (k-diffusion's)
    read as a term."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    steps = [get_ancestral_step(sig[i], sig[i + 1], eta=eta) for i in range(n)]
    key = _noise_key(seed, per_sample_seeds, x, noise_sampler is None, noise_sampler)
    for i in _range(n, disable):
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        x = x.to(state)  # k-diffusion's promotion (_host)
        down, up = steps[i]
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) \
            if noise_sampler is not None and sig[i + 1] > 0 else None
        x = _affine(x, [denoised], _ddim(sig[i], down), s_noise * up, key.at(i), noise, backend)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.,
                 s_tmin=0., s_tmax=float("inf"), s_noise=1., seed=None, backend=None,
                 per_sample_seeds=None):
    """DPM-Solver-2 steps (k-diffusion's, after Karras et al. 2022, Alg. 2):
    Euler to the log-midpoint sigma_mid, then x + (sigma_next - sigma_hat)
    d(x_2, sigma_mid); two fused passes, Euler into sigma = 0."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    plan = _churn_plan(sig, s_churn, s_tmin, s_tmax, s_noise)
    key = _noise_key(seed, per_sample_seeds, x, any(c is not None for _, _, c in plan))
    churn_rows = _churn_table(sig, plan, x, state)
    first, second, mids = [], [], []
    for i, (_, sh, _) in enumerate(plan):
        nxt = sig[i + 1]
        mid = math.exp(0.5 * (math.log(sh) + math.log(nxt))) if nxt > 0 else sh
        first.append(_euler_row(sh, mid if nxt > 0 else 0.0))
        second.append(_second_stage_row(sh, mid, nxt))
        mids.append(mid)
    first, second = _rows(first, x, state), _rows(second, x, state)
    mids = torch.tensor(mids, dtype=sigmas.dtype).to(sigmas.device)
    xe = None
    for i in _range(len(sig) - 1, disable):
        x, denoised = _churn_and_denoise(model, x, i, sigmas, plan, churn_rows, key, s_in,
                                         extra_args, state, callback, backend)
        if sig[i + 1] == 0:
            x = euler_step(x, denoised, prediction="x1", table=first[i], backend=backend)
            continue
        xe = _buffer(xe, x)
        euler_step(x, denoised, prediction="x1", table=first[i], out=xe, backend=backend)
        denoised_2 = _denoise(model, xe, mids[i], s_in, extra_args, state)
        x = heun_step(x, denoised, xe, denoised_2, prediction="x1", table=second[i],
                      backend=backend)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1., s_noise=1., noise_sampler=None, seed=None, backend=None,
                           per_sample_seeds=None):
    """Ancestral DPM-Solver-2: the DPM-Solver-2 step to sigma_down plus noise
    of std s_noise sigma_up. The first stage is a fused Euler pass to x_2; the
    second stage, k-diffusion's x + (down - s)(x_2 - d_2)/mid, and the noise
    are one lincomb_step pass (Philox(seed, i x.numel()) in the kernel, or the
    caller's noise_sampler draw read as a term)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    steps = [get_ancestral_step(sig[i], sig[i + 1], eta=eta) for i in range(n)]
    key = _noise_key(seed, per_sample_seeds, x, noise_sampler is None, noise_sampler)
    first, mids = [], []
    for i, (down, up) in enumerate(steps):
        mid = math.exp(0.5 * (math.log(sig[i]) + math.log(down))) if down > 0 else sig[i]
        first.append(_euler_row(sig[i], mid if down > 0 else 0.0))
        mids.append(mid)
    first = _rows(first, x, state)
    host_mids, mids = mids, torch.tensor(mids, dtype=sigmas.dtype).to(sigmas.device)
    xe = None
    for i in _range(n, disable):
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        x = x.to(state)
        down, up = steps[i]
        if down == 0:
            x = euler_step(x, denoised, prediction="x1", table=first[i], backend=backend)
            continue
        xe = _buffer(xe, x)
        euler_step(x, denoised, prediction="x1", table=first[i], out=xe, backend=backend)
        denoised_2 = _denoise(model, xe, mids[i], s_in, extra_args, state)
        c = (down - sig[i]) / host_mids[i]  # x + c (x_2 - d_2)
        noise = None if noise_sampler is None else noise_sampler(sigmas[i], sigmas[i + 1])
        x = _affine(x, [xe, denoised_2], [1.0, c, -c], s_noise * up, key.at(i), noise, backend)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1., s_noise=1., noise_sampler=None, seed=None, backend=None,
                              per_sample_seeds=None):
    """Ancestral DPM-Solver++(2S): a DDIM half step to the log-midpoint, then
    the DDIM step to sigma_down from the midpoint's denoised x plus noise of
    std s_noise sigma_up, one fused lincomb_step pass (_ddim, _affine)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    promoted = state
    state = x.dtype  # k-diffusion multiplies by 0-dim ratios: x's dtype, except in Euler
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    steps = [get_ancestral_step(sig[i], sig[i + 1], eta=eta) for i in range(n)]
    key = _noise_key(seed, per_sample_seeds, x, noise_sampler is None, noise_sampler)
    first, mids = [], []
    for i, (down, up) in enumerate(steps):
        mid = math.exp(-(-math.log(sig[i]) + 0.5 * (math.log(sig[i]) - math.log(down)))) \
            if down > 0 else sig[i]
        first.append(_euler_row(sig[i], mid))
        mids.append(mid)
    first = _rows(first, x, state)
    mids = torch.tensor(mids, dtype=sigmas.dtype).to(sigmas.device)
    xe = None
    for i in _range(n, disable):
        down, up = steps[i]
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args,
                            promoted if down == 0 else state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if down == 0:  # k-diffusion's Euler branch: to_d promotes x (_host)
            x, pred = x.to(promoted), denoised
        else:
            xe = _buffer(xe, x)
            euler_step(x, denoised, prediction="x1", table=first[i], out=xe, backend=backend)
            pred = _denoise(model, xe, mids[i], s_in, extra_args, state)
        std = s_noise * up if sig[i + 1] > 0 else 0.0
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) \
            if noise_sampler is not None and sig[i + 1] > 0 else None
        x = _affine(x, [pred], _ddim(sig[i], down), std, key.at(i), noise, backend)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                     s_noise=1., noise_sampler=None, r=1 / 2, seed=None, backend=None,
                     per_sample_seeds=None):
    """DPM-Solver++ (stochastic, k-diffusion's): two ancestral DDIM stages per
    step, each one fused lincomb_step pass, the second over x, d and d_2
    ((1 - 1/(2r)) d + 1/(2r) d_2). Noise: the caller's noise_sampler draw read
    as a term, or in the kernel with the law of k-diffusion's default, a
    Brownian tree in sigma: its two draws of a step, over [sigma_s, sigma_t]
    and [sigma_next, sigma_t], share the first interval's increment, so the
    second is n2 = rho n1 + sqrt(1 - rho^2) z with rho^2 = (sigma_t -
    sigma_s)/(sigma_t - sigma_next) (_correlated_stage). n1 is
    Philox(seed, 2i x.numel()) and z Philox(seed, (2i + 1) x.numel()) for
    step i (the stream's draws 2i and 2i + 1)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    promoted = state
    state = x.dtype  # as sample_dpmpp_2s_ancestral
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    fac = 1 / (2 * r)
    key = _noise_key(seed, per_sample_seeds, x, noise_sampler is None, noise_sampler)
    plan, mids = [], []  # per step: the two stages' (weights, noise std)
    for i in range(n):
        if sig[i + 1] == 0:
            plan.append(None)
            mids.append(sig[i])
            continue
        t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
        s_mid = math.exp(-(t + (t_next - t) * r))
        d1, u1 = get_ancestral_step(sig[i], s_mid, eta)
        d2, u2 = get_ancestral_step(sig[i], sig[i + 1], eta)
        stage1 = (_ddim(sig[i], d1), s_noise * u1)
        stage2 = (_ddim(sig[i], d2, (1 - fac, fac)), s_noise * u2)
        if noise_sampler is None:
            stage2 = _correlated_stage(stage1, stage2, sig[i], s_mid, sig[i + 1])
        plan.append((stage1, stage2))
        mids.append(s_mid)
    host_mids, mids = mids, torch.tensor(mids, dtype=sigmas.dtype).to(sigmas.device)
    xe = None
    for i in _range(n, disable):
        last = sig[i + 1] == 0
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, promoted if last else state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if last:  # k-diffusion's Euler branch: to_d promotes x (_host)
            x = _affine(x.to(promoted), [denoised], [0.0, 1.0], 0.0, {}, None, backend)
            continue
        (w1, g1), (w2, g2) = plan[i]
        noise = None if noise_sampler is None else noise_sampler(sigmas[i], mids[i])
        xe = _affine(x, [denoised], w1, g1, key.at(2 * i), noise, backend, out=_buffer(xe, x))
        denoised_2 = _denoise(model, xe, mids[i], s_in, extra_args, state)
        noise = None if noise_sampler is None else noise_sampler(sigmas[i], sigmas[i + 1])
        terms = [denoised, denoised_2] if len(w2) == 3 else [denoised, denoised_2, xe]
        x = _affine(x, terms, w2, g2, key.at(2 * i + 1), noise, backend)
    return x


def _correlated_stage(stage1, stage2, s_t, s_mid, s_next):
    """Stage 2 of sample_dpmpp_sde with Brownian-tree noise from in-kernel
    draws. Its noise g2 n2, n2 = rho n1 + sqrt(1 - rho^2) z, reads stage 1's
    draw n1 back from stage 1's output x_e = a1 x + b1 d + g1 n1: g2 rho n1 =
    k (x_e - a1 x - b1 d) with k = g2 rho / g1. So stage 2 is one fused pass
    over (x, d, d_2, x_e) with the fresh draw z at std g2 sqrt(1 - rho^2);
    k <= ~1 on k-diffusion's grids (the midpoint's u1 is not much smaller
    than u2), so reading n1 back costs a rounding of x's size, as the step's
    own. Without stage 1 noise (g1 = 0: eta = 0 or s_noise = 0) the stage is
    unchanged."""
    (a1, b1), g1 = stage1
    (wx, wd, wd2), g2 = stage2
    if g1 == 0 or g2 == 0:
        return stage2
    rho2 = (s_t - s_mid) / (s_t - s_next)
    k = g2 * math.sqrt(rho2) / g1
    return [wx - k * a1, wd - k * b1, wd2, k], g2 * math.sqrt(max(0.0, 1.0 - rho2))


def _multistep_sde_setup(x, sigmas, extra_args, eta, noise_sampler, seed, per_sample_seeds):
    """What sample_dpmpp_2m_sde and _3m_sde set up alike: (extra_args, sigmas,
    their host copy, the state dtype, s_in, the step count, the noise key).
    The state is x's dtype: k-diffusion multiplies by 0-dim tensors only
    (_host)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, _ = _host(sigmas, x)
    key = _noise_key(seed, per_sample_seeds, x, noise_sampler is None and bool(eta),
                     noise_sampler)
    return extra_args, sigmas, sig, x.dtype, x.new_ones([x.shape[0]]), len(sig) - 1, key


def _multistep_sde_loop(model, x, sigmas, extra_args, callback, disable, state, s_in, plan,
                        key, noise_sampler, backend):
    """The loop of sample_dpmpp_2m_sde and _3m_sde: per model call one fused
    lincomb_step over x and the model's last denoised outputs (held as
    k-diffusion holds them, newest first) with plan[i] = (weights of x and
    those outputs, noise std), or x = denoised where plan[i] is None (the step
    into sigma = 0). The noise: Philox(seed, i x.numel()) in the kernel, or
    the caller's noise_sampler(sigma, sigma_next) (k-diffusion's default is a
    torchsde Brownian tree), called where k-diffusion calls it (std > 0)."""
    history = []
    for i in _range(len(plan), disable):
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        history = [denoised] + history[:2]
        if plan[i] is None:
            x = denoised
            continue
        weights, std = plan[i]
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) \
            if noise_sampler is not None and std else None
        x = _affine(x, history[:len(weights) - 1], weights, std, key.at(i), noise, backend)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                        s_noise=1., noise_sampler=None, solver_type="midpoint", seed=None,
                        backend=None, per_sample_seeds=None):
    """DPM-Solver++(2M) SDE (k-diffusion's): x' = (s'/s) e^{-eta h} x + B d +
    C (d - d_prev) + std xi with B = 1 - e^{-(1+eta) h}, C = B/(2r)
    ("midpoint") or (B/(-(1+eta) h) + 1)/r ("heun"), r = h_last/h, std =
    s' sqrt(1 - e^{-2 eta h}) s_noise: one fused lincomb_step per model call
    (_multistep_sde_loop)."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args, sigmas, sig, state, s_in, n, key = _multistep_sde_setup(
        x, sigmas, extra_args, eta, noise_sampler, seed, per_sample_seeds)
    plan, h_last = [], None
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        if nxt == 0:  # x = denoised
            plan.append(None)
            continue
        h = math.log(s) - math.log(nxt)
        hh = (1 + eta) * h
        b = -math.expm1(-hh)
        weights = [nxt / s * math.exp(-eta * h), b]
        if h_last is not None:
            r = h_last / h
            c = 0.5 * b / r if solver_type == "midpoint" else (b / -hh + 1) / r
            weights = [weights[0], b + c, -c]
        std = nxt * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if eta else 0.0
        plan.append((weights, std))
        h_last = h
    return _multistep_sde_loop(model, x, sigmas, extra_args, callback, disable, state, s_in,
                               plan, key, noise_sampler, backend)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1., s_noise=1., noise_sampler=None, seed=None, backend=None,
                        per_sample_seeds=None):
    """DPM-Solver++(3M) SDE (k-diffusion's). Its update is linear in (x, d, d_1,
    d_2): x' = e^{-(1+eta) h} x + c_0 d + c_1 d_1 + c_2 d_2 + std xi, the c_k
    from k-diffusion's d1, d2, phi_2, phi_3 collected on the host in floats
    (dpmpp_3m_sde_weights), std = s' sqrt(1 - e^{-2 eta h}) s_noise: one
    fused lincomb_step per model call (_multistep_sde_loop)."""
    extra_args, sigmas, sig, state, s_in, n, key = _multistep_sde_setup(
        x, sigmas, extra_args, eta, noise_sampler, seed, per_sample_seeds)
    plan = []
    h_1 = h_2 = None
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        if nxt == 0:  # x = denoised
            plan.append(None)
            continue
        h = math.log(s) - math.log(nxt)
        std = nxt * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise if eta else 0.0
        plan.append((dpmpp_3m_sde_weights(h, h_1, h_2, eta), std))
        h_1, h_2 = h, h_1
    return _multistep_sde_loop(model, x, sigmas, extra_args, callback, disable, state, s_in,
                               plan, key, noise_sampler, backend)


def dpmpp_3m_sde_weights(h, h_1=None, h_2=None, eta=1.0):
    """The weights of x, d, d_1[, d_2] in k-diffusion's DPM-Solver++(3M) SDE
    step (h = log(sigma/sigma_next), h_1, h_2 the two before it, None while
    unknown): its e^{-h_eta} x + (1 - e^{-h_eta}) d + phi_2 d1 - phi_3 d2 with
    d1, d2 expanded into the denoised outputs (floats, on the host)."""
    h_eta = h * (eta + 1)
    weights = [math.exp(-h_eta), -math.expm1(-h_eta)]
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if h_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        phi_3 = phi_2 / h_eta - 0.5
        a = phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)   # of d1_0 = (d - d_1)/r0
        b = -phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1)        # of d1_1 = (d_1 - d_2)/r1
        return [weights[0], weights[1] + a / r0, -a / r0 + b / r1, -b / r1]
    if h_1 is not None:
        r = h_1 / h
        return [weights[0], weights[1] + phi_2 / r, -phi_2 / r]
    return weights


def linear_multistep_coeff(order, t, i, j):
    """k-diffusion's LMS coefficient: the integral over [t_i, t_{i+1}] of the
    Lagrange basis polynomial of node t_{i-j} on t_i, ..., t_{i-order+1},
    integrated exactly (k-diffusion integrates the same polynomial with
    scipy's quad, exact to rounding for these degrees). In u = (tau - t_i)/h,
    h = t_{i+1} - t_i, each factor (tau - t_k)/(t_{i-j} - t_k) is linear in u
    and the integral over [0, 1] of sum_p c_p u^p is sum_p c_p/(p + 1): plain
    floats, no cancellation between large antiderivative values."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    a, tj = float(t[i]), float(t[i - j])
    h = float(t[i + 1]) - a
    c = [1.0]  # ascending powers of u
    for k in range(order):
        if k == j:
            continue
        tk = float(t[i - k])
        d = tj - tk
        lo, hi = (a - tk) / d, h / d  # the factor lo + hi u
        c = [lo * c[0]] + [lo * c[p] + hi * c[p - 1] for p in range(1, len(c))] + [hi * c[-1]]
    return h * sum(cp / (p + 1) for p, cp in enumerate(c))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4,
               backend=None):
    """k-diffusion's linear multistep sampler, one fused lms_step per step:
    d_i = (x - denoised)/sigma_i (the x1 -> velocity conversion on the VE
    row alpha = 1, d_sigma = 1) and x + sum_j c_j d_{i-j} in one pass, which
    also stores d_i into a ring of `order` buffers; the weights c_j
    (linear_multistep_coeff) are computed on the host up front. order: 1-4
    (lms_step keeps up to 3 earlier d)."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"order: expected an int in [1, 4] (lms_step keeps at most 3 earlier "
                         f"derivatives), got {order!r}")
    extra_args = {} if extra_args is None else extra_args
    sigmas, sig, state = _host(sigmas, x)
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    rows = _rows([_ve(sig[i], sig[i], 1.0, 1.0) for i in range(n)], x, state)
    weights = [[linear_multistep_coeff(min(i + 1, order), sig, i, j)
                for j in range(min(i + 1, order))] for i in range(n)]
    ring = []
    for i in _range(n, disable):
        denoised = _denoise(model, x, sigmas[i], s_in, extra_args, state)
        x = x.to(state)  # k-diffusion's promotion (_host)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if len(ring) < order:
            ring.append(torch.empty_like(x, memory_format=torch.contiguous_format))
        history = [ring[(i - j) % order] for j in range(1, len(weights[i]))]  # d_{i-j}
        x, _ = lms_step(x, denoised, weights[i], history, prediction="x1", table=rows[i],
                        u_out=ring[i % order], backend=backend)
    return x


def denoiser_to_x1_model(denoiser, schedule="edm", **extra_args):
    """A flowkern ``model(x_t, t)`` (x1 prediction, for flowkern.sample) from a
    k-diffusion denoiser ``denoiser(x_k, sigma_k, **extra_args)`` on any
    schedule: x_k = x_t / alpha_t, sigma_k = sigma_t / alpha_t (alpha_t > 0)."""
    from ..schedules import get_schedule
    sched = get_schedule(schedule)

    def model(x, t):
        alpha, sigma = sched(t)[:2]
        a = alpha.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return denoiser(x / a, (sigma / alpha).to(x.dtype), **extra_args)
    return model


# ---------------------------------------------------------------------------
# DPM-Solver with its own step control: k-diffusion's DPMSolver class, behind
# sample_dpm_fast and sample_dpm_adaptive. Its time is t = -log sigma
# (DPM-Solver's lambda for alpha = 1) and every update is x plus multiples of
# eps = (x - denoised)/sigma at earlier points (Lu et al. 2022, eq. (3.7) and
# Algs. 1-2; k-diffusion's dpm_solver_{1,2,3}_step); the coefficients are
# computed here on the host in float64, from Python floats.


def _sigma_of(t):
    """DPMSolver.sigma: sigma = e^{-t}."""
    return math.exp(-t)


def _t_of(sigma):
    """DPMSolver.t: t = -log sigma (+inf for a sigma_down of 0)."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _phi(z):
    """expm1(z)/z - 1 as DPMSolver writes it; 0 at z = 0 (its limit, where
    k-diffusion's 0/0 gives NaN)."""
    return math.expm1(z) / z - 1 if z != 0 else 0.0


def _eps_row(s, a):
    """euler_step row giving x + a eps, eps = (x - d)/s, from (x, d): with
    h = 1 and d_sigma_t = a the kernel's x + h u_t has u_t = a (x - d)/s."""
    return _ve(s, s, a, 0.0, h=1.0)


def _eps_pair_row(s, s_k, a, b):
    """heun_step row giving x + a eps + b eps_k from (x, d) at sigma s and
    (x_k, d_k) at sigma s_k: with h = 1 the kernel's x + h/2 (u_t + u_s) has
    u_t = d_sigma_t (x - d)/s and u_s = d_sigma_s (x_k - d_k)/s_k, so the
    d_sigma columns are 2a and 2b (as in _second_stage_row)."""
    return _ve(s, s_k, 2.0 * a, 2.0 * b, h=1.0)


def _dpm_rows(t, t_next, order, r1=None):
    """DPM-Solver-`order` from t to t_next as fused passes: (rows, mids).
    Pass 0 is u1 = x - sigma(s1) expm1(r1 h) eps (one Euler row; for order 1
    it is the step, x - sigma(t_next) expm1(h) eps); pass k > 0 reads x, eps
    and the point of pass k - 1 with its eps, evaluated at sigma mids[k - 1]
    (one Heun row): u2 and the result, with k-diffusion's coefficients
    (dpm_solver_2_step: r1 = 1/2 unless given; dpm_solver_3_step: r1 = 1/3,
    r2 = 2/3)."""
    h = t_next - t
    s, s_next, e = _sigma_of(t), _sigma_of(t_next), math.expm1(h)
    if order == 1:
        return [_eps_row(s, -s_next * e)], []
    r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = _sigma_of(t + r1 * h)
    rows = [_eps_row(s, -s1 * math.expm1(r1 * h))]
    if order == 2:  # x - s' E eps - s'/(2 r1) E (eps_1 - eps), E = expm1(h)
        c = s_next / (2 * r1) * e
        return rows + [_eps_pair_row(s, s1, -s_next * e + c, -c)], [s1]
    r2 = 2 / 3
    s2 = _sigma_of(t + r2 * h)
    c = s2 * (r2 / r1) * _phi(r2 * h)   # u2 = x - s2 expm1(r2 h) eps - c (eps_1 - eps)
    rows.append(_eps_pair_row(s, s1, -s2 * math.expm1(r2 * h) + c, -c))
    c = s_next / r2 * _phi(h)           # x' = x - s' E eps - c (eps_2 - eps)
    rows.append(_eps_pair_row(s, s2, -s_next * e + c, -c))
    return rows, [s1, s2]


def _pass_weights(row, k):
    """Pass k of a _dpm_rows step as lincomb_step weights over (x, d0) for
    k = 0, (x, d0, y, d) else: the rows' x + a eps [+ b eps_k], eps = (x -
    d0)/s, eps_k = (y - d)/s_k (_eps_row; _eps_pair_row stores 2a, 2b)."""
    s, a = row[AT_T.start + SIGMA], row[AT_T.start + D_SIGMA]
    if k == 0:
        return [1 + a / s, -a / s]
    a, b, s_k = a / 2, row[AT_S.start + D_SIGMA] / 2, row[AT_S.start + SIGMA]
    return [1 + a / s, -a / s, b / s_k, -b / s_k]


def _dpm_pass(x, d0, y, d, k, row, out, backend):
    """Pass k of a _dpm_rows step: Euler on (x, d0) for k = 0, else Heun's
    second stage on (x, d0) and (y, d)."""
    if k == 0:
        return euler_step(x, d0, prediction="x1", table=row, out=out, backend=backend)
    return heun_step(x, d0, y, d, prediction="x1", table=row, out=out, backend=backend)


def _dpm_solve(model, x, d0, rows, mids, bufs, s_in, extra_args, tick, backend, low=None,
               final=None):
    """One DPM-Solver step from x with d0 = its denoised x, on _dpm_rows'
    (device) rows: the intermediate points go to bufs[k], the result to a new
    tensor; tick() after each model call. low = (k, row, out): also the pass
    with that row on pass k's inputs, into out (sample_dpm_adaptive's
    lower-order solution). final(x, d0, y, d): the last pass instead of its
    row's (sample_dpm_fast's, with the noise). Returns (result, low's output
    or None)."""
    y, d, lo = x, d0, None
    last = len(rows) - 1
    for k in range(len(rows)):
        if k:
            d = _denoise(model, y, mids[k - 1], s_in, extra_args)
            tick()
        if low is not None and low[0] == k:
            lo = _dpm_pass(x, d0, y, d, k, low[1], low[2], backend)
        if k == last and final is not None:
            return final(x, d0, y, d), lo
        y = _dpm_pass(x, d0, y, d, k, rows[k], None if k == last else bufs[k], backend)
    return y, lo


def _ancestral_target(t, t_next, t_end, eta):
    """(t_next_, su) of one DPMSolver step: with eta it steps to sigma_down's
    level (not past t_end), and noise of std su = sqrt(sigma(t_next)^2 -
    sigma(t_next_)^2) restores sigma(t_next) (dpm_solver_fast/_adaptive)."""
    if not eta:
        return t_next, 0.0
    sd, _ = get_ancestral_step(_sigma_of(t), _sigma_of(t_next), eta)
    t_ = min(t_end, _t_of(sd))
    return t_, math.sqrt(max(0.0, _sigma_of(t_next) ** 2 - _sigma_of(t_) ** 2))


def _draws(std, eta, noise_sampler):
    """Whether a DPMSolver step adds noise: in the kernel where its std > 0;
    the caller's noise_sampler at every step when eta != 0, as k-diffusion
    calls it (a sequential sampler stays in step with k-diffusion's draws)."""
    return std > 0 or bool(eta and noise_sampler is not None)


def _float(name, v):
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected a float, got {v!r}") from None


def _dpm_times(sigma_min, sigma_max):
    """(t_start, t_end) = (-log sigma_max, -log sigma_min), k-diffusion's check first."""
    lo, hi = _float("sigma_min", sigma_min), _float("sigma_max", sigma_max)
    if lo <= 0 or hi <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")  # k-diffusion's words
    for name, v in (("sigma_min", lo), ("sigma_max", hi)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite noise level, got {v}")
    return -math.log(hi), -math.log(lo)


class _NoBar:
    """tqdm's interface, without tqdm."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _progress(total, disable):
    """DPMSolver's progress bar: one tick per model call (its eps_callback)."""
    bar = progress_bar(total, disable=disable)
    return _NoBar() if bar is None else bar


def _scalar(v, x):
    """A 0-dim tensor as DPMSolver hands them to the callback and noise_sampler
    (torch's default dtype, on x's device)."""
    return torch.tensor(v, dtype=torch.get_default_dtype(), device=x.device)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None,
                    disable=None, eta=0., s_noise=1., noise_sampler=None, seed=None,
                    backend=None, per_sample_seeds=None):
    """DPM-Solver-fast (Lu et al. 2022; k-diffusion's, fixed step size): n
    model calls on a grid uniform in t = -log sigma from sigma_max to
    sigma_min, in steps of order 3 and a last one (or two) of order 2 / 1 as
    k-diffusion plans them.

    Fused: each update of a step is one pass on rows built up front
    (_dpm_rows): u1 the fused Euler step from (x, denoised), u2 and the
    step's result the fused Heun second stage from (x, denoised) and the last
    intermediate point with its denoised x; k-diffusion's eps = (x -
    denoised)/sigma stay in the kernels' registers. An order-k step is k
    passes and k model calls.

    Noise (eta > 0): each step goes to sigma_down's level, then noise of std
    s_noise su, in the step's last pass (one lincomb_step over x, denoised
    and the last intermediate point with its denoised x, _pass_weights):
    Philox(seed, i x.numel()) for step i (seed None: one draw from torch's
    generator), or the caller's ``noise_sampler(sigma, sigma_next)``, called
    at every step as k-diffusion calls it, read as one more term. With eta = 0 nothing
    is drawn. The state stays in x's dtype, as in k-diffusion (all its
    coefficients are 0-dim tensors). Reverse sampling (sigma_min >
    sigma_max) needs eta = 0, as in k-diffusion."""
    extra_args = {} if extra_args is None else extra_args
    V.tensor("x", x)
    t_start, t_end = _dpm_times(sigma_min, sigma_max)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive int (the number of model calls), got {n!r}")
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")  # k-diffusion's words
    n = int(n)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    plan, rows = [], []
    for i, order in enumerate(orders):
        t_next_, su = _ancestral_target(ts[i], ts[i + 1], t_end, eta)
        step_rows, mids = _dpm_rows(ts[i], t_next_, order)
        last = _pass_weights(step_rows[-1], len(step_rows) - 1)
        plan.append((len(rows), len(step_rows), mids, su * s_noise, last))
        rows += step_rows
    # every row uploaded once, before the loop (no host->device copy per step)
    table = _rows(rows, x, x.dtype)
    key = _noise_key(seed, per_sample_seeds, x, bool(eta) and noise_sampler is None,
                     noise_sampler)
    at = None  # (t, sigma) of the grid, for the callback and the noise_sampler
    if callback is not None or (eta and noise_sampler is not None):
        at = torch.tensor([[t, _sigma_of(t)] for t in ts],
                          dtype=torch.get_default_dtype()).to(x.device)
    s_in = x.new_ones([x.shape[0]])
    bufs = [torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(max(orders) - 1)]
    with _progress(n, disable) as bar:
        for i, (start, count, mids, std, weights) in enumerate(plan):
            d0 = _denoise(model, x, _sigma_of(ts[i]), s_in, extra_args)
            bar.update()
            if callback is not None:
                callback({"sigma": at[i, 1], "sigma_hat": at[i, 1], "x": x, "i": i,
                          "t": at[i, 0], "t_up": at[i, 0], "denoised": d0})
            final = None
            if _draws(std, eta, noise_sampler):  # the last pass with the noise: one lincomb
                def final(x, d0, y, d, i=i, std=std, weights=weights):
                    noise = None if noise_sampler is None else \
                        noise_sampler(at[i, 1], at[i + 1, 1])
                    terms = [d0] if len(weights) == 2 else [d0, y, d]
                    return _affine(x, terms, weights, std, key.at(i), noise, backend)
            x, _ = _dpm_solve(model, x, d0, table[start:start + count], mids, bufs, s_in,
                              extra_args, bar.update, backend, final=final)
    return x


class _PID:
    """k-diffusion's PIDStepSizeController, the same float arithmetic: after
    each attempt h is scaled by the limited factor 1 + atan(f - 1), f = the
    product of the last inverse errors to the powers b1, b2, b3; the attempt
    is accepted when that factor is >= accept_safety."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps, self.errs = accept_safety, eps, []

    def propose_step(self, error):
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def _error_norm(x_low, x_high, x_prev, atol, rtol):
    """k-diffusion's error of an adaptive step: ||(x_low - x_high)/delta||_2 /
    sqrt(numel), delta = max(atol, rtol max(|x_low|, |x_prev|)) elementwise;
    a 0-dim tensor in the accumulation dtype (float32 for a 16-bit x, whose
    squares k-diffusion sums in x's dtype)."""
    acc = V.acc_dtype(x_low.dtype)
    lo = x_low.to(acc)
    delta = torch.maximum(lo.abs(), x_prev.to(acc).abs()).mul_(rtol).clamp_min_(atol)
    return torch.linalg.vector_norm((lo - x_high.to(acc)).div_(delta)) / x_low.numel() ** 0.5


def _check_adaptive(order, rtol, atol, h_init):
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")  # k-diffusion's words
    rtol, atol, h_init = _float("rtol", rtol), _float("atol", atol), _float("h_init", h_init)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a finite tolerance >= 0, got {v}")
    if rtol == 0 and atol == 0:  # the error would divide by zero and never accept
        raise ValueError("rtol, atol: expected at least one of them > 0, got both 0")
    if not (math.isfinite(h_init) and h_init != 0):
        raise ValueError(f"h_init: expected a finite nonzero first step, got {h_init}")
    return rtol, atol, h_init


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None,
                        disable=None, order=3, rtol=.05, atol=.0078, h_init=.05, pcoeff=0.,
                        icoeff=1., dcoeff=0., accept_safety=.81, eta=0., s_noise=1.,
                        noise_sampler=None, return_info=False, seed=None, backend=None,
                        per_sample_seeds=None):
    """DPM-Solver-12 and -23 with adaptive step size (Lu et al. 2022;
    k-diffusion's): each attempt from t to t + h computes the order-`order`
    solution and the one of order - 1 (DPM-Solver-1, or -2 with r1 = 1/3,
    sharing u1), k-diffusion's error norm between them, and k-diffusion's PID
    controller (_PID) accepts the attempt or not and scales h.

    Fused: every update is one pass (_dpm_rows; u1 the fused Euler step,
    u2 and both solutions the fused Heun second stage), so an attempt is
    `order` model calls and order + 1 passes, plus the error norm's few torch
    ops (the formula's, in the accumulation dtype). The attempt's rows are
    uploaded in one copy, and the error is read on the host once per attempt,
    as k-diffusion reads it: this loop synchronises by design.

    Noise (eta > 0): an accepted step adds noise of std s_noise su after
    stepping to sigma_down's level: the fused churn pass on Philox(seed, k
    x.numel()) for the k-th accepted step (seed None: one draw from torch's
    generator), or the caller's ``noise_sampler(sigma, sigma_next)`` (called
    on each accepted step, as k-diffusion calls it). return_info=True returns
    (x, info) with k-diffusion's info dict (steps, nfe, n_accept, n_reject).
    An error that is NaN raises (k-diffusion would reject forever)."""
    extra_args = {} if extra_args is None else extra_args
    V.tensor("x", x)
    t_start, t_end = _dpm_times(sigma_min, sigma_max)
    rtol, atol, h_init = _check_adaptive(order, rtol, atol, h_init)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")  # k-diffusion's words
    key = _noise_key(seed, per_sample_seeds, x, bool(eta) and noise_sampler is None,
                     noise_sampler)
    pid = _PID(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff,
               1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s_in = x.new_ones([x.shape[0]])
    bufs = [torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(order - 1)]
    lows = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2)]
    s, x_prev, j = t_start, x, 0   # x_prev: the last accepted low-order solution
    with _progress(None, disable) as bar:
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
            t_, su = _ancestral_target(s, t, t_end, eta)
            std = su * s_noise
            d0 = _denoise(model, x, _sigma_of(s), s_in, extra_args)
            bar.update()
            high, mids = _dpm_rows(s, t_, order)
            # the lower order's last pass: DPM-Solver-1 on (x, d0), or DPM-Solver-2
            # with r1 = 1/3 (its u1 is DPM-Solver-3's) on (u1, its denoised x)
            low = _dpm_rows(s, t_, order - 1, r1=1 / 3)[0][-1]
            tab = _rows(high + [low, _noise_row(std)], x, x.dtype)
            x_high, x_low = _dpm_solve(model, x, d0, tab[:order], mids, bufs, s_in, extra_args,
                                       bar.update, backend, low=(order - 2, tab[order], lows[j]))
            error = _error_norm(x_low, x_high, x_prev, atol, rtol)
            err = float(error)  # the host read of each attempt (k-diffusion's too)
            if math.isnan(err):
                raise FloatingPointError("sample_dpm_adaptive: the error estimate is NaN (a NaN "
                                         "in x or in the model's output?)")
            if pid.propose_step(err):
                x_prev, j, x = x_low, 1 - j, x_high
                if _draws(std, eta, noise_sampler):
                    at = (None, None) if noise_sampler is None else (
                        _scalar(_sigma_of(s), x), _scalar(_sigma_of(t), x))
                    x = _add_noise(x, 0, info["n_accept"], tab[order + 1:], key, noise_sampler,
                                   *at, std, backend)
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if callback is not None:
                sg, ts_ = _scalar(_sigma_of(s), x), _scalar(s, x)
                callback({"sigma": sg, "sigma_hat": sg, "x": x, "i": info["steps"] - 1,
                          "t": ts_, "t_up": ts_, "denoised": d0, "error": error, "h": pid.h,
                          **info})
    if return_info:
        return x, info
    return x
