"""lincomb_step (x_s = c_x x + sum_k c_k p_k + std xi with the caller's
weights; k-diffusion's DPM-Solver++(3M) SDE in one fused pass) on every
backend against the float64 reference: every dtype, 1-4 terms, no noise, a
seed or per-sample seeds, non-contiguous inputs, large magnitudes, in place;
the same noise on every backend; opcheck; torch.compile; derivatives (the
kernel backends refuse them, the torch backend differentiates); bad input
naming the argument."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwad

import flowkern as fk
from flowkern.reference.steps import philox_normal

from conftest import DEVICE, backends_under_test, dtypes_for

BACKENDS = backends_under_test()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
CASES = [(b, d) for b in KERNEL_BACKENDS for d in dtypes_for(b)]
WEIGHTS = [0.8187, 0.4521, -0.3316, 0.0612, 1.0]  # 3M SDE-like; the last scales a noise term
STD = 0.37


def _inputs(shape, dtype, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
            for _ in range(n)]


def _noise_args(noise, rows):
    if noise == "none":
        return {}
    if noise == "seed":
        return dict(noise_std=STD, seed=1234, offset=77)
    seeds = torch.arange(rows, dtype=torch.int64, device=DEVICE) * 7919 + 5
    return dict(noise_std=STD, per_sample_seeds=seeds, offset=77)


def _want(x, terms, weights, noise, rows):
    """The float64 formula written out, with the kernels' noise."""
    want = weights[0] * x.double()
    for w, p in zip(weights[1:], terms):
        want = want + w * p.double()
    kw = _noise_args(noise, rows)
    if kw:
        key = kw.get("per_sample_seeds", kw.get("seed"))
        want = want + STD * philox_normal(key, kw["offset"], x.shape, torch.float64, x.device)
    return want


NT_NOISE = [(nt, noise) for nt in range(1, 5) for noise in ("none", "seed", "per_sample")
            if nt <= 3 or noise == "none"]  # the in-kernel noise goes with at most 3 terms


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("nt,noise", NT_NOISE)
def test_matches_reference(backend, dtype, nt, noise):
    shape = (5, 3, 37)
    x, *terms = _inputs(shape, dtype, 1 + nt)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous state
    terms[-1] = terms[-1][:, :, ::1]
    weights = WEIGHTS[:nt + 1]
    got = fk.lincomb_step(x, terms, weights, backend=backend, **_noise_args(noise, shape[0]))
    assert got.dtype == dtype and got.shape == shape
    want = _want(x, terms, weights, noise, shape[0])
    # the torch reference in the input dtype is the tolerance's yardstick
    naive = fk.lincomb_step(x, terms, weights, backend="torch", **_noise_args(noise, shape[0]))
    err, base = (got.double() - want).abs().max(), (naive.double() - want).abs().max()
    eps = torch.finfo(dtype).eps
    # the kernels draw xi in float32 (philox.h): a few float32 ulp of STD |xi| in float64
    noise_ulp = 0.0 if noise == "none" else 8 * torch.finfo(torch.float32).eps * STD * 6
    assert err <= 2 * base + 8 * eps * want.abs().max() + noise_ulp, (err, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_the_formula(backend):
    """In float64 every backend is the written-out combination to 1e-14."""
    x, *terms = _inputs((4, 33), torch.float64, 5, scale=1e3)
    got = fk.lincomb_step(x, terms, [1 / 3, 0.1, -1 / 7, math.pi, -2.5], backend=backend)
    want = x / 3 + 0.1 * terms[0] - terms[1] / 7 + math.pi * terms[2] - 2.5 * terms[3]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14 * want.abs().max().item())


