"""Training-step benchmarks of flowkern.rectified and flowkern.flowmap: the
fused ops against the eager formulations of the RectifiedFlow code (Liu et
al., github.com/gnobitab/RectifiedFlow) and of torchcfm, for a small MLP.

Self-contained (pytest-benchmark's ``benchmark`` fixture only):

    python -m pytest bench/bench_rectified.py -o python_files='bench_*.py' \
        --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds

Shapes (``SIZES``):
  toy2d   x (4096, 2),    MLP(dim 2,    hidden 128, depth 3): the demo's model
  cifar   x (128, 3072),  MLP(dim 3072, hidden 256, depth 2): image-sized rows

Groups "<objective> · <size> · <what>" where <what> is
  step  one full training step: the loss, backward and an Adam step
        (the model's forward and backward are in it, so this is what a
        user's step costs);
  loss  the objective alone with the model's output given (a leaf tensor
        standing in for the network): forward + backward of the loss with
        respect to that output, i.e. the part flowkern fuses.

Objectives and candidates (each checked against the eager one first):
  reflow     flowkern: rectified.reflow_loss (interpolate + fused flow_matching_loss)
             RectifiedFlow: z_t = t z1 + (1 - t) z0; ((z1 - z0) - v(z_t, t))^2, mean
             torchcfm: ConditionalFlowMatcher(sigma=0).sample_location_and_conditional_flow,
                       then torch.mean((v - u)^2)
  distill4   4-step distillation ‖x1 - Euler_4(x0)‖²:
             flowkern: rectified.distill_loss(steps=4) (3 ei_steps + fused flowmap_loss)
             eager: x = x + v(x, t)/4 four times, then ((x1 - x)^2).mean()
  semigroup  flow-map semigroup loss, x1 parametrisation, linear schedule:
             flowkern: flowmap.semigroup_loss (target: two ei_step jumps; the jump
                       and its error fused in flowmap_loss)
             eager: g = ((1-s)/(1-t)) x + ((s-t)/(1-t)) d̄ written out in torch
The time includes drawing t (and u); data and noise are made outside.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import flowkern as fk
from flowkern import flowmap as FM
from flowkern import rectified as RF
from flowkern.demo import toy

SIZES = {"toy2d": dict(rows=4096, dim=2, hidden=128, depth=3),
         "cifar": dict(rows=128, dim=3072, hidden=256, depth=2)}


def _setup(size, extra_time=False):
    c = SIZES[size]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = toy.MLP(dim=c["dim"], hidden=c["hidden"], depth=c["depth"], extra_time=extra_time)
    x0 = torch.randn(c["rows"], c["dim"], generator=g)
    x1 = torch.randn(c["rows"], c["dim"], generator=g)
    t = torch.rand(c["rows"], generator=g)
    return SimpleNamespace(model=model, x0=x0, x1=x1, t=t, rows=c["rows"],
                           opt=torch.optim.Adam(model.parameters(), lr=1e-4))


# ---------------------------------------------------------------------------
# reflow / 1-RF: the flow-matching loss on pairs


def reflow_flowkern(m, x0, x1, t):
    return RF.reflow_loss(m, x0, x1, t)


def reflow_rectifiedflow(m, x0, x1, t):
    # RectifiedFlow's get_train_tuple + loss (its 2-D notebook), mean over elements
    tt = t[:, None]
    z_t = tt * x1 + (1.0 - tt) * x0
    target = x1 - x0
    return (target - m(z_t, t)).pow(2).mean()


def reflow_torchcfm(m, x0, x1, t):
    from torchcfm import ConditionalFlowMatcher
    t_, xt, ut = _CFM.setdefault("cfm", ConditionalFlowMatcher(sigma=0.0)) \
        .sample_location_and_conditional_flow(x0, x1, t=t)
    return torch.mean((m(xt, t_) - ut) ** 2)


_CFM: dict = {}

# ---------------------------------------------------------------------------
# k-step distillation


def distill_flowkern(m, x0, x1, t):
    return RF.distill_loss(m, x0, x1, steps=4)


def distill_eager(m, x0, x1, t):
    x = x0
    for i in range(4):
        x = x + m(x, torch.full((x0.shape[0],), i / 4)) / 4
    return ((x1 - x) ** 2).mean()


# ---------------------------------------------------------------------------
# flow-map semigroup loss (x1 parametrisation, linear schedule)


def _times(t):
    s = t + (1 - t) * 0.75
    u = t + (s - t) * 0.5
    return 0.8 * t, s, u


_FMAPS: dict = {}


def semigroup_flowkern(m, x0, x1, t):
    fmap = _FMAPS.get(id(m))
    if fmap is None or fmap.net is not m:
        fmap = _FMAPS[id(m)] = FM.FlowMap(m, prediction="x1")
    tt, s, u = _times(t)
    return FM.semigroup_loss(fmap, x0, tt, s, u)


def semigroup_eager(m, x0, x1, t):
    tt, s, u = _times(t)

    def g(x, a, b):
        a_, b_ = a[:, None], b[:, None]
        return ((1 - b_) / (1 - a_)) * x + ((b_ - a_) / (1 - a_)) * m(x, a, b)
    with torch.no_grad():
        target = g(g(x0, tt, u), u, s)
    return ((g(x0, tt, s) - target) ** 2).mean()


OBJECTIVES = {
    "reflow": ([("flowkern", reflow_flowkern), ("RectifiedFlow (eager)", reflow_rectifiedflow),
                ("torchcfm", reflow_torchcfm)], False),
    "distill4": ([("flowkern", distill_flowkern), ("eager", distill_eager)], False),
    "semigroup": ([("flowkern", semigroup_flowkern), ("eager", semigroup_eager)], True),
}
CASES = [pytest.param(obj, i, size, id=f"{obj}-{name}-{size}")
         for obj, (cands, _) in OBJECTIVES.items() for i, (name, _) in enumerate(cands)
         for size in SIZES]


def _check(obj, fn, d):
    if fn is OBJECTIVES[obj][0][0][1]:
        want = OBJECTIVES[obj][0][1][1](d.model, d.x0, d.x1, d.t)
        got = fn(d.model, d.x0, d.x1, d.t)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("obj,idx,size", CASES)
def test_step(benchmark, obj, idx, size):
    """One training step: loss, backward, Adam."""
    cands, extra = OBJECTIVES[obj]
    name, fn = cands[idx]
    if name == "torchcfm":
        pytest.importorskip("torchcfm")
    d = _setup(size, extra)
    _check(obj, fn, d)
    benchmark.group = f"{obj} · {size} · step"
    benchmark.name = name

    def step():
        d.opt.zero_grad(set_to_none=True)
        loss = fn(d.model, d.x0, d.x1, d.t)
        loss.backward()
        d.opt.step()
        return loss
    step(), step()
    benchmark(step)


class _Given(torch.nn.Module):
    """Stands in for the network: returns a fixed leaf tensor (the model's
    output), so the benchmark times the objective alone."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, s=None):
        return self.out


LOSS_CASES = [pytest.param(obj, i, size, id=f"{obj}-{name}-{size}")
              for obj, (cands, _) in OBJECTIVES.items() if obj != "distill4"
              for i, (name, _) in enumerate(cands) for size in SIZES]


@pytest.mark.parametrize("obj,idx,size", LOSS_CASES)
def test_loss(benchmark, obj, idx, size):
    """The objective with the network replaced by a given output: forward and
    backward with respect to that output."""
    cands, _ = OBJECTIVES[obj]
    name, fn = cands[idx]
    if name == "torchcfm":
        pytest.importorskip("torchcfm")
    d = _setup(size)
    out = torch.randn_like(d.x0).requires_grad_()
    m = _Given(out)
    d.model = m
    _check(obj, fn, d)
    benchmark.group = f"{obj} · {size} · loss"
    benchmark.name = name

    def run():
        return torch.autograd.grad(fn(m, d.x0, d.x1, d.t), out)
    run(), run()
    benchmark(run)
