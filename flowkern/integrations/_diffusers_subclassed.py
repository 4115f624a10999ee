"""diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
DDIMScheduler and FlowMatchHeunDiscreteScheduler with fused steps.

Each class IS diffusers' scheduler (a subclass): its config, timesteps,
sigmas, ``scale_model_input``, ``add_noise``, save/load and compatibles are
diffusers' own code, so every option diffusers offers for the schedule
(karras/exponential/beta sigmas, timestep spacing, interpolation, zero-SNR
rescaling, custom sigmas, ...) behaves as in diffusers. Only ``step()`` is
flowkern's: one fused pass instead of diffusers' 6-10 tensor ops.

The step. diffusers' Euler state is k-diffusion's VE state: sample =
x1 + sigma eps, and its step is sample + (sigma_next - sigma_hat)
(sample - x0)/sigma_hat, which for a VE state is exactly the first-order
DPM-Solver++ (DDIM) step (sigma_next/sigma_hat) sample + (1 -
sigma_next/sigma_hat) x0. flowkern's dpmpp_2m_step without d_prev computes
that, converting the model output to x0 in registers, and returns x0 as its
second output: prev_sample and pred_original_sample from one pass. The
table row: alpha = 1, sigma_t = sigma_hat, sigma_s = sigma_next, and for
v-prediction (diffusers' x0 = sample/(sigma^2 + 1) - sigma v/sqrt(sigma^2 + 1),
the VP velocity in VE coordinates) the derivative columns d_alpha =
-sigma/sqrt(1 + sigma^2), d_sigma = sigma_hat/(sigma sqrt(1 + sigma^2)), for
which the kernel's velocity -> x1 conversion (d_sigma x - sigma u)/det,
det = d_sigma - sigma_hat d_alpha, is diffusers' formula.

Noise (churn in Euler, the ancestral noise in EulerAncestral) is drawn from
step()'s generator exactly as diffusers draws it, and added in a separate
pass, so seeded pipelines give diffusers' samples.
"""
from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler as _DiffusersDDIM
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler as _DiffusersEulerAncestral,
    EulerAncestralDiscreteSchedulerOutput)
from diffusers.schedulers.scheduling_flow_match_heun_discrete import (
    FlowMatchHeunDiscreteScheduler as _DiffusersFMHeun, FlowMatchHeunDiscreteSchedulerOutput)
from diffusers.schedulers.scheduling_euler_discrete import (
    EulerDiscreteScheduler as _DiffusersEuler, EulerDiscreteSchedulerOutput)
from diffusers.utils.torch_utils import randn_tensor

from ..ops.steps import dpmpp_2m_step, euler_step, heun_step

_PRED = {"epsilon": "eps", "sample": "x1", "original_sample": "x1", "v_prediction": "velocity"}


def _row(sigma, sigma_hat, sigma_next, prediction_type):
    """One dpmpp_2m_step table row (module docstring) for diffusers' Euler
    step from sigma_hat to sigma_next; sigma is the level the model saw."""
    da = ds = 0.0
    if prediction_type == "v_prediction":
        root = math.sqrt(1.0 + sigma * sigma)
        da, ds = -sigma / root, sigma_hat / (sigma * root)
    return [1.0, sigma_hat, da, ds, 1.0, sigma_next, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def _check_prediction(sched, allowed):
    p = sched.config.prediction_type
    if p not in allowed:
        raise ValueError(f"prediction_type given as {p} must be one of "
                         f"{', '.join(sorted(allowed))}")
    return _PRED[p]


def _check_timestep(name, timestep):
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as "
                         f"timesteps to `{name}.step()` is not supported. Make sure to pass one "
                         f"of the `scheduler.timesteps` as a timestep.")


def _fused(x, model_output, prediction, row):
    """(prev_sample, pred_original_sample) in float32 (float64 for float64
    inputs), one pass."""
    acc = torch.float64 if x.dtype == torch.float64 == model_output.dtype else torch.float32
    x, p = x.to(acc), model_output.to(acc)
    return dpmpp_2m_step(x, p, prediction=prediction, table=row.to(x.device, acc))


