"""Training op family (interpolate, flow_matching_loss, convert) on every
backend against the float64 reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern as fk
from flowkern import reference as ref
from flowkern._rules import PREDICTIONS
from flowkern.schedules import coefficients

from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close

BACKENDS = backends_under_test()
CASES = [(b, d) for b in BACKENDS for d in dtypes_for(b)]
SHAPES = [(1,), (7,), (1, 1), (7, 3), (3, 1023), (2, 3, 5, 7), (2, 40000)]
SCHEDULES = ["linear", "cosine", fk.schedules.Polynomial(3), "vp", "ve", "edm"]


def _times(rows, edges=True, lo=0.0, hi=1.0, gen=None):
    t = lo + (hi - lo) * torch.rand(rows, generator=gen, dtype=torch.float64)
    if edges and rows >= 2:
        t[0], t[-1] = lo, hi
    return t


def _data(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
            for _ in range(3)]


def _refs(fn, tensors, t, schedule, dtype):
    """(ref64, naive): the reference in float64 and evaluated in `dtype`."""
    c64 = coefficients(schedule, t.double(), t.numel(), torch.float64)
    out64 = fn([x.double() for x in tensors], c64)
    cn = coefficients(schedule, t.float(), t.numel(), torch.float32).to(dtype)
    naive = fn(tensors, cn)
    return out64, naive


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_interpolate(backend, dtype, shape, target):
    x0, x1, _ = _data(shape, dtype)
    hi = 0.99 if target == "score" else 1.0  # the score target is undefined at sigma = 0
    t = _times(shape[0], hi=hi).to(DEVICE)
    xt, y = fk.interpolate(x0, x1, t.to(dtype if dtype == torch.float64 else torch.float32),
                           target=target, backend=backend)
    assert xt.dtype == dtype and y.dtype == dtype
    (xt64, y64), (xtn, yn) = _refs(lambda v, c: ref.interpolate(v[0], v[1], c, target),
                                   [x0, x1], t, "linear", dtype)
    assert_close(xt, xt64, xtn, f"x_t {backend} {dtype}")
    assert_close(y, y64, yn, f"y {backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_interpolate_schedules(backend, schedule):
    x0, x1, _ = _data((5, 33), torch.float32)
    t = _times(5, lo=0.01, hi=0.99).to(DEVICE)
    xt, y = fk.interpolate(x0, x1, t.float(), schedule, backend=backend)
    (xt64, y64), (xtn, yn) = _refs(lambda v, c: ref.interpolate(v[0], v[1], c, "velocity"),
                                   [x0, x1], t, schedule, torch.float32)
    assert_close(xt, xt64, xtn, "x_t")
    assert_close(y, y64, yn, "y")


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 1023), (2, 3, 5, 7), (2, 40000)])
@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flow_matching_loss(backend, dtype, shape, target, reduction):
    x0, x1, pred = _data(shape, dtype)
    t = _times(shape[0], hi=0.99 if target == "score" else 1.0).to(DEVICE)
    w = torch.rand(shape[0], dtype=torch.float64).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss = fk.flow_matching_loss(pred, x0, x1, t.to(acc), target=target, weight=w.to(acc),
                                 reduction=reduction, backend=backend)
    out64, naive = _refs(lambda v, c: ref.flow_matching_loss(v[0], v[1], v[2], c, target,
                                                             w.to(v[0].dtype), reduction),
                         [pred, x0, x1], t, "linear", dtype)
    # Rounding error is relative to the terms of pred - y, not to their difference:
    # the loss of (|pred| + |y|) bounds that magnitude (target "x1" with x1 = 0 gives y = 0).
    c64 = coefficients("linear", t.double(), t.numel(), torch.float64)
    y64 = ref.target(x0.double(), x1.double(), c64, target)
    mag = (pred.double().abs() + y64.abs())
    zero = torch.zeros_like(mag)
    scale = ref.flow_matching_loss(mag, zero, zero, c64, "x1", w, reduction).abs().max().item()
    # A reduction's error grows with the count; PyTorch's own pairwise sum is the yardstick.
    assert_close(loss, out64, naive, f"loss {backend} {dtype}", factor=4.0, ulps=16.0, scale=scale)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 1023), (2, 3, 5, 7)])
@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("inputs_grad", [False, True])
def test_flow_matching_loss_grad(backend, dtype, shape, target, inputs_grad):
    """The loss gradients in every dtype: g_pred alone (x0 and x1 are noise and
    data, the usual case, one tensor written) and all three."""
    x0, x1, pred = _data(shape, dtype, seed=1)
    t = _times(shape[0], hi=0.99 if target == "score" else 1.0).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [v.clone().requires_grad_(i == 0 or inputs_grad) for i, v in enumerate((pred, x0, x1))]
    loss = fk.flow_matching_loss(*leaves, t.to(acc), target=target, reduction="sum",
                                 backend=backend)
    loss.backward(torch.tensor(0.75, dtype=loss.dtype, device=DEVICE))
    if not inputs_grad:
        assert leaves[1].grad is None and leaves[2].grad is None

    # d(0.75 * sum rho^2) / d pred = 1.5 rho, rho = pred - y
    out64, naive = _refs(lambda v, c: 1.5 * (v[0] - ref.target(v[1], v[2], c, target)),
                         [pred, x0, x1], t, "linear", dtype)
    c64 = coefficients("linear", t.double(), t.numel(), torch.float64)
    mag = pred.double().abs() + ref.target(x0.double(), x1.double(), c64, target).abs()
    assert_close(leaves[0].grad, out64, naive, f"g_pred {backend} {dtype}", factor=4.0,
                 ulps=8.0, scale=1.5 * mag.max().item())
    if inputs_grad:
        # rho is linear in (x0, x1): their gradients are -d y / d x times g_pred (docs/design.md §4).
        for k, leaf in ((1, leaves[1]), (2, leaves[2])):
            e = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
            args = [e, e, e]
            args[k] = torch.ones_like(e)
            dy = ref.target(args[1], args[2], c64, target)  # d y / d x_k, per element
            want = -dy * out64
            got = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # y independent of x_k
            assert_close(got, want, -dy.to(dtype) * naive, f"g_x{k - 1} {backend} {dtype}",
                         factor=4.0, ulps=8.0, scale=(dy.abs() * 1.5 * mag).max().item())


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("src", PREDICTIONS)
@pytest.mark.parametrize("dst", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["linear", "vp"])
def test_convert(backend, dtype, src, dst, schedule):
    shape = (6, 3, 17)
    x, p, _ = _data(shape, dtype)
    t = _times(6, lo=0.05, hi=0.95).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = fk.convert(p, x, t.to(acc), schedule, src=src, dst=dst, backend=backend)
    out64, naive = _refs(lambda v, c: ref.convert(v[0], v[1], c, src, dst), [p, x], t,
                         schedule, dtype)
    assert_close(out, out64, naive, f"convert {src}->{dst} {backend} {dtype}", factor=4.0,
                 ulps=16.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_round_trip_edges(backend):
    """Conversions that need no division by a vanishing coefficient stay finite
    at t = 0 and t = 1 (linear: alpha = 0 at t = 0, sigma = 0 at t = 1)."""
    x, p, _ = _data((2, 9), torch.float64 if backend != "cuda" else torch.float32)
    t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=DEVICE)
    for src, dst in [("velocity", "x1"), ("velocity", "eps"), ("x1", "x1"), ("score", "eps")]:
        out = fk.convert(p, x, t, src=src, dst=dst, backend=backend)
        assert torch.isfinite(out).all(), (src, dst)
    # x1 -> velocity -> x1 at t = 0 (sigma = 1, alpha = 0) is the identity
    v = fk.convert(p[:1], x[:1], t[:1], src="x1", dst="velocity", backend="torch")
    x1 = fk.convert(v, x[:1], t[:1], src="velocity", dst="x1", backend=backend)
    torch.testing.assert_close(x1, p[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    """Non-contiguous, broadcast inputs and scalar t give the dense result."""
    base = torch.randn(4, 10, 6, device=DEVICE)
    x0 = base[:, ::2, :].transpose(1, 2)            # non-contiguous (4, 6, 5)
    x1 = torch.randn(1, 6, 5, device=DEVICE).expand(4, 6, 5)  # broadcast over the batch
    for t in (0.3, torch.tensor(0.3, device=DEVICE), torch.full((1,), 0.3, device=DEVICE)):
        xt, y = fk.interpolate(x0, x1, t, backend=backend)
        torch.testing.assert_close(xt, 0.3 * x1 + 0.7 * x0)
        torch.testing.assert_close(y, x1 - x0)
    x1_small = torch.randn(6, 5, device=DEVICE)      # broadcast by rank
    xt, _ = fk.interpolate(x0, x1_small, 0.5, backend=backend)
    torch.testing.assert_close(xt, 0.5 * x0 + 0.5 * x1_small)
    pred = torch.randn(6, 5, 4, device=DEVICE).permute(2, 0, 1)
    loss = fk.flow_matching_loss(pred, x0, x1, 0.3, backend=backend)
    torch.testing.assert_close(loss, ((pred - (x1 - x0)) ** 2).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, device=DEVICE)
    t = torch.rand(0, device=DEVICE)
    xt, y = fk.interpolate(x, x, t, backend=backend)
    assert xt.shape == (0, 5) and y.shape == (0, 5)
    assert fk.flow_matching_loss(x, x, x, t, reduction="none", backend=backend).shape == (0,)
    assert fk.flow_matching_loss(x, x, x, t, reduction="sum", backend=backend).item() == 0
    assert fk.convert(x, x, t, backend=backend).shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes(backend):
    x0, x1, pred = _data((3, 257), torch.float32, scale=1e18)
    t = torch.tensor([0.0, 0.5, 1.0], device=DEVICE)
    xt, y = fk.interpolate(x0, x1, t, backend=backend)
    assert torch.isfinite(xt).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y, x1 - x0, rtol=1e-6, atol=0)
    loss = fk.flow_matching_loss(pred * 1e-12, x0 * 1e-12, x1 * 1e-12, t, backend=backend)
    want = ((pred.double() - (x1.double() - x0.double())) * 1e-12).pow(2).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffers(backend):
    x0, x1, _ = _data((4, 100), torch.float32)
    t = torch.rand(4, device=DEVICE)
    out = (torch.empty_like(x0), torch.empty_like(x0))
    got = fk.interpolate(x0, x1, t, target="eps", out=out, backend=backend)
    assert got[0] is out[0] and got[1] is out[1]
    want = fk.interpolate(x0, x1, t, target="eps", backend="torch")
    torch.testing.assert_close(out[0], want[0])
    torch.testing.assert_close(out[1], want[1])
    # in place into x0 itself: each element is read before it is written
    x0c = x0.clone()
    fk.interpolate(x0c, x1, t, out=(x0c, torch.empty_like(x0)), backend=backend)
    torch.testing.assert_close(x0c, want[0])


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 9), dims=st.lists(st.integers(1, 13), min_size=0, max_size=3),
       transpose=st.booleans(), step=st.integers(1, 3), backend=st.sampled_from(BACKENDS))
def test_hypothesis_shapes(rows, dims, transpose, step, backend):
    shape = (rows, *dims)
    big = torch.randn(rows, *[d * step for d in dims], device=DEVICE, dtype=torch.float64)
    x0 = big[(slice(None),) + tuple(slice(None, None, step) for _ in dims)]
    if transpose and len(dims) >= 2:
        x0 = x0.transpose(-1, -2).contiguous().transpose(-1, -2)
    x1 = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    pred = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    t = torch.rand(rows, device=DEVICE, dtype=torch.float64)
    if backend == "cuda":
        x0, x1, pred, t = x0.float(), x1.float(), pred.float(), t.float()
    got = fk.interpolate(x0, x1, t, backend=backend)
    want = fk.interpolate(x0, x1, t, backend="torch")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(fk.flow_matching_loss(pred, x0, x1, t, backend=backend),
                               fk.flow_matching_loss(pred, x0, x1, t, backend="torch"))


# ---------------------------------------------------------------------- autograd

GRAD_BACKENDS = [b for b in BACKENDS if b != "torch" and (b != "cuda")]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_gradcheck(backend, target):
    kw = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    x0, x1, pred = (torch.randn(3, 5, **kw) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, device=DEVICE)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda a, b: fk.interpolate(a, b, t, "cosine", target, backend=backend), (x0, x1))
    assert torch.autograd.gradcheck(
        lambda p, a, b: fk.flow_matching_loss(p, a, b, t, "vp", target, weight=w,
                                              backend=backend), (pred, x0, x1))
    assert torch.autograd.gradcheck(
        lambda p, x: fk.convert(p, x, t, "linear", src=target, dst="velocity",
                                backend=backend), (pred, x0))
    # only one output of interpolate used: the other's gradient is absent
    assert torch.autograd.gradcheck(lambda a, b: fk.interpolate(a, b, t, backend=backend)[1],
                                    (x0, x1))


def _namespaces():
    out = []
    if "cpu" in BACKENDS or "cuda" in BACKENDS:
        out.append("flowkern")
    if "triton" in BACKENDS:
        out.append("flowkern_triton")
    return out


def _coef_args(ns, kw):
    """Coefficient arguments (t, t_value, kind, params) of the schemas: the
    native ops take times + a built-in schedule, a float time, or a table
    (kind -1); the triton ops are always given a table."""
    t = torch.tensor([0.1, 0.5, 0.8], **kw)
    table = coefficients("cosine", t, 3, torch.float32)
    out = [(table, 0.0, -1, [])]
    if ns == "flowkern":
        out += [(t, 0.0, 1, []), (None, 0.3, 3, [0.1, 20.0]), (t[:1], 0.0, 5, [0.002, 80.0, 7.0])]
    return out


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck(ns):
    ops = getattr(torch.ops, ns)
    kw = dict(device=DEVICE)
    x0, x1, p = (torch.randn(3, 7, **kw, requires_grad=True) for _ in range(3))
    x1b = torch.randn(1, 7, **kw, requires_grad=True)  # broadcast over the batch
    w = torch.rand(3, **kw)
    overloads = ["default"] + (["nograd"] if ns == "flowkern" else [])
    for coef in _coef_args(ns, kw):
        for target in range(4):
            for ov in overloads:
                grad = ov == "default"
                a, b, q = (v if grad else v.detach() for v in (x0, x1, p))
                xb = x1b if grad and ns == "flowkern" else b
                torch.library.opcheck(getattr(ops.interpolate, ov), (a, xb, *coef, target, True))
                for red, wt in ((0, None), (1, w), (2, w)):
                    torch.library.opcheck(getattr(ops.fm_loss, ov),
                                          (q, a, b, *coef, target, wt, red, True))
            for red, gshape in ((0, ()), (2, (3,))):
                g = torch.randn(gshape, **kw)
                for nout in (1, 3):
                    torch.library.opcheck(ops.fm_loss_backward,
                                          (g, p.detach(), x0.detach(), x1.detach(), *coef,
                                           target, w, red, nout))
            torch.library.opcheck(ops.interpolate_backward,
                                  (x0.detach(), x1.detach(), *coef, target))
            for dst in range(4):
                for ov in overloads:
                    a, q = (x0, p) if ov == "default" else (x0.detach(), p.detach())
                    torch.library.opcheck(getattr(ops.convert, ov),
                                          (q, a, *coef, target, dst, False))
                torch.library.opcheck(ops.convert_backward, (x0.detach(), *coef, target, dst))
        out = (torch.empty(3, 7, **kw), torch.empty(3, 7, **kw))
        torch.library.opcheck(ops.interpolate_out,
                              (x0.detach(), x1.detach(), *coef, 0, True, *out))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_compile_training_step(backend):
    """A whole training step compiles with fullgraph=True (no graph break) and
    matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    model = model.to(DEVICE)

    def loss_fn(x0, x1, t):
        xt, _ = fk.interpolate(x0, x1, t, backend=backend)
        pred = model(torch.cat([xt, t[:, None]], 1))
        return fk.flow_matching_loss(pred, x0, x1, t, backend=backend)

    def step(fn, x0, x1, t):
        model.zero_grad()
        loss = fn(x0, x1, t)
        loss.backward()  # AOTAutograd's compiled backward runs the fused backward ops
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    x0, x1 = torch.randn(8, 2, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    t = torch.rand(8, device=DEVICE)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c, grads_c = step(compiled, x0, x1, t)
    loss_e, grads_e = step(loss_fn, x0, x1, t)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- bad input


x = torch.randn(4, 3)
t = torch.rand(4)
BAD = [
    (lambda: fk.interpolate([1.0], x, t), TypeError, "x0"),
    (lambda: fk.interpolate(x, x.long(), t), TypeError, "x1"),
    (lambda: fk.interpolate(x, x.double(), t), TypeError, "x1"),
    (lambda: fk.interpolate(x, torch.randn(5, 3), t), ValueError, "broadcast"),
    (lambda: fk.interpolate(torch.tensor(1.0), x, t), ValueError, "x0"),
    (lambda: fk.interpolate(x, x, torch.rand(3)), ValueError, "t"),
    (lambda: fk.interpolate(x, x, torch.rand(4, 1)), ValueError, "t"),
    (lambda: fk.interpolate(x, x, "0.5"), TypeError, "t"),
    (lambda: fk.interpolate(x, x, torch.tensor([0.1, 0.2, 1.5, 0.3])), ValueError, r"\[0, 1\]"),
    (lambda: fk.interpolate(x, x, torch.tensor([0.1, float("nan"), 0.5, 0.3])), ValueError, r"\[nan, nan\]"),
    (lambda: fk.interpolate(x, x, torch.tensor([1, 0, 1, 0])), TypeError, "t"),
    (lambda: fk.interpolate(x, x, t, target="noise"), ValueError, "target"),
    (lambda: fk.interpolate(x, x, t, schedule="sigmoid"), ValueError, "schedule"),
    (lambda: fk.interpolate(x, x, t, schedule=3), TypeError, "schedule"),
    (lambda: fk.interpolate(x, x, t, backend="metal"), ValueError, "backend"),
    (lambda: fk.interpolate(x, x, t, backend="cuda"), ValueError, "CUDA tensors"),
    (lambda: fk.interpolate(x, x, torch.ones(4), target="score"), ValueError, "sigma_t"),
    (lambda: fk.interpolate(x, x, t, out=(x,)), TypeError, "out"),
    (lambda: fk.interpolate(x, x, t, out=(torch.empty(4, 2), torch.empty(4, 3))), ValueError, "out"),
    (lambda: fk.interpolate(x, x, t, out=(torch.empty(3, 4).t(), torch.empty(4, 3))), ValueError, "contiguous"),
    (lambda: fk.flow_matching_loss(x, x, x, t, reduction="max"), ValueError, "reduction"),
    (lambda: fk.flow_matching_loss(x, x, x, t, weight=torch.ones(3)), ValueError, "weight"),
    (lambda: fk.flow_matching_loss(x, x, x, torch.ones(4), target="score"), ValueError, "sigma_t"),
    (lambda: fk.convert(x, x, torch.zeros(4), src="eps", dst="x1"), ValueError, "alpha_t"),
    (lambda: fk.convert(x, x, torch.ones(4), src="x1", dst="eps"), ValueError, "sigma_t"),
    (lambda: fk.convert(x, x, t, src="v", dst="x1"), ValueError, "src"),
    (lambda: fk.convert(x, x, t, src="x1", dst="noise"), ValueError, "dst"),
    (lambda: fk.schedules.VE(sigma_min=5, sigma_max=1), ValueError, "sigma_min"),
]


@pytest.mark.parametrize("fn,exc,pattern", BAD, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD)])
def test_bad_inputs(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_out_rejects_autograd():
    x = torch.randn(4, 3, requires_grad=True)
    out = (torch.empty(4, 3, requires_grad=True), torch.empty(4, 3))
    with pytest.raises(RuntimeError, match="autograd"):
        fk.interpolate(x, x, 0.5, out=out)


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 3)
    with fk.use_backend("torch"):
        assert fk.backend.resolve(None, x.device) == "torch"
        assert fk.backend.resolve("cpu", x.device) == "cpu"
    monkeypatch.setenv("FLOWKERN_BACKEND", "torch")
    assert fk.backend.resolve(None, x.device) == "torch"
    monkeypatch.setenv("FLOWKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FLOWKERN_BACKEND"):
        fk.backend.resolve(None, x.device)
    monkeypatch.delenv("FLOWKERN_BACKEND")
    assert fk.backend.resolve(None, x.device) == ("cpu" if fk.available()["cpu"] else "torch")


