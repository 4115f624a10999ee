"""Rectified flow, flow maps and the fused flow-map loss.

* flowkern.flowmap_loss (the new op family) on every backend against the
  float64 reference: values over dtypes, predictions, forms, reductions and
  shared / per-sample tables; gradcheck in float64 (all subsets of
  differentiable inputs); opcheck of both namespaces; torch.compile with
  fullgraph=True; bad inputs.
* flowkern.rectified (reflow pairs, reflow / distillation losses, OT
  coupling, straightness) and flowkern.flowmap (FlowMap, its initialisation
  from a pretrained model, local and semigroup losses) against their eager
  formulas.
* The seeds' result at toy scale (flowkern.demo.rectified): one-step
  quality 1-RF >> 2-RF >= 2-RF + distill, flow map, with justified margins.
"""
import itertools
import math

import pytest
import torch

import flowkern as fk
from flowkern import flowmap as FM
from flowkern import rectified as RF
from flowkern.demo import toy
from flowkern._rules import PRED_CODE, PREDICTIONS
from flowkern.reference import flowmap as ref

from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close

BACKENDS = backends_under_test()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
CASES = [(b, d) for b in BACKENDS for d in dtypes_for(b)]
GRAD_BACKENDS = [b for b in KERNEL_BACKENDS if b != "cuda"]


def _inputs(shape, dtype, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
            for _ in range(n)]


def _table(rows, acc, per_sample, schedule="vp"):
    n = rows if per_sample else 1
    g = torch.Generator().manual_seed(1)
    t = 0.1 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    s = t + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    return fk.step_table(schedule, t, s, dtype=acc, device=DEVICE)


def _ref_loss(x, p, y, tab, prediction, form, weight=None, reduction="mean"):
    tab = tab.expand(x.shape[0], tab.shape[1])
    return ref.flowmap_loss(x, p, y, tab[:, :4], tab[:, 4:8], prediction, form, weight,
                            reduction)


