"""The adapters against the real libraries (diffusers, k-diffusion,
flow_matching) on the same toy model and grid: <= 1e-5 relative in float32.
Each peer is optional (pytest.importorskip).

k-diffusion: ``import k_diffusion`` imports its whole training stack
(torchvision, kornia, clip, clean-fid, scikit-image, wandb, ...). Only
``k_diffusion/sampling.py`` is needed, which imports scipy, torchdiffeq,
torchsde, tqdm and ``utils.append_dims``; when the package import fails, the
test loads the installed sampling.py itself inside a stub package whose
``utils`` holds a copy of the one-line ``append_dims``.
"""
import importlib
import inspect
import math
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from flowkern.integrations import diffusers as fk_diffusers
from flowkern.integrations import flow_matching as fk_fm
from flowkern.integrations import k_diffusion as fk_k
from flowkern.reference.steps import philox_normal

from conftest import backends_under_test

BACKENDS = [b for b in ("torch", "cpu") if b in backends_under_test()]
TOL = 1e-5
EPS_OF = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10,
          torch.bfloat16: 2.0 ** -7, torch.float64: 2.0 ** -52}
# diffusers' own np.array(tensor) under numpy 2 (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _toy(dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, dim, generator=g) * (0.5 / dim ** 0.5)


# ---------------------------------------------------------------------------
# diffusers


def _diffusers():
    return pytest.importorskip("diffusers")


def _run_scheduler(sched, model, x, n):
    sched.set_timesteps(n)
    for t in sched.timesteps:
        out = model(x, t.expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x


def _diffusers_model(W):
    def model(x, t):
        return torch.tanh(x.flatten(1) @ W).reshape(x.shape) * (1 + t.float()[:, None, None]
                                                                / 1000)
    return model


@pytest.mark.parametrize("n", [1, 4, 20])
@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"use_karras_sigmas": True},
                                    {"use_dynamic_shifting": True}])
def test_diffusers_flow_match_euler(n, config):
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = _diffusers_model(_toy())
    kw = {"mu": 0.7} if config.get("use_dynamic_shifting") else {}
    a, b = d.FlowMatchEulerDiscreteScheduler(**config), \
        fk_diffusers.FlowMatchEulerDiscreteScheduler(**config)
    a.set_timesteps(n, **kw)
    b.set_timesteps(n, **kw)
    assert torch.allclose(a.sigmas, b.sigmas) and torch.allclose(a.timesteps, b.timesteps)
    xa, xb = x.clone(), x.clone()
    for t in a.timesteps:
        xa = a.step(model(xa, t.expand(3)), t, xa).prev_sample
        xb = b.step(model(xb, t.expand(3)), t, xb, return_dict=False)[0]
    assert _rel(xb, xa) <= TOL


@pytest.mark.parametrize("n", [1, 2, 5, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True},
                                    {"final_sigmas_type": "sigma_min"},
                                    {"beta_schedule": "scaled_linear",
                                     "timestep_spacing": "trailing"},
                                    {"beta_schedule": "squaredcos_cap_v2", "solver_order": 1}])
def test_diffusers_dpmsolver_multistep(n, prediction_type, config):
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2))
    model = _diffusers_model(_toy(seed=1))
    a = d.DPMSolverMultistepScheduler(prediction_type=prediction_type, **config)
    b = fk_diffusers.DPMSolverMultistepScheduler(prediction_type=prediction_type, **config)
    ref, out = _run_scheduler(a, model, x, n), _run_scheduler(b, model, x, n)
    assert torch.equal(a.timesteps, b.timesteps) and torch.allclose(a.sigmas, b.sigmas)
    assert _rel(out, ref) <= TOL


def test_diffusers_dpmsolver_flow_sigmas():
    d = _diffusers()
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    model = _diffusers_model(_toy(seed=2))
    cfg = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ref = _run_scheduler(d.DPMSolverMultistepScheduler(**cfg), model, x, 8)
    out = _run_scheduler(fk_diffusers.DPMSolverMultistepScheduler(**cfg), model, x, 8)
    assert _rel(out, ref) <= TOL


