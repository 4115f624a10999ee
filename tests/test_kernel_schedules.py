"""Built-in schedules evaluated inside the kernels (docs/design.md §8): the
training ops on the cpu and triton backends take the times and the
schedule's kind and parameters, no coefficient table (schedules.h
schedule_at; flowkern/triton/schedules.py). Each schedule at the edge times
(0, 1 and only nearly 0 or 1), every form of t, float32 and float64, against
the float64 reference; and no table built on the way where values are not
checked."""
import pytest
import torch

import flowkern as fk
from flowkern import _validate as V
from flowkern import reference as ref
from flowkern.schedules import EDM, VP, Polynomial, coefficients

from conftest import DEVICE, backends_under_test
from helpers import EPS, assert_close

BACKENDS = [b for b in backends_under_test() if b != "torch"]
SCHEDULES = ["linear", "cosine", Polynomial(3), Polynomial(0.5), "vp", VP(0.05, 30.0), "ve",
             "edm", EDM(0.01, 120.0, 5.0)]
EDGES = [0.0, 1e-7, 0.3, 0.5, 0.75, 1 - 1e-7, 1.0]
B = len(EDGES)


def _t_forms(dtype):
    """(name, t as the op takes it, the float64 times per row)."""
    t64 = torch.tensor(EDGES, dtype=torch.float64)
    strided = torch.stack([t64, -t64], 1)[:, 0]  # stride 2
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    return [("rows", t64.to(tdt).to(DEVICE), t64.to(tdt).double()),
            ("rows_f64", t64.to(DEVICE), t64),
            ("strided", strided.to(DEVICE), t64),
            ("one", torch.tensor([0.3], dtype=tdt, device=DEVICE),
             torch.full((B,), 0.3, dtype=tdt).double()),
            ("scalar", torch.tensor(1 - 1e-7, dtype=torch.float64, device=DEVICE),
             torch.full((B,), 1 - 1e-7, dtype=torch.float64)),
            ("float", 1e-7, torch.full((B,), 1e-7, dtype=torch.float64))]


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 33, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
            for _ in range(3)]


def _check(out, want64, scale, dtype, what):
    if dtype == torch.float64:
        err = (out.double().cpu() - want64).abs().max().item()
        assert err <= 64 * EPS[dtype] * scale, f"{what}: error {err:.3g} (scale {scale:.3g})"
    else:  # the coefficients rounded once to float32, then the float32 combination
        assert_close(out.cpu(), want64, want64.to(dtype), what, ulps=8.0, scale=scale)


