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
pass, so seeded pipelines give diffusers' samples. EulerAncestral's step()
without a generator (diffusers then draws from torch's global generator)
draws its noise in the kernel instead: flowkern.churn adds sigma_up xi,
xi from Philox keyed by a seed drawn from torch's global generator at the
first such step after set_timesteps (step i at offset i x.numel()), so
torch.manual_seed still fixes the result. Same law, another stream than
diffusers' randn; and no (B, ...) randn, which costs more than the whole
fused step on a CPU.
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
from diffusers.schedulers.scheduling_unipc_multistep import (
    UniPCMultistepScheduler as _DiffusersUniPC)
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
import numpy as np

from .._validate import acc_dtype
from ..ops.steps import (churn, dpmpp_2m_step, ei_step, euler_step, heun_step, lincomb_step,
                         noise_stream)
from ..tables import step_row
from .k_diffusion import _ve

_PRED = {"epsilon": "eps", "sample": "x1", "original_sample": "x1", "v_prediction": "velocity",
         "flow_prediction": "velocity"}


def _row(sigma, sigma_hat, sigma_next, prediction_type):
    """One dpmpp_2m_step table row (module docstring) for diffusers' Euler
    step from sigma_hat to sigma_next; sigma is the level the model saw."""
    da = ds = 0.0
    if prediction_type == "v_prediction":
        root = math.sqrt(1.0 + sigma * sigma)
        da, ds = -sigma / root, sigma_hat / (sigma * root)
    return step_row((1.0, sigma_hat, da, ds), (1.0, sigma_next, 0.0, 0.0))


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
    sigma_up * randn from the generator, drawn as diffusers draws it; without
    a generator, sigma_up * xi drawn in the kernel (module docstring)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        sig = self.sigmas.tolist()
        rows, ups, noise_rows = [], [], []
        for i in range(len(sig) - 1):
            s, nxt = sig[i], sig[i + 1]
            up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
            down = (nxt ** 2 - up ** 2) ** 0.5
            rows.append(_row(s, s, down, self.config.prediction_type))
            ups.append(up)
            # churn from (alpha, sigma) = (1, 0) to (1, up): x + sqrt(up^2 - 0) xi
            noise_rows.append(step_row((1.0, 0.0, 0.0, 0.0), (1.0, up, 0.0, 0.0)))
        self._fk_rows = torch.tensor(rows, dtype=torch.float64).to(self.timesteps.device)
        self._fk_noise_rows = torch.tensor(noise_rows, dtype=torch.float64).to(
            self.timesteps.device)
        self._fk_ups = ups
        self._fk_noise = None  # the in-kernel noise stream, drawn at the first step

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
        if generator is None:  # in the kernel, in place (module docstring)
            if self._fk_noise is None:  # one seed a run: the steps read no value
                self._fk_noise = noise_stream(None, None, prev)
            churn(prev, table=self._fk_noise_rows[i].to(prev.dtype), out=prev,
                  **self._fk_noise.at(i))
        else:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype,
                                 device=model_output.device, generator=generator)
            if noise.dtype == prev.dtype:  # one pass, in place
                prev.add_(noise, alpha=self._fk_ups[i])
            else:  # diffusers rounds noise * sigma_up in the noise's dtype (float16)
                prev.add_(noise * self._fk_ups[i])
        prev = prev.to(model_output.dtype)
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
    return _ve(1.0, 1.0, h=h)


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




def _lincomb_run(x, bufs, coeffs, backend=None):
    """q x + sum_k c_k bufs[k] for coeffs = (q, [c_0, c_1, ...]) (host floats):
    one fused lincomb_step pass."""
    q, cs = coeffs
    return lincomb_step(x, bufs[:len(cs)], [q, *cs], backend=backend)


