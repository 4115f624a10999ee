"""The drop-in adapters against the installed peers' own code on an analytic
model (issue 10, Deliver item 6).

k-diffusion: every sampler of flowkern.integrations.k_diffusion against
k-diffusion's function of the same name on the exact denoiser of a small
Gaussian mixture (E[x0 | x0 + sigma n] in closed form, computed in float64
whatever the state's dtype), on every sigma grid k-diffusion offers
(get_sigmas_karras, get_sigmas_exponential, get_sigmas_polyexponential,
get_sigmas_vp; sample_dpm_fast and sample_dpm_adaptive make their own grid
uniform in -log sigma, so they run over the (sigma_min, sigma_max) ranges of
those grids), on the "cpu" and "torch" backends. The toy models of
tests/test_integrations.py are O(1) tanh maps; this one has the structure the
samplers are built for (a denoiser that moves from the mixture's mean at
large sigma to the nearest component at small sigma), and it is exact, so a
float64 run of either side is free of model error.

Errors are norm-relative: ||a - b||_2 / ||b||_2 over the whole batch, in
float64. Stochastic samplers get the same noise on both sides: the same
deterministic noise_sampler (a fresh seeded generator per run, or
k-diffusion's own BrownianTreeNoiseSampler with a fixed seed); the churn of
sample_euler / sample_heun / sample_dpm_2 (k-diffusion draws torch.randn_like,
flowkern draws Philox in the kernel; there is no noise_sampler) is fed to
k-diffusion as the backend's own in-kernel normals, read out through
flowkern.lincomb_step (0 x + 1 xi at the same Philox offset).

* float64: flowkern's sample within 1e-11 of k-diffusion's; the noise_sampler
  called as many times with the same (sigma, sigma_next); the callback
  called at the same steps.
* float32: each side's error against k-diffusion's float64 run (the same
  float32 noise values, in float64) - flowkern's within 4x k-diffusion's own
  float32 error plus FLOOR (a few float32 ulps of the result).

diffusers: a real pipeline built offline from tiny random models with
flowkern's UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler and
FlowMatchHeunDiscreteScheduler swapped in by the standard from_config line
(test_integrations.py covers DPMSolverMultistep, Euler, EulerAncestral and
DDIM): the images agree with diffusers' own scheduler to rounding, and
save_pretrained / from_pretrained gives back flowkern's class, the same
config and the same images. The flow-matching schedulers run in
DDPMPipeline on a UNet2DModel, as test_integrations.py's pipeline test;
UniPC cannot (DDPMPipeline passes generator= to step(), which diffusers' own
UniPCMultistepScheduler.step does not take) and runs in DiTPipeline.

k-diffusion's DPMSolver (dpm_fast, dpm_adaptive) makes its times from
torch.tensor(sigma_max) in torch's default dtype, and passes noise_sampler
sigmas in it (the adapter passes the same): the float64 runs here set that
default to float64 on both sides (see tests/test_k_diffusion_dpm.py). In
float32 its order-3 dpm_adaptive is only good to ~1e-3 here (both sides:
the same steps, float32 coefficients of tiny last steps), so that check is
loose.
"""

import pytest
import torch

import flowkern
from flowkern.integrations import diffusers as fk_diffusers
from flowkern.integrations import k_diffusion as fk_k

from helpers import default_dtype as _default_dtype
from test_integrations import BACKENDS, _diffusers, _k_sampling

