"""sample_dpm_fast and sample_dpm_adaptive (flowkern.integrations.k_diffusion)
against k-diffusion's own, on tests/test_integrations.py's toy denoiser and
start (x = 80 N(0, 1), sigma 80 -> 0.002), with its helpers.

k-diffusion's DPMSolver makes its times from torch.tensor(sigma_max), in
torch's default dtype: its float64 runs here set that default to float64, so
that its t grid and coefficients are float64 as flowkern's always are (float32
times alone put a float64 run 2e-5 to 2e-4 off here). Its float32 runs keep
the default: there the adapter's error against the float64 run must be within
a small multiple of k-diffusion's own.
"""
import math

import pytest
import torch

from flowkern.integrations import k_diffusion as fk_k
from helpers import default_dtype as _default_dtype
from test_integrations import BACKENDS, _k_model, _k_sampling, _philox_sampler, _rel, _toy

SIG_MIN, SIG_MAX = 0.002, 80.0
FAST_N = [1, 2, 3, 4, 5, 7, 10]  # orders [1], [2], [2, 1], [3, 1], [3, 2], [3, 3, 1], [3, 3, 3, 1]
NOISE = [(0.0, 1.0), (1.0, 1.0), (0.5, 0.8)]  # (eta, s_noise)


def _setup(dtype):
    ks = _k_sampling()
    x = 80.0 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4))
    return ks, x.to(dtype), _k_model(_toy(seed=3).to(dtype))


