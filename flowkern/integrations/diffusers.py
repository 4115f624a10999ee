"""diffusers-compatible schedulers backed by flowkern's fused steps.

Drop-in use in a pipeline::

    from flowkern.integrations.diffusers import FlowMatchEulerDiscreteScheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

Conventions (docs/design.md §1):

- Flow matching: diffusers' ``sigma = 1 - t`` and its model predicts
  ``v = x0 - x1 = -u_t``; its step is ``x + (sigma_next - sigma) v``. Since
  ``(sigma_next - sigma) v = (s - t) u``, the fused Euler step reads the model
  output untouched, with h = sigma_next - sigma in the step table.
- DPM-Solver++: diffusers' discrete VP schedule gives per step the noise level
  sigma_k = sqrt((1 - abar)/abar), i.e. alpha = 1/sqrt(1 + sigma_k^2) and
  sigma = sigma_k alpha on our scale (x_t = alpha x1 + sigma x0, the same
  state). The step table is filled with those values directly (no continuous
  schedule is needed); "epsilon" is our eps, "sample" our x1, "v_prediction"
  (v = alpha eps - sigma x1) our velocity with table derivatives (d_alpha,
  d_sigma) = (-sigma, alpha), and "flow_prediction" our velocity with (-1, 1).

They are real diffusers schedulers (SchedulerMixin + ConfigMixin):
``from_config`` of any compatible scheduler's config (UniPC's and DEIS's
included, mapped as diffusers maps them), ``save_pretrained`` /
``from_pretrained`` (a saved pipeline reloads with flowkern's scheduler),
``compatibles``, and diffusers' output classes. Only what the fused steps
implement is supported; other options raise NotImplementedError naming the
option.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch

try:  # real diffusers schedulers: its config, save/load and output classes
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteSchedulerOutput)
    from diffusers.schedulers.scheduling_utils import (KarrasDiffusionSchedulers,
                                                       SchedulerMixin, SchedulerOutput)
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised without the peer
    raise ImportError("flowkern.integrations.diffusers: the diffusers adapters are diffusers "
                      "schedulers and need diffusers installed (pip install diffusers)") from e

from ..ops.steps import dpmpp_2m_step, euler_step, lincomb_step, step_table

__all__ = ["FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
           "FlowMatchHeunDiscreteScheduler", "UniPCMultistepScheduler", "SchedulerOutput"]


def _config_signature(cls):
    """The class's __init__ signature from its `_defaults`: diffusers'
    ConfigMixin reads the config keys a class accepts from the signature
    (from_config of another scheduler's config keeps exactly those), so the
    keys and defaults are written once, in `_defaults`, and mirror diffusers'
    own scheduler of the same name (tests/test_integrations.py holds them
    equal)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in cls._defaults.items()]
    cls.__init__.__signature__ = inspect.Signature(params)
    return cls


class _Base(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler (SchedulerMixin + ConfigMixin: config,
    from_config, save_pretrained / from_pretrained, compatibles) whose steps
    are flowkern's fused ones. Its config is registered from the keyword
    arguments and `_defaults`, as diffusers' @register_to_config does."""

    config_name = "scheduler_config.json"  # diffusers.schedulers.scheduling_utils
    order = 1
    init_noise_sigma = 1.0
    _defaults: dict = {}

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self._defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got unexpected keyword "
                            f"argument(s) {unknown}")
        self.register_to_config(**{**self._defaults, **kwargs})
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def __len__(self):
        return self.config.num_train_timesteps

    def _unsupported(self, names):
        for name, bad in names:
            if bad:
                raise NotImplementedError(
                    f"{type(self).__name__}: {name}={self.config.get(name)!r} is not implemented "
                    f"by flowkern's fused steps; use diffusers' own scheduler for it")


# ---------------------------------------------------------------------------
# Flow matching, Euler