pytestmark = [
    # torchsde's BrownianInterval, called by k-diffusion's BrownianTreeNoiseSampler
    # at its own sigma_min (rounding: ta = t0 - 1 ulp)
    pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning"),
    pytest.mark.filterwarnings("ignore:Should have tb<=t1:UserWarning"),
    # diffusers' own np.array(tensor) under numpy 2 (not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TOL64 = 1e-11
FACTOR32 = 4.0
FLOOR = 4 * 2.0 ** -23        # ~4.8e-7: a few float32 ulps of the result, relative


def _rel(a, b):
    """||a - b||_2 / ||b||_2 in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------
# the analytic model: a mixture of K isotropic Gaussians in DIM dimensions


DIM, N_SAMPLES, N_STEPS = 4, 64, 10
_g = torch.Generator().manual_seed(2024)
MIX_MEAN = 2.0 * torch.randn(3, DIM, generator=_g, dtype=torch.float64)
MIX_STD = 0.2 + 0.6 * torch.rand(3, generator=_g, dtype=torch.float64)
MIX_W = torch.softmax(torch.randn(3, generator=_g, dtype=torch.float64), 0)
del _g


def gmm_denoiser(x, sigma, **extra):
    """The exact denoiser E[x0 | x0 + sigma n = x] of the mixture: the
    posterior-weighted component means mu_k + s_k^2/(s_k^2 + sigma^2) (x -
    mu_k), in float64, returned in x's dtype (as a model would answer)."""
    xd = x.double().reshape(x.shape[0], 1, DIM)
    var = MIX_STD[None, :, None] ** 2 + sigma.double().reshape(-1, 1, 1) ** 2  # (B, K, 1)
    diff = xd - MIX_MEAN[None]                                                  # (B, K, D)
    logp = MIX_W.log()[None] - 0.5 * (diff ** 2 / var).sum(-1) \
        - 0.5 * DIM * var[..., 0].log()
    post = torch.softmax(logp, 1)[..., None]
    mean = MIX_MEAN[None] + MIX_STD[None, :, None] ** 2 / var * diff
    return (post * mean).sum(1).reshape(x.shape).to(x.dtype)


def test_the_denoiser_is_exact():
    """Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x), p_sigma the
    mixture convolved with N(0, sigma^2): the closed form above against
    autograd of the log density (logsumexp of the components), float64."""
    x = 3.0 * torch.randn(N_SAMPLES, DIM, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    for s in (0.01, 0.3, 1.0, 5.0, 80.0):
        sigma = torch.full((N_SAMPLES,), s, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        var = MIX_STD ** 2 + s ** 2                                        # (K,)
        sq = ((xr[:, None, :] - MIX_MEAN[None]) ** 2).sum(-1)              # (B, K)
        logp = torch.logsumexp(MIX_W.log() - 0.5 * sq / var - 0.5 * DIM * var.log(), 1)
        (score,) = torch.autograd.grad(logp.sum(), xr)
        assert _rel(gmm_denoiser(x, sigma), x + s ** 2 * score) <= 1e-13, s


# ---------------------------------------------------------------------------
# k-diffusion's grids and the samplers' arguments


SIG_MIN, SIG_MAX = 0.01, 80.0
GRIDS = {
    "karras": lambda ks: ks.get_sigmas_karras(N_STEPS, SIG_MIN, SIG_MAX),
    "exponential": lambda ks: ks.get_sigmas_exponential(N_STEPS, SIG_MIN, SIG_MAX),
    "polyexponential": lambda ks: ks.get_sigmas_polyexponential(N_STEPS, SIG_MIN, SIG_MAX,
                                                                rho=2.0),
    "vp": lambda ks: ks.get_sigmas_vp(N_STEPS),
}


def _grid(ks, name, dtype):
    """The grid as k-diffusion makes it with `dtype` the default (float32:
    what its users get)."""
    with _default_dtype(dtype):
        sigmas = GRIDS[name](ks)
    assert sigmas.dtype == dtype and sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    return sigmas


def _start(sigma_max, dtype):
    """x = sigma_max n, k-diffusion's start."""
    n = torch.randn(N_SAMPLES, DIM, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    return (float(sigma_max) * n).to(dtype)


class _Noise:
    """A deterministic noise_sampler: draw k of a fresh instance is the k-th
    float32 normal of a generator seeded with `seed`, in `dtype` (the float32
    and float64 runs add the same values); it records its arguments."""

    def __init__(self, shape, dtype, seed=3):
        self.g, self.shape, self.dtype = torch.Generator().manual_seed(seed), shape, dtype
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.g, dtype=torch.float32).to(self.dtype)


class _BackendChurnNoise:
    """torch.randn_like for k-diffusion's churn: the normals the backend's
    churn kernel draws at step i (Philox(seed, i numel)), read out through
    flowkern.lincomb_step (0 x + 1 xi), in the state's dtype, then `dtype`."""

    def __init__(self, seed, backend, state_dtype, dtype):
        self.seed, self.backend, self.state_dtype, self.dtype = seed, backend, state_dtype, dtype
        self.calls = 0

    def __call__(self, t, *args, **kwargs):
        z = torch.zeros(t.shape, dtype=self.state_dtype)
        xi = flowkern.lincomb_step(z, [z], [0.0, 0.0], noise_std=1.0, seed=self.seed,
                                   offset=self.calls * t.numel(), backend=self.backend)
        self.calls += 1
        return xi.to(self.dtype)


CHURN = dict(s_churn=3.0, s_tmin=0.05, s_tmax=40.0, s_noise=1.003)
ETAS = [dict(), dict(eta=0.5, s_noise=0.8), dict(eta=0.0)]
SDE = [("sample_euler_ancestral", {}), ("sample_dpm_2_ancestral", {}),
       ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_sde", {}),
       ("sample_dpmpp_sde", {"r": 0.3}), ("sample_dpmpp_2m_sde", {}),
       ("sample_dpmpp_2m_sde", {"solver_type": "heun"}), ("sample_dpmpp_3m_sde", {})]
# (sampler, its keyword arguments, the noise: None | "churn" | "list" | "tree")
CASES = [("sample_euler", {}, None), ("sample_heun", {}, None), ("sample_dpmpp_2m", {}, None),
         ("sample_dpm_2", {}, None)] \
    + [("sample_lms", {"order": k}, None) for k in (1, 2, 3, 4)] \
    + [(n, CHURN, "churn") for n in ("sample_euler", "sample_heun", "sample_dpm_2")] \
    + [(n, {**kw, **e}, "list") for n, kw in SDE for e in ETAS] \
    + [(n, kw, "tree") for n, kw in SDE]


def _params(cases, heavy):
    """(grid, sampler, kw, noise) for every grid; `heavy` cases on the karras
    grid only unless `make test-full` (slow: torchsde's Brownian tree is
    ~10x the cost of a list sampler)."""
    return [pytest.param(g, n, kw, noise, id=f"{n}-{kw}-{noise}-{g}",
                         marks=[pytest.mark.slow] if heavy(n, kw, noise) and g != "karras"
                         else [])
            for n, kw, noise in cases for g in GRIDS]


FP64_PARAMS = _params(CASES, lambda n, kw, noise: noise == "tree")
FP32_PARAMS = _params([c for c in CASES if c[2] != "tree"],
                      lambda n, kw, noise: kw.get("eta") == 0.0)


def _noise_kwargs(ks, noise, x, sigmas):
    """A fresh noise_sampler for one run (each run starts over)."""
    if noise == "list":
        return {"noise_sampler": _Noise(x.shape, x.dtype)}
    if noise == "tree":
        return {"noise_sampler": ks.BrownianTreeNoiseSampler(
            x, sigmas[sigmas > 0].min(), sigmas.max(), seed=11)}
    return {}


def _run_pair(ks, name, kw, noise, x, sigmas, backend, monkeypatch):
    """k-diffusion's and flowkern's run on (x, sigmas) with the same noise;
    also what their noise samplers saw and their callbacks' step indices."""
    na, nb = _noise_kwargs(ks, noise, x, sigmas), _noise_kwargs(ks, noise, x, sigmas)
    log_a, log_b = [], []
    with monkeypatch.context() as m:
        if noise == "churn":  # the normals the backend's churn kernel draws
            m.setattr(torch, "randn_like", _BackendChurnNoise(5, backend, x.dtype, x.dtype))
            nb = {"seed": 5}
        ref = getattr(ks, name)(gmm_denoiser, x, sigmas, disable=True,
                                callback=lambda d: log_a.append(d["i"]), **kw, **na)
    out = getattr(fk_k, name)(gmm_denoiser, x, sigmas, disable=True, backend=backend,
                              callback=lambda d: log_b.append(d["i"]), **kw, **nb)
    calls = [getattr(n.get("noise_sampler"), "calls", None) for n in (na, nb)]
    return ref, out, calls, (log_a, log_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,name,kw,noise", FP64_PARAMS)
def test_k_diffusion_float64(backend, grid, name, kw, noise, monkeypatch):
    """float64: flowkern's sample within 1e-11 (norm-relative) of
    k-diffusion's, on the same noise; the same noise_sampler calls and
    callback steps."""
    ks = _k_sampling()
    sigmas = _grid(ks, grid, torch.float64)
    x = _start(sigmas[0], torch.float64)
    ref, out, calls, logs = _run_pair(ks, name, kw, noise, x, sigmas, backend, monkeypatch)
    assert out.dtype == ref.dtype == torch.float64
    assert _rel(out, ref) <= TOL64, _rel(out, ref)
    assert logs[0] == logs[1]
    if noise == "list":  # the same draws at the same (sigma, sigma_next)
        assert len(calls[1]) == len(calls[0])
        assert len(calls[0]) > 0 or kw.get("eta") == 0.0
        for a, b in zip(*calls):
            assert b == pytest.approx(a, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,name,kw,noise", FP32_PARAMS)
def test_k_diffusion_float32_within_the_peers_error(backend, grid, name, kw, noise,
                                                    monkeypatch):
    """float32 (k-diffusion's float32 grid, float32 x and noise): flowkern's
    error against k-diffusion's float64 run (the same grid and noise values)
    within FACTOR32 x k-diffusion's own float32 error + FLOOR. (The Brownian
    tree draws other numbers in float32 than in float64: the list sampler
    stands for it here.)"""
    ks = _k_sampling()
    sigmas = _grid(ks, grid, torch.float32)
    x = _start(sigmas[0], torch.float32)
    # k-diffusion in float64 on the float32 grid, start and noise values
    if noise == "churn":
        with monkeypatch.context() as m:
            m.setattr(torch, "randn_like", _BackendChurnNoise(5, backend, torch.float32,
                                                              torch.float64))
            exact = getattr(ks, name)(gmm_denoiser, x.double(), sigmas.double(), disable=True,
                                      **kw)
    else:
        nk = {"noise_sampler": _Noise(x.shape, torch.float64)} if noise else {}
        exact = getattr(ks, name)(gmm_denoiser, x.double(), sigmas.double(), disable=True,
                                  **kw, **nk)
    ref, out, _, _ = _run_pair(ks, name, kw, noise, x, sigmas, backend, monkeypatch)
    assert out.dtype == ref.dtype == torch.float32
    peer, ours = _rel(ref, exact), _rel(out, exact)
    assert ours <= FACTOR32 * peer + FLOOR, (ours, peer)


# ---------------------------------------------------------------------------
# sample_dpm_fast and sample_dpm_adaptive: their own grid over each range


RANGES = {"karras/exponential/polyexponential": (SIG_MIN, SIG_MAX)}


def _vp_range():
    ks = _k_sampling()
    s = _grid(ks, "vp", torch.float64)
    return float(s[-2]), float(s[0])


DPM_CASES = [("sample_dpm_fast", dict(n=10), None),          # orders [3, 3, 3, 1]
             ("sample_dpm_fast", dict(n=8), None),           # [3, 3, 2]
             ("sample_dpm_fast", dict(n=9, eta=0.5, s_noise=0.8), "list"),  # [3, 3, 2, 1]
             ("sample_dpm_fast", dict(n=10, eta=1.0), "tree"),
             ("sample_dpm_adaptive", dict(order=2), None),
             ("sample_dpm_adaptive", dict(order=3), None),
             ("sample_dpm_adaptive", dict(order=3, rtol=0.01, atol=1e-3), None),
             ("sample_dpm_adaptive", dict(order=3, eta=0.5, s_noise=0.8), "list"),
             ("sample_dpm_adaptive", dict(order=2, eta=1.0), "tree")]
DPM_IDS = [f"{n}-{kw}-{noise}" for n, kw, noise in DPM_CASES]


def _dpm_call(fn, x, rng, kw, noise, dtype_default, noise_dtype):
    kw = dict(kw)
    n = (kw.pop("n"),) if "n" in kw else ()
    if noise == "list":
        kw["noise_sampler"] = _Noise(x.shape, noise_dtype)
    elif noise == "tree":
        kw["noise_sampler"] = _k_sampling().BrownianTreeNoiseSampler(x, rng[0], rng[1], seed=11)
    if "order" in kw:
        kw["return_info"] = True
    with _default_dtype(dtype_default):
        r = fn(gmm_denoiser, x, rng[0], rng[1], *n, disable=True, **kw)
    return r if "order" in kw else (r, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rng", ["karras/exponential/polyexponential", "vp"])
@pytest.mark.parametrize("name,kw,noise", DPM_CASES, ids=DPM_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k_diffusion_dpm_solver(backend, rng, name, kw, noise, dtype):
    """float64: within 1e-11 of k-diffusion's (adaptive: the same accepted and
    rejected steps). float32: within FACTOR32 x k-diffusion's own float32
    error + FLOOR of its float64 run, all three taking the same steps."""
    if noise == "tree" and dtype == torch.float32:
        pytest.skip("the Brownian tree draws other numbers in float32 than in float64")
    ks = _k_sampling()
    rng = RANGES.get(rng) or _vp_range()
    x = _start(rng[1], dtype)
    ours = lambda *a, **k: getattr(fk_k, name)(*a, backend=backend, **k)  # noqa: E731
    peer = getattr(ks, name)
    exact, info_e = _dpm_call(peer, x.double(), rng, kw, noise, torch.float64, torch.float64)
    # k-diffusion passes noise_sampler sigma(t) in the default dtype, and so does
    # the adapter: a float64 run has float64 times on both sides
    out, info_o = _dpm_call(ours, x, rng, kw, noise, dtype, dtype)
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert info_o == info_e and _rel(out, exact) <= TOL64, _rel(out, exact)
        return
    ref, info_r = _dpm_call(peer, x, rng, kw, noise, torch.float32, dtype)
    assert info_o == info_r == info_e  # the same steps, or the errors are not comparable
    peer_err, ours_err = _rel(ref, exact), _rel(out, exact)
    assert ours_err <= FACTOR32 * peer_err + FLOOR, (ours_err, peer_err)


# ---------------------------------------------------------------------------
# diffusers: a real pipeline with the scheduler swapped in, saved and reloaded


def _unet_pipeline(d, scheduler):
    """DDPMPipeline on a tiny random UNet2DModel, as test_integrations.py's
    pipeline test builds it. It passes generator= to step(), which
    diffusers' own UniPCMultistepScheduler.step does not take."""
    torch.manual_seed(0)
    unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(8, 16), norm_num_groups=4,
                         down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"))
    return d.DDPMPipeline(unet=unet, scheduler=scheduler), \
        dict(batch_size=2, num_inference_steps=6, output_type="np")


def _dit_pipeline(d, scheduler):
    """DiTPipeline on a tiny random DiT and AutoencoderKL, classifier-free
    guidance on (a doubled batch): step() without a generator, as UniPC's
    takes it. eval(): DiT's label embedding drops labels at random in
    training mode."""
    torch.manual_seed(0)
    dit = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=1000, norm_num_groups=4).eval()
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                          layers_per_block=1, latent_channels=4, norm_num_groups=4,
                          sample_size=8).eval()
    return d.DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler), \
        dict(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=6, output_type="np")


def _sample(pipe, kw):
    """The pipeline's images, and (DiT) the latents its VAE decodes."""
    seen = []
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        decode = vae.decode
        vae.decode = lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k)
    try:
        images = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    finally:
        if vae is not None:
            del vae.decode  # the class's method again
    return images, (seen[-1] if seen else None)


FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
PIPELINE_CASES = [("UniPCMultistepScheduler", _dit_pipeline, {}),
                  ("UniPCMultistepScheduler", _dit_pipeline, {"solver_order": 3}),
                  ("UniPCMultistepScheduler", _dit_pipeline,
                   {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
                  ("UniPCMultistepScheduler", _dit_pipeline, FLOW_SIGMAS),
                  ("FlowMatchEulerDiscreteScheduler", _unet_pipeline, {}),
                  ("FlowMatchEulerDiscreteScheduler", _unet_pipeline, {"shift": 3.0}),
                  ("FlowMatchHeunDiscreteScheduler", _unet_pipeline, {})]


@pytest.mark.parametrize("name,build,config", PIPELINE_CASES,
                         ids=[f"{n}-{c}" for n, _, c in PIPELINE_CASES])
def test_diffusers_pipeline_swap_save_reload(tmp_path, name, build, config):
    """A real pipeline on tiny random models (offline), its scheduler
    diffusers' `name` with `config`, then flowkern's `name` swapped in by
    `from_config(pipe.scheduler.config)`: the images agree with the same
    pipeline on diffusers' own scheduler to rounding; save_pretrained /
    from_pretrained gives back flowkern's class, the same config and the same
    images. The images are clamped to [0, 1]: most pixels must lie inside,
    or agreement there says nothing; DiT's latents are compared too (its
    random VAE decoder damps differences below the images' rounding)."""
    d = _diffusers()
    pipe, kw = build(d, getattr(d, name)(**config))
    ref_pipe = type(pipe)(**{**pipe.components,
                             "scheduler": getattr(d, name).from_config(pipe.scheduler.config)})
    pipe.scheduler = getattr(fk_diffusers, name).from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is getattr(fk_diffusers, name)
    for p in (pipe, ref_pipe):
        p.set_progress_bar_config(disable=True)
    got, got_z = _sample(pipe, kw)
    want, want_z = _sample(ref_pipe, kw)
    inside = ((want > 0) & (want < 1)).mean()
    assert inside > 0.5 and want.std() > 0.05, (inside, want.std())
    assert abs(got - want).max() <= 1e-5, abs(got - want).max()
    if want_z is not None:  # the latents themselves: the decoder damps their differences
        assert _rel(got_z, want_z) <= 1e-5, _rel(got_z, want_z)

    pipe.save_pretrained(tmp_path)
    back = type(pipe).from_pretrained(tmp_path)
    assert type(back.scheduler) is getattr(fk_diffusers, name)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.scheduler.config) == public(pipe.scheduler.config)
    assert all(back.scheduler.config[k] == v for k, v in config.items())
    back.set_progress_bar_config(disable=True)
    again, again_z = _sample(back, kw)
    assert abs(again - got).max() == 0
    assert again_z is None or torch.equal(again_z, got_z)