def _peer(ks, name, model, x, *args, **kw):
    """k-diffusion's sampler; its times in float64 for a float64 x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.get_default_dtype()
    with _default_dtype(dtype):
        return getattr(ks, name)(model, x, SIG_MIN, SIG_MAX, *args, disable=True, **kw)


def _ours(name, model, x, *args, **kw):
    return getattr(fk_k, name)(model, x, SIG_MIN, SIG_MAX, *args, disable=True, **kw)


def _same_callbacks(log_a, log_b):
    assert len(log_a) == len(log_b) and list(log_a[0]) == list(log_b[0])
    for a, b in zip(log_a, log_b):
        assert a["i"] == b["i"]
        for key in ("sigma", "sigma_hat", "t", "t_up"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6)
        # the model's input cancels from |x| ~ 200 to ~ 14 in one step at sigma
        # 80: a denoised x inside the loop carries that conditioning (measured:
        # 3e-11 where a 1-ulp change of the peer's own x_init moves it 3e-12);
        # the final samples are held to 1e-11 by the callers
        assert _rel(b["denoised"], a["denoised"]) <= 1e-10
        if "error" in a:  # the adaptive one's
            assert float(b["error"]) == pytest.approx(float(a["error"]), rel=1e-8, abs=1e-12)
            assert b["h"] == pytest.approx(a["h"], rel=1e-8)
            assert all(a[k] == b[k] for k in ("steps", "nfe", "n_accept", "n_reject"))


# ---------------------------------------------------------------------------
# float64: equal to rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", FAST_N)
@pytest.mark.parametrize("eta,s_noise", NOISE)
def test_dpm_fast_float64(backend, n, eta, s_noise):
    """Every order tail of k-diffusion's plan, deterministic and ancestral
    (both samplers fed the same noise through a noise_sampler), with its
    callback and extra_args."""
    ks, x, model = _setup(torch.float64)
    kw = dict(eta=eta, s_noise=s_noise, extra_args={"scale": 0.9})
    log_a, log_b = [], []
    ref = _peer(ks, "sample_dpm_fast", model, x, n, noise_sampler=_philox_sampler(5, x),
                callback=log_a.append, **kw)
    out = _ours("sample_dpm_fast", model, x, n, noise_sampler=_philox_sampler(5, x),
                callback=log_b.append, backend=backend, **kw)
    assert out.dtype == ref.dtype and _rel(out, ref) <= 1e-11, _rel(out, ref)
    _same_callbacks(log_a, log_b)


ADAPTIVE = [dict(order=2), dict(order=3),
            dict(order=2, eta=1.0), dict(order=3, eta=0.5, s_noise=0.8),
            dict(order=3, rtol=0.02, atol=0.001, h_init=0.2, pcoeff=0.1, icoeff=0.9,
                 dcoeff=0.05, accept_safety=0.9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", ADAPTIVE, ids=[str(k) for k in ADAPTIVE])
def test_dpm_adaptive_float64(backend, kw):
    """The same accepted and rejected steps (return_info), the same error
    norms and step sizes in the callback, the same sample."""
    ks, x, model = _setup(torch.float64)
    log_a, log_b = [], []
    ref, info_a = _peer(ks, "sample_dpm_adaptive", model, x, noise_sampler=_philox_sampler(5, x),
                        callback=log_a.append, return_info=True, **kw)
    out, info_b = _ours("sample_dpm_adaptive", model, x, noise_sampler=_philox_sampler(5, x),
                        callback=log_b.append, return_info=True, backend=backend, **kw)
    assert info_b == info_a and info_a["n_reject"] > 0
    assert out.dtype == ref.dtype and _rel(out, ref) <= 1e-11, _rel(out, ref)
    _same_callbacks(log_a, log_b)
    assert torch.equal(_ours("sample_dpm_adaptive", model, x, noise_sampler=_philox_sampler(5, x),
                             backend=backend, **kw), out)  # return_info=False: x alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_and_empty_interval_float64(backend):
    """sigma_min > sigma_max (k-diffusion's reverse sampling, eta = 0) as the
    peer; sigma_min = sigma_max leaves x as it is (k-diffusion's third-order
    step divides 0 by 0 there: NaN)."""
    ks, x, model = _setup(torch.float64)
    for n in (2, 5):
        with _default_dtype(torch.float64):
            ref = ks.sample_dpm_fast(model, x, SIG_MAX, 3.0, n, disable=True)
        out = fk_k.sample_dpm_fast(model, x, SIG_MAX, 3.0, n, disable=True, backend=backend)
        assert _rel(out, ref) <= 1e-11
    with _default_dtype(torch.float64):
        ref, info_a = ks.sample_dpm_adaptive(model, x, SIG_MAX, 3.0, disable=True,
                                             return_info=True)
    out, info_b = fk_k.sample_dpm_adaptive(model, x, SIG_MAX, 3.0, disable=True,
                                           return_info=True, backend=backend)
    assert info_b == info_a and _rel(out, ref) <= 1e-11
    for n in (1, 3, 5):
        assert torch.equal(fk_k.sample_dpm_fast(model, x, 1.0, 1.0, n, disable=True,
                                                backend=backend), x)


# ---------------------------------------------------------------------------
# float32 and 16-bit x: within k-diffusion's own error


FP32_CASES = [("sample_dpm_fast", dict(n=n, eta=eta)) for n in (3, 5, 10) for eta in (0.0, 1.0)] \
    + [("sample_dpm_adaptive", dict(order=o, eta=eta)) for o in (2, 3) for eta in (0.0, 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", FP32_CASES, ids=[f"{n}-{k}" for n, k in FP32_CASES])
def test_float32_within_the_peers_error(backend, name, kw):
    """float32, the caller's noise_sampler and the noise drawn in the kernels
    (seed=): error against k-diffusion's float64 run (fed the same float32
    noise) within 3x k-diffusion's own float32 error (+ 2e-6). Measured: up to
    1.8x, and 2.6x where both are ~1e-6 (the start |x| ~ 80 ends O(1): both
    lose ~1e-6..1e-3 to cancellation; k-diffusion's float32 times add to its)."""
    ks, x, model = _setup(torch.float32)
    _, x64, m64 = _setup(torch.float64)
    kw = dict(kw)
    n = (kw.pop("n"),) if "n" in kw else ()
    adaptive = name == "sample_dpm_adaptive"
    if adaptive:
        kw["return_info"] = True

    def sampler32_as64():  # the float32 noise, in float64 (what the kernels add)
        inner = _philox_sampler(5, x)
        return lambda a, b: inner(a, b).double()

    exact = _peer(ks, name, m64, x64, *n, noise_sampler=sampler32_as64(), **kw)
    ref = _peer(ks, name, model, x, *n, noise_sampler=_philox_sampler(5, x), **kw)
    given = _ours(name, model, x, *n, noise_sampler=_philox_sampler(5, x), backend=backend,
                  **kw)
    fused = _ours(name, model, x, *n, seed=5, backend=backend, **kw)
    if adaptive:  # the same steps taken, or the comparison is meaningless
        assert exact[1] == ref[1] == given[1] == fused[1]
        exact, ref, given, fused = exact[0], ref[0], given[0], fused[0]
    peer = _rel(ref, exact)
    for out in (given, fused):
        assert out.dtype == torch.float32 and _rel(out, exact) <= 3 * peer + 2e-6, \
            (_rel(out, exact), peer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", [("sample_dpm_fast", dict(n=10)),
                                     ("sample_dpm_adaptive", dict(order=3))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_x_has_the_peers_accuracy(backend, name, kw, dtype):
    """A float16/bfloat16 x (a model answering in x's dtype): k-diffusion's
    DPMSolver keeps x's dtype (its coefficients are 0-dim tensors), and so
    does the adapter; its error within 2x the peer's (measured 0.4-0.9x)."""
    ks, x, _ = _setup(torch.float32)
    inner = _k_model(_toy(seed=3).double())

    def model(x, sigma, **extra):  # computes in float64, answers in x's dtype
        return inner(x.double(), sigma.double(), **extra).to(x.dtype)

    x16, kw = x.to(dtype), dict(kw)
    n = (kw.pop("n"),) if "n" in kw else ()
    exact = _peer(ks, name, model, x16.double(), *n, **kw)
    ref = _peer(ks, name, model, x16, *n, **kw)
    out = _ours(name, model, x16, *n, backend=backend, **kw)
    assert out.dtype == ref.dtype == dtype
    assert _rel(out, exact) <= 2 * _rel(ref, exact) + 1e-6, (_rel(out, exact), _rel(ref, exact))


# ---------------------------------------------------------------------------
# the noise drawn in the kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", [("sample_dpm_fast", dict(n=10)),
                                     ("sample_dpm_adaptive", dict(order=3))])