@_config_signature
class FlowMatchEulerDiscreteScheduler(_Base):
    """diffusers' FlowMatchEulerDiscreteScheduler (deterministic Euler) on the
    fused Euler step. Supports shift, use_dynamic_shifting (``mu``, exponential
    or linear time shift), shift_terminal, use_karras_sigmas,
    use_exponential_sigmas and custom ``sigmas``/``timesteps``."""

    _compatibles = []  # as diffusers' own
    _defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                     base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                     use_karras_sigmas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, time_shift_type="exponential",
                     stochastic_sampling=False)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        self._unsupported([("invert_sigmas", c.invert_sigmas),
                           ("use_beta_sigmas", c.use_beta_sigmas),
                           ("stochastic_sampling", c.stochastic_sampling)])
        if c.use_karras_sigmas and c.use_exponential_sigmas:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas can be used.")
        if c.time_shift_type not in ("exponential", "linear"):
            raise ValueError("time_shift_type must either be 'exponential' or 'linear'.")
        n = c.num_train_timesteps
        timesteps = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        sigmas = torch.from_numpy(timesteps).to(torch.float32) / n
        if not c.use_dynamic_shifting:
            sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
        self._shift = c.shift
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps = None
        self._table = None

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float):
        self._shift = shift

    def time_shift(self, mu, sigma, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is None:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps
        given_t = timesteps is not None
        if given_t:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max),
                                        self._sigma_to_t(self.sigma_min), num_inference_steps)
            sigmas = timesteps / c.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        if c.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if c.shift_terminal:
            one_minus_z = 1 - sigmas
            sigmas = 1 - one_minus_z / (one_minus_z[-1] / (1 - c.shift_terminal))
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
            if c.use_karras_sigmas:
                ramp = np.linspace(0, 1, num_inference_steps)
                a, b = hi ** (1 / 7.0), lo ** (1 / 7.0)
                sigmas = (a + ramp * (b - a)) ** 7.0
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        if given_t:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * c.num_train_timesteps
        sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self.timesteps, self.sigmas = timesteps, sigmas
        self._step_index = None
        self._begin_index = None
        # One table for all steps: t = 1 - sigma (our time), and h = sigma_next -
        # sigma so that the model's -u is used as is (see the module docstring).
        sig, nxt = sigmas[:-1], sigmas[1:]
        self._table = step_table("linear", (1 - sig).clamp(0, 1), (1 - nxt).clamp(0, 1),
                                 h=nxt - sig, dtype=torch.float32, device=sigmas.device)

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        pos = 1 if len(indices) > 1 else 0
        return indices[pos].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_noise(self, sample, timestep, noise=None):
        """Forward process: sigma noise + (1 - sigma) sample."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule_timesteps = self.timesteps.to(sample.device)
        timestep = timestep.to(sample.device)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, schedule_timesteps) for t in timestep]
        elif self.step_index is not None:
            idx = [self.step_index] * timestep.shape[0]
        else:
            idx = [self.begin_index] * timestep.shape[0]
        sigma = sigmas[idx].flatten()
        while sigma.dim() < sample.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, generator=None, per_token_timesteps=None,
             return_dict=True):
        """x_next = sample + (sigma_next - sigma) model_output, one fused pass,
        computed in float32 (float64 for float64 inputs), returned in
        model_output's dtype."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                         and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as "
                             "timesteps to `FlowMatchEulerDiscreteScheduler.step()` is not "
                             "supported. Make sure to pass one of the `scheduler.timesteps` as "
                             "a timestep.")
        if self._table is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchEulerDiscreteScheduler (flowkern): "
                                      "per_token_timesteps is not implemented")
        if self.step_index is None:
            self._init_step_index(timestep)
        out_dtype = model_output.dtype
        x, v = sample, model_output
        if x.dtype != v.dtype or x.dtype not in (torch.float32, torch.float64):
            x, v = x.to(torch.float32), v.to(torch.float32)
        prev = euler_step(x, v, prediction="velocity", table=self._table[self._step_index])
        self._step_index += 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


# ---------------------------------------------------------------------------
# DPM-Solver++(2M)


def _betas_for_alpha_bar(n, max_beta=0.999):
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def _rescale_zero_terminal_snr(betas):
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


_PRED = {"epsilon": "eps", "sample": "x1", "v_prediction": "velocity",
         "flow_prediction": "velocity"}


