"""Forward-mode AD and torch.func transforms through every differentiable op
(docs/design.md §10): torch.func.jvp, torch.autograd.forward_ad, jvp nested in
grad (the MeanFlow pattern), torch.func.grad and vmap (one kernel, not a loop),
on every kernel backend, against the torch backend and finite differences in
float64. What cannot be differentiated forward raises, naming the argument."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.profiler import ProfilerActivity, profile

import flowkern as fk
from conftest import DEVICE, backends_under_test

KERNELS = [b for b in backends_under_test() if b != "torch"]
B, D = 5, 7  # odd sizes


def _dtype(backend):
    return torch.float64 if backend in ("cpu", "triton") else torch.float32


def _data(backend, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = _dtype(backend)
    return [torch.randn(B, D, generator=g, dtype=torch.float64).to(DEVICE, dt) for _ in range(n)]


def _times(backend):
    return torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=_dtype(backend), device=DEVICE)


# Each case: (name, number of differentiable tensor inputs, f(backend, *tensors)).
# Broadcast, weights, guidance, forms and every reduction are among them.
def _cases(t):
    w = torch.rand(B, dtype=t.dtype, device=t.device) + 0.5
    return [
        ("interpolate-velocity", 2, lambda be, a, b: fk.interpolate(a, b, t, "cosine",
                                                                    backend=be)),
        ("interpolate-eps-bcast", 2, lambda be, a, b: fk.interpolate(a, b[:1], 0.4, "vp",
                                                                     "eps", backend=be)),
        ("interpolate-score", 2, lambda be, a, b: fk.interpolate(a, b, t, "linear", "score",
                                                                 backend=be)),
        ("convert-eps-velocity", 2, lambda be, p, x: fk.convert(p, x, t, "cosine", "eps",
                                                                "velocity", backend=be)),
        ("convert-velocity-x1", 2, lambda be, p, x: fk.convert(p, x, 0.6, "edm", "velocity",
                                                               "x1", backend=be)),
        ("fm_loss-mean", 3, lambda be, p, a, b: fk.flow_matching_loss(p, a, b, t,
                                                                      backend=be)),
        ("fm_loss-sum-weight", 3, lambda be, p, a, b: fk.flow_matching_loss(
            p, a, b, t, "cosine", "eps", weight=w, reduction="sum", backend=be)),
        ("fm_loss-none", 3, lambda be, p, a, b: fk.flow_matching_loss(
            p, a, b, 0.3, "vp", "x1", reduction="none", backend=be)),
        ("fm_loss-weight-tangent", 4, lambda be, p, a, b, ww: fk.flow_matching_loss(
            p, a, b, t, weight=ww[:, 0].abs(), backend=be)),
        ("ei_step-data", 2, lambda be, x, p: fk.ei_step(x, p, 0.3, 0.6, "cosine", backend=be)),
        ("ei_step-noise-eps", 2, lambda be, x, p: fk.ei_step(x, p, t * 0.5, t * 0.5 + 0.2, "vp",
                                                             "eps", "noise", backend=be)),
        ("ei_step-cfg", 3, lambda be, x, p, u: fk.ei_step(x, p, 0.2, 0.5, "linear", "velocity",
                                                          pred_uncond=u, guidance=2.5,
                                                          backend=be)),
        ("flowmap_loss-mean", 3, lambda be, x, p, y: fk.flowmap_loss(x, p, y, 0.2, 0.7,
                                                                     backend=be)),
        ("flowmap_loss-none-velocity", 3, lambda be, x, p, y: fk.flowmap_loss(
            x, p, y, t * 0.5, t * 0.5 + 0.3, "cosine", "velocity", reduction="none",
            backend=be)),
        ("flowmap_loss-weight-tangent", 4, lambda be, x, p, y, ww: fk.flowmap_loss(
            x, p, y[:1], t * 0.5, 0.8, "vp", "eps", "noise", weight=ww[:, 0].abs(),
            reduction="sum", backend=be)),
        ("flowmap_loss-table", 3, lambda be, x, p, y: fk.flowmap_loss(
            x, p, y, table=fk.step_table("edm", t * 0.5, t * 0.5 + 0.2, dtype=x.dtype,
                                         device=x.device), prediction="velocity",
            backend=be)),
    ]


CASE_IDS = [c[0] for c in _cases(torch.zeros(B))]


def _case(name, backend):
    return next(c for c in _cases(_times(backend)) if c[0] == name)


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", CASE_IDS)
def test_jvp_matches_the_reference(backend, name):
    """torch.func.jvp and forward_ad duals give the torch backend's tangents,
    along a random direction in every differentiable input."""
    _, n, f = _case(name, backend)
    primals = _data(backend, n, seed=1)
    tangents = _data(backend, n, seed=2)
    _, want = torch.func.jvp(lambda *a: f("torch", *a), tuple(primals), tuple(tangents))
    out, got = torch.func.jvp(lambda *a: f(backend, *a), tuple(primals), tuple(tangents))
    for o, g, w in zip(_flat(out), _flat(got), _flat(want)):
        assert g.shape == o.shape and g.dtype == o.dtype
        torch.testing.assert_close(g, w)
    with fwad.dual_level():
        duals = [fwad.make_dual(p, d) for p, d in zip(primals, tangents)]
        dual_out = f(backend, *duals)
        for o, w in zip(_flat(dual_out), _flat(want)):
            torch.testing.assert_close(fwad.unpack_dual(o).tangent, w)


# The interpreted Triton kernels take ~7 s a case here: two run by default.
_FD_CASES = [pytest.param(b, name, marks=[pytest.mark.slow] if (
    b == "triton" and name not in ("fm_loss-none", "ei_step-cfg")) else [])
    for b in KERNELS if _dtype(b) == torch.float64 for name in CASE_IDS]


@pytest.mark.parametrize("backend,name", _FD_CASES)
def test_forward_and_reverse_mode_against_finite_differences(backend, name):
    """gradcheck in float64: the forward-mode and the reverse-mode Jacobians
    against finite differences, one tangent direction at a time."""
    _, n, f = _case(name, backend)
    inputs = [x.requires_grad_() for x in _data(backend, n, seed=3)]
    assert torch.autograd.gradcheck(lambda *a: f(backend, *a), inputs, check_forward_ad=True,
                                    check_backward_ad=True, check_undefined_grad=False)


@pytest.mark.parametrize("backend,name", _FD_CASES)
def test_double_backward_against_finite_differences(backend, name):
    """gradgradcheck in float64: a backward differentiated again (create_graph,
    Hessian-vector products) is correct on every backend — it was silently
    zero through the fused backward kernels."""
    _, n, f = _case(name, backend)
    inputs = [x.requires_grad_() for x in _data(backend, n, seed=8)]
    assert torch.autograd.gradgradcheck(lambda *a: f(backend, *a), inputs)


@pytest.mark.parametrize("backend", KERNELS)
def test_jvp_inside_grad_the_meanflow_pattern(backend):
    """grad of a loss built on a jvp through the ops (MeanFlow's target
    u - (t - r) du/dt): the tangent is differentiated, not dropped."""
    x, v, p0, y = _data(backend, 4, seed=4)
    t = _times(backend)

    def objective(be):
        def loss(theta):
            def u(z):  # a toy model around the fused ops, nonlinear in theta
                return fk.ei_step(z, torch.tanh(theta * z), 0.2, 0.6, "cosine", backend=be)
            out, du = torch.func.jvp(u, (x,), (v,))
            return fk.flow_matching_loss(out - 0.4 * du, y, x, t, backend=be)
        return loss

    want = torch.func.grad(objective("torch"))(p0)
    got = torch.func.grad(objective(backend))(p0)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNELS)
def test_per_sample_gradients_with_vmap_of_grad(backend):
    """vmap(grad(loss)) over samples: the per-sample-gradient pattern."""
    pred, x0, x1 = _data(backend, 3, seed=5)
    t = _times(backend)

    def per_sample(be):
        def loss(p, a, b, tt):
            return fk.flow_matching_loss(p[None], a[None], b[None], tt[None], "cosine",
                                         backend=be)
        return torch.func.vmap(torch.func.grad(loss))(pred, x0, x1, t)

    torch.testing.assert_close(per_sample(backend), per_sample("torch"))


def _vmapped(backend):
    """(name, function of one stacked batch (N, B, D), its loop twin)."""
    t = _times(backend)
    a, b, c = _data(backend, 3, seed=6)
    return [
        ("interpolate", lambda z: fk.interpolate(z, b, t, "cosine", backend=backend)[0]),
        ("convert", lambda z: fk.convert(z, a, t, "linear", "eps", "x1", backend=backend)),
        ("fm_loss-mean", lambda z: fk.flow_matching_loss(z, a, b, t, backend=backend)),
        ("fm_loss-sum", lambda z: fk.flow_matching_loss(z, a, b, 0.3, "vp", "eps",
                                                        reduction="sum", backend=backend)),
        ("fm_loss-none", lambda z: fk.flow_matching_loss(z, a, b, t, reduction="none",
                                                         backend=backend)),
        ("ei_step", lambda z: fk.ei_step(z, a, 0.2, 0.5, "cosine", backend=backend)),
        ("ei_step-cfg", lambda z: fk.ei_step(a, z, 0.2, 0.5, pred_uncond=b, guidance=1.5,
                                             backend=backend)),
        ("ei_step-times", lambda z: fk.ei_step(z, a, t * 0.5, t * 0.5 + 0.3, "vp", "eps",
                                               "noise", backend=backend)),
        ("flowmap_loss", lambda z: fk.flowmap_loss(a, z, c, 0.2, 0.6, reduction="none",
                                                   backend=backend)),
        ("flowmap_loss-times", lambda z: fk.flowmap_loss(z, a, c[:1], t * 0.5, t * 0.5 + 0.3,
                                                         "cosine", "velocity", weight=t,
                                                         backend=backend)),
    ]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("index", range(10), ids=lambda i: _vmapped("torch")[i][0])
def test_vmap_runs_one_kernel(backend, index):
    """vmap over N batches equals the loop over them and runs the batching
    rule (one op call on N*B rows), not torch's per-sample fallback."""
    _, f = _vmapped(backend)[index]
    stacked = torch.stack(_data(backend, 3, seed=7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns "performance drop"
        got = torch.func.vmap(f)(stacked)
    torch.testing.assert_close(got, torch.stack([f(z) for z in stacked]))
    if backend == "cpu":
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.func.vmap(f)(stacked)
        ours = [e for e in prof.events() if e.name.startswith("flowkern::")
                and e.name != "flowkern::empty_output"]
        # the batched call (running the rule) holds the one kernel call
        kernels = [e.name for e in ours
                   if not any(c.name.startswith("flowkern::") for c in e.cpu_children)]
        assert len(kernels) == 1, [e.name for e in ours]


@pytest.mark.parametrize("backend", KERNELS)
def test_a_tangent_in_the_times_is_an_error(backend):
    x, v = _data(backend, 2)
    t = _times(backend)
    with pytest.raises(RuntimeError, match="argument 't' carries a forward-mode tangent"):
        torch.func.jvp(lambda tt: fk.interpolate(x, v, tt, backend=backend)[0], (t,),
                       (torch.ones_like(t),))
    with pytest.raises(RuntimeError, match="argument 't' carries a forward-mode tangent"):
        torch.func.jvp(lambda tt: fk.ei_step(x, v, tt * 0.5, 0.7, backend=backend), (t,),
                       (torch.ones_like(t),))
    # (triton's times become a table first, whose tangent is named t)
    s_named = "s" if backend != "triton" else "t"
    with pytest.raises(RuntimeError, match=f"argument '{s_named}' carries a forward-mode tangent"):
        torch.func.jvp(lambda ss: fk.ei_step(x, v, 0.1, ss * 0.5 + 0.2, backend=backend), (t,),
                       (torch.ones_like(t),))
    # and the torch backend does differentiate in t
    _, tan = torch.func.jvp(lambda tt: fk.interpolate(x, v, tt, backend="torch")[0], (t,),
                            (torch.ones_like(t),))
    torch.testing.assert_close(tan, v - x)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("step", ["euler", "euler-out=x", "dpmpp_2m", "em", "lms",
                                  "ei_step-out", "interpolate-out"])
def test_ops_that_write_a_buffer_refuse_tangents(backend, step):
    """The steps (and ei_step / interpolate with out=) have no forward-mode
    formula: a dual input raises instead of coming out with a dropped tangent."""
    x, v = _data(backend, 2)
    call = {
        "euler": lambda a: fk.euler_step(a, v, 0.3, 0.5, backend=backend),
        "euler-out=x": lambda a: fk.euler_step(a, v, 0.3, 0.5, out=a, backend=backend),
        "dpmpp_2m": lambda a: fk.dpmpp_2m_step(a, v, 0.3, 0.5, backend=backend)[0],
        "em": lambda a: fk.em_step(a, v, 0.3, 0.5, seed=1, backend=backend),
        "lms": lambda a: fk.lms_step(a, v, [0.1, -0.05], [v], t=0.3, backend=backend)[0],
        "ei_step-out": lambda a: fk.ei_step(a, v, 0.3, 0.5, out=torch.empty_like(a),
                                            backend=backend),
        "interpolate-out": lambda a: fk.interpolate(a, v, 0.3, out=(torch.empty_like(a),
                                                                  torch.empty_like(a)),
                                                    backend=backend)[0],
    }[step]
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        with fwad.dual_level():
            call(fwad.make_dual(x.clone(), torch.ones_like(x)))
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        torch.func.jvp(call, (x.clone(),), (torch.ones_like(x),))


@pytest.mark.skipif(not fk.available()["cpu"], reason="needs flowkern._C")
def test_the_raw_nograd_overload_refuses_tangents():
    """The `.nograd` kernels have no forward-mode formula: a dual reaching one
    directly (not through the public function) is an error naming it."""
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    with fwad.dual_level():
        d = fwad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="interpolate.nograd: argument 'x0' carries a "
                                               "forward-mode tangent"):
            torch.ops.flowkern.interpolate.nograd(d, v, None, 0.3, 0, [], 0, True)


@pytest.mark.skipif(not fk.available()["cpu"], reason="needs flowkern._C")
def test_no_transform_keeps_the_one_call_path():
    """Outside any transform a call stays one `.nograd` op (tests/test_host_path.py
    counts it); with a dual level open but no dual input, the differentiable call
    returns plain tensors."""
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    with fwad.dual_level():
        xt, _ = fk.interpolate(x, v, 0.3)
        assert fwad.unpack_dual(xt).tangent is None
    torch.testing.assert_close(xt, fk.interpolate(x, v, 0.3, backend="torch")[0])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("field", ["poisson_field", "empirical_denoiser"])
def test_fields_refuse_derivatives_on_the_kernel_backends(backend, field):
    """The field kernels have no derivative: a gradient or tangent request is an
    error naming the argument (it was a wrong or zero derivative), and the
    torch backend differentiates."""
    x, ref = _data(backend, 1)[0], _data(backend, 1, seed=9)[0]
    r = torch.rand(B, dtype=x.dtype, device=DEVICE) + 0.5
    call = {"poisson_field": lambda be, a: fk.poisson_field(a, r, ref, backend=be)[0],
            "empirical_denoiser": lambda be, a: fk.empirical_denoiser(a, 0.5, ref,
                                                                      backend=be)}[field]
    arg = "x" if field == "poisson_field" else "x_t"
    with pytest.raises(RuntimeError, match=f"argument '{arg}' requires grad"):
        call(backend, x.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        torch.func.jvp(lambda a: call(backend, a), (x,), (torch.ones_like(x),))
    with torch.no_grad():  # detached: fine
        call(backend, x.clone().requires_grad_())
    _, tan = torch.func.jvp(lambda a: call("torch", a), (x,), (torch.ones_like(x),))
    assert tan.abs().sum() > 0


def test_use_backend_is_per_thread():
    """use_backend in one thread does not change the backend another thread's
    calls run on, and interleaved exits do not pop each other's entries."""
    import threading
    from flowkern.backend import resolve
    if not fk.available()["triton"]:
        pytest.skip("needs a second non-default backend (triton)")
    seen, entered, release = {}, threading.Event(), threading.Event()

    def other():
        with fk.use_backend("torch"):
            entered.set()
            release.wait(10)
            seen["other"] = resolve(None, torch.device("cpu"))
        seen["other_after"] = resolve(None, torch.device("cpu"))

    default = resolve(None, torch.device("cpu"))
    th = threading.Thread(target=other)
    th.start()
    entered.wait(10)
    with fk.use_backend("triton"):
        seen["main"] = resolve(None, torch.device("cpu"))
        release.set()
        th.join(10)
        seen["main_after_other_exit"] = resolve(None, torch.device("cpu"))
    assert seen == {"other": "torch", "other_after": default, "main": "triton",
                    "main_after_other_exit": "triton"}
    assert resolve(None, torch.device("cpu")) == default