class EulerDiscreteScheduler(_DiffusersEuler):
    """diffusers' EulerDiscreteScheduler whose step() is one fused pass
    (module docstring). Churn (s_churn > 0) draws diffusers' noise from the
    generator and adds it first, as diffusers does."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        # diffusers keeps sigmas on the CPU: one host copy here, none in step()
        sig = self._fk_sig = self.sigmas.tolist()
        rows = [_row(sig[i], sig[i], sig[i + 1], self.config.prediction_type)
                for i in range(len(sig) - 1)]
        self._fk_rows = torch.tensor(rows, dtype=torch.float64).to(self.timesteps.device)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        _check_timestep("EulerDiscreteScheduler", timestep)
        prediction = _check_prediction(self, {"epsilon", "sample", "original_sample",
                                              "v_prediction"})
        if self.step_index is None:
            self._init_step_index(timestep)
        i, sig = self.step_index, self._fk_sig
        sigma = sig[i]
        gamma = min(s_churn / (len(sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sample = sample.to(torch.float32)
        row = self._fk_rows[i]
        if gamma > 0:
            sigma_hat = sigma * (gamma + 1)
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype,
                                 device=model_output.device, generator=generator)
            sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
            row = torch.tensor(_row(sigma, sigma_hat, sig[i + 1], self.config.prediction_type),
                               dtype=torch.float64)
        prev, x0 = _fused(sample, model_output, prediction, row)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_DiffusersEulerAncestral):
    """diffusers' EulerAncestralDiscreteScheduler whose step() is one fused
    pass to sigma_down (module docstring) plus the ancestral noise
    sigma_up * randn from the generator, drawn as diffusers draws it."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        sig = self.sigmas.tolist()
        rows, ups = [], []
        for i in range(len(sig) - 1):
            s, nxt = sig[i], sig[i + 1]
            up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
            down = (nxt ** 2 - up ** 2) ** 0.5
            rows.append(_row(s, s, down, self.config.prediction_type))
            ups.append(up)
        self._fk_rows = torch.tensor(rows, dtype=torch.float64).to(self.timesteps.device)
        self._fk_ups = ups

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        _check_timestep("EulerDiscreteScheduler", timestep)
        if self.config.prediction_type == "sample":  # as diffusers
            raise NotImplementedError("prediction_type not implemented yet: sample")
        prediction = _check_prediction(self, {"epsilon", "v_prediction"})
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        sample = sample.to(torch.float32)
        prev, x0 = _fused(sample, model_output, prediction, self._fk_rows[i])
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype,
                             device=model_output.device, generator=generator)
        prev = (prev + noise * self._fk_ups[i]).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DDIMScheduler(_DiffusersDDIM):
    """diffusers' DDIMScheduler whose step() is one fused pass:
    prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps (+ std noise)
    is the first-order DPM-Solver++ step into the level (alpha_s, sigma_s') =
    (sqrt(abar_prev), sqrt(1 - abar_prev - std^2)), whose kernel also returns
    x0 (pred_original_sample). The rows are built once per eta for every
    training timestep, on the timesteps' device, and picked by the timestep
    there (no host read). clip_sample / thresholding clamp x0, which no fused
    step does: with them step() is diffusers' own (not fused)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fk_rows = {}

    def _fk_table(self, eta):
        if eta not in self._fk_rows:
            c = self.config
            n_train = c.num_train_timesteps
            ac = self.alphas_cumprod.double()
            t = torch.arange(n_train)
            prev = t - n_train // self.num_inference_steps
            a_t = ac[t]
            a_p = torch.where(prev >= 0, ac[prev.clamp_min(0)],
                              self.final_alpha_cumprod.double())
            var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)  # _get_variance
            std = eta * var.sqrt()
            al, sg = a_t.sqrt(), (1 - a_t).sqrt()
            v = c.prediction_type == "v_prediction"
            zero, one = torch.zeros_like(al), torch.ones_like(al)
            cols = [al, sg, -sg if v else zero, al if v else zero, a_p.sqrt(),
                    (1 - a_p - std * std).clamp_min(0).sqrt(), zero, zero, one, one, zero, zero]
            dev = self.timesteps.device
            self._fk_rows[eta] = (torch.stack(cols, 1).to(dev), std.to(dev))
        return self._fk_rows[eta]

    def step(self, model_output, timestep, sample, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        c = self.config
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if c.thresholding or c.clip_sample:  # x0 is clamped: diffusers' own step
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output,
                                generator, variance_noise, return_dict)
        prediction = _check_prediction(self, {"epsilon", "sample", "v_prediction"})
        rows, std = self._fk_table(float(eta))
        if isinstance(timestep, torch.Tensor):  # a gather on the device: no host read
            idx = timestep.reshape(1).to(rows.device, torch.long)
            row, scale = rows.index_select(0, idx)[0], std.index_select(0, idx)[0]
        else:
            row, scale = rows[int(timestep)], std[int(timestep)]
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        prev, x0 = dpmpp_2m_step(sample.to(dtype), model_output.to(dtype),
                                 prediction=prediction, table=row)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make "
                                 "sure that either `generator` or `variance_noise` stays `None`.")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator,
                                              device=model_output.device,
                                              dtype=model_output.dtype)
            prev = prev + (scale.to(prev.dtype) * variance_noise).to(prev.dtype)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _h_row(h):
    """A velocity-prediction step row: only h is read (u is the prediction)."""
    return [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, h, 0.0]


class FlowMatchHeunDiscreteScheduler(_DiffusersFMHeun):
    """diffusers' FlowMatchHeunDiscreteScheduler whose two stages are the fused
    Euler step (the predictor x + dt v, diffusers' first call) and the fused
    Heun step (x + dt (v + v_2)/2 from the first call's x and v, its second
    call). diffusers' v = noise - data is the step's -u over sigma = 1 - t, so
    (sigma_next - sigma) v is read as is (as FlowMatchEulerDiscreteScheduler
    does). Churn draws diffusers' noise from the generator, as diffusers
    (its second-stage draw is made and, as there, unused)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        sig = self._fk_sig = self.sigmas.tolist()  # once, at set-up
        rows = [_h_row(sig[i + 1] - sig[i]) for i in range(len(sig) - 1)]
        self._fk_rows = torch.tensor(rows, dtype=torch.float32).to(self.sigmas.device)
        self._fk_x = self._fk_v = None

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        _check_timestep("FlowMatchHeunDiscreteScheduler", timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        i, sig = self.step_index, self._fk_sig
        first = self.state_in_first_order
        sigma = sig[i] if first else sig[i - 1]
        nxt = sig[i + 1] if first else sig[i]
        gamma = min(s_churn / (len(sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        sample = sample.to(torch.float32)
        v = model_output.to(sample.dtype)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype,
                                 device=model_output.device, generator=generator)
            if first:  # the second stage's noise only moves a sample it does not use
                sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        if first:
            row = self._fk_rows[i]
            if gamma > 0:  # derivative v sigma/sigma_hat over dt = sigma_next - sigma_hat
                v = v * (sigma / sigma_hat)
                row = torch.tensor(_h_row(nxt - sigma_hat)).to(sample.device)
            prev = euler_step(sample, v, prediction="velocity", table=row)
            self.dt, self._fk_x, self._fk_v, self._fk_row = nxt - sigma_hat, sample, v, row
        else:
            prev = heun_step(self._fk_x, self._fk_v, sample, v, prediction="velocity",
                             table=self._fk_row)
            self.dt = self._fk_x = self._fk_v = self._fk_row = None
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev)


# Their public home: a saved pipeline's model_index.json records the module,
# and diffusers looks the loading class (SchedulerMixin) up in it on reload.
for _cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler,
             FlowMatchHeunDiscreteScheduler):
    _cls.__module__ = "flowkern.integrations.diffusers"