def _unipc_rhos(rks, hh, b_h, order, corrector):
    """diffusers' UniPC rhos (bh1/bh2): the R rows rks^(i-1), the b of
    h phi_k(h) k!/B(h); the predictor's order 2 is 0.5, the corrector's order
    1 is 0.5, else a small solve (in float64 here, float32 in diffusers)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    if corrector:
        return [0.5] if order == 1 else list(np.linalg.solve(np.array(rows), np.array(b)))
    if order == 2:
        return [0.5]
    return list(np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1]))


class UniPCMultistepScheduler(_DiffusersUniPC):
    """diffusers' UniPCMultistepScheduler (bh1/bh2, orders 1-3, predict_x0)
    whose step is fused: the model output converted to x0 in one pass (the
    data-form exponential step into sigma = 0 is exactly the conversion),
    then UniC's correction and UniP's prediction, each linear in a sample
    and the x0 history: one fused lincomb_step pass each (three passes a
    step). The coefficients (rhos) are computed on the host at set_timesteps
    for the step sequence diffusers runs (kernel arguments: nothing is
    uploaded); a step off that sequence computes its own then. thresholding, predict_x0=False and solver_p run diffusers' own
    step (not fused). Into sigma = 0 the bh1 update is diffusers' NaN
    (B(h) = -inf times 0); here it is its limit, the x0 prediction."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        sig = self.sigmas.tolist()
        if self.config.use_flow_sigmas:
            self._fk_as = [(1 - v, v) for v in sig]
        else:
            self._fk_as = [(1 / math.sqrt(v * v + 1), v / math.sqrt(v * v + 1)) for v in sig]
        self._fk_hist, self._fk_last = None, None
        self._fk_plans = self._plan_all()

    def _lam(self, k):
        a, s = self._fk_as[k]
        return math.log(a) - math.log(s)

    def _coeffs(self, i_s0, i_t, order, corrector):
        """(q, coefficients) of UniC (buffers [m_t, m0, m_1, ...]) or UniP
        ([m0, m_1, ...]) from level i_s0 to i_t; None into sigma = 0 (x0)."""
        c = self.config
        a_t, s_t = self._fk_as[i_t]
        if s_t == 0:
            return None
        h = self._lam(i_t) - self._lam(i_s0)
        hh = -h
        b_h = hh if c.solver_type == "bh1" else math.expm1(hh)
        rks = [(self._lam(i_s0 - k) - self._lam(i_s0)) / h for k in range(1, order)] + [1.0]
        rhos = _unipc_rhos(rks, hh, b_h, order, corrector) if (order > 1 or corrector) else []
        ks = [-a_t * b_h * rhos[k - 1] / rks[k - 1] for k in range(1, order)]  # of D1_k
        m0 = -a_t * math.expm1(hh) - sum(ks)
        q = s_t / self._fk_as[i_s0][1]
        if not corrector:
            return q, [m0] + ks
        ct = -a_t * b_h * rhos[-1]  # UniC's rhos[-1] (model_t - m0)
        return q, [ct, m0 - ct] + ks

    def _plan_all(self):
        """The step sequence diffusers runs (begin_index None, every step):
        per step (corrector order or 0, this_order) and the host rows."""
        c = self.config
        n = len(self.timesteps)
        plans, low, prev_order = [], 0, None
        for i in range(n):
            corr = prev_order if (i > 0 and (i - 1) not in self.disable_corrector) else 0
            order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
            order = min(order, low + 1)
            plans.append((corr, order,
                          self._coeffs(i - 1, i, corr, True) if corr else None,
                          self._coeffs(i, i + 1, order, False)))
            low, prev_order = min(low + 1, c.solver_order), order
        return plans

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        c = self.config
        if (c.thresholding or not self.predict_x0 or self.solver_p is not None
                or c.solver_type not in ("bh1", "bh2")):
            return super().step(model_output, timestep, sample, return_dict)
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self.step_index, len(self.timesteps)
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector \
            and self._fk_last is not None
        this_order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        this_order = min(this_order, self.lower_order_nums + 1)
        corr = self.this_order if use_corrector else 0
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        x = sample.to(dtype)
        ring = c.solver_order + 1
        if self._fk_hist is None or self._fk_hist[0].shape != x.shape \
                or self._fk_hist[0].dtype != x.dtype or self._fk_hist[0].device != x.device:
            self._fk_hist = [torch.empty_like(x, memory_format=torch.contiguous_format)
                             for _ in range(ring)]
        hist = self._fk_hist
        m_t = hist[i % ring]
        past = [hist[(i - k) % ring] for k in range(1, ring)]  # x0 at i-1, i-2, ...
        conv = self._conv_row(i, x)
        if self._fk_plans[i][:2] == (corr, this_order):  # the planned sequence
            cc, pc = self._fk_plans[i][2:]
        else:  # off the plan (a begin_index, a skipped step): coefficients now
            cc = self._coeffs(i - 1, i, corr, True) if corr else None
            pc = self._coeffs(i, i + 1, this_order, False)
        pred = _PRED[c.prediction_type]
        # the x0 of the model output at this sample, before the correction (diffusers)
        ei_step(x, model_output.to(dtype), prediction=pred, form="data", table=conv, out=m_t)
        if corr:
            x = past[0].clone() if cc is None else _lincomb_run(
                self._fk_last, [m_t, past[0]] + past[1:corr], cc)
        self.this_order = this_order
        self._fk_last = x
        prev = m_t.clone() if pc is None else _lincomb_run(
            x, [m_t] + past[:this_order - 1], pc)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _conv_row(self, i, x):
        """The ei_step row converting the model output at step i to x0 (data
        form into (alpha, sigma) = (1, 0)), cached on the device."""
        key = (x.device, x.dtype)
        if getattr(self, "_fk_conv", None) is None or self._fk_conv[0] != key:
            c = self.config
            tab = acc_dtype(x.dtype)
            rows = []
            for a, s in self._fk_as[:-1]:
                da, ds = {"v_prediction": (-s, a), "flow_prediction": (-1.0, 1.0)}.get(
                    c.prediction_type, (0.0, 0.0))
                rows.append(step_row((a, s, da, ds), (1.0, 0.0, 0.0, 0.0)))
            self._fk_conv = (key, torch.tensor(rows, dtype=tab).to(x.device))
        return self._fk_conv[1][i]


# Their public home: a saved pipeline's model_index.json records the module,
# and diffusers looks the loading class (SchedulerMixin) up in it on reload.
for _cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler,
             FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler):
    _cls.__module__ = "flowkern.integrations.diffusers"