def _rates_finite(coef):
    return bool(torch.isfinite(coef[:, 2:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_training_ops_evaluate_the_schedule_in_the_kernel(backend, dtype, schedule):
    x0, x1, pred = _data(dtype)
    forms = _t_forms(dtype) if dtype == torch.float64 else _t_forms(dtype)[:1]
    for name, t, t64 in forms:
        c64 = coefficients(schedule, t64, B, torch.float64)
        d = [v.double().cpu() for v in (x0, x1, pred)]
        what = f"{schedule} {name} {dtype} {backend}"
        # x_t and the x1 target read alpha, sigma only: finite at every time
        xt, y = fk.interpolate(x0, x1, t, schedule, target="x1", backend=backend)
        want = ref.interpolate(d[0], d[1], c64, "x1")[0]
        _check(xt, want, (c64[:, :2].abs().sum(1).max() * 5).item(), dtype, f"x_t {what}")
        if not _rates_finite(c64):  # vp at t = 1: velocity is an error (test_training)
            continue
        xt, y = fk.interpolate(x0, x1, t, schedule, target="velocity", backend=backend)
        want = ref.interpolate(d[0], d[1], c64, "velocity")[1]
        scale = (c64[:, 2:].abs().sum(1).max() * 5).item()
        _check(y, want, scale, dtype, f"velocity {what}")
        loss = fk.flow_matching_loss(pred, x0, x1, t, schedule, reduction="none",
                                     backend=backend)
        want = ref.flow_matching_loss(d[2], d[0], d[1], c64, "velocity", None, "none")
        _check(loss, want, ((scale + 5) ** 2), dtype, f"loss {what}")
        if bool((c64[:, 0] * c64[:, 3] - c64[:, 1] * c64[:, 2] != 0).all()):
            out = fk.convert(pred, x0, t, schedule, src="velocity", dst="x1", backend=backend)
            want = ref.convert(d[2], d[0], c64, "velocity", "x1")
            _check(out, want, want.abs().max().item() + 1, dtype, f"convert {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["cosine", "vp", "edm"])
def test_backward_evaluates_the_schedule_in_the_kernel(backend, schedule):
    """The backward kernels take the same (t, kind, params): gradients of x_t,
    y and the loss against the reference's autograd in float64."""
    t = torch.tensor([0.0, 1e-7, 0.3, 0.5, 0.75, 1 - 1e-7, 0.9], dtype=torch.float64,
                     device=DEVICE)
    x0, x1, pred = (v.requires_grad_() for v in _data(torch.float64, seed=1))
    g = torch.randn(B, 33, dtype=torch.float64, device=DEVICE)
    for be in (backend, "torch"):
        for v in (x0, x1, pred):
            v.grad = None
        xt, y = fk.interpolate(x0, x1, t, schedule, backend=be)
        loss = fk.flow_matching_loss(pred, x0, x1, t, schedule, reduction="sum", backend=be)
        ((xt * g).sum() + (y * g).sum() + loss).backward()
        grads = [v.grad.clone() for v in (x0, x1, pred)]
        if be == backend:
            got = grads
    for a, b, n in zip(got, grads, ("x0", "x1", "pred")):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 64 * EPS[torch.float64] * scale, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_table_where_values_are_not_checked(backend, monkeypatch):
    """A built-in schedule reaches the kernel as (t, kind, params): with the
    value checks off (values_prechecked: what a GPU does without
    FLOWKERN_DEBUG) no coefficient table is built; a custom schedule still
    gets its table, and with checks on the checks build one."""
    import flowkern.ops.training as T

    built = []
    real = T.coefficients

    def spy(*a, **k):
        built.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(T, "coefficients", spy)
    x0, x1, pred = _data(torch.float32)
    t = torch.rand(B, device=DEVICE)
    with V.values_prechecked():
        fk.interpolate(x0, x1, t, "vp", backend=backend)
        fk.flow_matching_loss(pred, x0, x1, 0.4, "edm", backend=backend)
        fk.convert(pred, x0, t, "cosine", backend=backend)
    assert built == []
    custom = lambda s: (s, 1 - s, torch.ones_like(s), -torch.ones_like(s))  # noqa: E731
    fk.interpolate(x0, x1, t, custom, backend=backend)
    assert built[-1] is custom
    if backend == "triton":  # the native ops check in C++ without a table
        fk.interpolate(x0, x1, t, "vp", backend=backend)
        assert len(built) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_errors_match_with_the_schedule_in_the_kernel(backend):
    x0, x1, pred = _data(torch.float32)
    with pytest.raises(ValueError, match=r"^t: times must lie in \[0, 1\]"):
        fk.interpolate(x0, x1, 1.5, "vp", backend=backend)
    with pytest.raises(ValueError, match=r"^t: times must lie in \[0, 1\]"):
        fk.interpolate(x0, x1, torch.full((B,), -0.1, device=DEVICE), "cosine", backend=backend)
    with pytest.raises(ValueError, match=r"^t: .*not finite"):
        fk.interpolate(x0, x1, 1.0, "vp", target="velocity", backend=backend)
    with pytest.raises(ValueError, match=r"^t: sigma_t is 0"):
        fk.flow_matching_loss(pred, x0, x1, torch.ones(B, device=DEVICE), "linear",
                              target="score", backend=backend)
    with pytest.raises(ValueError, match=r"^t: alpha_t is 0"):
        fk.convert(pred, x0, 0.0, "linear", src="eps", dst="x1", backend=backend)


# ---------------------------------------------------------------------------
# steps: float times and a built-in schedule go to the kernel as `times`


STEP_SCHEDULES = ["linear", "cosine", Polynomial(2), "vp", "ve", "edm"]
STEP_TIMES = [(0.2, 0.45), (1e-7, 0.3), (0.6, 1 - 1e-7)]


def _steps(x, p, q, t, s, schedule, be, **kw):
    """Each step op once at (t, s): {name: output}. `kw` adds table= or other
    times; the defaults are what a caller passes."""
    tp = t - 0.1
    out = {
        "euler": fk.euler_step(x, p, t, s, schedule, backend=be, **kw),
        "heun": fk.heun_step(x, p, x + 0.1 * q, q, t, s, schedule, backend=be, **kw),
        "ei_data": fk.ei_step(x, p, t, s, schedule, prediction="eps", backend=be, **kw),
        "ei_noise": fk.ei_step(x, p, t, s, schedule, form="noise", backend=be, **kw),
        "em": fk.em_step(x, p, t, s, schedule, g=0.7, seed=3, backend=be, **kw),
        "churn": fk.churn(x, s, t, schedule, seed=5, backend=be, **kw),
        "lms": fk.lms_step(x, p, [0.3, -0.1], [q], t, schedule, backend=be, **kw)[0],
    }
    if tp >= 0:  # (a t_prev within rounding of t makes DPM-Solver++'s r ill-conditioned)
        out["dpmpp_2m"] = fk.dpmpp_2m_step(x, p, t, s, schedule, d_prev=q, t_prev=tp,
                                           backend=be, **kw)[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("schedule", STEP_SCHEDULES, ids=str)
def test_steps_evaluate_float_times_in_the_kernel(dtype, schedule, monkeypatch):
    """Triton's steps given float times compute their row in the kernel
    (KIND >= 0, no table on the device) and agree with the torch backend."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not under test")
    from flowkern.triton import lincomb

    kinds = []
    real = lincomb._coef_args

    def spy(src, like):
        args, const = real(src, like)
        kinds.append(const["KIND"])
        return args, const

    monkeypatch.setattr(lincomb, "_coef_args", spy)
    g = torch.Generator().manual_seed(2)
    x, p, q = (torch.randn(5, 40, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
               for _ in range(3))
    for t, s in STEP_TIMES:
        kinds.clear()
        with torch.no_grad():
            got = _steps(x, p, q, t, s, schedule, "triton")
            assert kinds and all(k >= 0 for k in kinds), kinds
            want = _steps(x.double(), p.double(), q.double(), t, s, schedule, "torch")
            naive = _steps(x, p, q, t, s, schedule, "torch")  # torch's own error in dtype
        alpha_t = coefficients(schedule, torch.tensor([t], dtype=torch.float64), 1,
                               torch.float64)[0, 0].item()
        for name, v in got.items():
            # the noise form divides by alpha_t (1e-7 for linear at t = 1e-7): its
            # terms, 1/alpha_t times larger than its value, set the rounding scale
            scale = (want[name].abs().max().item() + 1.0) * (
                1.0 / alpha_t if name == "ei_noise" else 1.0)
            assert_close(v.cpu(), want[name].cpu(), naive[name].cpu(),
                         f"{name} {schedule} {dtype} t={t} s={s}", ulps=16.0, scale=scale,
                         # em and churn: Philox noise is float32 whatever the dtype
                         atol=4e-7 * scale if name in ("em", "churn") else 0.0)


def test_steps_with_float_times_build_no_device_table(monkeypatch):
    """A float-time triton step builds no step table (its value checks read a
    (1, 12) host row, _host_row): nothing is built on or copied to the data's
    device; per-sample times still take the table path."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not under test")
    import flowkern.ops.steps as S

    devices = []
    real = S.step_table

    def spy(*a, **k):
        devices.append(str(a[6] if len(a) > 6 else k.get("device")))
        return real(*a, **k)

    monkeypatch.setattr(S, "step_table", spy)
    x = torch.randn(3, 8, device=DEVICE)
    fk.euler_step(x, x, 0.2, 0.4, "vp", backend="triton")
    fk.em_step(x, x, 0.2, 0.4, "edm", seed=1, backend="triton")
    assert devices == []
    fk.euler_step(x, x, torch.full((3,), 0.2, device=DEVICE), 0.4, "vp", backend="triton")
    assert devices == [str(x.device)]  # per-sample times: the table path


def test_step_value_errors_with_float_times_in_the_kernel():
    if "triton" not in BACKENDS:
        pytest.skip("triton not under test")
    x = torch.randn(3, 8, device=DEVICE)
    for be in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"^s: times must lie in \[0, 1\]"):
            fk.euler_step(x, x, 0.2, 1.5, "vp", backend=be)
        with pytest.raises(ValueError, match=r"^s: em_step integrates forward"):
            fk.em_step(x, x, 0.5, 0.4, "linear", seed=1, backend=be)
        with pytest.raises(ValueError, match=r"^t: alpha_t is 0"):
            fk.churn(x, 0.0, 0.0, "linear", seed=1, backend=be)


def test_triton_training_call_is_one_op():
    """Under torch.profiler, a triton training call on a built-in schedule with
    the value checks off (a GPU without FLOWKERN_DEBUG) records its one
    flowkern_triton op and at most a view of t: no table construction."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not under test")
    from torch.profiler import ProfilerActivity, profile

    x0, x1, pred = _data(torch.float32)
    t = torch.rand(B, device=DEVICE)
    calls = {"flowkern_triton::interpolate": lambda: fk.interpolate(x0, x1, t, "vp",
                                                                    backend="triton"),
             "flowkern_triton::fm_loss": lambda: fk.flow_matching_loss(pred, x0, x1, 0.3, "edm",
                                                                       backend="triton"),
             "flowkern_triton::convert": lambda: fk.convert(pred, x0, t, "cosine",
                                                            backend="triton")}
    for op, call in calls.items():
        call()  # compile / warm up
        with V.values_prechecked(), torch.no_grad():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
        top = [e.name for e in prof.events() if e.cpu_parent is None]
        assert top.count(op) == 1 and set(top) <= {op, "aten::reshape", "aten::view"}, top