# ---------------------------------------------------------------------- the fused op


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flowmap_loss_matches_reference(backend, dtype, prediction, form, reduction):
    shape = (5, 3, 37)
    x, p, y = _inputs(shape, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_sample = reduction != "sum"  # both table layouts are covered
    tab = _table(shape[0], acc, per_sample)
    w = torch.rand(shape[0], dtype=torch.float64).to(DEVICE)
    loss = fk.flowmap_loss(x, p, y, table=tab, prediction=prediction, form=form,
                           weight=w.to(acc), reduction=reduction, backend=backend)
    assert loss.dtype == dtype
    out64 = _ref_loss(x.double(), p.double(), y.double(), tab.double(), prediction, form,
                      w, reduction)
    naive = _ref_loss(x, p, y, tab.to(dtype), prediction, form, w.to(dtype), reduction) \
        if dtype != torch.float64 else out64
    # Error is relative to the magnitude of the residual's terms |a x| + |b p| + |y|.
    tab64 = tab.double().expand(shape[0], 12)
    mag = ref.flowmap(x.double().abs(), p.double().abs(), tab64[:, :4], tab64[:, 4:8],
                      prediction, form).abs() + y.double().abs()
    zero = torch.zeros_like(mag)
    scale = _ref_loss(mag, zero, zero, torch.tensor([[1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]],
                                                    dtype=torch.float64, device=DEVICE),
                      "x1", "data", w, reduction).abs().max().item() * 10
    assert_close(loss, out64, naive, f"flowmap_loss {prediction} {form} {backend} {dtype}",
                 factor=4.0, ulps=16.0, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_flowmap_loss_is_ei_step_error(backend, prediction):
    """flowmap_loss(x, p, y, t, s) == mean((ei_step(x, p, t, s) - y)^2), t and s
    per sample or floats, on every schedule."""
    x, p, y = _inputs((6, 5), torch.float64 if backend != "cuda" else torch.float32)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.6, 0.9], dtype=x.dtype, device=DEVICE)
    s = torch.tensor([0.2, 0.1, 0.9, 1.0, 0.7, 0.95], dtype=x.dtype, device=DEVICE)
    form = "data" if prediction in ("x1", "velocity") else "noise"
    lo = 0.05 if form == "noise" else 0.0          # the noise form divides by alpha_t
    for schedule in ("linear", "cosine", "vp"):
        tt = t.clamp(min=lo)
        want = ((fk.ei_step(x, p, tt, s, schedule, prediction, form, backend="torch") - y) ** 2)
        got = fk.flowmap_loss(x, p, y, tt, s, schedule, prediction, form, backend=backend)
        torch.testing.assert_close(got, want.mean())
        got = fk.flowmap_loss(x, p, y, 0.3, 0.8, schedule, prediction, form, reduction="none",
                              backend=backend)
        want = (fk.ei_step(x, p, 0.3, 0.8, schedule, prediction, form, backend="torch")
                - y) ** 2
        torch.testing.assert_close(got, want.mean(1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_flowmap_loss_layouts(backend):
    """Non-contiguous x and pred, a target broadcast over the batch, large rows
    (several CPU segments / Triton column blocks) and the empty batch."""
    base = torch.randn(4, 10, 6, device=DEVICE)
    x = base[:, ::2, :].transpose(1, 2)                          # (4, 6, 5) non-contiguous
    p = torch.randn(6, 5, 4, device=DEVICE).permute(2, 0, 1)      # (4, 6, 5) non-contiguous
    y = torch.randn(6, 5, device=DEVICE)                          # broadcast by rank
    got = fk.flowmap_loss(x, p, y, 0.2, 0.7, "cosine", "x1", backend=backend)
    want = fk.flowmap_loss(x, p, y, 0.2, 0.7, "cosine", "x1", backend="torch")
    torch.testing.assert_close(got, want)
    x, p, y = _inputs((3, 70000), torch.float32)
    for tab in (_table(3, torch.float32, True), _table(3, torch.float32, False)):
        got = fk.flowmap_loss(x, p, y, table=tab, prediction="velocity", reduction="none",
                              backend=backend)
        want = fk.flowmap_loss(x.double(), p.double(), y.double(), table=tab.double(),
                               prediction="velocity", reduction="none", backend="torch")
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    e = torch.randn(0, 3, device=DEVICE)
    assert fk.flowmap_loss(e, e, e, torch.rand(0, device=DEVICE), 0.5, reduction="none",
                           backend=backend).shape == (0,)
    assert fk.flowmap_loss(e, e, e, 0.1, 0.5, reduction="sum", backend=backend).item() == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_flowmap_loss_backward_matches_reference(backend):
    """The fused backward against autograd through the float64 reference, with
    every subset of (x, target) requiring grad (pred always does)."""
    x0, p0, y0 = _inputs((4, 3, 9), torch.float32, seed=3)
    tab = _table(4, torch.float32, True, "cosine")
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], device=DEVICE)
    for need_x, need_y in itertools.product([False, True], repeat=2):
        for prediction, form in (("x1", "data"), ("velocity", "data"), ("eps", "noise")):
            x, p, y = (v.clone().requires_grad_(r) for v, r in ((x0, need_x), (p0, True),
                                                                (y0, need_y)))
            fk.flowmap_loss(x, p, y, table=tab, prediction=prediction, form=form, weight=w,
                            backend=backend).backward()
            xd, pd, yd = (v.double().requires_grad_() for v in (x0, p0, y0))
            _ref_loss(xd, pd, yd, tab.double(), prediction, form, w.double()).backward()
            torch.testing.assert_close(p.grad.double(), pd.grad, rtol=1e-5, atol=1e-7)
            for v, vd, need in ((x, xd, need_x), (y, yd, need_y)):
                if need:
                    torch.testing.assert_close(v.grad.double(), vd.grad, rtol=1e-5, atol=1e-7)
                else:
                    assert v.grad is None


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("form", ["data", "noise"])
def test_flowmap_loss_gradcheck(backend, prediction, form):
    kw = dict(dtype=torch.float64, device=DEVICE)
    x, p, y = (torch.randn(3, 4, **kw, requires_grad=True) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.7], **kw)
    w = torch.tensor([1.0, 0.3, 2.0], **kw)
    assert torch.autograd.gradcheck(
        lambda a, b, c: fk.flowmap_loss(a, b, c, t, t + 0.2, "vp", prediction, form, weight=w,
                                        backend=backend), (x, p, y))
    assert torch.autograd.gradcheck(   # shared table, per-sample losses, target detached
        lambda a, b: fk.flowmap_loss(a, b, y.detach(), 0.3, 0.6, "cosine", prediction, form,
                                     reduction="none", backend=backend), (x, p))
    assert torch.autograd.gradcheck(   # only the prediction differentiable
        lambda b: fk.flowmap_loss(x.detach(), b, y.detach(), t, t + 0.1, "linear", prediction,
                                  form, reduction="sum", backend=backend), (p,))