FK_SCHEDULERS = ["FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                 "FlowMatchHeunDiscreteScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", FK_SCHEDULERS)
def test_diffusers_schedulers_are_diffusers_schedulers(name, tmp_path):
    """SchedulerMixin + ConfigMixin with diffusers' own config keys and
    defaults (read from the __init__ signature, as ConfigMixin reads them),
    its compatibles, its output class, and a save_pretrained /
    from_pretrained round trip."""
    d = _diffusers()
    import inspect
    from diffusers.utils import BaseOutput
    ours_cls, theirs_cls = getattr(fk_diffusers, name), getattr(d, name)
    assert issubclass(ours_cls, d.SchedulerMixin) and issubclass(ours_cls, d.ConfigMixin)

    def defaults(c):
        return {k: p.default for k, p in inspect.signature(c.__init__).parameters.items()
                if k != "self"}
    want, got = defaults(theirs_cls), defaults(ours_cls)
    assert set(got) == set(want)
    assert all(got[k] == want[k] or (got[k] != got[k] and want[k] != want[k]) for k in want)
    assert ours_cls._compatibles == theirs_cls._compatibles
    ours = ours_cls(num_train_timesteps=500)
    ours.save_pretrained(tmp_path)
    back = ours_cls.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(back) is ours_cls and public(back.config) == public(ours.config)
    assert back.config.num_train_timesteps == 500
    theirs = theirs_cls.from_pretrained(tmp_path)  # the saved config is diffusers'
    assert {k: v for k, v in theirs.config.items() if not k.startswith("_")} == \
        {k: v for k, v in back.config.items() if not k.startswith("_")}
    ours.set_timesteps(3)
    x = torch.randn(2, 3)
    out = ours.step(torch.zeros_like(x), ours.timesteps[0], x)
    assert isinstance(out, BaseOutput) and out.prev_sample is out[0]
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours_cls(not_an_option=1)


def test_diffusers_from_config_of_every_compatible_scheduler():
    """The standard swap line, `DPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)`, from every scheduler diffusers lists as
    compatible (UniPC's bh2 and DEIS's logrho/deis included): the same
    registered config as diffusers' own from_config, and the same steps."""
    d = _diffusers()
    model = _diffusers_model(_toy(seed=3))
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5))
    for src_cls in d.DPMSolverMultistepScheduler._get_compatibles():
        src = src_cls(beta_schedule="scaled_linear") \
            if "beta_schedule" in inspect.signature(src_cls.__init__).parameters else src_cls()
        theirs = d.DPMSolverMultistepScheduler.from_config(src.config)
        ours = fk_diffusers.DPMSolverMultistepScheduler.from_config(src.config)
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(ours.config) == strip(theirs.config), src_cls.__name__
        ref, out = _run_scheduler(theirs, model, x, 6), _run_scheduler(ours, model, x, 6)
        assert _rel(out, ref) <= TOL, src_cls.__name__


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_diffusers_pipeline_with_the_scheduler_swapped_in_saves_and_reloads(tmp_path, name):
    """A real diffusers pipeline, built offline from a tiny random UNet, with
    flowkern's scheduler swapped in by the standard line: it samples as with
    diffusers' own scheduler, and save_pretrained / from_pretrained keeps it
    (model_index.json names flowkern's class, which diffusers imports)."""
    d = _diffusers()
    torch.manual_seed(0)
    unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(8, 16), norm_num_groups=4,
                         down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = d.DDPMPipeline(unet=unet, scheduler=d.UniPCMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    extra = {"clip_sample": False} if name == "DDIMScheduler" else {}  # the fused path
    ref_pipe = d.DDPMPipeline(unet=unet, scheduler=getattr(d, name).from_config(
        pipe.scheduler.config, **extra))
    ref_pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(fk_diffusers, name).from_config(pipe.scheduler.config, **extra)
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    got = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    want = ref_pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(got - want).max() <= 1e-5
    pipe.save_pretrained(tmp_path)
    back = d.DDPMPipeline.from_pretrained(tmp_path)
    assert type(back.scheduler) is getattr(fk_diffusers, name)
    back.set_progress_bar_config(disable=True)
    again = back(generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(again - got).max() == 0


def test_diffusers_from_config_and_pipeline_surface():
    d = _diffusers()
    theirs = d.DPMSolverMultistepScheduler(beta_schedule="scaled_linear")
    ours = fk_diffusers.DPMSolverMultistepScheduler.from_config(theirs.config)
    assert ours.config.beta_schedule == "scaled_linear" and ours.order == 1
    assert ours.init_noise_sigma == 1.0 and len(ours) == 1000
    ours.set_timesteps(10)
    x = torch.randn(2, 3)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x
    noisy = ours.add_noise(x, torch.zeros_like(x), ours.timesteps[:2])
    theirs.set_timesteps(10)
    assert torch.allclose(noisy, theirs.add_noise(x, torch.zeros_like(x), theirs.timesteps[:2]))
    fm = fk_diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        d.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert fm.shift == 3.0 and fm.config.get("base_image_seq_len", 0) == 256


DPM_ANY_CONFIG = [
    (True, {"use_exponential_sigmas": True}), (True, {"use_beta_sigmas": True}),
    (True, {"use_lu_lambdas": True}),
    (True, {"solver_type": "heun", "use_lu_lambdas": True, "prediction_type": "v_prediction"}),
    (True, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_beta_sigmas": True}),
    (True, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
            "use_dynamic_shifting": True, "mu": 0.7}),
    (False, {"thresholding": True, "prediction_type": "sample"}),
    (False, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    (False, {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    (False, {"solver_order": 4})]


@pytest.mark.parametrize("fused,config", DPM_ANY_CONFIG,
                         ids=["-".join(f"{k}={v}" for k, v in c.items()) for _, c in DPM_ANY_CONFIG])
def test_diffusers_dpmsolver_any_config(fused, config):
    """Every configuration diffusers' DPMSolverMultistepScheduler takes works
    in flowkern's (its subclass): the sigma grids (exponential, beta, Lu
    lambdas, flow sigmas with dynamic shifting) through the fused step, the
    others (thresholding, the non-++ algorithms, order 4) through diffusers'
    own step; from_config of such a config (the standard swap line) too."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    model = _diffusers_model(_toy(seed=4))
    config = dict(config)
    mu = config.pop("mu", None)

    def run(sched):
        sched.set_timesteps(12, **({} if mu is None else {"mu": mu}))
        g, xs = torch.Generator().manual_seed(3), x
        for t in sched.timesteps:
            xs = sched.step(model(xs, t.expand(xs.shape[0])), t, xs, generator=g).prev_sample
        return xs

    ours = fk_diffusers.DPMSolverMultistepScheduler.from_config(
        d.DPMSolverMultistepScheduler(**config).config)
    assert ours.fused == fused
    ref, out = run(d.DPMSolverMultistepScheduler(**config)), run(ours)
    tol = 3 * TOL if config.get("solver_order") == 3 else TOL  # test_..._third_order
    assert _rel(out, ref) <= (tol if fused else 0.0), _rel(out, ref)


@pytest.mark.parametrize("config,kw", [
    ({"use_beta_sigmas": True}, {}), ({"invert_sigmas": True}, {}),
    ({"use_exponential_sigmas": True, "shift": 3.0}, {}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1},
     {"mu": 1.3}),
    ({"stochastic_sampling": True}, {})])
def test_diffusers_flow_match_euler_any_config(config, kw):
    """The schedule options the fused step had not covered (beta sigmas,
    inverted sigmas, ...) and stochastic_sampling (diffusers' own step, its
    generator's noise) match diffusers' FlowMatchEulerDiscreteScheduler."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = _diffusers_model(_toy())

    def run(sched):
        sched.set_timesteps(9, **kw)
        g, xs = torch.Generator().manual_seed(2), x
        for t in sched.timesteps:
            xs = sched.step(model(xs, t.expand(3)), t, xs, generator=g).prev_sample
        return xs

    theirs = d.FlowMatchEulerDiscreteScheduler(**config)
    ours = fk_diffusers.FlowMatchEulerDiscreteScheduler.from_config(theirs.config)
    ref, out = run(theirs), run(ours)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert _rel(out, ref) <= (0.0 if config.get("stochastic_sampling") else TOL)


def test_diffusers_adapter_errors():
    s = fk_diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 2), torch.tensor(1000.0), torch.zeros(1, 2))
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(torch.zeros(1, 2), 0, torch.zeros(1, 2))


# ---------------------------------------------------------------------------
# k-diffusion


def _k_sampling():
    try:
        return importlib.import_module("k_diffusion.sampling")
    except Exception:            # ImportError of its training stack, or worse
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(dep)
    name = "_flowkern_test_kdiff"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    pkg, utils = types.ModuleType(name), types.ModuleType(f"{name}.utils")
    pkg.__path__ = []

    def append_dims(x, target_dims):      # k_diffusion.utils.append_dims
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims, pkg.utils = append_dims, utils
    sys.modules[name], sys.modules[f"{name}.utils"] = pkg, utils
    path = spec.submodule_search_locations[0] + "/sampling.py"
    sspec = importlib.util.spec_from_file_location(f"{name}.sampling", path)
    mod = importlib.util.module_from_spec(sspec)
    sys.modules[f"{name}.sampling"] = mod
    sspec.loader.exec_module(mod)
    return mod


def _k_model(W):
    def model(x, sigma, **extra):          # an O(1) denoised x at every noise level
        c = extra.get("scale", 1.0)
        z = (x.flatten(1) @ W) * (2.0 / (1 + sigma[:, None].to(x.dtype)))
        return c * torch.tanh(z).reshape(x.shape)
    return model


def _k_setup(n=10, dtype=torch.float32):
    ks = _k_sampling()
    x = 80.0 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4))
    sigmas = ks.get_sigmas_karras(n, 0.002, 80.0).to(dtype)
    return ks, x.to(dtype), sigmas, _k_model(_toy(seed=3).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m"])
@pytest.mark.parametrize("n", [1, 2, 10, 30])
def test_k_diffusion_deterministic(backend, name, n):
    # With 1 or 2 steps the first step leaves sigma = 80 for 0 or 0.002, and
    # k-diffusion's own float32 x + dt (x - d)/sigma (|x| ~ 80, result O(1))
    # is only good to ~1e-5: those cases compare in float64.
    ks, x, sigmas, model = _k_setup(n, torch.float64 if n < 10 else torch.float32)
    log_a, log_b = [], []
    ref = getattr(ks, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                            callback=lambda d: log_a.append(d))
    out = getattr(fk_k, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                              callback=lambda d: log_b.append(d), backend=backend)
    assert _rel(out, ref) <= TOL
    assert len(log_a) == len(log_b) and set(log_b[0]) == set(log_a[0])
    for a, b in zip(log_a, log_b):
        assert a["i"] == b["i"] and torch.allclose(a["sigma_hat"], b["sigma_hat"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_k_diffusion_churn_same_noise(backend, name, monkeypatch):
    """s_churn > 0: k-diffusion draws torch.randn_like once per step; feeding
    it flowkern's Philox noise of step i (offset i * numel) gives the same
    samples as the fused churn."""
    ks, x, sigmas, model = _k_setup(10)
    seed, calls = 1234, [0]

    def philox_like(t, *args, **kwargs):
        z = philox_normal(seed, calls[0] * t.numel(), t.shape, t.dtype)
        calls[0] += 1
        return z

    kw = dict(s_churn=3.0, s_tmin=0.05, s_tmax=40.0, s_noise=1.003, disable=True)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", philox_like)
        ref = getattr(ks, name)(model, x, sigmas, **kw)
    out = getattr(fk_k, name)(model, x, sigmas, seed=seed, backend=backend, **kw)
    plain = getattr(fk_k, name)(model, x, sigmas, disable=True, backend=backend)
    assert _rel(out, ref) <= TOL and _rel(out, plain) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_k_diffusion_euler_ancestral_same_noise(backend, eta, s_noise):
    """flowkern's Philox noise passed to k-diffusion as a noise_sampler: the
    one-pass fused ancestral step (Euler-Maruyama kernel) and the
    noise_sampler path both match k-diffusion."""
    ks, x, sigmas, model = _k_setup(10)
    seed = 99

    def sampler():
        return _philox_sampler(seed, x)

    ref = ks.sample_euler_ancestral(model, x, sigmas, eta=eta, s_noise=s_noise,
                                    noise_sampler=sampler(), disable=True)
    fused = fk_k.sample_euler_ancestral(model, x, sigmas, eta=eta, s_noise=s_noise, seed=seed,
                                        disable=True, backend=backend)
    given = fk_k.sample_euler_ancestral(model, x, sigmas, eta=eta, s_noise=s_noise,
                                        noise_sampler=sampler(), disable=True, backend=backend)
    assert _rel(fused, ref) <= TOL and _rel(given, ref) <= TOL


def test_k_diffusion_adapter_without_peer():
    """The adapter's own contract, peer or not: sigmas validation, the
    denoiser wrapper (x_k = x_t / alpha_t, sigma_k = sigma_t / alpha_t)."""
    with pytest.raises(ValueError, match="sigmas: expected a 1-D tensor"):
        fk_k.sample_euler(lambda x, s: x, torch.zeros(2, 2), torch.tensor([1.0]))
    seen = {}

    def denoiser(x, sigma):
        seen["x"], seen["sigma"] = x, sigma
        return torch.zeros_like(x)
    model = fk_k.denoiser_to_x1_model(denoiser, "vp")
    x, t = torch.ones(2, 3), torch.tensor([0.3, 0.7])
    model(x, t)
    a, s = torch.stack(__import__("flowkern").get_schedule("vp")(t)[:2])
    assert torch.allclose(seen["sigma"], s / a)
    assert torch.allclose(seen["x"], x / a[:, None])


# ---------------------------------------------------------------------------
# flow_matching


def _fm():
    return pytest.importorskip("flow_matching")


def test_flow_matching_paths():
    _fm()
    from flow_matching.path import AffineProbPath, CondOTProbPath
    from flow_matching.path.scheduler import (CondOTScheduler, CosineScheduler,
                                              PolynomialConvexScheduler, VPScheduler)
    g = torch.Generator().manual_seed(5)
    x0, x1, t = torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 4, generator=g), \
        torch.rand(6, generator=g)
    for sched in (CondOTScheduler(), CosineScheduler(), VPScheduler(),
                  PolynomialConvexScheduler(2)):
        a = AffineProbPath(sched).sample(x0, x1, t)
        b = fk_fm.AffineProbPath(sched).sample(x0, x1, t)
        assert type(b) is type(a)
        assert _rel(b.x_t, a.x_t) <= TOL and _rel(b.dx_t, a.dx_t) <= TOL
        assert b.x_0 is x0 and b.x_1 is x1 and b.t is t
    a, b = CondOTProbPath(), fk_fm.CondOTProbPath()
    assert _rel(b.sample(x0, x1, t).x_t, a.sample(x0, x1, t).x_t) <= TOL
    tt = t.reshape(-1, 1, 1)
    for name in ("target_to_velocity", "epsilon_to_velocity", "velocity_to_target",
                 "epsilon_to_target", "velocity_to_epsilon", "target_to_epsilon"):
        assert _rel(getattr(b, name)(x1, x0, tt), getattr(a, name)(x1, x0, tt)) <= TOL, name


def test_flow_matching_path_is_differentiable():
    x0 = torch.randn(4, 3, requires_grad=True)
    x1 = torch.randn(4, 3, requires_grad=True)
    s = fk_fm.CondOTProbPath().sample(x0, x1, torch.rand(4))
    (s.x_t.sum() + 2 * s.dx_t.sum()).backward()
    assert torch.isfinite(x0.grad).all() and torch.isfinite(x1.grad).all()
    with pytest.raises(ValueError, match="t: the time vector must have shape"):
        fk_fm.CondOTProbPath().sample(x0, x1, torch.rand(4, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2"])
@pytest.mark.parametrize("step_size,grid", [
    (0.1, [0.0, 1.0]), (None, [0.0, 0.2, 0.5, 0.9, 1.0]), (0.07, [0.0, 0.33, 0.5, 1.0]),
    (0.1, [1.0, 0.4, 0.0])])
@pytest.mark.parametrize("intermediates", [False, True])
def test_flow_matching_ode_solver(backend, method, step_size, grid, intermediates):
    _fm()
    from flow_matching.solver import ODESolver
    W = _toy(4, seed=6)

    class Velocity(torch.nn.Module):
        def forward(self, x, t, **extras):
            return torch.tanh(x @ W) * (1 + t) + extras.get("bias", 0.0)

    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(7))
    grid = torch.tensor(grid)
    kw = dict(method=method, time_grid=grid, return_intermediates=intermediates, bias=0.1)
    ref = ODESolver(Velocity()).sample(x, step_size, **kw)
    out = fk_fm.ODESolver(Velocity(), backend=backend).sample(x, step_size, **kw)
    assert out.shape == ref.shape and _rel(out, ref) <= TOL


def test_flow_matching_solver_errors():
    solver = fk_fm.ODESolver(lambda x, t: x)
    with pytest.raises(ValueError, match="method: 'dopri5' is not a fixed-step method"):
        solver.sample(torch.zeros(2, 2), None, method="dopri5")
    with pytest.raises(NotImplementedError, match="enable_grad"):
        solver.sample(torch.zeros(2, 2), 0.5, enable_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_model_keywords_reach_the_model(backend):
    """Every keyword of sample() past the peer's own goes to the model, as in
    flow_matching: a model with its own `backend` argument gets it."""
    seen = {}

    def model(x, t, backend=None, scale=1.0):
        seen["backend"], seen["scale"] = backend, scale
        return -x * scale

    solver = fk_fm.ODESolver(model, backend=backend)
    x = torch.randn(3, 4)
    solver.sample(x, 0.25, backend="the model's", scale=2.0)
    assert seen == {"backend": "the model's", "scale": 2.0}
    solver.compute_likelihood(x, lambda z: z.sum(1), 0.25, time_grid=torch.tensor([1.0, 0.0]),
                              backend="again")
    assert seen["backend"] == "again"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step_size,grid,intermediates", [
    (0.1, [1.0, 0.0], False), (None, [1.0, 0.6, 0.25, 0.0], True), (0.07, [1.0, 0.5, 0.0], True)])
def test_flow_matching_compute_likelihood(backend, method, exact, dtype, step_size, grid,
                                          intermediates):
    """compute_likelihood against flow_matching's own on the same model, grid
    and Hutchinson draw (the same global-generator state before each call):
    float64 to 1e-11 relative, float32 to TOL; and, exact, against the
    closed form of a linear field (its log-likelihood is Gaussian)."""
    _fm()
    from flow_matching.solver import ODESolver
    if dtype == torch.float64 and not exact:
        pytest.skip("flow_matching's Hutchinson z is float32 (bool * 2.0) and its einsum "
                    "then fails on float64 states; test_flow_matching_likelihood_of_a_"
                    "linear_flow checks ours in float64")
    W = _toy(4, seed=6).to(dtype)

    class Velocity(torch.nn.Module):
        def forward(self, x, t, **extras):
            return torch.tanh(x @ W) * (1 + t) + extras.get("bias", 0.0)

    x1 = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)
    log_p0 = lambda z: -0.5 * (z * z).sum(1) - 2 * math.log(2 * math.pi)  # noqa: E731
    kw = dict(method=method, time_grid=torch.tensor(grid, dtype=dtype),
              return_intermediates=intermediates, exact_divergence=exact, bias=0.1)
    torch.manual_seed(11)
    ref_x, ref_lp = ODESolver(Velocity()).compute_likelihood(x1, log_p0, step_size, **kw)
    torch.manual_seed(11)
    x, lp = fk_fm.ODESolver(Velocity(), backend=backend).compute_likelihood(
        x1, log_p0, step_size, **kw)
    tol = 1e-11 if dtype == torch.float64 else TOL
    assert x.shape == ref_x.shape and lp.shape == ref_lp.shape
    assert _rel(x, ref_x) <= tol and _rel(lp, ref_lp) <= tol, (_rel(x, ref_x), _rel(lp, ref_lp))


def test_flow_matching_likelihood_of_a_linear_flow():
    """u_t(x) = A x (A constant): x_0 = exp(-A) x_1 and div u = tr A, so
    log p_1(x_1) = log N(exp(-A) x_1) - tr A exactly; Euler with 400 steps is
    within its O(h) error, the exact divergence is tr A at every step."""
    A = torch.tensor([[0.3, 0.2], [-0.1, -0.4]], dtype=torch.float64)
    x1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_p0 = lambda z: -0.5 * (z * z).sum(1) - math.log(2 * math.pi)  # noqa: E731
    solver = fk_fm.ODESolver(lambda x, t: x @ A.T)
    x0, lp = solver.compute_likelihood(x1, log_p0, 1 / 400, method="heun2",
                                       exact_divergence=True)
    want_x0 = x1 @ torch.linalg.matrix_exp(-A).T
    want = log_p0(want_x0) - torch.trace(A)
    assert _rel(x0, want_x0) < 1e-5 and _rel(lp, want) < 1e-5
    # Hutchinson: for a diagonal A, z^T A z = sum_i A_ii z_i^2 = tr A for every
    # Rademacher z, so the estimate is exact too
    D = torch.diag(torch.tensor([0.3, -0.45], dtype=torch.float64))
    solver = fk_fm.ODESolver(lambda x, t: x @ D)
    x0, lp = solver.compute_likelihood(x1, log_p0, 1 / 400, method="heun2")
    want_x0 = x1 @ torch.linalg.matrix_exp(-D)
    torch.testing.assert_close(lp, log_p0(want_x0) - torch.trace(D), rtol=1e-5, atol=1e-6)


def test_flow_matching_likelihood_errors():
    solver = fk_fm.ODESolver(lambda x, t: x)
    with pytest.raises(ValueError, match="time_grid: must start at 1.0 and end at 0.0"):
        solver.compute_likelihood(torch.zeros(2, 2), lambda z: z.sum(1), 0.5,
                                  time_grid=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="method: 'dopri5'"):
        solver.compute_likelihood(torch.zeros(2, 2), lambda z: z.sum(1), None, method="dopri5")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m",
                                  "sample_euler_ancestral", "sample_dpm_2",
                                  "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_lms",
                                  "sample_dpmpp_3m_sde"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_k_diffusion_half_state_has_the_peers_accuracy(backend, name, dtype):
    """A float16/bfloat16 x with float32 sigmas: k-diffusion's Euler-type
    states turn float32 at the first step (to_d divides by
    append_dims(sigma)), so their error against float64 is float32's, not
    float16's; its dpmpp_2m keeps x's dtype. The adapters keep the state in
    the same dtype: the same output dtype, and an error within 2x the
    peer's (issue 10 measured 12x with the state kept in float16)."""
    ks, x, sigmas, _ = _k_setup(12, torch.float32)
    inner = _k_model(_toy(seed=3).double())

    def model(x, sigma, **extra):  # computes in float64, answers in x's dtype
        return inner(x.double(), sigma.double(), **extra).to(x.dtype)

    x16 = x.to(dtype)
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
             for i in range(30)]  # in x's dtype, as k-diffusion's default randn_like(x)

    def kw(dtype=None):  # the same noise for all: k-diffusion's noise_sampler
        if name in ("sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpm_2",
                    "sample_lms"):
            return dict(disable=True)
        it = iter(noise)
        return dict(disable=True, noise_sampler=lambda s, sn: next(it).to(dtype or x16.dtype))

    # both start from the rounded x and draw the same noise values: the float64
    # run (its noise term in float64 too, not rounded to x's dtype as
    # k-diffusion's noise * sigma_up is) measures what the loop adds
    exact = getattr(ks, name)(model, x16.double(), sigmas.double(), **kw(torch.float64))
    ref = getattr(ks, name)(model, x16, sigmas, **kw())
    out = getattr(fk_k, name)(model, x16, sigmas, backend=backend, **kw())
    assert out.dtype == ref.dtype
    err_peer, err_ours = _rel(ref, exact), _rel(out, exact)
    assert err_ours <= 2 * err_peer + 1e-6, (err_ours, err_peer)


def _philox_sampler(seed, x, brownian=False, dtype=None):
    """k-diffusion noise_sampler returning flowkern's in-kernel noise: call k
    gets Philox(seed, k x.numel()), as the fused samplers draw it (float32
    draws in `dtype`: what the kernels add to a float64 x). With `brownian`,
    sample_dpmpp_sde's law (k-diffusion's default Brownian tree in sigma):
    a step's second call, over [sigma_next, sigma] after the first's [sigma_s,
    sigma], is rho z_1 + sqrt(1 - rho^2) z_2, rho^2 = (sigma - sigma_s) /
    (sigma - sigma_next), as flowkern's fused sample_dpmpp_sde draws it."""
    calls, first = [0], {}

    def noise_sampler(sigma, sigma_next):
        k = calls[0]
        calls[0] += 1
        z = philox_normal(seed, k * x.numel(), x.shape, torch.float32 if dtype else x.dtype)
        z = z.to(dtype or x.dtype)
        if not brownian:
            return z
        if k % 2 == 0:
            first.update(z=z, sigma_s=float(sigma_next))
            return z
        s_t, s_s, s_n = float(sigma), first["sigma_s"], float(sigma_next)
        rho2 = (s_t - s_s) / (s_t - s_n)
        return math.sqrt(rho2) * first["z"] + math.sqrt(1 - rho2) * z
    return noise_sampler


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 10, 30])
def test_k_diffusion_dpm_2(backend, n):
    """sample_dpm_2 (two fused passes per step) against k-diffusion's, with
    its callback; float64 for the 1- and 2-step grids (see
    test_k_diffusion_deterministic)."""
    ks, x, sigmas, model = _k_setup(n, torch.float64 if n < 10 else torch.float32)
    log_a, log_b = [], []
    ref = ks.sample_dpm_2(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                          callback=log_a.append)
    out = fk_k.sample_dpm_2(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                            callback=log_b.append, backend=backend)
    assert _rel(out, ref) <= TOL
    assert [a["i"] for a in log_a] == [b["i"] for b in log_b]


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_diffusion_dpm_2_churn_same_noise(backend, monkeypatch):
    ks, x, sigmas, model = _k_setup(10)
    seed, calls = 77, [0]

    def philox_like(t, *args, **kwargs):  # k-diffusion's dpm_2 draws once per step
        z = philox_normal(seed, calls[0] * t.numel(), t.shape, t.dtype)
        calls[0] += 1
        return z

    kw = dict(s_churn=3.0, s_tmin=0.05, s_tmax=40.0, s_noise=1.003, disable=True)
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", philox_like)
        ref = ks.sample_dpm_2(model, x, sigmas, **kw)
    out = fk_k.sample_dpm_2(model, x, sigmas, seed=seed, backend=backend, **kw)
    assert _rel(out, ref) <= TOL