def test_in_kernel_noise(backend, name, kw):
    """seed=, no noise_sampler: deterministic in the seed (seed None: one draw
    from torch's generator); with denoised = 0 every step scales x by
    sigma_down/sigma and adds noise of std su with sigma_down^2 + su^2 =
    sigma_next^2, so the sample is c x + noise exactly (the same noise for
    any x: a run from x = 0 is that noise), and its std is sigma_min's."""
    s_min, s_max = 0.5, 10.0
    x = s_max * torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))

    def zero(x, sigma):
        return torch.zeros_like(x)

    def run(x, **extra):
        return getattr(fk_k, name)(zero, x, s_min, s_max, eta=0.5, disable=True,
                                   backend=backend, **kw, **extra)

    out, noise = run(x, seed=11), run(torch.zeros_like(x), seed=11)
    assert torch.equal(run(x, seed=11), out) and _rel(run(x, seed=12), out) > 0.5
    torch.manual_seed(3)
    a = run(x)
    torch.manual_seed(3)
    assert torch.equal(run(x), a) and _rel(a, out) > 0.5
    c = float((out - noise).flatten() @ x.flatten() / (x.flatten() @ x.flatten()))
    assert 0 < c < 0.05 and _rel(out - noise, c * x) <= 1e-4   # eta = 0.5: c ~ 0.02
    assert abs(noise.mean().item()) <= 0.01 * s_min
    assert noise.std().item() == pytest.approx(math.sqrt(s_min ** 2 - (c * s_max) ** 2),
                                               rel=0.01)
    assert out.std().item() == pytest.approx(s_min, rel=0.01)
    other = run(torch.zeros_like(x), seed=12)  # another seed: independent noise
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), other.flatten()]))[0, 1]) <= 0.01


# ---------------------------------------------------------------------------
# errors


def test_errors_as_the_peer():
    """Where k-diffusion raises, the same ValueError and words."""
    ks, x, model = _setup(torch.float32)
    cases = [("sample_dpm_fast", (0.0, 80.0, 4), {}, "must not be 0"),
             ("sample_dpm_fast", (0.1, -1.0, 4), {}, "must not be 0"),
             ("sample_dpm_fast", (10.0, 1.0, 4), {"eta": 1.0}, "eta must be 0 for reverse"),
             ("sample_dpm_adaptive", (0.0, 80.0), {}, "must not be 0"),
             ("sample_dpm_adaptive", (0.1, 80.0), {"order": 1}, "order should be 2 or 3"),
             ("sample_dpm_adaptive", (10.0, 1.0), {"eta": 1.0}, "eta must be 0 for reverse")]
    for name, args, kw, words in cases:
        for fn in (getattr(ks, name), getattr(fk_k, name)):
            with pytest.raises(ValueError, match=words):
                fn(model, x, *args, disable=True, **kw)


def test_errors_of_our_own():
    """Clear errors where k-diffusion would fail later, loop or give NaN."""
    _, x, model = _setup(torch.float32)
    fast, adaptive = fk_k.sample_dpm_fast, fk_k.sample_dpm_adaptive
    for n in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="n: expected a positive int"):
            fast(model, x, 0.1, 10.0, n)
    with pytest.raises(ValueError, match="sigma_min: expected a float"):
        fast(model, x, "a", 10.0, 3)
    with pytest.raises(ValueError, match="sigma_max: expected a finite"):
        fast(model, x, 0.1, math.inf, 3)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fast(model, [1.0], 0.1, 10.0, 3)
    with pytest.raises(ValueError, match="seed: expected"):
        fast(model, x, 0.1, 10.0, 3, eta=1.0, seed=-1)
    with pytest.raises(ValueError, match="model: expected the denoised x"):
        fast(lambda x, s: x[0], x, 0.1, 10.0, 3)
    for kw, words in ((dict(rtol=0.0, atol=0.0), "rtol, atol"), (dict(atol=-1.0), "atol"),
                      (dict(rtol=math.nan), "rtol"), (dict(h_init=0.0), "h_init"),
                      (dict(h_init=math.inf), "h_init")):
        with pytest.raises(ValueError, match=words):
            adaptive(model, x, 0.1, 10.0, **kw)
    with pytest.raises(FloatingPointError, match="NaN"):
        adaptive(lambda x, s: torch.full_like(x, math.nan), x, 0.1, 10.0, disable=True)
