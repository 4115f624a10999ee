"""Benchmarks of the sampler-step family (flowkern.euler_step, heun_step,
ei_step, dpmpp_2m_step, em_step, lms_step) per step, and of a whole sampling loop's
non-model overhead, against the peers' schedulers and samplers.

State: (64, 65536) fp32 (4M elements; 16M with `large`), the model output a
fixed random tensor (steps) or the identity (loops: a trivial model, so the
loop's own cost is what is timed). Every step candidate writes into an
existing buffer where its API allows it (flowkern out=; the peers allocate).

Groups "<step> · <size> · per step":
  euler     flowkern.euler_step            | eager x + h*v (diffusers FlowMatchEuler's
            formula) | torch.compile(eager) | diffusers FlowMatchEulerDiscreteScheduler.step
  heun      flowkern euler_step + heun_step (both stages) | eager (both stages)
  ei (DDIM) flowkern.ei_step(eps, noise form) | eager DDIM formula | diffusers DDIMScheduler.step
  dpmpp_2m  flowkern.dpmpp_2m_step (2nd order) | eager | diffusers
            DPMSolverMultistepScheduler(dpmsolver++, order 2).step
  em        flowkern.em_step (noise in the kernel) | eager with torch.randn_like
  lms       flowkern.lms_step (order 4: d_t and three earlier d) | k-diffusion
            sample_lms's step as it writes it (to_d, then x + sum(c * d)) |
            torch.compile of it
  dpmpp_3m_sde  flowkern.lincomb_step (x and three denoised outputs, noise in
            the kernel) | k-diffusion sample_dpmpp_3m_sde's step as it writes it
            (0-dim tensor scalars, torch.randn_like noise) | torch.compile of it
  diffusers euler  flowkern.integrations.diffusers.EulerDiscreteScheduler.step (one fused
            pass, prev_sample and pred_original_sample) | diffusers' own step()
  roofline bytes: diffusers euler 16 B/elem (read sample, model output; write prev, x0);
  euler/ei/em 12 B/elem (read x, pred; write x_s); heun 32 (stage 1:
  12, stage 2 reads x, pred, x_e, pred_e and writes x_s: 20); dpmpp_2m 20 (read x,
  pred, d_prev; write x_s, d_t); lms 28 (read x, denoised, three earlier d;
  write x_s, d_t); dpmpp_3m_sde 20 (read x and three denoised; write x_s).
Groups "loop · <size> · per step" (trivial model, 20 steps, per step):
  flowkern.sample(method) | diffusers scheduler loop | k-diffusion sample_* |
  the sum of the fused steps alone (the loop's floor) | flowkern's k-diffusion
  adapter against k-diffusion for dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral,
  dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde, lms, dpm_fast (n = 20 model calls,
  sigma 80 -> 0.02: six DPM-Solver-3 steps and one DPM-Solver-2) and
  dpm_adaptive (the same range, order 3, the same rtol/atol on both sides: the
  trivial model's error estimate is 0, so both accept every step, h growing
  from h_init, and take the same 6 steps, 18 model calls) | flowkern's
  diffusers schedulers (Euler, EulerAncestral, DDIM, UniPC, DPM-Solver++ order 3,
  FlowMatchHeun) against diffusers' own, each a plain loop of set_timesteps and
  step(); EulerAncestral with a generator (both draw diffusers' randn) and
  without one (diffusers draws randn from torch's global generator, flowkern
  in its kernel).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flowkern

ROWS, LOOP_STEPS = 64, 20
SIZES = [pytest.param("4M", 1 << 22, id="4M"),
         pytest.param("16M", 1 << 24, id="16M", marks=[pytest.mark.large])]
_DATA: dict = {}
_COMPILED: dict = {}


def data(n):
    if n not in _DATA:
        g = torch.Generator().manual_seed(n)
        shape = (ROWS, n // ROWS)
        mk = lambda: torch.randn(shape, generator=g)  # noqa: E731
        _DATA[n] = SimpleNamespace(x=mk(), p=mk(), xe=mk(), pe=mk(), dp=mk(), out=mk(),
                                   out2=mk())
    return _DATA[n]


def compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


T, S, TP = 0.4, 0.45, 0.35
TAB = flowkern.step_table("linear", T, S, t_prev=TP)
TAB_VP = flowkern.step_table("vp", T, S, t_prev=TP)


# eager formulas, written the way the peers write them
def eager_euler(x, v):
    return x + (S - T) * v


def eager_heun(x, v, xe, ve):
    x_e = x + (S - T) * v
    return x_e, x + 0.5 * (S - T) * (v + ve)


def _vp(t):
    a, s, _, _ = flowkern.get_schedule("vp")(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


(A_T, S_T), (A_S, S_S), (A_P, S_P) = _vp(T), _vp(S), _vp(TP)


def eager_ddim(x, eps):
    x1 = (x - S_T * eps) / A_T
    return A_S * x1 + S_S * eps


def eager_dpmpp(x, eps, d_prev):
    import math
    d = (x - S_T * eps) / A_T
    lt, ls, lp = math.log(A_T / S_T), math.log(A_S / S_S), math.log(A_P / S_P)
    h, r = ls - lt, (lt - lp) / (ls - lt)
    D = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
    return (S_S / S_T) * x - A_S * math.expm1(-h) * D, d


# sample_lms's step 10 of a 20-step linear sigma grid 80 -> 0.02, order 4
LMS_SIGMAS = [80.0 + (0.02 - 80.0) * i / 19 for i in range(20)] + [0.0]
LMS_SIGMA = LMS_SIGMAS[10]
LMS_ROW = torch.tensor(flowkern.tables.step_row((1.0, LMS_SIGMA, 0.0, 1.0),
                                                (1.0, LMS_SIGMA, 0.0, 1.0)))


def _lms_coeffs():
    from flowkern.integrations.k_diffusion import linear_multistep_coeff
    return [linear_multistep_coeff(4, LMS_SIGMAS, 10, j) for j in range(4)]


LMS_C = _lms_coeffs()


def eager_lms(x, denoised, d1, d2, d3):
    """k-diffusion sample_lms: d = to_d(x, sigma, denoised); x + sum(c_j d_{i-j})."""
    d = (x - denoised) / LMS_SIGMA
    ds = [d3, d2, d1, d]
    return x + sum(c * dd for c, dd in zip(LMS_C, reversed(ds))), d


# sample_dpmpp_3m_sde's step 10 of the same grid (eta = 1, s_noise = 1), all three
# denoised outputs known; k-diffusion's noise_sampler there is a Brownian tree,
# here torch.randn_like (cheaper: the eager candidate is not slowed by it)
SDE_SIG = [torch.tensor(LMS_SIGMAS[i], dtype=torch.float32) for i in (8, 9, 10, 11)]
SDE_H = [math.log(LMS_SIGMAS[i]) - math.log(LMS_SIGMAS[i + 1]) for i in (10, 9, 8)]


def _sde_weights():
    from flowkern.integrations.k_diffusion import dpmpp_3m_sde_weights
    h, h_1, h_2 = SDE_H
    return dpmpp_3m_sde_weights(h, h_1, h_2), \
        LMS_SIGMAS[11] * math.sqrt(-math.expm1(-2 * h))


SDE_W, SDE_STD = _sde_weights()


def eager_3m_sde(x, denoised, denoised_1, denoised_2):
    """k-diffusion sample_dpmpp_3m_sde's step as it writes it (0-dim tensor scalars)."""
    s2, s1, s, nxt = SDE_SIG
    t_2, t_1, t, s_ = -s2.log(), -s1.log(), -s.log(), -nxt.log()
    h, h_1, h_2 = s_ - t, t - t_1, t_1 - t_2
    h_eta = h * 2
    x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (denoised - denoised_1) / r0
    d1_1 = (denoised_1 - denoised_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    x = x + phi_2 * d1 - phi_3 * d2
    return x + torch.randn_like(x) * nxt * (-2 * h).expm1().neg().sqrt()


def eager_em(x, v):
    h, g = S - T, 0.5
    return x + h * v + g * h ** 0.5 * torch.randn_like(x)


def _diffusers(name, **cfg):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, name)(**cfg)
    sched.set_timesteps(50)
    return sched


