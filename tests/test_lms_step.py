"""lms_step (linear multistep, k-diffusion's sample_lms in one fused pass) on
every backend against the float64 reference: every prediction type, guidance,
history length 0-3, shared and per-sample tables, non-contiguous inputs, edge
times; both outputs (x_s and u_t); in place; NaN in the history kept out of
u_t; opcheck; torch.compile; bad input naming the argument."""
import math

import pytest
import torch

import flowkern as fk
from flowkern._rules import PREDICTIONS

from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close, assert_nan_only_at, step_overloads

BACKENDS = backends_under_test()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
CASES = [(b, d) for b in KERNEL_BACKENDS for d in dtypes_for(b)]
WEIGHTS = [0.083, -0.061, 0.029, -0.0071]  # order-4 Adams-Bashforth-like, step ~0.05


def _inputs(shape, dtype, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
            for _ in range(n)]


def _table(rows, acc, per_sample, t=None):
    g = torch.Generator().manual_seed(1)
    if t is None:
        t = 0.2 + 0.5 * torch.rand(rows if per_sample else 1, generator=g, dtype=torch.float64)
    return fk.step_table("vp", t, t, dtype=acc, device=DEVICE)


def _lms(x, p, hist, pu, tab, prediction, nh, cfg, backend, **kw):
    extra = dict(pred_uncond=pu, guidance=2.5) if cfg else {}
    return fk.lms_step(x, p, WEIGHTS[:nh + 1], hist[:nh], table=tab, prediction=prediction,
                       backend=backend, **extra, **kw)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("nh", range(4))
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_lms_matches_reference(backend, dtype, prediction, nh, cfg):
    shape = (5, 3, 37)
    x, p, pu, *hist = _inputs(shape, dtype)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous state
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tab = _table(shape[0], acc, per_sample=cfg)
    got = _lms(x, p, hist, pu, tab, prediction, nh, cfg, backend)
    ref64 = _lms(x.double(), p.double(), [h.double() for h in hist], pu.double(), tab.double(),
                 prediction, nh, cfg, "torch")
    naive = ref64 if dtype == torch.float64 else _lms(x, p, hist, pu, tab.to(dtype),
                                                      prediction, nh, cfg, "torch")
    scale = max(a.abs().max().item() for a in (x, p, pu, *hist)) * \
        tab.abs().max().item() ** 2 * 10
    for k, name in enumerate(("x_s", "u_t")):
        assert got[k].dtype == dtype and got[k].shape == shape
        assert_close(got[k], ref64[k], naive[k],
                     f"lms {name} {prediction} nh={nh} cfg={cfg} {backend} {dtype}",
                     factor=4.0, ulps=8.0, scale=scale)


