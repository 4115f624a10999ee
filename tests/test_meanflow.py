"""MeanFlow (flowkern.meanflow): the fused loss against its eager formulation
in every dtype, the MeanFlow identity on a model whose average velocity is
known in closed form, one- and two-step sampling, the time sampler, the
errors, and the DDP pattern."""
import os
import socket

import pytest
import torch

import flowkern as fk
from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close

BACKENDS = backends_under_test()
mf = fk.meanflow


def _rho(t):
    return t ** 2 + (1 - t) ** 2


def _exact_u(mu):
    """Data N(mu, I) on the linear path: z_t ~ N(t mu, rho(t) I) with
    rho(t) = t^2 + (1 - t)^2, the flow map z_s = s mu + sqrt(rho(s)/rho(t)) (z_t - t mu),
    and u(z, t, s) = (z_s - z) / (s - t) (the marginal velocity at s = t)."""
    def u(z, t, s):
        t_, s_ = t[:, None], s[:, None]
        c = z - t_ * mu
        h = s_ - t_
        same = h.abs() < 1e-12
        ratio = torch.sqrt(_rho(s_) / _rho(t_))
        jump = mu + c * (ratio - 1) / torch.where(same, torch.ones_like(h), h)
        v = mu + c * (2 * t_ - 1) / _rho(t_)
        return torch.where(same, v, jump)
    return u


def _marginal_v(mu, z, t):
    t_ = t[:, None]
    return mu + (z - t_ * mu) * (2 * t_ - 1) / _rho(t_)