def _third_order_weights(a, s, n, sde):
    """diffusers' third-order update (dpmsolver++ / sde-dpmsolver++) on top of
    the fused first-order pass, per step.

    It is linear in (x, m0, m1, m2) (the x0 predictions of the last three
    steps): x' = q x + c0 m0 + c1 m1 + c2 m2, with D1, D2 of r0 = h_0/h,
    r1 = h_1/h expanded on the host. The first-order DPM-Solver++ pass (the
    step's own table row, no d_prev) gives prev = q x + e1 m0 and writes m0;
    one lincomb_step over (prev, m0, m1, m2) with weights (1, c0 - e1, c1,
    c2) completes it (the SDE's noise a fifth term). None where the step
    does not use them (before step 2, into sigma = 0)."""
    a, s = a.double(), s.double()
    lam = (torch.log(a) - torch.log(s)).tolist()
    av = a.tolist()
    weights = []
    for i in range(n):
        if i < 2 or not math.isfinite(lam[i + 1]):
            weights.append(None)
            continue
        h, h0, h1 = lam[i + 1] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
        r0, r1 = h0 / h, h1 / h
        a_t = av[i + 1]
        if sde:
            em = -math.expm1(-2 * h)
            e1, pa = a_t * em, a_t * (em / (-2 * h) + 1)
            pd = a_t * ((em - 2 * h) / (2 * h) ** 2 - 0.5)
        else:
            em = -math.expm1(-h)
            e1, pa = a_t * em, a_t * (-em / h + 1)
            pd = -a_t * ((h - em) / h ** 2 - 0.5)
        big_a = pa * (1 + r0 / (r0 + r1)) + pd / (r0 + r1)   # of D1_0 = (m0 - m1)/r0
        big_b = -pa * r0 / (r0 + r1) - pd / (r0 + r1)        # of D1_1 = (m1 - m2)/r1
        c0, c1, c2 = e1 + big_a / r0, -big_a / r0 + big_b / r1, -big_b / r1
        weights.append([1.0, c0 - e1, c1, c2])
    return weights


def _sde_heun_rows(a, s, n, sde, heun):
    """Table columns (sigma_s, alpha_p, sigma_p) and the SDE noise scale per
    step that make the fused DPM-Solver++(2M) kernel compute diffusers'
    sde-dpmsolver++ and/or heun updates. With lambda = log(alpha/sigma),
    h = lambda_{i+1} - lambda_i, r0 = (lambda_i - lambda_{i-1})/h:
    - SDE: x' = (s'/s) e^{-h} x + a'(1 - e^{-2h}) D + s' sqrt(1 - e^{-2h}) noise
      is the ODE step into the level s' e^{-h} (kernel h_k = 2h), plus noise;
    - the kernel's second-order term is E c2 (d - d_prev), E = a'(1 -
      e^{-h_k}), c2 = 1/(2 r_k), r_k = (lambda_i - lambda_p)/h_k: midpoint
      needs r_k = r0, heun E c2 = a'(1 - (1 - e^{-h_k})/h_k)/r0 (diffusers'
      (e^{-h} - 1)/h + 1, and (1 - e^{-2h})/(-2h) + 1 for the SDE); the
      previous level is placed there (alpha_p = 1, sigma_p = e^{-lambda_p}).
    Computed in float64 from diffusers' float32 (alpha, sigma)."""
    a, s = a.double(), s.double()
    i = torch.arange(n)
    lam = torch.log(a) - torch.log(s)
    h = lam[i + 1] - lam[i]
    h_k = 2 * h if sde else h
    s_next = s[i + 1] * torch.exp(-h) if sde else s[i + 1]
    s_next = torch.where(s[i + 1] == 0, torch.zeros_like(s_next), s_next)  # 0 * e^{-inf}
    scale = s[i + 1] * torch.sqrt(-torch.expm1(-2 * h))
    scale = torch.where(s[i + 1] == 0, torch.zeros_like(scale), scale)
    r0 = (lam[i] - lam[(i - 1).clamp_min(0)]) / h
    r_k = r0
    if heun:
        e = -torch.expm1(-h_k)
        r_k = e * r0 / (2 * (1 - e / h_k))
    lam_p = lam[i] - r_k * h_k
    ok = (i > 0) & torch.isfinite(lam_p)  # first steps and the step into sigma = 0: unused
    a_prev = torch.where(ok, torch.ones_like(lam_p), a[(i - 1).clamp_min(0)])
    s_prev = torch.where(ok, torch.exp(-lam_p), s[(i - 1).clamp_min(0)])
    return s_next, a_prev, s_prev, scale