def test_reference_is_the_multistep_formula():
    """The reference against k-diffusion's own expression for sample_lms
    (x + sum_j c_j d_{i-j}, d = (x - denoised)/sigma), written out here."""
    x, den, d1, d2, d3 = _inputs((2, 9), torch.float64, 5)
    sigma = 3.7
    row = torch.tensor([1.0, sigma, 0.0, 1.0] * 2 + [1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    d = (x - den) / sigma
    want = x + WEIGHTS[0] * d + WEIGHTS[1] * d1 + WEIGHTS[2] * d2 + WEIGHTS[3] * d3
    for backend in BACKENDS:
        xs, u = fk.lms_step(x.to(DEVICE), den.to(DEVICE), WEIGHTS,
                            [h.to(DEVICE) for h in (d1, d2, d3)], table=row.to(DEVICE),
                            prediction="x1", backend=backend)
        torch.testing.assert_close(u.cpu(), d, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(xs.cpu(), want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_times(backend):
    """t = 0 and 1 and a schedule whose sigma is only nearly 0 (t = 1 - 1e-7):
    the velocity needs no division; x1 -> velocity divides by sigma_t, an
    error naming it at sigma = 0 and finite, large coefficients just before."""
    x, p, h1 = _inputs((3, 8), torch.float64, 3)
    for t in (0.0, 1.0):
        xs, u = fk.lms_step(x, p, [0.1, 0.2], [h1], t=t, schedule="cosine", backend=backend)
        torch.testing.assert_close(u, p)
        torch.testing.assert_close(xs, x + 0.1 * p + 0.2 * h1)
    with pytest.raises(ValueError, match="sigma_t"):
        fk.lms_step(x, p, [0.1], t=1.0, schedule="linear", prediction="x1", backend=backend)
    t = 1.0 - 1e-7
    xs, u = fk.lms_step(x, p, [1e-8], t=t, schedule="linear", prediction="x1", backend=backend)
    # linear: x1 -> velocity is (x1 - x) / (1 - t) ... as convert computes it
    want = fk.convert(p, x, t, "linear", "x1", "velocity", backend="torch")
    torch.testing.assert_close(u, want, rtol=1e-9, atol=0)
    assert torch.isfinite(xs).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_in_place_and_float_time(backend):
    """out=x updates in place; a float t equals its shared table; per-sample
    times equal a per-sample table."""
    x, p, h1, h2 = _inputs((4, 65), torch.float32, 4)
    tab = fk.step_table("cosine", 0.3, 0.3, device=DEVICE)
    want = fk.lms_step(x, p, WEIGHTS[:3], [h1, h2], table=tab, prediction="eps",
                       backend=backend)
    y = x.clone()
    got = fk.lms_step(y, p, WEIGHTS[:3], [h1, h2], t=0.3, schedule="cosine", prediction="eps",
                      out=y, backend=backend)
    assert got[0].data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, want[0])
    torch.testing.assert_close(got[1], want[1])
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], device=DEVICE)
    a = fk.lms_step(x, p, [0.2], t=t, schedule="vp", prediction="score", backend=backend)
    b = fk.lms_step(x, p, [0.2], table=fk.step_table("vp", t, t, device=DEVICE),
                    prediction="score", backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("outs", [(0, 1), (2, 1), (4, 3), (1, 0), (3, 4)])
def test_outputs_alias_inputs(backend, outs):
    """out= and u_out= may each be an input exactly (the CPU engine's element
    loop runs as independent iterations, FK_IVDEP in hd.h): a 5-input step
    across the vectorised body and its tail equals separate buffers."""
    args = _inputs((3, 131), torch.float32, 5)
    tab = fk.step_table("cosine", 0.3, 0.3, device=DEVICE)

    def step(x, p, h1, h2, h3, **kw):
        return fk.lms_step(x, p, WEIGHTS, [h1, h2, h3], table=tab, prediction="eps",
                           backend=backend, **kw)
    want = step(*args)
    mine = [a.clone() for a in args]
    got = step(*mine, out=mine[outs[0]], u_out=mine[outs[1]])
    assert got[0].data_ptr() == mine[outs[0]].data_ptr()
    assert got[1].data_ptr() == mine[outs[1]].data_ptr()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_nan_in_history_stays_out_of_u_t(backend, cfg):
    """u_t does not depend on the history: a NaN there must not reach it
    (lincomb.h reads(), triton skip_mask); x_s carries it at that element only."""
    x, p, pu, h1, h2, h3 = _inputs((4, 6), torch.float32)
    kw = dict(t=0.5, schedule="cosine", prediction="eps", backend=backend)
    if cfg:
        kw.update(pred_uncond=pu, guidance=2.0)
    xs0, u0 = fk.lms_step(x, p, WEIGHTS, [h1, h2, h3], **kw)
    bad = h2.clone()
    bad[1, 2] = float("nan")
    xs1, u1 = fk.lms_step(x, p, WEIGHTS, [h1, bad, h3], **kw)
    assert torch.equal(u1, u0), "a NaN in the history reached u_t"
    assert_nan_only_at(xs1, xs0, (1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, device=DEVICE)
    t = torch.rand(0, device=DEVICE)
    xs, u = fk.lms_step(x, x, [0.1, 0.2], [x], t=t, backend=backend)
    assert xs.shape == u.shape == (0, 5)


def _namespaces():
    return (["flowkern"] if ("cpu" in BACKENDS or "cuda" in BACKENDS) else []) + \
        (["flowkern_triton"] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck(ns):
    packet = getattr(torch.ops, ns).lms_step
    x, p, pu, h1, h2, h3 = (torch.randn(3, 7, device=DEVICE) for _ in range(6))
    tab = fk.step_table("vp", torch.tensor([0.2, 0.4, 0.5]), torch.tensor([0.2, 0.4, 0.5]),
                        device=DEVICE)
    ts = torch.tensor([0.2, 0.4, 0.5], device=DEVICE)  # per-sample times as a tensor
    coefs = [(tab, None, None, None, [], -1, []),
             (tab[:1].contiguous(), None, None, None, [], -1, []),
             (None, ts, ts, None, [0.0, 0.0, float("nan"), 0.0], 3, [0.1, 20.0])]
    if ns == "flowkern":
        coefs += [(None, None, None, None, [0.2, 0.2, float("nan"), 0.0], 3, [0.1, 20.0])]
    o, o2 = torch.empty_like(x), torch.empty_like(x)
    for c0 in coefs:
        for ov, c in step_overloads(ns, c0):
            _opcheck(getattr(packet, ov), c, x, p, pu, h1, h2, h3, o, o2)


def _opcheck(op, c, x, p, pu, h1, h2, h3, o, o2):
    for pred in range(4):
        torch.library.opcheck(op, (x, p, h1, h2, h3, pu, WEIGHTS, *c, pred, 2.0, True, o, o2))
        torch.library.opcheck(op, (x, p, h1, None, None, None, WEIGHTS[:2], *c, pred, 1.0,
                                   True, o, o2))
        torch.library.opcheck(op, (x, p, None, None, None, None, WEIGHTS[:1], *c, pred, 1.0,
                                   True, o, o2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_multistep_loop(backend):
    """A 4-step multistep loop over a ring of history buffers compiles with
    fullgraph=True and matches eager."""
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4).to(DEVICE)
    tabs = fk.step_table("linear", torch.linspace(0.1, 0.7, 4), torch.linspace(0.1, 0.7, 4),
                         device=DEVICE)

    def loop(x):
        hist = []
        for i in range(4):
            x, u = fk.lms_step(x, model(x), WEIGHTS[:len(hist) + 1], hist, table=tabs[i],
                               backend=backend)
            hist = [u] + hist[:2]
        return x

    x0 = torch.randn(6, 4, device=DEVICE)
    with torch.no_grad():
        got = torch.compile(loop, fullgraph=True)(x0.clone())
        want = loop(x0.clone())
    torch.testing.assert_close(got, want)


x, p, x1 = torch.randn(4, 3), torch.randn(4, 3), torch.empty(4, 3)
BAD = [
    (lambda b: fk.lms_step(x, p, [0.1], t=0.2, prediction="noise", backend=b), ValueError,
     "prediction"),
    (lambda b: fk.lms_step(x, p[:, :2], [0.1], t=0.2, backend=b), ValueError, "pred"),
    (lambda b: fk.lms_step(x, p, [0.1, 0.2], [p[:, :2]], t=0.2, backend=b), ValueError, "u1"),
    (lambda b: fk.lms_step(x, p, [0.1, 0.2], [None], t=0.2, backend=b), TypeError, "u1"),
    (lambda b: fk.lms_step(x, p, [0.1], [p], t=0.2, backend=b), ValueError,
     "weights: expected 2 weights"),
    (lambda b: fk.lms_step(x, p, [0.1, math.inf], [p], t=0.2, backend=b), ValueError,
     "weights: expected finite"),
    (lambda b: fk.lms_step(x, p, 0.1, t=0.2, backend=b), TypeError, "weights"),
    (lambda b: fk.lms_step(x, p, [0.1] * 5, [p] * 4, t=0.2, backend=b), ValueError,
     "history: lms_step keeps at most 3"),
    (lambda b: fk.lms_step(x, p, [0.1, 0.2], p, t=0.2, backend=b), TypeError, "history"),
    (lambda b: fk.lms_step(x, p, [0.1], backend=b), TypeError, "t"),
    (lambda b: fk.lms_step(x, p, [0.1], t=1.5, backend=b), ValueError, r"\[0, 1\]"),
    (lambda b: fk.lms_step(x, p, [0.1], t=0.2, u_out=torch.empty(4, 2), backend=b), ValueError,
     "u_out"),
    (lambda b: fk.lms_step(x, p, [0.1, 0.2], [p], t=0.2, out=x1, u_out=x1, backend=b),
     ValueError, "u_out"),
    (lambda b: fk.lms_step(x, p, [0.1], t=0.2, guidance=2.0, backend=b), ValueError,
     "guidance"),
]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch", "triton") if b in BACKENDS])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_inputs(backend, i):
    fn, exc, pattern = BAD[i]
    with pytest.raises(exc, match=pattern):
        fn(backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_triton_weights_are_kernel_scalars(monkeypatch):
    """The triton op takes the weights as kernel scalars, each a float32
    (hi, lo) pair: no tensor is built (a per-call host-to-device copy would
    synchronise and break graph capture), and float64 weights that float32
    cannot hold (1/3, 0.1) keep float64 accuracy: the cpu kernel to 1e-14."""
    x, p, *hist = _inputs((4, 33), torch.float64, n=5)
    tab = _table(4, torch.float64, per_sample=False)
    weights = [1 / 3, -0.1, math.pi / 100, -1 / 7]
    want = fk.lms_step(x, p, weights, hist[:3], table=tab, prediction="x1", backend="cpu")

    def no_tensor(*a, **k):
        raise AssertionError("torch.tensor called during the triton lms_step")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    got = fk.lms_step(x, p, weights, hist[:3], table=tab, prediction="x1", backend="triton")
    monkeypatch.undo()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)
    # the hi/lo split matters: float32-rounded weights are off by ~1e-9 here
    rounded = [float(torch.tensor(w, dtype=torch.float32)) for w in weights]
    off = fk.lms_step(x, p, rounded, hist[:3], table=tab, prediction="x1", backend="cpu")
    assert (off[0] - want[0]).abs().max() > 1e-10


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_triton_weight_beyond_float32_is_an_error():
    x, p = _inputs((2, 8), torch.float32, n=2)
    with pytest.raises(ValueError, match="weights: the triton backend takes weights up to"):
        fk.lms_step(x, p, [1e39], t=0.2, backend="triton")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_torch_backend_differentiates(prediction):
    """The torch backend (the reference) is differentiable in x, pred and the
    history: gradcheck in float64, and forward mode (torch.func.jvp) equal to
    the step on the tangents' linear part (x_s is affine in its inputs)."""
    x, p, pu, h1, h2 = (a.double().requires_grad_() for a in _inputs((3, 5), torch.float64, 5))
    tab = _table(3, torch.float64, per_sample=True)

    def step(x, p, pu, h1, h2):
        return fk.lms_step(x, p, WEIGHTS[:3], [h1, h2], table=tab, prediction=prediction,
                           pred_uncond=pu, guidance=1.5, backend="torch")

    assert torch.autograd.gradcheck(step, (x, p, pu, h1, h2))
    tangents = tuple(torch.randn_like(a) for a in (x, p, pu, h1, h2))
    primals = tuple(a.detach() for a in (x, p, pu, h1, h2))
    _, tan = torch.func.jvp(step, primals, tangents)
    zero = [torch.zeros_like(a) for a in primals]
    lin = step(*tangents)  # affine with no constant term: the step on the tangents
    base = step(*zero)
    for k in range(2):
        torch.testing.assert_close(tan[k], lin[k] - base[k], rtol=1e-12, atol=1e-12)