NOISY_ADAPTERS = [("sample_euler", {"s_churn": 3.0}), ("sample_heun", {"s_churn": 3.0}),
                  ("sample_dpm_2", {"s_churn": 3.0}), ("sample_euler_ancestral", {}),
                  ("sample_dpm_2_ancestral", {}), ("sample_dpmpp_2s_ancestral", {}),
                  ("sample_dpmpp_sde", {}), ("sample_dpmpp_2m_sde", {}),
                  ("sample_dpmpp_3m_sde", {}), ("sample_dpm_fast", {"eta": 1.0})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,extra", NOISY_ADAPTERS, ids=[n for n, _ in NOISY_ADAPTERS])
def test_k_diffusion_per_sample_seeds(backend, name, extra):
    """per_sample_seeds: with a per-sample model, each sample's result is the
    same in another batch, at another position and alone (seeded with its
    seed); a seed or per_sample_seeds with a noise_sampler, or both, raise."""
    def model(x, sigma, **_):  # elementwise: sample b depends on sample b only
        return torch.tanh(x / (1.0 + sigma.to(x.dtype)[:, None, None]))
    x = 20.0 * torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = ((0.02, 80.0, 7) if name == "sample_dpm_fast" else
            (_k_sampling().get_sigmas_karras(6, 0.02, 80.0),))
    run = lambda x, **kw: getattr(fk_k, name)(model, x, *grid, disable=True,  # noqa: E731
                                              backend=backend, **extra, **kw)
    seeds = [9, 2 ** 62, 0, 9, 31]
    full = run(x, per_sample_seeds=seeds)
    assert torch.equal(full, run(x, per_sample_seeds=torch.tensor(seeds)))
    perm = [4, 0, 2]
    assert torch.equal(run(x[perm], per_sample_seeds=[seeds[i] for i in perm]), full[perm])
    assert torch.equal(run(x[1:2], seed=seeds[1])[0], full[1])
    assert not torch.equal(full, run(x, per_sample_seeds=[s + 1 for s in seeds]))
    with pytest.raises(ValueError, match="per_sample_seeds: give seed or per_sample_seeds"):
        run(x, seed=1, per_sample_seeds=seeds)
    if "noise_sampler" in inspect.signature(getattr(fk_k, name)).parameters:
        for kw in (dict(seed=1), dict(per_sample_seeds=seeds)):
            with pytest.raises(ValueError, match="noise comes from noise_sampler"):
                run(x, noise_sampler=lambda a, b: torch.zeros_like(x), **kw)


SDE_SAMPLERS = [("sample_dpm_2_ancestral", {}), ("sample_dpmpp_2s_ancestral", {}),
                ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"r": 0.3}),
                ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
                ("sample_dpmpp_3m_sde", {})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,extra", SDE_SAMPLERS, ids=[f"{n}-{e}" for n, e in SDE_SAMPLERS])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_k_diffusion_sde_samplers_same_noise(backend, name, extra, eta, s_noise):
    """Each stochastic sampler against k-diffusion's, flowkern's Philox noise
    fed to it as a noise_sampler. float64 with the noise_sampler: equal to
    rounding; the fused path (its float32 draws) equal to rounding to
    k-diffusion given the same draws (sample_dpmpp_sde: correlated as its
    default Brownian tree correlates them, _philox_sampler). float32, the
    fused path (noise drawn in the kernels) and the
    noise_sampler path: error against the float64 run within 2x k-diffusion's
    own float32 error (its eta = 1 dpm_2_ancestral is only good to 4e-5)."""
    kw = dict(eta=eta, s_noise=s_noise, disable=True, **extra)
    seed = 5
    brownian = name == "sample_dpmpp_sde"
    ks, x, sigmas, model = _k_setup(10, torch.float64)
    ref = getattr(ks, name)(model, x, sigmas, noise_sampler=_philox_sampler(seed, x), **kw)
    got = getattr(fk_k, name)(model, x, sigmas, noise_sampler=_philox_sampler(seed, x),
                              backend=backend, **kw)
    assert _rel(got, ref) <= 1e-10
    ref = getattr(ks, name)(model, x, sigmas, **kw, noise_sampler=_philox_sampler(
        seed, x, brownian, torch.float64))
    fused = getattr(fk_k, name)(model, x, sigmas, seed=seed, backend=backend, **kw)
    assert _rel(fused, ref) <= 1e-6  # the backends' float32 draws differ by ~2 ulp
    ks, x, sigmas, model = _k_setup(10, torch.float32)
    x64, s64 = x.double(), sigmas.double()
    m64 = _k_model(_toy(seed=3).double())

    exact = getattr(ks, name)(m64, x64, s64, **kw, noise_sampler=_philox_sampler(
        seed, x, brownian, torch.float64))
    ref = getattr(ks, name)(model, x, sigmas, **kw,
                            noise_sampler=_philox_sampler(seed, x, brownian))
    fused = getattr(fk_k, name)(model, x, sigmas, seed=seed, backend=backend, **kw)
    given = getattr(fk_k, name)(model, x, sigmas, backend=backend, **kw,
                                noise_sampler=_philox_sampler(seed, x, brownian))
    peer = _rel(ref, exact)
    # 3M: the fused kernels weight d, d_1, d_2 separately (coefficients up to ~4x
    # the step's 1 - e^{-h}), where k-diffusion first takes their differences:
    # measured up to 4.3x its float32 error here (eta = 0), both ~1e-5
    k = 5 if name == "sample_dpmpp_3m_sde" else 2
    for out in (fused, given):
        assert out.dtype == ref.dtype and _rel(out, exact) <= k * peer + 2e-6, \
            (_rel(out, exact), peer)
    if eta:  # the noise is in there
        other = getattr(fk_k, name)(model, x, sigmas, seed=seed + 1, backend=backend, **kw)
        assert _rel(other, ref) > 1e-3


