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

They are diffusers' own scheduler classes, subclassed: ``from_config`` of
any compatible scheduler's config (UniPC's and DEIS's included, mapped as
diffusers maps them), every schedule option, ``save_pretrained`` /
``from_pretrained`` (a saved pipeline reloads with flowkern's scheduler),
``compatibles`` and the output classes are diffusers' code; step() is
flowkern's fused one. A step configuration the fused steps do not implement
runs diffusers' own step (DPMSolverMultistepScheduler.fused, DDIM's
clip_sample, FlowMatchEuler's stochastic_sampling).
"""
from __future__ import annotations

import math

import torch

try:  # real diffusers schedulers: its config, save/load and output classes
    from diffusers.schedulers.scheduling_dpmsolver_multistep import (
        DPMSolverMultistepScheduler as _DiffusersDPM)
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler as _DiffusersFMEuler,
        FlowMatchEulerDiscreteSchedulerOutput)
    # SchedulerMixin: a saved pipeline's model_index.json names this module,
    # and diffusers looks the loading class up in it on reload
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput  # noqa: F401
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised without the peer
    raise ImportError("flowkern.integrations.diffusers: the diffusers adapters are diffusers "
                      "schedulers and need diffusers installed (pip install diffusers)") from e

from ..ops.steps import dpmpp_2m_step, euler_step, lincomb_step, step_table

__all__ = ["FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
           "FlowMatchHeunDiscreteScheduler", "UniPCMultistepScheduler", "SchedulerOutput"]


# ---------------------------------------------------------------------------
# Flow matching, Euler


class FlowMatchEulerDiscreteScheduler(_DiffusersFMEuler):
    """diffusers' FlowMatchEulerDiscreteScheduler (a subclass: its config,
    timesteps and sigmas, every schedule option -- shift, dynamic shifting
    with ``mu``, shift_terminal, karras/exponential/beta sigmas,
    invert_sigmas, custom ``sigmas``/``timesteps`` --, scale_noise, save/load
    are diffusers' own) whose deterministic Euler step is one fused pass.
    stochastic_sampling and per_token_timesteps run diffusers' own step (not
    fused)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        # One table for all steps: t = 1 - sigma (our time), and h = sigma_next -
        # sigma so that the model's -u is used as is (see the module docstring).
        sig, nxt = self.sigmas[:-1], self.sigmas[1:]
        self._table = step_table("linear", (1 - sig).clamp(0, 1), (1 - nxt).clamp(0, 1),
                                 h=nxt - sig, dtype=torch.float32, device=self.sigmas.device)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0,
             s_tmax=float("inf"), s_noise=1.0, generator=None, per_token_timesteps=None,
             return_dict=True):
        """x_next = sample + (sigma_next - sigma) model_output, one fused pass,
        computed in float32 (float64 for float64 inputs), returned in
        model_output's dtype."""
        if self.config.stochastic_sampling or per_token_timesteps is not None:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax,
                                s_noise, generator, per_token_timesteps, return_dict)
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                         and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as "
                             "timesteps to `FlowMatchEulerDiscreteScheduler.step()` is not "
                             "supported. Make sure to pass one of the `scheduler.timesteps` as "
                             "a timestep.")
        if getattr(self, "_table", None) is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        out_dtype = model_output.dtype
        x, v = sample, model_output
        if x.dtype != v.dtype or x.dtype not in (torch.float32, torch.float64):
            x, v = x.to(torch.float32), v.to(torch.float32)
        table = self._table[self._step_index]
        if table.device != x.device:
            table = table.to(x.device)
        prev = euler_step(x, v, prediction="velocity", table=table)
        self._step_index += 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


# ---------------------------------------------------------------------------
# DPM-Solver++(2M)


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


class DPMSolverMultistepScheduler(_DiffusersDPM):
    """diffusers' DPMSolverMultistepScheduler (a subclass: its config,
    timesteps and sigmas, every schedule option, add_noise, save/load and
    compatibles are diffusers' own) whose step() is the fused
    DPM-Solver++(2M) step for algorithm_type "dpmsolver++" or
    "sde-dpmsolver++", solver_type "midpoint" or "heun", solver_order 1, 2 or
    3 (3: _third_order_weights), prediction_type "epsilon", "sample",
    "v_prediction" or "flow_prediction", on any sigma grid (karras,
    exponential, beta, Lu lambdas, flow sigmas with dynamic shifting, ...):
    the x0 prediction is converted in registers and kept for the next steps
    in internal buffers. The SDE variant and the heun correction are the same
    kernel on adjusted table rows (set_timesteps says how); the SDE noise,
    drawn from step()'s generator as diffusers draws it (or its
    variance_noise), is added in place in a second pass (a third-order
    step's second pass, its lincomb_step, reads it as a term). The other
    configurations diffusers offers (algorithm_type "dpmsolver" or
    "sde-dpmsolver", thresholding, which clamps x0 by a per-sample quantile,
    solver_order > 3) run diffusers' own step() (not fused; ``fused`` says
    which)."""

    @property
    def fused(self) -> bool:
        """Whether step() is flowkern's fused step (else diffusers' own)."""
        c = self.config
        return (c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
                and c.solver_type in ("midpoint", "heun") and c.solver_order in (1, 2, 3)
                and not c.thresholding and c.prediction_type in _PRED)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._d, self._k, self._table = None, 0, None
        if not self.fused:
            return
        # One step table for all steps, from diffusers' own (alpha, sigma) values.
        c = self.config
        sig = self.sigmas
        a, s = self._sigma_to_alpha_sigma_t(sig)
        n = len(self.timesteps)
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
        self._table = torch.stack([col.to(torch.float32) for col in cols], 1).to(
            self.timesteps.device)
        self._third = _third_order_weights(a, s, n, sde) if c.solver_order == 3 else None

    def step(self, model_output, timestep, sample=None, generator=None, variance_noise=None,
             return_dict=True):
        """One fused DPM-Solver++ step (first order at the first step and, per
        diffusers' rules, at the last), returned in model_output's dtype; or
        diffusers' own step where the configuration is not fused."""
        if not self.fused:
            return super().step(model_output, timestep, sample, generator, variance_noise,
                                return_dict)
        if self.num_inference_steps is None or self._table is None:
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


# diffusers' Euler schedulers, subclassed with a fused step (their own module)
from ._diffusers_subclassed import (DDIMScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                                    EulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                                    UniPCMultistepScheduler)