STEP_CASES = {
    "euler": [
        ("flowkern", lambda d: lambda: flowkern.euler_step(d.x, d.p, table=TAB, out=d.out)),
        ("eager", lambda d: lambda: eager_euler(d.x, d.p)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p))(compiled(eager_euler))),
        ("diffusers FlowMatchEulerDiscreteScheduler.step", "fm_euler"),
    ],
    "heun": [
        ("flowkern (both stages)", lambda d: lambda: (
            flowkern.euler_step(d.x, d.p, table=TAB, out=d.out),
            flowkern.heun_step(d.x, d.p, d.xe, d.pe, table=TAB, out=d.out2))),
        ("eager (both stages)", lambda d: lambda: eager_heun(d.x, d.p, d.xe, d.pe)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p, d.xe, d.pe))(
            compiled(eager_heun))),
    ],
    "ei": [
        ("flowkern", lambda d: lambda: flowkern.ei_step(d.x, d.p, table=TAB_VP, prediction="eps",
                                                        form="noise", out=d.out)),
        ("eager", lambda d: lambda: eager_ddim(d.x, d.p)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p))(compiled(eager_ddim))),
        ("diffusers DDIMScheduler.step", "ddim"),
    ],
    "dpmpp_2m": [
        ("flowkern", lambda d: lambda: flowkern.dpmpp_2m_step(
            d.x, d.p, table=TAB_VP, prediction="eps", d_prev=d.dp, t_prev=TP, out=d.out,
            d_out=d.out2)),
        ("eager", lambda d: lambda: eager_dpmpp(d.x, d.p, d.dp)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p, d.dp))(
            compiled(eager_dpmpp))),
        ("diffusers DPMSolverMultistepScheduler(dpmsolver++, 2).step", "dpm"),
    ],
    "diffusers euler": [  # whole step() calls: the adapter (a fused pass) vs diffusers'
        ("flowkern", "fk_euler_d"),
        ("diffusers EulerDiscreteScheduler.step", "euler_d"),
    ],
    "em": [
        ("flowkern", lambda d: lambda: flowkern.em_step(
            d.x, d.p, table=flowkern.step_table("linear", T, S, g=0.5), seed=1, out=d.out)),
        ("eager (torch.randn_like)", lambda d: lambda: eager_em(d.x, d.p)),
    ],
    "lms": [
        ("flowkern", lambda d: lambda: flowkern.lms_step(
            d.x, d.p, LMS_C, [d.xe, d.pe, d.dp], table=LMS_ROW, prediction="x1", out=d.out,
            u_out=d.out2)),
        ("eager (k-diffusion sample_lms step)",
         lambda d: lambda: eager_lms(d.x, d.p, d.xe, d.pe, d.dp)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p, d.xe, d.pe, d.dp))(
            compiled(eager_lms))),
    ],
    "dpmpp_3m_sde": [
        ("flowkern", lambda d: lambda: flowkern.lincomb_step(
            d.x, [d.p, d.xe, d.pe], SDE_W, noise_std=SDE_STD, seed=1, out=d.out)),
        ("eager (k-diffusion sample_dpmpp_3m_sde step)",
         lambda d: lambda: eager_3m_sde(d.x, d.p, d.xe, d.pe)),
        ("torch.compile(eager)", lambda d: (lambda f: lambda: f(d.x, d.p, d.xe, d.pe))(
            compiled(eager_3m_sde))),
    ],
}
STEP_BYTES = {"euler": 12, "heun": 32, "ei": 12, "dpmpp_2m": 20, "em": 12, "lms": 28,
              "dpmpp_3m_sde": 20,  # reads x, denoised and the two before it; writes x_s
              "diffusers euler": 16}  # reads sample, model output; writes prev, x0