ONE_PASS = [("sample_euler_ancestral", 1), ("sample_dpm_2_ancestral", 2),
            ("sample_dpmpp_2s_ancestral", 2), ("sample_dpmpp_sde", 2),
            ("sample_dpmpp_2m_sde", 1), ("sample_dpmpp_3m_sde", 1), ("sample_dpm_fast", 1)]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs flowkern._C")
@pytest.mark.parametrize("name,calls", ONE_PASS, ids=[n for n, _ in ONE_PASS])
@pytest.mark.parametrize("noise", ["kernel", "noise_sampler"])
def test_k_diffusion_sde_samplers_one_pass_per_model_call(name, calls, noise):
    """Each stochastic sampler makes one fused pass per model call, its noise
    included, whether drawn in the kernel or given by a noise_sampler: under
    torch.profiler one flowkern op per model call and no eager arithmetic
    (the model here is a copy)."""
    ks, x, sigmas, _ = _k_setup(6, torch.float32)
    n_calls = [0]

    def model(x, sigma, **_):
        n_calls[0] += 1
        return x.clone()

    draws = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    it = iter(draws)
    kw = dict(seed=3) if noise == "kernel" else dict(noise_sampler=lambda a, b: next(it))
    grid = (0.02, 80.0, 7) if name == "sample_dpm_fast" else (sigmas,)
    if name == "sample_dpm_fast":  # DPMSolver: noise with eta > 0, in the step's last pass
        kw["eta"] = 1.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        getattr(fk_k, name)(model, x, *grid, disable=True, backend="cpu", **kw)
    names = [e.name for e in prof.events()]
    fused = [n for n in names if n.startswith("flowkern::")]
    eager = [n for n in names if n in ("aten::add", "aten::sub", "aten::div", "aten::add_",
                                       "aten::mul_", "aten::normal_")]
    sigma_in = names.count("aten::mul")  # sigma * s_in, the model's argument (as k-diffusion)
    # the last step into sigma = 0 returns the model's output (multistep) or is one pass
    last = 1 if name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde") else 0
    assert len(fused) == n_calls[0] - last and not eager and sigma_in == n_calls[0], \
        (fused, eager, sigma_in, n_calls[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_diffusion_brownian_tree_noise_sampler(backend):
    """k-diffusion's own BrownianTreeNoiseSampler (its SDE samplers' default)
    passed to flowkern's: the same samples."""
    ks, x, sigmas, model = _k_setup(8, torch.float64)
    pytest.importorskip("torchsde")

    def tree():
        return ks.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=3)

    for name in ("sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        ref = getattr(ks, name)(model, x, sigmas, noise_sampler=tree(), disable=True)
        out = getattr(fk_k, name)(model, x, sigmas, noise_sampler=tree(), disable=True,
                                  backend=backend)
        assert _rel(out, ref) <= 1e-10, name


def _run_scheduler_noisy(sched, model, x, n, seed):
    """_run_scheduler with a generator passed to step() (the SDE draws)."""
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = model(x, t.expand(x.shape[0]))
        x = sched.step(out, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("n", [1, 2, 5, 25])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction_type,config", [
    ("epsilon", {}), ("v_prediction", {"use_karras_sigmas": True}),
    ("sample", {"final_sigmas_type": "sigma_min"}),
    ("flow_prediction", {"use_flow_sigmas": True, "flow_shift": 3.0})])
def test_diffusers_dpmsolver_sde_and_heun(n, algorithm_type, solver_type, prediction_type,
                                          config):
    """sde-dpmsolver++ and the heun solver type against diffusers' own, the
    same generator passed to step() (the SDE noise is drawn as diffusers
    draws it); float32 within TOL."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    model = _diffusers_model(_toy(seed=4))
    kw = dict(algorithm_type=algorithm_type, solver_type=solver_type,
              prediction_type=prediction_type, **config)
    ref = _run_scheduler_noisy(d.DPMSolverMultistepScheduler(**kw), model, x, n, 3)
    out = _run_scheduler_noisy(fk_diffusers.DPMSolverMultistepScheduler(**kw), model, x, n, 3)
    assert _rel(out, ref) <= TOL, _rel(out, ref)
    if algorithm_type.startswith("sde") and n > 1:  # the noise is in there
        other = _run_scheduler_noisy(fk_diffusers.DPMSolverMultistepScheduler(**kw), model, x,
                                     n, 4)
        assert _rel(other, ref) > 1e-3


EULER_CONFIGS = [{}, {"prediction_type": "v_prediction"}, {"use_karras_sigmas": True},
                 {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
                 {"interpolation_type": "log_linear"},
                 {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}]


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("config", EULER_CONFIGS, ids=[str(c) for c in EULER_CONFIGS])
@pytest.mark.parametrize("n", [1, 4, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_euler_schedulers(name, config, n, dtype):
    """flowkern's Euler and EulerAncestral (diffusers' classes with a fused
    step) against diffusers' own: the same timesteps and sigmas (inherited),
    the same samples and pred_original_sample with the same generator, a
    float16 model output included."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8)) * 14.6
    model = _diffusers_model(_toy(seed=5))
    accepted = inspect.signature(getattr(d, name).__init__).parameters
    if any(k not in accepted for k in config):
        pytest.skip(f"diffusers' {name} has no {sorted(set(config) - set(accepted))}")
    a, b = getattr(d, name)(**config), getattr(fk_diffusers, name)(**config)
    a.set_timesteps(n)
    b.set_timesteps(n)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    xa = x.clone()
    tol = TOL if dtype == torch.float32 else 2e-3
    for t in a.timesteps:  # each step from the same state, then on from diffusers'
        m = model(a.scale_model_input(xa, t).float(), t.expand(3)).to(dtype)
        b.scale_model_input(xa, t)
        oa = a.step(m, t, xa, generator=ga)
        ob = b.step(m, t, xa.clone(), generator=gb)
        assert ob.prev_sample.dtype == oa.prev_sample.dtype
        # x0 = sample - sigma eps (or its v form) cancels terms of the sample's and
        # the model output's size: errors relative to them
        scale = max(xa.abs().max().item(), m.abs().max().item())
        for u, v in ((ob.pred_original_sample, oa.pred_original_sample),
                     (ob.prev_sample, oa.prev_sample)):
            err = (u.float() - v.float()).abs().max().item()
            assert err <= tol * scale, (err, scale)
        xa = oa.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_euler_ancestral_without_generator_draws_in_the_kernel(prediction_type):
    """step() without a generator adds sigma_up xi with xi drawn in the kernel
    (Philox keyed by a seed drawn from torch's global generator at the first
    such step after set_timesteps, step i at offset i x.numel()): exactly the
    deterministic part (the generator path less its noise) plus sigma_up
    times flowkern's normals there; torch.manual_seed fixes it; the noise is
    standard normal; set_timesteps starts a new stream."""
    _diffusers()
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3)) * 14.6
    m = torch.randn(64, 4096, generator=torch.Generator().manual_seed(4))
    s = fk_diffusers.EulerAncestralDiscreteScheduler(prediction_type=prediction_type)
    s.set_timesteps(10)
    t, up = s.timesteps[3], s._fk_ups[3]
    s._step_index = 3
    with_gen = s.step(m, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    det = with_gen - torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * up
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # what step() draws (noise_stream)
    torch.manual_seed(11)
    s._step_index = 3
    out = s.step(m, t, x)
    xi = philox_normal(seed, 3 * x.numel(), x.shape)
    torch.testing.assert_close(out.prev_sample, det + up * xi, rtol=0, atol=1e-4 * 14.6)
    drawn = (out.prev_sample - det) / up
    assert abs(drawn.mean().item()) < 0.01 and abs(drawn.std().item() - 1) < 0.01
    for new_run in (False, True):
        if new_run:
            s.set_timesteps(10)  # a new stream (another seed)
        torch.manual_seed(11)
        s._step_index = 3
        assert torch.equal(s.step(m, t, x).prev_sample, out.prev_sample)
    s.set_timesteps(10)
    s._step_index = 3
    assert not torch.equal(s.step(m, t, x).prev_sample, out.prev_sample)


def test_diffusers_euler_churn_and_swap():
    """Euler with s_churn draws diffusers' noise from the generator; the
    standard swap line from a pipeline's scheduler config keeps its config."""
    d = _diffusers()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)) * 14.6
    model = _diffusers_model(_toy(seed=6)[:12, :12])
    src = d.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    a = d.EulerDiscreteScheduler.from_config(src.config)
    b = fk_diffusers.EulerDiscreteScheduler.from_config(src.config)
    assert dict(a.config) == dict(b.config)
    for s in (a, b):
        s.set_timesteps(12)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    xa, xb = x.clone(), x.clone()
    kw = dict(s_churn=2.0, s_tmin=0.1, s_tmax=10.0)
    for t in a.timesteps:
        xa = a.step(model(a.scale_model_input(xa, t), t.expand(2)), t, xa, generator=ga,
                    **kw).prev_sample
        xb = b.step(model(b.scale_model_input(xb, t), t.expand(2)), t, xb, generator=gb,
                    **kw).prev_sample
    assert _rel(xb, xa) <= TOL
    with pytest.raises(NotImplementedError, match="sample"):
        s = fk_diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample")
        s.set_timesteps(3)
        s.step(torch.zeros(1, 2), s.timesteps[0], torch.zeros(1, 2))