def _namespaces():
    return (["flowkern"] if ("cpu" in BACKENDS or "cuda" in BACKENDS) else []) + \
        (["flowkern_triton"] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck(ns):
    """flowmap_loss and its backward on each way of giving the coefficients (a
    per-sample or shared step table, per-sample tensor times, float times,
    one time of each), every prediction and form, every reduction with and
    without a weight, and each set of optional gradients."""
    ops = getattr(torch.ops, ns)
    x, p, y = (torch.randn(3, 7, device=DEVICE) for _ in range(3))
    t, s = torch.tensor([0.2, 0.4, 0.5], device=DEVICE), torch.tensor([0.3, 0.5, 0.9],
                                                                      device=DEVICE)
    tab = fk.step_table("vp", t, s, device=DEVICE)
    kind, params = fk.schedules.native_spec("vp")
    w = torch.rand(3, device=DEVICE) + 0.5
    coefs = [(tab, 0.0, None, 0.0, -1, []), (tab[:1].contiguous(), 0.0, None, 0.0, -1, []),
             (t, 0.0, s, 0.0, kind, params), (None, 0.3, None, 0.6, kind, params),
             (t, 0.0, None, 0.6, kind, params)]
    if ns == "flowkern_triton":  # one table path behind every form: two forms suffice
        coefs = coefs[1:3]       # (~4 s an interpreted form)
    for c in coefs:
        for pred, form in itertools.product(range(4), range(2)):
            xg, pg, yg = (v.clone().requires_grad_() for v in (x, p, y))
            red = (pred + form) % 3
            torch.library.opcheck(ops.flowmap_loss.default,
                                  (xg, pg, yg, *c, pred, form, w, red, True))
            torch.library.opcheck(ops.flowmap_loss.default,
                                  (x, pg, y, *c, pred, form, None, red, True))
            if ns == "flowkern":
                torch.library.opcheck(ops.flowmap_loss.nograd,
                                      (x, p, y, *c, pred, form, w, red, True))
            if (pred, form) in ((0, 0), (3, 1)):  # the flags are independent of the coefficients
                for red, (gx, gt) in itertools.product(range(3),
                                                       itertools.product([False, True], repeat=2)):
                    g = torch.rand((3,) if red == 2 else (), device=DEVICE)
                    torch.library.opcheck(ops.flowmap_loss_backward,
                                          (g, x, p, y, *c, pred, form, w, red, gx, gt))
    xd = torch.randn(2, 3, 5, device=DEVICE, dtype=torch.float64)
    torch.library.opcheck(ops.flowmap_loss.default, (xd, xd.clone().requires_grad_(), xd[:1, :1],
                                             tab[:1].double(), 0.0, None, 0.0, -1, [], 1, 0,
                                             None, 0, True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_with_times(backend):
    """flowmap_loss with per-sample tensor times and float times compiles with
    fullgraph=True and equals eager, its gradients too."""
    torch._dynamo.reset()
    x, p, y = (torch.randn(6, 5, device=DEVICE) for _ in range(3))
    t = torch.rand(6, device=DEVICE) * 0.5
    w = torch.rand(6, device=DEVICE)

    def f(x, p):
        return (fk.flowmap_loss(x, p, y, t, t + 0.3, "cosine", "velocity", weight=w,
                                backend=backend)
                + fk.flowmap_loss(x, p, y, 0.2, t + 0.4, "vp", "eps", "noise", reduction="sum",
                                  backend=backend))

    grads = []
    for fn in (torch.compile(f, fullgraph=True), f):
        a, b = x.clone().requires_grad_(), p.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    # the triton path's step table is float32 torch ops, which Inductor fuses
    # and rounds its own way (the native ops evaluate in double, exactly alike)
    tol = dict(rtol=2e-5, atol=1e-4) if backend == "triton" else {}
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_semigroup_and_distill_steps(backend):
    """A flow-map semigroup step and a 2-step distillation step compile with
    fullgraph=True (no graph break) and match eager, gradients included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = toy.MLP(hidden=16, depth=2, n_freq=2, extra_time=True).to(DEVICE)
    fmap = FM.FlowMap(net, prediction="velocity", backend=backend)
    student = toy.MLP(hidden=16, depth=2, n_freq=2).to(DEVICE)
    x0, x1 = torch.randn(8, 2, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    t = torch.rand(8, device=DEVICE) * 0.5
    s = t + 0.4
    u = t + 0.2

    def semigroup(x, t, s, u):
        return FM.semigroup_loss(fmap, x, t, s, u)

    def distill(x0, x1):
        return RF.distill_loss(student, x0, x1, steps=2, backend=backend)

    for fn, args, params in ((semigroup, (x0, t, s, u), list(net.parameters())),
                             (distill, (x0, x1), list(student.parameters()))):
        def step(f):
            for q in params:
                q.grad = None
            loss = f(*args)
            loss.backward()
            return loss.detach(), [q.grad.clone() for q in params]
        loss_c, grads_c = step(torch.compile(fn, fullgraph=True))
        loss_e, grads_e = step(fn)
        torch.testing.assert_close(loss_c, loss_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)


x, p = torch.randn(4, 3), torch.randn(4, 3)
BAD = [
    (lambda: fk.flowmap_loss([1.0], p, p, 0.1, 0.2), TypeError, "x"),
    (lambda: fk.flowmap_loss(x, p[:, :2], p, 0.1, 0.2), ValueError, "pred"),
    (lambda: fk.flowmap_loss(x, p.double(), p, 0.1, 0.2), ValueError, "pred"),
    (lambda: fk.flowmap_loss(x, p, p.double(), 0.1, 0.2), ValueError, "target"),
    (lambda: fk.flowmap_loss(x, p, torch.randn(5, 3), 0.1, 0.2), ValueError, "target"),
    (lambda: fk.flowmap_loss(x, p, p.long(), 0.1, 0.2), TypeError, "target"),
    (lambda: fk.flowmap_loss(x, p, p), TypeError, "t and s"),
    (lambda: fk.flowmap_loss(x, p, p, torch.rand(3), 0.5), ValueError, "t"),
    (lambda: fk.flowmap_loss(x, p, p, 0.5, torch.rand(3)), ValueError, "s"),
    (lambda: fk.flowmap_loss(x, p, p, 0.5, "0.7"), TypeError, "s"),
    (lambda: fk.flowmap_loss(x, p, p, 0.5, torch.tensor([1, 1, 1, 1])), TypeError, "s"),
    (lambda: fk.flowmap_loss(x, p, p, 0.5, torch.rand(4) + 1.0), ValueError, r"s: .*\[0, 1\]"),
    (lambda: fk.flowmap_loss(x, p, p, 1.0, 1.0, "vp", "velocity", "noise"), ValueError,
     "d_sigma_t is not finite"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 1.5), ValueError, r"\[0, 1\]"),
    (lambda: fk.flowmap_loss(x, p, p, 1.0, 1.0), ValueError, "sigma_t"),
    (lambda: fk.flowmap_loss(x, p, p, 0.0, 0.5, form="noise"), ValueError, "alpha_t"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, form="ode"), ValueError, "form"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, prediction="d"), ValueError, "prediction"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, reduction="max"), ValueError, "reduction"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, weight=torch.ones(3)), ValueError, "weight"),
    (lambda: fk.flowmap_loss(x, p, p, table=torch.zeros(2, 12)), ValueError, "table"),
    (lambda: fk.flowmap_loss(x, p, p, table=[0.0] * 12), TypeError, "table"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, backend="cuda"), ValueError, "CUDA"),
    (lambda: fk.flowmap_loss(x, p, p, 0.1, 0.2, backend="metal"), ValueError, "backend"),
    (lambda: RF.reflow_pairs(torch.nn.Identity(), x, steps=0), ValueError, "steps"),
    (lambda: RF.reflow_pairs(torch.nn.Identity(), x, batch_size=0), ValueError, "batch_size"),
    (lambda: RF.reflow_pairs(torch.nn.Identity(), x, method="rk4"), ValueError, "method"),
    (lambda: RF.reflow_pairs(None, x), TypeError, "model"),
    (lambda: RF.reflow_loss(lambda a, b: a, x, x[:2]), ValueError, "x1"),
    (lambda: RF.distill_loss(lambda a, b: a, x, x, steps=0), ValueError, "steps"),
    (lambda: RF.distill_loss(lambda a, b: a, x, x, prediction="v"), ValueError, "prediction"),
    (lambda: RF.ot_pairs(x, x.double()), ValueError, "x1"),
    (lambda: RF.straightness(lambda a, b: a, x, prediction="x1"), ValueError, "prediction"),
    (lambda: FM.FlowMap(3), TypeError, "net"),
    (lambda: FM.FlowMap(lambda a, b, c: a, prediction="v"), ValueError, "prediction"),
    (lambda: toy.extend_time_input(torch.nn.Linear(2, 2)), TypeError, "model"),
    (lambda: FM.FlowMap.from_pretrained(torch.nn.Linear(2, 2)), TypeError,
     "model: a Linear has no extend_time_input"),
    (lambda: FM.FlowMap.from_pretrained(torch.nn.Linear(2, 2), extend=3), TypeError, "extend"),
    (lambda: FM.FlowMap(lambda a, b, c: a).sample(x, steps=0), ValueError, "steps"),
    (lambda: FM.FlowMap(lambda a, b, c: a)(x, torch.rand(3), 0.5), ValueError, "t"),
]


@pytest.mark.parametrize("fn,exc,pattern", BAD, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD)])
@pytest.mark.parametrize("default", ["auto", "torch"])
def test_bad_inputs(fn, exc, pattern, default):
    """The same error on the native op's checks (C++) and the Python path's
    (the torch backend, as the triton backend validates)."""
    if default == "auto":
        with pytest.raises(exc, match=pattern):
            fn()
        return
    with fk.use_backend("torch"), pytest.raises(exc, match=pattern):
        fn()


def test_times_that_need_a_gradient_are_refused():
    """The fused op does not differentiate in t or s: either one requiring a
    gradient is an error naming it (the torch backend differentiates both)."""
    x, p, y = (torch.randn(3, 4, device=DEVICE) for _ in range(3))
    for name in ("t", "s"):
        t = torch.tensor([0.2, 0.3, 0.4], device=DEVICE, requires_grad=name == "t")
        s = torch.tensor([0.5, 0.6, 0.7], device=DEVICE, requires_grad=name == "s")
        for backend in KERNEL_BACKENDS:
            with pytest.raises(RuntimeError, match=f"argument '{name}' requires grad"):
                fk.flowmap_loss(x, p, y, t, s, "cosine", backend=backend)
        loss = fk.flowmap_loss(x, p, y, t, s, "cosine", backend="torch")
        g, = torch.autograd.grad(loss, t if name == "t" else s)
        assert g.abs().sum() > 0
    tab = fk.step_table("cosine", t.detach().requires_grad_(), 0.7)
    for backend in KERNEL_BACKENDS:
        with pytest.raises(RuntimeError, match="argument 'table' requires grad"):
            fk.flowmap_loss(x, p, y, table=tab, backend=backend)
    assert torch.autograd.grad(fk.flowmap_loss(x, p, y, table=tab, backend="torch"),
                               tab)[0].abs().sum() > 0


# ---------------------------------------------------------------------- rectified flow


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return toy.MLP(hidden=32, depth=2, n_freq=3, **kw).to(DEVICE)


def test_reflow_pairs_batches_and_matches_sample():
    model = _mlp()
    x0 = torch.randn(37, 2, device=DEVICE)
    z0, z1 = RF.reflow_pairs(model, x0, steps=8, method="heun", batch_size=10, progress=True)
    assert z0 is x0 and z1.shape == x0.shape
    want = fk.sample(model, x0, "linear", "heun", steps=8, progress=False)
    torch.testing.assert_close(z1, want)
    calls = []

    def counting(x, t):
        calls.append(x.shape[0])
        return model(x, t)
    RF.reflow_pairs(counting, x0, steps=2, batch_size=16, progress=False)
    assert max(calls) <= 16 and sum(calls) == 2 * 37


def test_ei_step_is_euler_for_rectified_flow():
    """The justification of the differentiable k-step distillation: for the
    linear schedule and a velocity prediction the EI (data form) step is the
    Euler step x + (s - t) v, on every backend."""
    x, v = _inputs((5, 4), torch.float64, n=2)
    t = torch.tensor([0.0, 0.1, 0.5, 0.7, 0.9], dtype=torch.float64, device=DEVICE)
    s = torch.tensor([1.0, 0.4, 0.75, 0.7, 1.0], dtype=torch.float64, device=DEVICE)
    for be in BACKENDS:
        torch.testing.assert_close(fk.ei_step(x, v, t, s, "linear", "velocity", backend=be),
                                   x + (s - t)[:, None] * v)
    model = _mlp()
    x0 = torch.randn(16, 2, device=DEVICE)
    torch.testing.assert_close(fk.sample(model, x0, method="ei", steps=5, progress=False),
                               fk.sample(model, x0, method="euler", steps=5, progress=False))


def test_reflow_loss_is_flow_matching_on_pairs():
    model = _mlp()
    x0, x1 = torch.randn(16, 2, device=DEVICE), torch.randn(16, 2, device=DEVICE)
    t = torch.rand(16, device=DEVICE)
    got = RF.reflow_loss(model, x0, x1, t)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    want = ((model(xt, t) - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(got, want)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(RF.reflow_loss(model, x0, x1, generator=g1),
                               RF.reflow_loss(model, x0, x1, torch.rand(16, generator=g2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_distill_loss_matches_eager_euler(backend, steps):
    """distill_loss == ‖x1 - EulerSolve_k(x0)‖² with gradients equal to autograd
    through the eager Euler loop (the RectifiedFlow code's formulation)."""
    model = _mlp(1).double()
    x0 = torch.randn(12, 2, device=DEVICE, dtype=torch.float64)
    x1 = torch.randn(12, 2, device=DEVICE, dtype=torch.float64)
    loss = RF.distill_loss(model, x0, x1, steps=steps, backend=backend)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    x = x0
    for i in range(steps):
        t = torch.full((12,), i / steps, dtype=torch.float64, device=DEVICE)
        x = x + model(x, t) / steps
    want = ((x1 - x) ** 2).mean()
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(a, b)
    if steps == 1:  # the one-step form of the issue: ‖x1 - (x0 + v(x0, 0))‖²
        v = model(x0, torch.zeros(12, dtype=torch.float64, device=DEVICE))
        torch.testing.assert_close(loss, ((x1 - (x0 + v)) ** 2).mean())


def test_ot_pairs_is_the_optimal_assignment():
    pytest.importorskip("ot")
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g) + 1
    z0, z1 = RF.ot_pairs(x0, x1)
    assert z0 is x0
    # a permutation of x1 ...
    assert sorted(z1[:, 0].tolist()) == sorted(x1[:, 0].tolist())
    # ... with the least total squared distance of all 7! assignments
    cost = torch.cdist(x0.double(), x1.double()) ** 2
    best = min(sum(cost[i, j].item() for i, j in enumerate(perm))
               for perm in itertools.permutations(range(7)))
    assert math.isclose(((z0 - z1).double() ** 2).sum().item(), best, rel_tol=1e-6)
    xb, yb = torch.randn(256, 2, generator=g), toy.dataset("moons", 256)
    _, yo = RF.ot_pairs(xb, yb)
    assert ((xb - yo) ** 2).sum() < ((xb - yb) ** 2).sum()
    e = torch.randn(0, 2)
    assert RF.ot_pairs(e, e)[1].shape == (0, 2)


def test_straightness():
    x0 = torch.randn(64, 2, device=DEVICE)
    c = torch.tensor([1.0, -2.0], device=DEVICE)
    assert RF.straightness(lambda x, t: c.expand_as(x), x0) < 1e-12      # straight lines
    # rotation by 1 radian: S = (theta^2 - 4 sin^2(theta/2)) E|x0|^2 / dim
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)
    want = (1 - 4 * math.sin(0.5) ** 2) * (x0 ** 2).sum(1).mean().item() / 2
    assert math.isclose(RF.straightness(rot, x0, steps=200), want, rel_tol=0.02)


def test_demo_metrics():
    from flowkern.demo import rectified as D
    a, b = toy.dataset("moons", 3000, seed=1), toy.dataset("moons", 3000, seed=2)
    assert math.isclose(D.SlicedW2(b, 128, 0)(a), toy.sliced_wasserstein(a, b, 128, 0),
                        rel_tol=1e-12)
    assert D.in_modes(toy.dataset("8gaussians", 4000), "8gaussians") > 0.98
    assert D.in_modes(torch.zeros(10, 2), "8gaussians") == 0.0
    assert D.in_modes(a, "moons") is None


# ---------------------------------------------------------------------- flow map


def test_flowmap_parametrisation_and_pretrained_init():
    model = _mlp(2)
    fmap = FM.FlowMap.from_pretrained(model, prediction="velocity")
    x = torch.randn(10, 2, device=DEVICE)
    t = torch.rand(10, device=DEVICE) * 0.9
    s = t + 0.1 * torch.rand(10, device=DEVICE)
    # the extended network computes the pretrained function for every s ...
    torch.testing.assert_close(fmap.net(x, t, s), model(x, t))
    torch.testing.assert_close(fmap.pred(x, t, 0.3), model(x, t))
    # ... so d̄(t, t, x) is the pretrained denoiser: x + (1 - t) v for a rectified flow
    d = fk.convert(fmap.net(x, t, t), x, t, "linear", "velocity", "x1")
    torch.testing.assert_close(d, x + (1 - t)[:, None] * model(x, t))
    # g is ei_step of the network's output; g(t, t, x) = x; g(t, s, x) = Euler step at init
    torch.testing.assert_close(fmap(x, t, s), fk.ei_step(x, model(x, t), t, s, "linear",
                                                         "velocity", backend="torch"))
    torch.testing.assert_close(fmap(x, t, t), x)
    torch.testing.assert_close(fmap(x, t, s), x + (s - t)[:, None] * model(x, t))
    # one jump from noise = one Euler step of the pretrained flow
    torch.testing.assert_close(fmap.sample(x, 1), fk.sample(model, x, steps=1, progress=False))
    torch.testing.assert_close(fmap.sample(x, 3), fk.sample(model, x, steps=3, progress=False))
    # the x1 parametrisation: g(0, 1, x) = d̄ itself
    fx1 = FM.FlowMap(lambda x, t, s: 2 * x + s[:, None], prediction="x1")
    torch.testing.assert_close(fx1(x, 0.0, 1.0), 2 * x + 1)
    # the zero-initialised s-weights get gradients: training can learn the s-dependence
    fmap(x, t, s).sum().backward()
    assert fmap.net.net[0].weight.grad[:, -7:].abs().sum() > 0


def test_flowmap_from_any_pretrained_model():
    """Any network with extend=: a model of the caller's (here a tiny net
    over [x, t]) and the caller's second-time construction, a copy with a
    zero-initialised s input; d̄ starts as the model for every s and the s
    weights get gradients."""
    class Net(torch.nn.Module):
        def __init__(self, n_t):
            super().__init__()
            self.lin = torch.nn.Linear(2 + n_t, 2)

        def forward(self, x, t, s=None):
            ts = [t[:, None]] + ([] if s is None else [s[:, None]])
            return self.lin(torch.cat([x] + ts, 1))

    def extend(m):
        net = Net(2).to(DEVICE)
        with torch.no_grad():
            net.lin.weight.zero_()
            net.lin.weight[:, :3] = m.lin.weight
            net.lin.bias.copy_(m.lin.bias)
        return net

    model = Net(1).to(DEVICE)
    fmap = FM.FlowMap.from_pretrained(model, prediction="velocity", extend=extend)
    x = torch.randn(6, 2, device=DEVICE)
    t, s = torch.full((6,), 0.2, device=DEVICE), torch.full((6,), 0.7, device=DEVICE)
    torch.testing.assert_close(fmap.pred(x, t, s), model(x, t))
    torch.testing.assert_close(fmap(x, t, s), x + 0.5 * model(x, t))
    fmap(x, t, s).sum().backward()
    assert fmap.net.lin.weight.grad[:, 3].abs().sum() > 0


def test_local_loss():
    fmap = FM.FlowMap.from_pretrained(_mlp(3), prediction="velocity")
    x0, x1 = torch.randn(16, 2, device=DEVICE), torch.randn(16, 2, device=DEVICE)
    t = torch.rand(16, device=DEVICE) * 0.9
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    got = FM.local_loss(fmap, x0, x1, t)
    torch.testing.assert_close(got, ((fmap.net(xt, t, t) - (x1 - x0)) ** 2).mean())
    # against a teacher: its own initialisation has zero local loss
    teacher = _mlp(3)
    assert FM.local_loss(fmap, x0, x1, t, teacher=teacher).item() < 1e-10
    # x1 parametrisation against a velocity teacher: d̄(t, t, x) -> x + (1 - t) v
    fx1 = FM.FlowMap(_mlp(4, extra_time=True), prediction="x1")
    want = ((fx1.net(xt, t, t) - (xt + (1 - t)[:, None] * teacher(xt, t))) ** 2).mean()
    torch.testing.assert_close(FM.local_loss(fx1, x0, x1, t, teacher=teacher), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_semigroup_loss_matches_eager_with_stop_gradient(backend):
    net = _mlp(5, extra_time=True)
    fmap = FM.FlowMap(net, prediction="x1", backend=backend)
    x = torch.randn(16, 2, device=DEVICE)
    t = torch.rand(16, device=DEVICE) * 0.5
    s = t + 0.4
    u = t + 0.1
    loss = FM.semigroup_loss(fmap, x, t, s, u)
    grads = torch.autograd.grad(loss, list(net.parameters()))

    def g(x, a, b):  # the paper's formula for the linear schedule
        sa, sb = 1 - a, 1 - b  # sigma; alpha = t
        return (sb / sa)[:, None] * x + (b - sb * a / sa)[:, None] * net(x, a, b)
    with torch.no_grad():
        target = g(g(x, t, u), u, s)
    want = ((g(x, t, s) - target) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(want, list(net.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # u = t or u = s: the composition is the map itself, the loss is 0
    assert FM.semigroup_loss(fmap, x, t, s, t).item() < 1e-10
    assert FM.semigroup_loss(fmap, x, t, s, s).item() < 1e-10
    # u drawn per sample from a generator is reproducible
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(FM.semigroup_loss(fmap, x, t, s, generator=g1),
                               FM.semigroup_loss(fmap, x, t, s, generator=g2))


# ---------------------------------------------------------------------- the seeds' result


# Margins, from runs of these two configurations with training seeds 0-3
# (evaluated on 16k samples):
# * 1-RF in one Euler step: spread (RMS distance to the data mean / the
#   data's) 0.04-0.05 and 0 % of the samples in a mode (a perfect 1-RF gives
#   x0 + E[x1 - x0 | x0] = E[x1], spread 0); 2-RF: spread 0.97-0.99.
#   Asserted: spread < 0.3 and in modes < 5 % for 1-RF; spread > 0.8 for 2-RF.
# * one reflow divides the one-step SW2 by 13-19 (1.36 -> 0.07-0.10).
#   Asserted: by at least 4.
# * distillation and the flow map lower the one-step SW2 below 2-RF's by
#   0.019-0.039 and raise the fraction in modes by 5-8 points; the same
#   models evaluated on five other draws of 16k samples move that SW2
#   difference by +-0.003. Asserted: lower by at least 0.01, and more in modes.
#   Their one-step distance to 2-RF's ODE endpoint (what both are trained to
#   reproduce) is 0.40-0.50 of 2-RF's. Asserted: < 0.7.
# * 2-RF's straightness is 0.2-0.6 % of 1-RF's. Asserted: < 10 %.
# * MeanFlow and the shortcut model, trained from scratch (600 steps here, seeds
#   0-2; 800 for seed 0): one-step SW2 0.16-0.19 and 0.156-0.161, i.e. 0.11-0.14
#   of 1-RF's one step; spread 0.98-1.04; 46-57 % in modes (1-RF: 0 %). At
#   this budget both stay behind 2-RF's one step (0.09-0.10), which is printed,
#   not asserted. Asserted: one-step SW2 < 0.25 of 1-RF's, spread > 0.8,
#   in modes > 30 %.
MARGINS = dict(collapse=0.3, reflow=0.25, improve=0.01, ode_err=0.7, straight=0.1,
               one_step=0.25, in_modes=0.3)
# The demo's configuration with shorter reflow, distillation and flow-map
# training (1-RF keeps its 1500 steps: it sets the quality of everything after).
TEST_CONFIG = dict(steps_2rf=600, steps_distill=300, steps_flowmap=500, n_pairs=8000,
                   pair_steps=16, steps_meanflow=600, steps_shortcut=600)


def _ordering(cfg):
    from flowkern.demo import rectified as D
    with D.single_thread():
        models, _ = D.train_all(cfg)
        rows, *_ = D.evaluate(models, cfg)
    print(D.table(rows, float("nan"), cfg.many_steps))
    # one-step quality of every model and the table's other columns
    r = {row["model"]: row for row in rows}
    one = {k: v["sw2_1"] for k, v in r.items()}
    m = MARGINS
    # 1-RF in one Euler step collapses toward the data mean; 2-RF does not
    assert r["1-RF"]["spread_1"] < m["collapse"]
    assert r["1-RF"]["modes_1"] < 0.05
    assert r["2-RF"]["spread_1"] > 0.8
    # one reflow: much better in one step, and straighter paths
    assert one["2-RF"] < m["reflow"] * one["1-RF"], one
    assert r["2-RF"]["straightness"] < m["straight"] * r["1-RF"]["straightness"]
    # distillation and the flow map: better than 2-RF in one step
    for k in ("2-RF + distill", "flow map"):
        assert one[k] < one["2-RF"] - m["improve"], (k, one[k], one["2-RF"])
        assert r[k]["modes_1"] > r["2-RF"]["modes_1"], (k, r[k], r["2-RF"])
        assert r[k]["ode_err_1"] < m["ode_err"] * r["2-RF"]["ode_err_1"], (k, r[k], r["2-RF"])
    # the one-step objectives trained from scratch: far better than 1-RF in one step
    for k in ("MeanFlow", "shortcut"):
        assert one[k] < m["one_step"] * one["1-RF"], (k, one[k], one["1-RF"])
        assert r[k]["spread_1"] > 0.8 and r[k]["modes_1"] > m["in_modes"], (k, r[k])
    # many steps: reflow keeps the quality of the flow it straightens
    assert r["2-RF"]["sw2_many"] < 1.5 * r["1-RF"]["sw2_many"]
    return r


def test_seeds_result_at_toy_scale():
    """The seeds' result on 8 Gaussians, a reduced configuration (~45 s)."""
    from flowkern.demo import rectified as D
    _ordering(D.Config(seed=0, **TEST_CONFIG))


@pytest.mark.slow
def test_seeds_result_demo_configuration():
    """The same ordering for the demo's full configuration (~50 s)."""
    from flowkern.demo import rectified as D
    _ordering(D.Config(seed=0))