def _peer_step(kind, d):
    if kind == "fm_euler":
        s = _diffusers("FlowMatchEulerDiscreteScheduler")
        ts = s.timesteps[10]

        def run():
            s._step_index = 10  # the same step every call
            return s.step(d.p, ts, d.x).prev_sample
        return run
    if kind in ("euler_d", "fk_euler_d"):  # EulerDiscreteScheduler, epsilon, step 10 of 50
        if kind == "euler_d":
            s = _diffusers("EulerDiscreteScheduler")
        else:
            from flowkern.integrations.diffusers import EulerDiscreteScheduler
            s = EulerDiscreteScheduler()
            s.set_timesteps(50)
        ts = s.timesteps[10]
        s.is_scale_input_called = True

        def run():
            s._step_index = 10
            return s.step(d.p, ts, d.x).prev_sample
        return run
    if kind == "ddim":
        s = _diffusers("DDIMScheduler")
        ts = s.timesteps[10]
        return lambda: s.step(d.p, ts, d.x).prev_sample
    s = _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2)
    ts = s.timesteps[10]

    def run():
        s._step_index = 10
        s.lower_order_nums = 2
        s.model_outputs = [None, d.dp]  # step() shifts the history left first
        return s.step(d.p, ts, d.x).prev_sample
    return run