@pytest.mark.parametrize("jvp", ["forward_ad", "func"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_meanflow_identity_holds_for_the_exact_average_velocity(backend, jvp):
    """u = v + (s - t) du/dt exactly for the true average velocity and the
    marginal v: the fused loss (no weighting) is zero to rounding; the
    opposite sign of the (s - t) term is not."""
    mu = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64, device=DEVICE)
    z = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    t = torch.linspace(0.05, 0.65, 7, dtype=torch.float64, device=DEVICE)
    s = torch.minimum(t + torch.linspace(0.0, 0.3, 7, dtype=torch.float64, device=DEVICE),
                      torch.ones_like(t))
    v = _marginal_v(mu, z, t)
    u, dudt = mf._jvp(_exact_u(mu), z, t, s, v, jvp)
    dt = torch.float64 if backend != "cuda" else torch.float32
    u, v, dudt = u.to(dt), v.to(dt), dudt.to(dt)
    assert mf.loss(u, v, dudt, t.to(dt), s.to(dt), power=0, backend=backend) < 1e-20 * 7
    flipped = ((u - v + (s - t)[:, None] * dudt) ** 2).sum(1).mean()
    assert flipped > 1e-3


def _eager_loss(u, v, dudt, t, s, power, eps):
    """The MeanFlow loss as its authors write it, in float64."""
    u, v, dudt = u.double(), v.double(), dudt.double()
    h = (s - t).double().reshape(-1, *[1] * (u.dim() - 1))
    delta = u - (v + h * dudt).detach()
    sq = delta.pow(2).reshape(u.shape[0], -1).sum(1)
    w = (sq.detach() + eps).pow(-power)
    return (w * sq).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("shape", [(5, 3, 7), (6, 3, 32, 32), (4097, 2)],
                         ids=["odd", "image", "toy2d"])
def test_fused_loss_matches_the_eager_formulation(backend, power, shape):
    """Odd sizes, an image batch (3072-wide rows: long reductions) and the
    2-D toy's narrow rows (4097 of them: one past a power of two)."""
    for dtype in dtypes_for(backend):
        g = torch.Generator().manual_seed(3)
        B = shape[0]
        u64, v64, d64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 3
                         for _ in range(3))
        t = torch.rand(B, generator=g, dtype=torch.float64) * 0.5
        s = t + 0.4
        u, v, d = (x.to(DEVICE, dtype) for x in (u64, v64, d64))
        tt, ss = t.to(DEVICE), s.to(DEVICE)
        u.requires_grad_()
        out = mf.loss(u, v, d, tt, ss, power=power, backend=backend)
        (gu,) = torch.autograd.grad(out, u)
        ref_u = u.detach().double().requires_grad_()
        ref = _eager_loss(ref_u, v, d, tt, ss, power, 1e-3)
        (ref_g,) = torch.autograd.grad(ref, ref_u)
        # PyTorch's own error in this dtype: the eager formula evaluated in it
        ud = u.detach().requires_grad_()
        h = (ss - tt).to(dtype).reshape(-1, *[1] * (len(shape) - 1))
        naive_sq = (ud - (v + h * d)).pow(2).reshape(B, -1).sum(1)
        naive = ((naive_sq.detach() + 1e-3).pow(-power) * naive_sq).mean()
        (naive_g,) = torch.autograd.grad(naive, ud)
        assert out.dtype == dtype and gu.dtype == dtype
        assert_close(out.detach().reshape(1), ref.detach().reshape(1), naive.detach().reshape(1),
                     f"{backend} {dtype} loss", factor=4)
        # d/du = 2 w_b / B * Delta. Delta = u - (v + h du/dt) is formed by
        # cancellation, so its rounding scales with its terms, amplified by
        # w_b (up to 1/eps on rows with a small Delta): the scale is
        # max 2 w_b / B (|u| + |v| + |h du/dt|). The op's chain (the mean's
        # 1/B, the weight, x inner then the kernel's 1/inner, Delta's two
        # roundings) has ~6 roundings where float64's naive formula is the
        # reference itself (naive error 0): an 8-ulp floor (seen: 4.4).
        u64_, v64_, d64_ = (x.detach().double() for x in (u, v, d))
        h64 = (ss - tt).double().reshape(-1, *[1] * (len(shape) - 1))
        sq64 = (u64_ - v64_ - h64 * d64_).pow(2).reshape(B, -1).sum(1)
        w64 = (sq64 + 1e-3).pow(-power).reshape(h64.shape)
        terms = 2 * w64 / B * (u64_.abs() + v64_.abs() + (h64 * d64_).abs())
        assert_close(gu, ref_g, naive_g, f"{backend} {dtype} grad", factor=4, ulps=8,
                     scale=terms.max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_broadcasts_float_times_and_differentiates_u_only(backend):
    u = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    v = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    d = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    out = mf.loss(u, v, d, 0.2, 0.7, backend=backend)
    gu, gv, gd = torch.autograd.grad(out, (u, v, d), allow_unused=True)
    assert gu is not None and gv is None and gd is None  # the target is stop-gradient
    ref = mf.loss(u, v, d, torch.full((4,), 0.2, device=DEVICE),
                  torch.full((4,), 0.7, device=DEVICE), backend="torch")
    torch.testing.assert_close(out, ref)


def test_training_loss_composes_interpolate_jvp_and_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def model(z, t, s):
        return net(torch.cat([z, t[:, None], s[:, None]], 1))

    x1, x0 = torch.randn(9, 2) + 2, torch.randn(9, 2)
    t, s = mf.sample_times(9, ratio=0.5, generator=torch.Generator().manual_seed(1))
    losses = []
    for jvp in ("forward_ad", "func"):
        for backend in BACKENDS:
            net.zero_grad()
            out = mf.training_loss(model, x1, x0, t, s, "cosine", jvp=jvp, backend=backend)
            out.backward()
            losses.append((out.detach(), net[0].weight.grad.clone()))
    z, v = fk.interpolate(x0, x1, t, "cosine", backend="torch")
    u, dudt = torch.func.jvp(model, (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    want = _eager_loss(u, v, dudt, t, s, 1.0, 1e-3)
    net.zero_grad()
    want.backward()
    for out, grad in losses:
        torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, net[0].weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_and_two_step_sampling_are_exact_for_the_exact_model(backend):
    """For N(mu, I) data the exact average velocity maps noise to data in
    one jump: z_1 = mu + x0; with two jumps as well."""
    dt = torch.float64 if backend != "cuda" else torch.float32
    mu = torch.tensor([1.5, -2.0], dtype=dt, device=DEVICE)
    x0 = torch.randn(11, 2, dtype=dt, device=DEVICE)
    for steps in (1, 2):
        out = mf.sample(_exact_u(mu), x0, steps=steps, backend=backend)
        torch.testing.assert_close(out, x0 + mu)
    out = mf.sample(_exact_u(mu), x0, times=[0.0, 0.3, 1.0], backend=backend)
    torch.testing.assert_close(out, x0 + mu)


def test_a_small_meanflow_learns_a_one_step_map():
    """Trained for 500 steps (~1.5 s) on N(mu, 0.5^2 I) in 2-D, one-step
    samples land on the data's mean; their spread comes out at 0.75-0.85x
    the data's at this budget (a small model's known regression to the mean;
    wider with more training), so the bound is loose; the untrained model
    is far off."""
    torch.manual_seed(0)
    mu, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                              torch.nn.SiLU(), torch.nn.Linear(64, 2))

    def model(z, t, s):
        return net(torch.cat([z, t[:, None], s[:, None]], 1))

    x0 = torch.randn(4000, 2)
    before = (mf.sample(model, x0).mean(0) - mu).norm()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        x1 = mu + std * torch.randn(256, 2, generator=g)
        t, s = mf.sample_times(256, 0.25, std=2.0, generator=g)  # more mass near the ends
        loss = mf.training_loss(model, x1, t=t, s=s, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for steps in (1, 2):
        out = mf.sample(model, x0, steps=steps)
        assert (out.mean(0) - mu).norm() < 0.15 < 0.5 < before
        assert bool(((out.std(0) > 0.3) & (out.std(0) < 0.6)).all()), out.std(0)


def test_sample_times():
    g = torch.Generator().manual_seed(0)
    t, s = mf.sample_times(10000, ratio=0.25, generator=g)
    assert t.shape == s.shape == (10000,) and bool((t <= s).all())
    assert bool(((t > 0) & (s < 1)).all())
    frac = (s > t).float().mean().item()
    assert abs(frac - 0.25) < 0.02
    t2, s2 = mf.sample_times(10000, ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(s, s2)
    t, s = mf.sample_times(100, ratio=0.0)
    assert torch.equal(t, s)


def test_errors_name_the_argument():
    u = torch.randn(3, 4)
    with pytest.raises(ValueError, match="v: must match u"):
        mf.loss(u, torch.randn(3, 5), u, 0.1, 0.2)
    with pytest.raises(ValueError, match="eps: must be > 0"):
        mf.loss(u, u, u, 0.1, 0.2, eps=0.0)
    with pytest.raises(ValueError, match="power"):
        mf.loss(u, u, u, 0.1, 0.2, power=-1)
    with pytest.raises(ValueError, match="t: times must lie in"):
        mf.loss(u, u, u, 1.5, 0.2)
    model = lambda z, t, s: z  # noqa: E731
    with pytest.raises(ValueError, match="s: every s must be >= its t"):
        mf.training_loss(model, u, t=torch.full((3,), 0.5), s=torch.full((3,), 0.4))
    with pytest.raises(ValueError, match="s: give t and s together"):
        mf.training_loss(model, u, t=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="jvp: expected"):
        mf.training_loss(model, u, jvp="reverse")
    with pytest.raises(TypeError, match="model: expected a callable"):
        mf.training_loss(None, u)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        mf.sample(model, u, steps=0)
    with pytest.raises(ValueError, match="times: expected an increasing grid"):
        mf.sample(model, u, times=[0.0, 0.6, 0.5])
    with pytest.raises(ValueError, match="ratio"):
        mf.sample_times(4, ratio=1.5)


# -- DDP: through the wrapper the gradients are all-reduced; through .module not


def _ddp_rank(rank, port, via, queue):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(_Net())
    g = torch.Generator().manual_seed(100 + rank)
    x1 = torch.randn(8, 2, generator=g) + 3
    model = ddp if via != "module" else ddp.module
    fk.meanflow.training_loss(model, x1, generator=g, jvp="func" if via == "func" else
                              "forward_ad", backend="torch").backward()
    queue.put((rank, ddp.module.l.weight.grad.tolist()))
    dist.barrier()
    dist.destroy_process_group()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 2)

    def forward(self, z, t, s):
        return self.l(torch.cat([z, t[:, None], s[:, None]], 1))


def _local_grad(rank):
    torch.manual_seed(0)
    net = _Net()
    g = torch.Generator().manual_seed(100 + rank)
    x1 = torch.randn(8, 2, generator=g) + 3
    fk.meanflow.training_loss(net, x1, generator=g, backend="torch").backward()
    return net.l.weight.grad


def test_ddp_gradients_are_synchronised_through_the_wrapper():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    average = (_local_grad(0) + _local_grad(1)) / 2
    assert not torch.allclose(_local_grad(0), _local_grad(1))
    for via in ("forward_ad", "func", "module"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_ddp_rank, args=(r, port, via, queue)) for r in range(2)]
        for p in procs:
            p.start()
        grads = dict(queue.get(timeout=120) for _ in range(2))
        for p in procs:
            p.join(timeout=60)
        g0, g1 = torch.tensor(grads[0]), torch.tensor(grads[1])
        if via == "module":  # the pitfall: no all-reduce, each rank its own gradient
            assert not torch.allclose(g0, g1)
        else:
            torch.testing.assert_close(g0, g1)
            torch.testing.assert_close(g0, average, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_loss_gradcheck_forward_ad_and_compile(backend):
    """As for every op: gradcheck in float64 with forward-mode AD (power = 0:
    with power > 0 the weight is stop-gradient, which finite differences do
    not see), the tangent with the adaptive weight against the torch backend,
    and torch.compile(fullgraph=True) against eager, gradient included."""
    g = torch.Generator().manual_seed(5)
    u, v, d = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    t = torch.rand(4, generator=g, dtype=torch.float64).to(DEVICE) * 0.5
    s = t + 0.3
    torch.autograd.gradcheck(lambda a: mf.loss(a, v, d, t, s, power=0.0, backend=backend),
                             (u.clone().requires_grad_(),), check_forward_ad=True)
    du = torch.randn(u.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.func.jvp(lambda a: mf.loss(a, v, d, t, s, backend=backend), (u,), (du,))
    ref = torch.func.jvp(lambda a: mf.loss(a, v, d, t, s, backend="torch"), (u,), (du,))
    torch.testing.assert_close(got, ref)

    torch._dynamo.reset()
    u32, v32, d32, t32, s32 = (x.float() for x in (u, v, d, t, s))

    def step(f):
        a = u32.clone().requires_grad_()
        out = f(a, v32, d32, t32, s32)
        out.backward()
        return out.detach(), a.grad

    def fn(a, v, d, t, s):
        return mf.loss(a, v, d, t, s, backend=backend)

    torch.testing.assert_close(step(torch.compile(fn, fullgraph=True)), step(fn))