DDIM_CONFIGS = [{"clip_sample": False}, {"clip_sample": False, "prediction_type": "v_prediction",
                                         "timestep_spacing": "trailing",
                                         "rescale_betas_zero_snr": True},
                {"clip_sample": False, "prediction_type": "sample", "set_alpha_to_one": False,
                 "beta_schedule": "scaled_linear"},
                {}]  # the default clamps x0: diffusers' own step


@pytest.mark.parametrize("config", DDIM_CONFIGS, ids=[str(c) for c in DDIM_CONFIGS])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 5, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_ddim(config, eta, n, dtype):
    """flowkern's DDIMScheduler (diffusers' class, fused step) against
    diffusers' own, step by step from the same state with the same noise:
    each one's error against diffusers' step run in float64 (x0 = (x -
    sigma eps)/alpha amplifies rounding where alpha is small; diffusers
    computes float16 inputs in float16), ours within 2x diffusers' own."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8))
    model = _diffusers_model(_toy(seed=5))
    a, b = d.DDIMScheduler(**config), fk_diffusers.DDIMScheduler(**config)
    exact = d.DDIMScheduler(**config)
    for s in (a, b, exact):
        s.set_timesteps(n)
    xa = x.to(dtype)
    for k, t in enumerate(a.timesteps):
        m = model(xa.float(), t.expand(3)).to(dtype)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k)).to(dtype)
        kw = dict(eta=eta, variance_noise=noise if eta else None)
        oa = a.step(m, t, xa, **kw)
        ob = b.step(m, t, xa.clone(), **kw)
        kw64 = dict(eta=eta, variance_noise=noise.double() if eta else None)
        oe = exact.step(m.double(), t, xa.double(), **kw64)
        assert ob.prev_sample.dtype == oa.prev_sample.dtype
        # the terms: x0 = (x - sigma eps)/alpha scales them by 1/alpha_t
        alpha = a.alphas_cumprod[int(t)].sqrt().item()
        scale = max(xa.abs().max().item(), m.abs().max().item()) / max(alpha, 1e-3)
        for name in ("pred_original_sample", "prev_sample"):
            want = getattr(oe, name)
            err_d = (getattr(oa, name).double() - want).abs().max().item()
            err_f = (getattr(ob, name).double() - want).abs().max().item()
            assert err_f <= 2 * err_d + 4 * EPS_OF[dtype] * scale, (name, err_f, err_d)
        xa = oa.prev_sample


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}])
@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize("churn", [{}, {"s_churn": 2.0, "s_tmin": 0.2, "s_tmax": 0.9}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_flow_match_heun(config, n, churn, dtype):
    """flowkern's FlowMatchHeunDiscreteScheduler (diffusers' class, fused
    Euler and Heun stages) against diffusers' own over a whole loop (two
    calls per step), the same generator for churn: each one's error against
    diffusers' loop in float64, ours within 2x diffusers' own."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    W = _toy()

    def run(sched, dt, model_dt):
        sched.set_timesteps(n)
        model = _diffusers_model(W.to(model_dt))
        g = torch.Generator().manual_seed(5)
        xs = x.to(dt)
        for t in sched.timesteps:
            out = model(xs.to(model_dt), t.expand(3)).to(dt)
            xs = sched.step(out, t, xs, generator=g, **churn).prev_sample
        return xs

    exact = run(d.FlowMatchHeunDiscreteScheduler(**config), torch.float64, torch.float64)
    ref = run(d.FlowMatchHeunDiscreteScheduler(**config), dtype, torch.float32)
    out = run(fk_diffusers.FlowMatchHeunDiscreteScheduler(**config), dtype, torch.float32)
    a, b = d.FlowMatchHeunDiscreteScheduler(**config), \
        fk_diffusers.FlowMatchHeunDiscreteScheduler(**config)
    a.set_timesteps(n)
    b.set_timesteps(n)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert out.dtype == ref.dtype
    err_d, err_f = _rel(ref, exact), _rel(out, exact)
    assert err_f <= 2 * err_d + 4 * EPS_OF[dtype], (err_f, err_d)
    # and directly, the same noise in the same dtype (float64 draws other numbers)
    assert _rel(out, ref) <= (1e-4 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 10, 30])
