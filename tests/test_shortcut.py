"""Shortcut models (flowkern.shortcut): the fused objective against its eager
formulation in every dtype, self-consistency of the closed-form Gaussian
jump, exact sampling, the jump sampler, a toy training and the errors."""
import pytest
import torch

import flowkern as fk
from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close
from test_meanflow import _exact_u

BACKENDS = backends_under_test()
sc = fk.shortcut


def _exact_s(mu):
    """The exact jump direction for N(mu, I) data: (z_{t+d} - x) / d, and the
    velocity at d = 0 (the Gaussian average velocity of tests/test_meanflow.py)."""
    u = _exact_u(mu)
    return lambda x, t, d: u(x, t, t + d)


def _eager(pred_fm, x0, x1, pred_sc, s1, s2):
    fm = (pred_fm.double() - (x1.double() - x0.double())).pow(2).sum()
    target = ((s1.double() + s2.double()) / 2).detach()
    scp = (pred_sc.double() - target).pow(2).sum()
    return (fm + scp) / (pred_fm.numel() + pred_sc.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [((3, 5, 7), (4, 5, 7)), ((6, 3, 32, 32), (2, 3, 32, 32)),
                                    ((3073, 2), (1023, 2))], ids=["odd", "image", "toy2d"])
def test_fused_objective_matches_the_eager_formulation(backend, shapes):
    """Odd sizes, an image batch and the 2-D toy's narrow rows (3/4 : 1/4)."""
    fm_shape, sc_shape = shapes
    for dtype in dtypes_for(backend):
        g = torch.Generator().manual_seed(2)
        a64 = [torch.randn(fm_shape, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
        b64 = [torch.randn(sc_shape, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
        pf, x0, x1 = (x.to(DEVICE, dtype) for x in a64)
        ps, s1, s2 = (x.to(DEVICE, dtype) for x in b64)
        pf.requires_grad_(), ps.requires_grad_()
        out = sc.loss(pf, x0, x1, ps, s1, s2, backend=backend)
        gf, gs = torch.autograd.grad(out, (pf, ps))
        rf, rs = pf.detach().double().requires_grad_(), ps.detach().double().requires_grad_()
        ref = _eager(rf, x0, x1, rs, s1, s2)
        ref_gf, ref_gs = torch.autograd.grad(ref, (rf, rs))
        nf, ns = pf.detach().requires_grad_(), ps.detach().requires_grad_()
        naive = (((nf - (x1 - x0)) ** 2).sum() + ((ns - (s1 + s2) / 2) ** 2).sum()) / (
            nf.numel() + ns.numel())
        naive_gf, naive_gs = torch.autograd.grad(naive, (nf, ns))
        assert out.dtype == dtype
        assert_close(out.detach().reshape(1), ref.detach().reshape(1), naive.detach().reshape(1),
                     f"{backend} {dtype} loss", factor=4)
        assert_close(gf, ref_gf, naive_gf, f"{backend} {dtype} d/dpred_fm", factor=4)
        assert_close(gs, ref_gs, naive_gs, f"{backend} {dtype} d/dpred_sc", factor=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_part_may_be_empty_and_targets_are_stop_gradient(backend):
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    y = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    empty = x[:0]
    only_sc = sc.loss(empty, empty, empty, x, y, y, backend=backend)
    torch.testing.assert_close(only_sc, ((x - y) ** 2).mean())
    gx, gy = torch.autograd.grad(only_sc, (x, y), allow_unused=True)
    assert gx is not None and gy is None
    only_fm = sc.loss(x, y, y, empty, empty, empty, backend=backend)
    torch.testing.assert_close(only_fm, (x ** 2).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_exact_jump_is_self_consistent_and_samples_exactly(backend):
    """For N(mu, I) data the exact jump s(x, t, 2d) is the mean of its two
    d-jumps: the self-consistency part of the loss is zero to rounding; and
    1, 2 or 4 jumps map noise x0 to x0 + mu exactly."""
    dt = torch.float64 if backend != "cuda" else torch.float32
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=dt, device=DEVICE)
    model = _exact_s(mu)
    t, d = sc.sample_jumps(64, generator=torch.Generator().manual_seed(0), dtype=dt)
    t, d = t.to(DEVICE), d.to(DEVICE)
    x = torch.randn(64, 3, dtype=dt, device=DEVICE)
    s1 = model(x, t, d)
    mid = fk.euler_step(x, s1, t, t + d, "linear", "velocity", backend=backend)
    s2 = model(mid, t + d, d)
    empty = x[:0]
    assert sc.loss(empty, empty, empty, model(x, t, 2 * d), s1, s2, backend=backend) < 1e-24
    x0 = torch.randn(9, 3, dtype=dt, device=DEVICE)
    for steps in (1, 2, 4):
        torch.testing.assert_close(sc.sample(model, x0, steps, backend=backend), x0 + mu)


def test_sample_jumps_are_dyadic_and_on_their_grid():
    t, d = sc.sample_jumps(20000, max_steps=8, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    jump = 2 * d
    assert set(jump.unique().tolist()) == {1.0, 0.5, 0.25}  # 2/8 .. 1
    assert bool((t >= 0).all()) and bool((t + jump <= 1).all())
    assert torch.equal(torch.remainder(t, jump), torch.zeros_like(t))  # on the jump's grid
    with pytest.raises(ValueError, match="max_steps: expected a power of two"):
        sc.sample_jumps(4, max_steps=12)


def test_training_loss_is_the_fused_objective_of_the_recipe():
    """training_loss equals the recipe written out with the eager objective
    (same draws), and its gradients reach the model."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def model(x, t, d):
        return net(torch.cat([x, t[:, None], d[:, None]], 1))

    x1 = torch.randn(16, 2) + 1
    for backend in BACKENDS:
        net.zero_grad()
        out = sc.training_loss(model, x1, generator=torch.Generator().manual_seed(5),
                               backend=backend)
        out.backward()
        got = (out.detach(), net[0].weight.grad.clone())
        g = torch.Generator().manual_seed(5)
        x0 = torch.randn(x1.shape, generator=g)
        t_fm = torch.rand(12, generator=g)
        t_sc, d = sc.sample_jumps(4, 128, g)
        t = torch.cat([t_fm, t_sc])
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        with torch.no_grad():
            s1 = model(x_t[12:], t_sc, d)
            s2 = model(x_t[12:] + d[:, None] * s1, t_sc + d, d)
        pred = model(x_t, t, torch.cat([torch.zeros(12), 2 * d]))
        want = _eager(pred[:12], x0[:12], x1[:12], pred[12:], s1, s2)
        net.zero_grad()
        want.backward()
        torch.testing.assert_close(got[0], want.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], net[0].weight.grad, rtol=1e-4, atol=1e-6)


def test_a_small_shortcut_model_learns_one_step_generation():
    """500 steps (~1 s) on N(mu, 0.5^2 I) in 2-D: one- and two-jump samples land
    on the data's mean with a spread of the right order; untrained, far off."""
    torch.manual_seed(0)
    mu, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                              torch.nn.SiLU(), torch.nn.Linear(64, 2))

    def model(x, t, d):
        return net(torch.cat([x, t[:, None], d[:, None]], 1))

    x0 = torch.randn(4000, 2)
    before = (sc.sample(model, x0).mean(0) - mu).norm()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        x1 = mu + std * torch.randn(256, 2, generator=g)
        loss = sc.training_loss(model, x1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for steps in (1, 2):
        out = sc.sample(model, x0, steps)
        assert (out.mean(0) - mu).norm() < 0.15 < 0.5 < before
        assert bool(((out.std(0) > 0.25) & (out.std(0) < 0.75)).all()), out.std(0)


def test_errors_name_the_argument():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="x1: must have pred_fm's shape"):
        sc.loss(x, x, x[:2], x, x, x)
    with pytest.raises(ValueError, match="s2: must match pred_fm"):
        sc.loss(x, x, x, x, x, x.double())
    with pytest.raises(ValueError, match="fm_fraction"):
        sc.training_loss(lambda a, b, c: a, x, fm_fraction=2)
    with pytest.raises(TypeError, match="model: expected a callable"):
        sc.training_loss(None, x)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        sc.sample(lambda a, b, c: a, x, 0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_loss_gradcheck_forward_ad_and_compile(backend):
    """As for every op: gradcheck in float64 with forward-mode AD in both
    predictions, and torch.compile(fullgraph=True) against eager, gradients
    included."""
    g = torch.Generator().manual_seed(6)
    pf, x0, x1 = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    ps, s1, s2 = (torch.randn(2, 2, 5, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    torch.autograd.gradcheck(lambda a, b: sc.loss(a, x0, x1, b, s1, s2, backend=backend),
                             (pf.clone().requires_grad_(), ps.clone().requires_grad_()),
                             check_forward_ad=True)
    torch._dynamo.reset()
    args32 = [x.float() for x in (pf, x0, x1, ps, s1, s2)]

    def step(f):
        a, b = args32[0].clone().requires_grad_(), args32[3].clone().requires_grad_()
        out = f(a, args32[1], args32[2], b, args32[4], args32[5])
        out.backward()
        return out.detach(), a.grad, b.grad

    def fn(a, x0, x1, b, s1, s2):
        return sc.loss(a, x0, x1, b, s1, s2, backend=backend)

    torch.testing.assert_close(step(torch.compile(fn, fullgraph=True)), step(fn))
