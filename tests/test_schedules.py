"""Schedules: analytic derivatives against autograd of alpha and sigma, and
user-defined schedules."""
import pytest
import torch

import flowkern as fk
from flowkern.schedules import coefficients

BUILTINS = [fk.schedules.Linear(), fk.schedules.Cosine(), fk.schedules.Polynomial(2.5),
            fk.schedules.VP(), fk.schedules.VE(), fk.schedules.EDM()]


@pytest.mark.parametrize("schedule", BUILTINS, ids=repr)
def test_derivatives_match_autograd(schedule):
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64, requires_grad=True)
    alpha, sigma = schedule.alpha_sigma(t)
    # "+ 0 * t" keeps constant coefficients (VE, EDM alpha = 1) in the graph
    da_auto, = torch.autograd.grad((alpha + 0 * t).sum(), t, retain_graph=True)
    ds_auto, = torch.autograd.grad((sigma + 0 * t).sum(), t)
    da, ds = schedule.derivatives(t.detach())
    torch.testing.assert_close(da, da_auto, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ds, ds_auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", BUILTINS, ids=repr)
def test_endpoints_and_shapes(schedule):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, s, da, ds = schedule(t)
    assert a.shape == s.shape == da.shape == ds.shape == (2,)
    # data at t = 1 for every schedule that reaches it; noise dominates at t = 0
    assert (s[0] / a[0].clamp_min(1e-300)) > (s[1] / a[1])


def test_user_schedule_object_and_callable():
    class Quadratic(fk.schedules.Schedule):  # derivatives by forward-mode autodiff
        def alpha_sigma(self, t):
            return t * t, 1 - t * t

    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    a, s, da, ds = Quadratic()(t)
    torch.testing.assert_close(da, 2 * t)
    torch.testing.assert_close(ds, -2 * t)

    def plain(t):
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    got = fk.interpolate(x0, x1, t.float(), schedule=plain)
    want = fk.interpolate(x0, x1, t.float(), schedule="linear")
    torch.testing.assert_close(got[0], want[0])
    got = fk.interpolate(x0, x1, t.float(), schedule=Quadratic())
    want = fk.interpolate(x0, x1, t.float(), schedule=fk.schedules.Polynomial(2))
    torch.testing.assert_close(got[1], want[1])


def test_coefficient_table():
    c = coefficients("linear", torch.tensor(0.25), 3, torch.float32)
    assert c.shape == (3, 4) and c.is_contiguous() and c.dtype == torch.float32
    torch.testing.assert_close(c[1], torch.tensor([0.25, 0.75, 1.0, -1.0]))


def test_bad_parameters():
    with pytest.raises(ValueError, match="n must be"):
        fk.schedules.Polynomial(0)
    with pytest.raises(ValueError, match="beta_min"):
        fk.schedules.VP(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="sigma_min"):
        fk.schedules.EDM(sigma_min=1, sigma_max=0.5)
    with pytest.raises(ValueError, match="unknown name"):
        fk.get_schedule("sigmoid")
    with pytest.raises(TypeError, match="sigma_max: the ve schedule's sigma_max must be a real"):
        fk.schedules.VE(sigma_max="50")
    with pytest.raises(TypeError, match="rho: "):
        fk.schedules.EDM(rho=None)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bad_user_schedules_are_named(backend):
    """A callable returning anything but four columns of the right length, or
    a Schedule subclass without alpha_sigma, is an error naming `schedule`,
    never garbage coefficients (a (4,) tensor for a batch of 4 used to be read
    as four scalar columns)."""
    if not fk.available()[backend]:
        pytest.skip(f"{backend} not available")
    x = torch.randn(4, 5)
    bad = [(lambda t: t * 1, ValueError, "4-tuple .* got Tensor"),
           (lambda t: (t, 1 - t, t), ValueError, "got 3 values"),
           (lambda t: (t, 1 - t, "1", t), TypeError, "d_alpha must be a tensor"),
           (lambda t: (t, 1 - t, torch.ones(3), t), ValueError, "d_alpha has 3 values"),
           (type("NoAlpha", (fk.schedules.Schedule,), {})(), NotImplementedError,
            "NoAlpha must implement alpha_sigma")]
    for sched, exc, msg in bad:
        with pytest.raises(exc, match="schedule: .*" + msg):
            fk.interpolate(x, x, torch.full((4,), 0.3), schedule=sched, backend=backend)
        with pytest.raises(exc, match="schedule: .*" + msg):
            fk.euler_step(x, x, 0.3, 0.5, schedule=sched, backend=backend)
    # floats are columns too: a constant alpha or rate
    got = fk.interpolate(x, x, 0.3, schedule=lambda t: (t, 1 - t, 1.0, -1.0), backend=backend)
    torch.testing.assert_close(got[1], torch.zeros_like(x))


# flowkern::schedule_table (csrc/cpu/schedules.cpp): the C++ table of the
# built-ins that coefficients() uses on CPU, against the Python classes.
native = pytest.mark.skipif(not fk.backend.cpu_built(), reason="flowkern._C not built")
SCHEDULE_PARAMS = BUILTINS + [fk.schedules.Polynomial(0.5), fk.schedules.VP(0.5, 5.0),
                              fk.schedules.VE(0.002, 80.0), fk.schedules.EDM(0.01, 10.0, 3.0)]


def _python_table(schedule, t, rows, dtype):
    """coefficients() without the native path (a subclass is not a built-in)."""
    wrapped = type("Wrapped", (fk.schedules.Schedule,), {"__call__": lambda self, u: schedule(u)})()
    return coefficients(wrapped, t, rows, dtype)


@native
@pytest.mark.parametrize("schedule", SCHEDULE_PARAMS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_table_matches_python(schedule, dtype):
    t = torch.cat([torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7, 0.5]),
                   torch.rand(1018, generator=torch.Generator().manual_seed(0))]).double()
    t = t.clamp(1e-6, 1) if isinstance(schedule, fk.schedules.Polynomial) and schedule.n < 1 else t
    kind, params = fk.schedules.native_args(schedule)
    got = torch.ops.flowkern.schedule_table(t, kind, params, t.numel(), dtype, "t")
    assert got.dtype == dtype and got.shape == (t.numel(), 4)
    want = _python_table(schedule, t, t.numel(), torch.float64)
    # float64: the same formulas (libm vs torch's vectorised math: a few ulps);
    # float32: one rounding of the float64 value, where the Python path
    # evaluates in float32 (its error is larger than this bound)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1.2e-7, atol=1e-30)
    torch.testing.assert_close(got.double(), want, **tol)
    # coefficients() takes this path for a built-in on CPU
    torch.testing.assert_close(coefficients(schedule, t.to(dtype), t.numel(), dtype),
                               got if dtype == torch.float64 else
                               torch.ops.flowkern.schedule_table(
                                   t.to(dtype), kind, params, t.numel(), dtype, ""),
                               rtol=0, atol=0)