def test_k_diffusion_lms(backend, order, n):
    """sample_lms (one fused lms_step a step: d, the history sum and the ring
    buffer write in one pass) against k-diffusion's, its callback included; the coefficients
    against k-diffusion's quadrature. float64 for the 1- and 3-step grids
    (see test_k_diffusion_deterministic)."""
    ks, x, sigmas, model = _k_setup(n, torch.float64 if n < 10 else torch.float32)
    t = sigmas.cpu().numpy()
    for i in range(min(order, n), n):
        for j in range(order):
            # k-diffusion's integrand runs in float32 for float32 nodes (NumPy 2
            # keeps np.float32 - float in float32): agreement to its rounding
            rel = 1e-6 if t.dtype == np.float32 else 1e-9
            assert fk_k.linear_multistep_coeff(order, t, i, j) == pytest.approx(
                ks.linear_multistep_coeff(order, t, i, j), rel=rel, abs=1e-12)
    log_a, log_b = [], []
    ref = ks.sample_lms(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                        callback=log_a.append, order=order)
    out = fk_k.sample_lms(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                          callback=log_b.append, order=order, backend=backend)
    assert _rel(out, ref) <= TOL, _rel(out, ref)
    assert [a["i"] for a in log_a] == [b["i"] for b in log_b]


