"""One-step objectives: MeanFlow (flowkern.meanflow) and shortcut models
(flowkern.shortcut). The fused losses against the eager formulations of the
authors' code, and (MeanFlow) a whole training step with the JVP through a
small MLP.

    python -m pytest bench/bench_one_step.py -o python_files='bench_*.py' \
        --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds

Shapes: toy2d (4096, 2) and image (128, 3072) rows.
Groups "meanflow · <size> · <what>":
  loss  the loss alone, u a leaf (the model's output) and v, du/dt given:
        forward + backward with respect to u — the part flowkern fuses.
        Candidates: flowkern (meanflow.loss: one fm_loss kernel pass per
        row and its one-pass backward, then (B,)-sized weighting), eager (the
        authors' formulation: target, delta, per-sample sum of squares,
        adaptive weight, mean), compiled (torch.compile of eager).
  step  one training step of an MLP u(z, t, s): interpolate, JVP through the
        model (forward_ad), loss, backward, Adam. flowkern
        (meanflow.training_loss) vs eager (z_t, v by torch ops, torch.func.jvp,
        the eager loss).
Groups "shortcut · <size> · loss": the shortcut objective alone (3/4 of the
  rows flow matching, 1/4 self-consistency; the predictions a leaf): flowkern
  (shortcut.loss: two fused fm_loss passes) vs eager (the authors': the
  targets concatenated, then mean((pred - target)^2)) vs compiled.
"""
from __future__ import annotations

import pytest
import torch

import flowkern as fk

mf = fk.meanflow
SIZES = {"toy2d": (4096, 2), "image": (128, 3072)}


def eager_loss(u, v, dudt, t, s, power=1.0, eps=1e-3):
    """As in the MeanFlow reference code: stop-gradient target, per-sample
    squared norm, adaptive weight 1 / (|delta|^2 + c)^p, batch mean."""
    u_tgt = (v + (s - t)[:, None] * dudt).detach()
    sq = ((u - u_tgt) ** 2).sum(1)
    w = 1.0 / (sq.detach() + eps) ** power
    return (w * sq).mean()


_compiled = torch.compile(eager_loss, dynamic=False)


def _data(size):
    rows, dim = SIZES[size]
    g = torch.Generator().manual_seed(0)
    u, v, d = (torch.randn(rows, dim, generator=g) for _ in range(3))
    t = torch.rand(rows, generator=g) * 0.5
    return u.requires_grad_(), v, d, t, t + 0.3


LOSSES = {"flowkern": lambda u, v, d, t, s: mf.loss(u, v, d, t, s, backend="cpu"),
          "eager": eager_loss, "compiled": _compiled}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", LOSSES)
def test_loss(benchmark, name, size):
    args = _data(size)
    _time_loss(benchmark, f"meanflow · {size} · loss", name, LOSSES[name], eager_loss, args)


def _time_loss(benchmark, group, name, fn, eager, args):
    """Checks fn against the eager loss, then times its forward + backward with
    respect to args[0] (the model's output, a leaf)."""
    torch.testing.assert_close(fn(*args), eager(*args), rtol=1e-4, atol=1e-6)
    benchmark.group, benchmark.name = group, name

    def run():
        return torch.autograd.grad(fn(*args), args[0])
    run(), run()
    benchmark(run)


class _MLP(torch.nn.Module):
    def __init__(self, dim, hidden=256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, z, t, s):
        return self.net(torch.cat([z, t[:, None], s[:, None]], 1))


def flowkern_step(model, x1, x0, t, s):
    return mf.training_loss(model, x1, x0, t, s, backend="cpu")


def eager_step(model, x1, x0, t, s):
    z = t[:, None] * x1 + (1 - t[:, None]) * x0
    v = x1 - x0
    u, dudt = torch.func.jvp(model, (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    return eager_loss(u, v, dudt, t, s)


STEPS = {"flowkern": flowkern_step, "eager": eager_step}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", STEPS)
def test_step(benchmark, name, size):
    rows, dim = SIZES[size]
    torch.manual_seed(0)
    model = _MLP(dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    t, s = mf.sample_times(rows, generator=g)
    fn = STEPS[name]
    torch.testing.assert_close(fn(model, x1, x0, t, s), eager_step(model, x1, x0, t, s),
                               rtol=1e-4, atol=1e-6)
    benchmark.group = f"meanflow · {size} · step"
    benchmark.name = name

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fn(model, x1, x0, t, s)
        loss.backward()
        opt.step()
        return loss
    step(), step()
    benchmark(step)


def eager_shortcut(pred, x0, x1, s1, s2):
    """As in the shortcut-model reference code: one target tensor (flow-matching
    rows then self-consistency rows), the mean squared error against it."""
    target = torch.cat([x1 - x0, ((s1 + s2) / 2).detach()])
    return ((pred - target) ** 2).mean()


_compiled_shortcut = torch.compile(eager_shortcut, dynamic=False)
SHORTCUT = {"flowkern": lambda p, a, b, c, d: fk.shortcut.loss(p[:a.shape[0]], a, b,
                                                             p[a.shape[0]:], c, d,
                                                             backend="cpu"),
            "eager": eager_shortcut, "compiled": _compiled_shortcut}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", SHORTCUT)
def test_shortcut_loss(benchmark, name, size):
    rows, dim = SIZES[size]
    g = torch.Generator().manual_seed(0)
    n_fm = rows * 3 // 4
    pred = torch.randn(rows, dim, generator=g).requires_grad_()
    x0, x1 = (torch.randn(n_fm, dim, generator=g) for _ in range(2))
    s1, s2 = (torch.randn(rows - n_fm, dim, generator=g) for _ in range(2))
    _time_loss(benchmark, f"shortcut · {size} · loss", name, SHORTCUT[name], eager_shortcut,
               (pred, x0, x1, s1, s2))