def test_noise_is_the_same_on_every_backend():
    """The in-kernel noise (Philox(seed, offset + e), or per-sample seeds) is
    the same on every backend, in float32 to 2 ulp (the torch reference's
    Box-Muller uses torch's log/sin: see README "Noise")."""
    x, p = _inputs((6, 129), torch.float32, 2)
    for noise in ("seed", "per_sample"):
        outs = [fk.lincomb_step(x, [p], [0.5, 0.5], backend=b, **_noise_args(noise, 6))
                for b in BACKENDS]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=3e-7, atol=3e-7)
        # and a noise term is really there: std STD about the mean
        resid = outs[0] - 0.5 * (x + p)
        assert 0.8 * STD < resid.std().item() < 1.2 * STD


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_and_out(backend):
    x, a, b = _inputs((3, 17), torch.float32, 3)
    want = fk.lincomb_step(x, [a, b], WEIGHTS[:3], backend=backend)
    y = x.clone()
    got = fk.lincomb_step(y, [a, b], WEIGHTS[:3], out=y, backend=backend)
    assert got is y
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    out = torch.empty_like(x)
    assert fk.lincomb_step(x, [a, b], WEIGHTS[:3], out=out, backend=backend) is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # out= a term exactly (the CPU element loop is compiled as independent
    # iterations, FK_IVDEP in hd.h): 3 x 131 crosses the vectorised body and its tail
    x, a, b, c = _inputs((3, 131), torch.float32, 4)
    want = fk.lincomb_step(x, [a, b, c], WEIGHTS[:4], backend=backend)
    for k in range(3):
        terms = [u.clone() for u in (a, b, c)]
        assert fk.lincomb_step(x, terms, WEIGHTS[:4], out=terms[k], backend=backend) is terms[k]
        torch.testing.assert_close(terms[k], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_caller_tensors_unchanged(backend):
    x, a = _inputs((3, 9), torch.float32, 2)
    x0, a0 = x.clone(), a.clone()
    fk.lincomb_step(x, [a], [0.5, 0.5], noise_std=1.0, seed=3, backend=backend)
    assert torch.equal(x, x0) and torch.equal(a, a0)


x_, p_ = torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
buf_ = torch.randn(3, 8, device=DEVICE)
BAD = [
    (lambda b: fk.lincomb_step(x_, [], [1.0], backend=b), ValueError, "terms: expected 1 to 4"),
    (lambda b: fk.lincomb_step(x_, [p_] * 5, [1.0] * 6, backend=b), ValueError,
     "terms: expected 1 to 4"),
    (lambda b: fk.lincomb_step(x_, p_, [1.0, 1.0], backend=b), TypeError, "terms: expected a list"),
    (lambda b: fk.lincomb_step(x_, [p_, 3.0], [1.0, 1.0, 1.0], backend=b), TypeError, "terms"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0], backend=b), ValueError,
     "weights: expected 2 weights"),
    (lambda b: fk.lincomb_step(x_, [p_] * 4, [1.0] * 5, noise_std=0.5, backend=b), ValueError,
     "terms: at most 3 with the in-kernel noise"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, math.inf], backend=b), ValueError,
     "weights: expected finite"),
    (lambda b: fk.lincomb_step(x_, [p_], 0.5, backend=b), TypeError, "weights"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, 1.0], noise_std=-1.0, backend=b), ValueError,
     "noise_std: expected a finite value >= 0"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, 1.0], noise_std=math.nan, backend=b), ValueError,
     "noise_std"),
    (lambda b: fk.lincomb_step(x_, [p_[:1]], [1.0, 1.0], backend=b), ValueError, r"terms\[0\]"),
    (lambda b: fk.lincomb_step(x_, [p_, p_.double()], [1.0, 1.0, 1.0], backend=b), ValueError,
     r"terms\[1\]"),
    (lambda b: fk.lincomb_step(x_, [buf_[:2]], [1.0, 1.0], out=buf_[1:], backend=b), ValueError,
     r"out: overlaps terms\[0\]"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, 1.0], seed=-1, backend=b), ValueError, "seed"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, 1.0], noise_std=1.0, seed=1,
                               per_sample_seeds=torch.zeros(2, dtype=torch.int64, device=DEVICE),
                               backend=b), ValueError, "per_sample_seeds"),
    (lambda b: fk.lincomb_step(x_, [p_], [1.0, 1.0], noise_std=1.0,
                               per_sample_seeds=torch.zeros(3, dtype=torch.int64, device=DEVICE),
                               backend=b), ValueError, "per_sample_seeds: expected shape"),
    (lambda b: fk.lincomb_step(x_[0, 0], [p_[0, 0]], [1.0, 1.0], backend=b), ValueError,
     "x: expected a batch"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_inputs(backend, i):
    fn, exc, pattern = BAD[i]
    with pytest.raises(exc, match=pattern):
        fn(backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_refuse_derivatives(backend):
    """The op writes a buffer: a tensor that needs a gradient, or a dual
    (forward-mode) term, is an error, not a result with a dropped derivative."""
    x, p = _inputs((2, 8), torch.float32, 2)
    with pytest.raises(RuntimeError, match="requires grad"):
        fk.lincomb_step(x, [p.requires_grad_()], [1.0, 1.0], backend=backend)
    p = p.detach()
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        with fwad.dual_level():
            fk.lincomb_step(x, [fwad.make_dual(p, torch.ones_like(p))], [1.0, 1.0],
                            backend=backend)


def test_torch_backend_differentiates():
    """The torch backend is the reference: gradcheck in float64, and its jvp is
    the step on the tangents (linear in x and the terms; the noise a constant)."""
    x, a, b = (t.requires_grad_() for t in _inputs((3, 5), torch.float64, 3))

    def step(x, a, b):
        return fk.lincomb_step(x, [a, b], WEIGHTS[:3], noise_std=0.2, seed=5, backend="torch")

    assert torch.autograd.gradcheck(step, (x, a, b))
    primals = tuple(t.detach() for t in (x, a, b))
    tangents = tuple(torch.randn_like(t) for t in primals)
    _, tan = torch.func.jvp(step, primals, tangents)
    want = fk.lincomb_step(tangents[0], list(tangents[1:]), WEIGHTS[:3], backend="torch")
    torch.testing.assert_close(tan, want, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not fk.available()["cpu"], reason="needs flowkern._C")
def test_opcheck():
    x, a, b = _inputs((3, 9), torch.float32, 3)
    seeds = torch.arange(3, dtype=torch.int64, device=DEVICE)
    namespaces = [torch.ops.flowkern] + (
        [torch.ops.flowkern_triton] if "triton" in BACKENDS else [])
    for ns in namespaces:
        for args in ((x, [a], [0.5, 0.5], 0.0, 0, 0, None, True, torch.empty_like(x)),
                     (x, [a, b], [0.5, 0.5, 1.0], 0.3, 7, 9, None, True, torch.empty_like(x)),
                     (x, [a, b], [0.5, 0.5, 1.0], 0.3, 0, 9, seeds, True, torch.empty_like(x))):
            torch.library.opcheck(ns.lincomb_step.default, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    """A 3-step multistep loop (history of the last two terms, noise per step)
    under torch.compile(fullgraph=True) equals eager."""
    x, d0, d1, d2 = _inputs((4, 16), torch.float32, 4)

    def loop(x, ds):
        hist = []
        for i, d in enumerate(ds):
            hist = [d] + hist[:2]
            x = fk.lincomb_step(x, hist, WEIGHTS[:len(hist) + 1], noise_std=0.1, seed=3,
                                offset=i * x.numel(), backend=backend)
        return x

    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True)(x, [d0, d1, d2])
    torch.testing.assert_close(got, loop(x, [d0, d1, d2]), rtol=1e-6, atol=1e-6)