CASES = [(step, i) for step, cands in STEP_CASES.items() for i in range(len(cands))]


@pytest.mark.parametrize("step,order", CASES, ids=[f"{s}-{i}" for s, i in CASES])
@pytest.mark.parametrize("size,n", SIZES)
def test_step(benchmark, measure, roofline, size, n, step, order):
    name, factory = STEP_CASES[step][order]
    roofline.label(benchmark, op=f"{step} step", size=size, n=n, pass_="per step",
                   candidate=name, order=order, bytes_per_elem=STEP_BYTES[step],
                   counted="see bench_steps.py docstring")
    d = data(n)
    fn = _peer_step(factory, d) if isinstance(factory, str) else factory(d)
    measure(fn)


# ---------------------------------------------------------------------------
# whole loops with a trivial model: the non-model overhead per step


def _identity(x, t):
    return x


def _kdiff():
    try:
        from flowkern.integrations import k_diffusion as kd_adapter  # noqa: F401
        import k_diffusion.sampling as kd
    except Exception:
        try:
            import importlib.util
            import sys
            import types
            spec = importlib.util.find_spec("k_diffusion")
            if spec is None:
                pytest.skip("k-diffusion not installed")
            import os
            path = os.path.join(os.path.dirname(spec.origin), "sampling.py")
            pkg = types.ModuleType("k_diffusion_stub")
            pkg.utils = types.SimpleNamespace(
                append_dims=lambda x, n: x[(...,) + (None,) * (n - x.ndim)])
            sys.modules.setdefault("k_diffusion_stub", pkg)
            src = open(path).read().replace("from . import utils", "utils = __import__('k_diffusion_stub').utils")
            mod = types.ModuleType("k_diffusion_sampling_bench")
            mod.__dict__["__file__"] = path
            exec(compile(src, path, "exec"), mod.__dict__)
            kd = mod
        except Exception as exc:  # pragma: no cover
            pytest.skip(f"k-diffusion sampling not importable: {exc}")
    return kd


LOOP_CASES = [
    ("flowkern.sample euler", "fk", "euler"),
    ("fused euler steps alone (floor)", "floor", "euler"),
    ("k-diffusion sample_euler", "kd", "sample_euler"),
    ("flowkern.sample dpmpp_2m", "fk", "dpmpp_2m"),
    ("k-diffusion sample_dpmpp_2m", "kd", "sample_dpmpp_2m"),
    ("flowkern.sample heun", "fk", "heun"),
    ("k-diffusion sample_heun", "kd", "sample_heun"),
    ("diffusers FlowMatchEuler loop", "fm_loop", None),
]
# sample_dpm_fast's (sigma_min, sigma_max, n): LOOP_STEPS model calls on its own grid
DPM_FAST_GRID = (0.02, 80.0, LOOP_STEPS)
# sample_dpm_adaptive's (sigma_min, sigma_max) and step-size control. Its step count
# is adaptive: both sides get the same rtol/atol (and h_init, order) so that they
# take the same steps; with the trivial model (denoised = x) the error estimate is
# 0 and every step is accepted: 6 DPM-Solver-3 steps, 18 model calls, both sides
DPM_ADAPTIVE_GRID = DPM_FAST_GRID[:2]
DPM_ADAPTIVE_KW = dict(order=3, rtol=0.05, atol=0.0078, h_init=0.05)
# the k-diffusion samplers flowkern's adapter builds from the fused steps
# (two fused passes per step where k-diffusion makes 6-15), adapter vs peer;
# the SDE samplers draw their noise in the kernels, the peer gets its
# cheapest noise (default_noise_sampler: randn_like, not a Brownian tree)
# diffusers' schedulers, flowkern's (diffusers' classes with fused steps) vs
# diffusers' own, in a plain 20-step loop (the trivial model)
# "<class>, generator=None": step() without a generator (diffusers draws from
# torch's global generator, flowkern's EulerAncestral in its kernel)
D_LOOPS = {"EulerDiscreteScheduler": {}, "EulerAncestralDiscreteScheduler": {},
           "EulerAncestralDiscreteScheduler, generator=None": {},
           "DDIMScheduler": {"clip_sample": False}, "UniPCMultistepScheduler": {},
           "DPMSolverMultistepScheduler": {"solver_order": 3},
           "FlowMatchHeunDiscreteScheduler": {}}