@_config_signature
class DPMSolverMultistepScheduler(_Base):
    """diffusers' DPMSolverMultistepScheduler with algorithm_type
    "dpmsolver++" or "sde-dpmsolver++", solver_type "midpoint" or "heun",
    solver_order 1, 2 or 3 (3: _third_order_weights), on the fused
    DPM-Solver++(2M) step (the x0 prediction is converted in registers and
    kept for the next steps in internal buffers). The SDE variant and the heun correction are the same
    kernel on adjusted table rows (set_timesteps says how); the SDE noise,
    drawn from step()'s generator as diffusers draws it (or its
    variance_noise), is added in place in a second pass (a third-order
    step's second pass, its lincomb_step, reads it as a term). prediction_type
    "epsilon", "sample", "v_prediction" or "flow_prediction"; beta schedules
    "linear", "scaled_linear", "squaredcos_cap_v2" or trained_betas;
    timestep_spacing "linspace", "leading", "trailing"; use_karras_sigmas,
    use_flow_sigmas; final_sigmas_type "zero" or "sigma_min";
    lower_order_final, euler_at_final, lambda_min_clipped,
    rescale_betas_zero_snr."""

    _defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                     beta_schedule="linear", trained_betas=None, solver_order=2,
                     prediction_type="epsilon", thresholding=False,
                     dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                     algorithm_type="dpmsolver++", solver_type="midpoint",
                     lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                     use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                     lambda_min_clipped=-float("inf"), variance_type=None,
                     timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                     use_dynamic_shifting=False, time_shift_type="exponential")

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        # diffusers maps the configs of its other multistep solvers onto this
        # one (DEIS: algorithm "deis", solver "logrho"; UniPC: solver "bh1"/
        # "bh2"), which is what makes from_config(pipe.scheduler.config) work
        # from them: the same mapping, the same registered config
        if c.algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        if c.solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        c = self.config
        self._unsupported([
            ("algorithm_type", c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++")),
            ("solver_type", c.solver_type not in ("midpoint", "heun")),
            ("solver_order", c.solver_order not in (1, 2, 3)),
            ("thresholding", c.thresholding),
            ("use_exponential_sigmas", c.use_exponential_sigmas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("use_lu_lambdas", c.use_lu_lambdas),
            ("use_dynamic_shifting", c.use_dynamic_shifting),
        ])
        if c.prediction_type not in _PRED:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of "
                             f"{sorted(_PRED)}")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but "
                             f"got {c.final_sigmas_type}")
        n = c.num_train_timesteps
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float32)
        elif c.beta_schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
        elif c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n,
                                   dtype=torch.float32) ** 2
        elif c.beta_schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(n)
        else:
            raise NotImplementedError(f"{c.beta_schedule} is not implemented for "
                                      f"{type(self).__name__}")
        if c.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.lower_order_nums = 0
        self._table = None
        self._d = None
        self._k = 0

    # -- the discrete schedule ------------------------------------------------

    def _sigma_to_t(self, sigma, log_sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)

    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        c = self.config
        if mu is not None:
            raise NotImplementedError("DPMSolverMultistepScheduler (flowkern): mu (dynamic "
                                      "shifting) is not implemented")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None and c.use_karras_sigmas:
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas = True`")
        n_train = c.num_train_timesteps
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped)
            last = ((n_train - clipped_idx).numpy()).item()
            if c.timestep_spacing == "linspace":
                timesteps = (np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1]
                             .copy().astype(np.int64))
            elif c.timestep_spacing == "leading":
                ratio = last // (num_inference_steps + 1)
                timesteps = ((np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1]
                             .copy().astype(np.int64))
                timesteps += c.steps_offset
            elif c.timestep_spacing == "trailing":
                ratio = n_train / num_inference_steps
                timesteps = np.arange(last, 0, -ratio).round().copy().astype(np.int64)
                timesteps -= 1
            else:
                raise ValueError(f"{c.timestep_spacing} is not supported. Please make sure to "
                                 f"choose one of 'linspace', 'leading' or 'trailing'.")
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy().copy()
        log_sigmas = np.log(sigmas)
        if c.use_karras_sigmas:
            s = np.flip(sigmas).copy()
            lo, hi = s[-1].item(), s[0].item()
            ramp = np.linspace(0, 1, num_inference_steps)
            a, b = hi ** (1 / 7.0), lo ** (1 / 7.0)
            sigmas = (a + ramp * (b - a)) ** 7.0
            timesteps = np.array([self._sigma_to_t(x, log_sigmas) for x in sigmas])
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif c.use_flow_sigmas:
            alphas = np.linspace(1, 1 / n_train, num_inference_steps + 1)
            s = 1.0 - alphas
            sigmas = np.flip(c.flow_shift * s / (1 + (c.flow_shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * n_train).copy()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if c.final_sigmas_type == "sigma_min":
            last_sigma = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            last_sigma = 0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._d, self._k = None, 0

        # One step table for all steps, from diffusers' own (alpha, sigma) values.
        sig = self.sigmas
        a, s = self._sigma_to_alpha_sigma_t(sig)
        n = len(timesteps)
        i = torch.arange(n)
        prev = (i - 1).clamp_min(0)
        if c.prediction_type == "v_prediction":
            da, ds = -s, a
        elif c.prediction_type == "flow_prediction":
            da, ds = -torch.ones_like(s), torch.ones_like(s)
        else:
            da, ds = torch.zeros_like(s), torch.zeros_like(s)
        s_next, a_prev, s_prev = s[i + 1], a[prev], s[prev]
        sde, heun = c.algorithm_type == "sde-dpmsolver++", c.solver_type == "heun"
        self._noise_scale = None
        if sde or heun:
            s_next, a_prev, s_prev, scale = _sde_heun_rows(a, s, n, sde, heun)
            # float32 as diffusers computes it, kept on the host: the noise add's alpha
            self._noise_scale = scale.to(torch.float32).tolist() if sde else None
        cols = [a[i], s[i], da[i], ds[i], a[i + 1], s_next, da[i + 1], ds[i + 1],
                a_prev, s_prev, torch.zeros(n), torch.zeros(n)]
        self._table = torch.stack([col.to(torch.float32) for col in cols], 1).to(device)
        self._third = _third_order_weights(a, s, n, sde) if c.solver_order == 3 else None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        cand = (schedule_timesteps == timestep).nonzero()
        if len(cand) == 0:
            return len(self.timesteps) - 1
        return cand[1].item() if len(cand) > 1 else cand[0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None,
             return_dict=True):
        """One fused DPM-Solver++ step (first order at the first step and, per
        diffusers' rules, at the last), returned in model_output's dtype."""
        if self._table is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        c = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self.timesteps)
        lower_order_final = (i == n - 1) and (
            c.euler_at_final or (c.lower_order_final and n < 15)
            or c.final_sigmas_type == "zero")
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        out_dtype = model_output.dtype
        x, p = sample, model_output
        if x.dtype != p.dtype or x.dtype not in (torch.float32, torch.float64):
            x, p = x.to(torch.float32), p.to(torch.float32)
        lower_order_second = (i == n - 2) and c.lower_order_final and n < 15
        ring = max(2, c.solver_order)  # the x0 history (the kernel writes d_t into it)
        if (self._d is None or len(self._d) != ring or self._d[0].shape != x.shape
                or self._d[0].dtype != x.dtype or self._d[0].device != x.device):
            self._d = [torch.empty_like(x, memory_format=torch.contiguous_format)
                       for _ in range(ring)]
            self._k = 0
        k = self._k
        first = c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final
        third = not first and not (c.solver_order == 2 or self.lower_order_nums < 2
                                   or lower_order_second)
        d_prev = None if first or third else self._d[(k - 1) % ring]
        table = self._table[i]
        if table.device != x.device:
            table = table.to(x.device)
        noise = None
        if self._noise_scale is not None:  # diffusers' draw: same generator calls
            noise = (randn_tensor(model_output.shape, generator=generator,
                                  device=model_output.device, dtype=torch.float32)
                     if variance_noise is None
                     else variance_noise.to(device=model_output.device, dtype=torch.float32))
        prev, _ = dpmpp_2m_step(x, p, prediction=_PRED[c.prediction_type], d_prev=d_prev,
                                table=table, d_out=self._d[k])
        if third and self._third[i] is not None:  # the rest (_third_order_weights)
            terms = [self._d[(k - j) % ring] for j in range(3)]
            weights = self._third[i]
            if noise is not None:  # the SDE's noise in the same pass
                terms, weights = terms + [noise.to(prev.dtype)], weights + [self._noise_scale[i]]
                noise = None
            prev = lincomb_step(prev, terms, weights, out=prev)
        if noise is not None:
            prev.add_(noise.to(prev.dtype), alpha=self._noise_scale[i])  # one pass, in place
        self._k = (k + 1) % ring
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples, noise, timesteps):
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:
            idx = [self.step_index] * timesteps.shape[0]
        else:
            idx = [self.begin_index] * timesteps.shape[0]
        sigma = sigmas[idx].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise


# diffusers' Euler schedulers, subclassed with a fused step (their own module)
from ._diffusers_subclassed import (DDIMScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                                    EulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                                    UniPCMultistepScheduler)