@pytest.mark.parametrize("backend", backends_under_test())
def test_vp_velocity_at_t1_is_an_error_not_inf(backend):
    """vp's d_sigma = -alpha d_alpha / sigma is -inf at t = 1: the velocity
    target and every conversion to or from velocity there are infinite, so they
    raise naming t (they returned inf / NaN); x_t and the other targets are
    finite, and just below t = 1 everything is."""
    vp = fk.schedules.VP()
    x0, x1 = torch.randn(4, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    t1 = torch.tensor([0.3, 1.0, 0.5, 0.7], device=DEVICE)
    with pytest.raises(ValueError, match="t: d_alpha_t or d_sigma_t is not finite"):
        fk.interpolate(x0, x1, t1, vp, "velocity", backend=backend)
    with pytest.raises(ValueError, match="t: d_alpha_t or d_sigma_t is not finite"):
        fk.flow_matching_loss(x1, x0, x1, 1.0, vp, "velocity", backend=backend)
    for src, dst in (("velocity", "eps"), ("eps", "velocity"), ("velocity", "x1")):
        with pytest.raises(ValueError, match="t: d_alpha_t or d_sigma_t is not finite"):
            fk.convert(x1, x0, t1, vp, src, dst, backend=backend)
    xt, y = fk.interpolate(x0, x1, t1, vp, "x1", backend=backend)
    assert bool(torch.isfinite(xt).all() and torch.isfinite(y).all())
    near = torch.full((4,), 1 - 1e-4, device=DEVICE)
    xt, y = fk.interpolate(x0, x1, near, vp, "velocity", backend=backend)
    assert bool(torch.isfinite(xt).all() and torch.isfinite(y).all())
    assert bool(torch.isfinite(fk.flow_matching_loss(x1, x0, x1, near, vp,
                                                     backend=backend)).all())