for _m in D_LOOPS:
    LOOP_CASES += [(f"flowkern {_m} loop", "fk_dloop", _m), (f"diffusers {_m} loop", "dloop", _m)]
for _m in ("sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
           "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lms",
           "sample_dpm_fast", "sample_dpm_adaptive"):
    LOOP_CASES += [(f"flowkern adapter {_m}", "kda", _m), (f"k-diffusion {_m}", "kd", _m)]


@pytest.mark.parametrize("order", range(len(LOOP_CASES)), ids=[c[0] for c in LOOP_CASES])
@pytest.mark.parametrize("size,n", SIZES[:1])
def test_loop(benchmark, measure, roofline, size, n, order):
    name, kind, method = LOOP_CASES[order]
    roofline.label(benchmark, op=f"{LOOP_STEPS}-step loop, trivial model", size=size, n=n,
                   pass_="whole loop", candidate=name, order=order,
                   bytes_per_elem=12 * LOOP_STEPS, counted=f"{LOOP_STEPS} x 12 B/elem")
    d = data(n)
    if kind == "fk":
        pred = "velocity" if method != "dpmpp_2m" else "x1"
        fn = lambda: flowkern.sample(_identity, d.x, "linear", method, steps=LOOP_STEPS,  # noqa: E731
                                     prediction=pred, progress=False, t_end=0.98)
    elif kind == "floor":
        grid = torch.linspace(0, 0.98, LOOP_STEPS + 1)
        tabs = flowkern.step_table("linear", grid[:-1], grid[1:])
        bufs = (d.out, d.out2)

        def fn():
            x = d.x
            for i in range(LOOP_STEPS):
                x = flowkern.euler_step(x, x, table=tabs[i], out=bufs[i % 2])
            return x
    elif kind == "kd":
        kd = _kdiff()
        sigmas = torch.cat([torch.linspace(80, 0.02, LOOP_STEPS), torch.zeros(1)])
        kw = ({"noise_sampler": kd.default_noise_sampler(d.x)}
              if method in ("sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde")
              else {})
        grid = (sigmas,)
        if method == "sample_dpm_fast":
            # its own grid; with eta = 0 it still adds 0 * noise_sampler(...) per step:
            # a zero sampler, not its default randn_like (its cheapest noise)
            grid, kw = DPM_FAST_GRID, {"noise_sampler": lambda s, sn: 0.0}
        if method == "sample_dpm_adaptive":  # as dpm_fast; the same steps as the adapter's
            grid = DPM_ADAPTIVE_GRID
            kw = {"noise_sampler": lambda s, sn: 0.0, **DPM_ADAPTIVE_KW}
        fn = lambda: getattr(kd, method)(lambda x, s: x, d.x, *grid, disable=True,  # noqa: E731
                                         **kw)
    elif kind in ("dloop", "fk_dloop"):
        cls = method.split(",")[0]
        if kind == "dloop":
            sched = getattr(pytest.importorskip("diffusers"), cls)(**D_LOOPS[method])
        else:
            from flowkern.integrations import diffusers as fk_d
            sched = getattr(fk_d, cls)(**D_LOOPS[method])
        g = torch.Generator().manual_seed(0)
        gen = "Ancestral" in method and not method.endswith("generator=None")

        def fn():
            sched.set_timesteps(LOOP_STEPS)
            x = d.x
            for ts in sched.timesteps:
                kw = {"generator": g} if gen else {}
                x = sched.step(x, ts, x, **kw).prev_sample
            return x
    elif kind == "kda":
        from flowkern.integrations import k_diffusion as adapter
        sigmas = torch.cat([torch.linspace(80, 0.02, LOOP_STEPS), torch.zeros(1)])
        kw = {} if method == "sample_lms" else {"seed": 0}
        grid = DPM_FAST_GRID if method == "sample_dpm_fast" else (sigmas,)
        if method == "sample_dpm_adaptive":  # the peer's rtol/atol: the same steps
            grid, kw = DPM_ADAPTIVE_GRID, {**kw, **DPM_ADAPTIVE_KW}
        fn = lambda: getattr(adapter, method)(lambda x, s: x, d.x, *grid,  # noqa: E731
                                              disable=True, **kw)
    else:
        s = _diffusers("FlowMatchEulerDiscreteScheduler")
        s.set_timesteps(LOOP_STEPS)

        def fn():
            s._step_index = None
            x = d.x
            for ts in s.timesteps:
                x = s.step(x, ts, x).prev_sample
            return x
    measure(fn)