@native
@pytest.mark.parametrize("shape", [(), (1,)])
def test_native_table_broadcasts_one_time(shape):
    t = torch.full(shape, 0.3)
    table = coefficients("cosine", t, 5, torch.float32)
    assert table.shape == (5, 4) and table.is_contiguous()
    assert (table == table[:1]).all()
    assert coefficients("cosine", t, 0, torch.float32).shape == (0, 4)


@native
@pytest.mark.parametrize("bad", [-0.25, 1.5, float("nan")])
def test_native_table_range_check(bad):
    t = torch.tensor([0.5, bad, 0.25])
    with pytest.raises(ValueError, match=r"^t: times must lie in \[0, 1\]"):
        coefficients("linear", t, 3, torch.float32, check="t")
    # the op itself: the Python type rides in the message (csrc/cpu/errors.h),
    # which coefficients() above turned back into a plain ValueError
    with pytest.raises(ValueError, match=r"^ValueError: tt: times must lie in \[0, 1\]"):
        torch.ops.flowkern.schedule_table(t, 0, [], 3, torch.float32, "tt")
    coefficients("linear", t, 3, torch.float32)  # no check asked: no error
    # the public ops report it under their argument's name
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"^t: times must lie in \[0, 1\]"):
        fk.interpolate(x, x, t)


@native
@pytest.mark.parametrize("bad,shown", [(-0.25, "[-0.25, 0.5]"), (1.5, "[0.25, 1.5]"),
                                       (float("inf"), "[0.25, inf]"),
                                       (float("nan"), "[nan, nan]")])
def test_range_message_shows_the_range(bad, shown):
    # every path that checks times reports the same range: NaN shows as [nan,
    # nan] (torch.aminmax's answer), an infinite time as inf, not as a NaN
    t = torch.tensor([0.5, bad, 0.25])
    want = "t: times must lie in [0, 1] (0 = noise, 1 = data); got values in " + shown
    x = torch.zeros(3, 2)
    calls = [lambda: coefficients("linear", t, 3, torch.float32, check="t"),
             lambda: fk.interpolate(x, x, t),
             lambda: fk.interpolate(x, x, t, backend="torch")]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == want
    with pytest.raises(ValueError) as e:  # the step ops' float times (coef_args.h)
        fk.euler_step(x, x, t=bad, s=0.5)
    assert str(e.value).endswith(f"got values in [{bad:g}, {bad:g}]"), str(e.value)


@native
def test_native_table_opcheck():
    t = torch.rand(7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.flowkern.schedule_table.default,
                          (t, 5, [0.002, 80.0, 7.0], 7, torch.float32, "t"))
