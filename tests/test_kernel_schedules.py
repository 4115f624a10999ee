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
