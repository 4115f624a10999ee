"""Benchmarks of the training op family: flowkern.interpolate and
flowkern.flow_matching_loss (docs/design.md §4), against the way flow_matching and
torchcfm users write the same computation.

Shapes: (B, N/B) fp32 with B = 64 rows and N in {256k, 4M, 16M} elements;
t ~ U[0, 1] of shape (B,); schedule "linear", target "velocity" (the CondOT /
rectified-flow case, where the eager code is cheapest).

Groups (one table each in the report): "<op> · <size> · <pass>".

* interpolate · fwd — returns (x_t, u_t):
    flowkern                 flowkern.interpolate(x0, x1, t)   (auto backend)
    flowkern out=            same, into preallocated (x_t, y) buffers
    eager                    t broadcast to (B, 1); xt = t*x1 + (1-t)*x0; ut = x1 - x0
                             (torchcfm's ConditionalFlowMatcher / the flow_matching examples)
    torch.compile(eager)     the same function, compiled once outside the timer
    flow_matching            AffineProbPath(CondOTScheduler()).sample(x_0, x_1, t)
    torchcfm                 ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow
                             (it draws randn_like(x0) for its sigma * eps term even at sigma = 0;
                             that is part of what its users pay)
    copy_ roofline           buf0.copy_(x0); buf1.copy_(x1): 16 B/elem of pure streaming at
                             this size, measured like the candidates
  roofline bytes: 16 B/elem = read x0, x1 + write x_t, y.

* flow_matching_loss · fwd — the scalar loss mean((pred - u_t)^2):
    flowkern                 flowkern.flow_matching_loss(pred, x0, x1, t)
    eager                    ((pred - (x1 - x0)) ** 2).mean()  (u_t exactly as `eager` builds it;
                             x_t is not computed by any loss candidate)
    torch.compile(eager)
  roofline bytes: 12 B/elem = read pred, x0, x1.

* flow_matching_loss · fwd+bwd — loss, then torch.autograd.grad(loss, pred):
  pred requires grad, x0 / x1 / t do not (noise and data). The graph is built
  inside the timed function because backward consumes it, so the time
  INCLUDES the forward. autograd.grad returns the gradient without
  accumulating it into pred.grad (no extra pass).
  roofline bytes: 16 B/elem = read pred, x0, x1 + write grad_pred, the
  single-pass lower bound. Any forward-then-backward scheme moves more: 28
  B/elem if the backward re-reads the three inputs, 24 if the forward saves
  the residual or, as flowkern does here, the gradient itself (written by
  the forward's pass, scaled in place by the backward: docs/design.md).

Only the op is timed: inputs (and out= buffers) are made outside the timed
function, torch.set_num_threads is left at its default (unless
--bench-threads), each candidate is checked once against the eager reference
before it is timed. Tensors live on FLOWKERN_BENCH_DEVICE (default cpu; on
cuda every timed call ends with a synchronize).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import flowkern

ROWS = 64
SIZES = [pytest.param(label, n, id=label, marks=[pytest.mark.large] if n >= 1 << 24 else [])
         for label, n in (("256k", 1 << 18), ("4M", 1 << 22), ("16M", 1 << 24))]

INTERP_BYTES = (16, "reads x0, x1; writes x_t, y")
LOSS_FWD_BYTES = (12, "reads pred, x0, x1")
LOSS_FWD_BWD_BYTES = (16, "reads pred, x0, x1; writes grad_pred (single-pass lower bound)")


# ---------------------------------------------------------------------------
# the eager reference, written the way flow_matching / torchcfm write it


def eager_interpolate(x0, x1, t):
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    xt = t * x1 + (1 - t) * x0
    ut = x1 - x0
    return xt, ut


def eager_loss(pred, x0, x1, t):
    return ((pred - (x1 - x0)) ** 2).mean()


_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn) once per function; each shape compiles on its first
    call, which `measure` makes before the timer starts."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# ---------------------------------------------------------------------------
# inputs, one set per size (made once, outside every timer)

_DATA: dict = {}


def data(n, device):
    key = (n, str(device))
    if key not in _DATA:
        g = torch.Generator().manual_seed(n)
        shape = (ROWS, n // ROWS)
        made = dict(x0=torch.randn(shape, generator=g), x1=torch.randn(shape, generator=g),
                    pred=torch.randn(shape, generator=g), t=torch.rand(ROWS, generator=g))
        _DATA[key] = SimpleNamespace(**{k: v.to(device) for k, v in made.items()})
    return _DATA[key]


# ---------------------------------------------------------------------------
# interpolate: candidates return (x_t, y); None as reference means "no check"


def _fk(d):
    return lambda: flowkern.interpolate(d.x0, d.x1, d.t)


def _fk_out(d):
    out = (torch.empty_like(d.x0), torch.empty_like(d.x0))
    return lambda: flowkern.interpolate(d.x0, d.x1, d.t, out=out)


def _eager(d):
    return lambda: eager_interpolate(d.x0, d.x1, d.t)


def _compiled(d):
    f = compiled(eager_interpolate)
    return lambda: f(d.x0, d.x1, d.t)


def _flow_matching(d):
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    path = AffineProbPath(scheduler=CondOTScheduler())

    def run():
        s = path.sample(x_0=d.x0, x_1=d.x1, t=d.t)
        return s.x_t, s.dx_t
    return run


def _torchcfm(d):
    pytest.importorskip("torchcfm")
    from torchcfm import ConditionalFlowMatcher
    cfm = ConditionalFlowMatcher(sigma=0.0)

    def run():
        _, xt, ut = cfm.sample_location_and_conditional_flow(d.x0, d.x1, t=d.t)
        return xt, ut
    return run


def _copy_roofline(d):
    b0, b1 = torch.empty_like(d.x0), torch.empty_like(d.x1)
    return lambda: (b0.copy_(d.x0), b1.copy_(d.x1))


INTERP = [  # (test id, candidate, factory, checked against eager)
    ("flowkern", "flowkern", _fk, True),
    ("flowkern_out", "flowkern out=", _fk_out, True),
    ("eager", "eager", _eager, True),
    ("compile", "torch.compile(eager)", _compiled, True),
    ("flow_matching", "flow_matching AffineProbPath.sample", _flow_matching, True),
    ("torchcfm", "torchcfm CFM(sigma=0).sample_location_and_conditional_flow", _torchcfm, True),
    ("copy", "copy_ roofline (x0, x1 -> 2 buffers)", _copy_roofline, False),
]


@pytest.mark.parametrize("order", range(len(INTERP)), ids=[c[0] for c in INTERP])
@pytest.mark.parametrize("size,n", SIZES)
def test_interpolate(benchmark, measure, roofline, device, size, n, order):
    _, name, factory, check = INTERP[order]
    roofline.label(benchmark, op="interpolate", size=size, n=n, pass_="fwd", candidate=name,
                   order=order, bytes_per_elem=INTERP_BYTES[0], counted=INTERP_BYTES[1])
    d = data(n, device)
    fn = factory(d)
    if check:
        want = eager_interpolate(d.x0, d.x1, d.t)
        got = fn()
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        del want, got
    measure(fn)


# ---------------------------------------------------------------------------
# flow_matching_loss: forward, and forward + backward to pred


def _loss_fk(pred, x0, x1, t):
    return flowkern.flow_matching_loss(pred, x0, x1, t)


LOSS = [  # (test id, candidate, loss function maker)
    ("flowkern", "flowkern", lambda: _loss_fk),
    ("eager", "eager", lambda: eager_loss),
    ("compile", "torch.compile(eager)", lambda: compiled(eager_loss)),
]


def _check_loss(loss_fn, d, grad):
    pred = d.pred.detach().requires_grad_(grad)
    want = eager_loss(pred, d.x0, d.x1, d.t)
    got = loss_fn(pred, d.x0, d.x1, d.t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if grad:
        (gw,) = torch.autograd.grad(want, pred)
        (gg,) = torch.autograd.grad(got, pred)
        torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("order", range(len(LOSS)), ids=[c[0] for c in LOSS])
@pytest.mark.parametrize("size,n", SIZES)
def test_flow_matching_loss_fwd(benchmark, measure, roofline, device, size, n, order):
    _, name, make = LOSS[order]
    roofline.label(benchmark, op="flow_matching_loss", size=size, n=n, pass_="fwd",
                   candidate=name, order=order, bytes_per_elem=LOSS_FWD_BYTES[0],
                   counted=LOSS_FWD_BYTES[1])
    d = data(n, device)
    loss_fn = make()
    _check_loss(loss_fn, d, grad=False)
    pred = d.pred
    measure(lambda: loss_fn(pred, d.x0, d.x1, d.t))


@pytest.mark.parametrize("order", range(len(LOSS)), ids=[c[0] for c in LOSS])
@pytest.mark.parametrize("size,n", SIZES)
def test_flow_matching_loss_fwd_bwd(benchmark, measure, roofline, device, size, n, order):
    _, name, make = LOSS[order]
    roofline.label(benchmark, op="flow_matching_loss", size=size, n=n, pass_="fwd+bwd",
                   candidate=name, order=order, bytes_per_elem=LOSS_FWD_BWD_BYTES[0],
                   counted=LOSS_FWD_BWD_BYTES[1],
                   note="time includes the forward (the graph is rebuilt in every call)")
    d = data(n, device)
    loss_fn = make()
    _check_loss(loss_fn, d, grad=True)
    pred = d.pred.detach().requires_grad_(True)

    def step():
        loss = loss_fn(pred, d.x0, d.x1, d.t)
        (g,) = torch.autograd.grad(loss, pred)
        return loss, g
    measure(step)
