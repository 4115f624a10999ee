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