@pytest.mark.parametrize("order", [0, 5, 2.0, True])
def test_k_diffusion_lms_order_out_of_range(order):
    """lms_step keeps at most 3 earlier derivatives: order 5 and up (which
    k-diffusion accepts) is an error naming it, as is a non-int order."""
    ks, x, sigmas, model = _k_setup(3, torch.float64)
    with pytest.raises(ValueError, match="order: expected an int in"):
        fk_k.sample_lms(model, x, sigmas, disable=True, order=order)


@pytest.mark.parametrize("n", [3, 5, 12, 25])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type,config", [
    ("epsilon", {}), ("v_prediction", {"use_karras_sigmas": True}),
    ("sample", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("flow_prediction", {"use_flow_sigmas": True, "flow_shift": 3.0})])
def test_diffusers_dpmsolver_third_order(n, algorithm_type, prediction_type, config):
    """solver_order=3 (the fused first-order DPM-Solver++ pass, then one
    lincomb_step over it and the last three x0 predictions, the SDE noise a
    term) against diffusers' own, the same generator for the SDE noise."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    model = _diffusers_model(_toy(seed=4))
    kw = dict(algorithm_type=algorithm_type, solver_order=3, prediction_type=prediction_type,
              **config)
    ref = _run_scheduler_noisy(d.DPMSolverMultistepScheduler(**kw), model, x, n, 3)
    out = _run_scheduler_noisy(fk_diffusers.DPMSolverMultistepScheduler(**kw), model, x, n, 3)
    # 3TOL: the fused form weights m0, m1, m2 separately where diffusers takes
    # differences first (as k-diffusion's 3M: test_k_diffusion_sde_samplers_same_noise)
    assert _rel(out, ref) <= 3 * TOL, _rel(out, ref)
    second = _run_scheduler_noisy(fk_diffusers.DPMSolverMultistepScheduler(
        **dict(kw, solver_order=2)), model, x, n, 3)
    if n >= 5:  # the third-order terms are in there
        assert _rel(second, ref) > 10 * TOL


@pytest.mark.parametrize("n", [1, 3, 6, 20])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type,config", [
    ("epsilon", {}), ("v_prediction", {"use_karras_sigmas": True}),
    ("sample", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("flow_prediction", {"use_flow_sigmas": True, "flow_shift": 3.0}),
    ("epsilon", {"disable_corrector": [0, 2]})])
def test_diffusers_unipc(n, solver_type, order, prediction_type, config):
    """flowkern's UniPCMultistepScheduler (diffusers' class, fused
    conversion, UniC and UniP) against diffusers' own over whole loops."""
    d = _diffusers()
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    model = _diffusers_model(_toy(seed=4))
    kw = dict(solver_type=solver_type, solver_order=order, prediction_type=prediction_type,
              **config)

    def states(sched):
        sched.set_timesteps(n)
        xs, out = x, []
        for t in sched.timesteps:
            xs = sched.step(model(xs, t.expand(xs.shape[0])), t, xs).prev_sample
            out.append(xs)
        return out

    ref = states(d.UniPCMultistepScheduler(**kw))
    out = states(fk_diffusers.UniPCMultistepScheduler(**kw))
    if solver_type == "bh1" and config.get("final_sigmas_type", "zero") == "zero":
        # diffusers' own bh1 step into sigma = 0 is NaN (B(h) = -h = -inf times a
        # zero term); flowkern's is the limit, the last step's x0 prediction
        assert ref[-1].isnan().all() and out[-1].isfinite().all()
        ref, out = ref[:-1], out[:-1]
    for k, (o, r) in enumerate(zip(out, ref)):
        assert _rel(o, r) <= 3 * TOL, (k, _rel(o, r))
