"""flow_matching_loss with the gradient written by the forward pass.

When pred alone needs a gradient (training: x0 and x1 are noise and data) on
a native backend, the public function's node is _LossAndGrad
(flowkern/ops/training.py): flowkern::fm_loss_with_grad computes the loss
and, in the same pass, d loss / d pred for a loss gradient of 1; the backward
scales that buffer in place. These tests hold it to fm_loss's own node (x0
needing a gradient too takes that one) and to the float64 formula, through
every way autograd may call it: a plain backward, a loss gradient other than
1, reduction 'none', weights, retain_graph (a second backward recomputes),
create_graph (the differentiable formula), accumulation into .grad.
"""
import pytest
import torch

import flowkern as fk
from flowkern.backend import cpu_built

pytestmark = pytest.mark.skipif(not cpu_built(), reason="needs flowkern._C")

OPS = torch.ops.flowkern
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.float64]


def data(shape=(5, 3, 7), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, x1, p = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    t = 0.05 + 0.9 * torch.rand(shape[0], generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(shape[0], generator=g, dtype=torch.float64)
    return x0, x1, p, t.to(torch.float32), w.to(dtype)


def want_loss_and_grad(p, x0, x1, t, schedule, weight, reduction, go):
    """The float64 formula of the loss and of go-weighted d loss / d pred."""
    p64 = p.double().detach().requires_grad_(True)
    loss = fk.flow_matching_loss(p64, x0.double(), x1.double(), t.double(), schedule,
                                 weight=None if weight is None else weight.double(),
                                 reduction=reduction, backend="torch")
    (g,) = torch.autograd.grad(loss, p64, go.double())
    return loss.detach(), g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "vp"])
def test_gradient_against_float64_and_the_other_node(dtype, reduction, weighted, schedule):
    x0, x1, p0, t, w = data(dtype=dtype)
    w = w if weighted else None
    p = p0.clone().requires_grad_(True)
    loss = fk.flow_matching_loss(p, x0, x1, t, schedule, weight=w, reduction=reduction)
    assert type(loss.grad_fn).__name__ == "_LossAndGradBackward"
    go = 0.5 + torch.rand(loss.shape, dtype=dtype)  # not 1: the in-place scale matters
    (g,) = torch.autograd.grad(loss, p, go)
    want, gw = want_loss_and_grad(p0, x0, x1, t, schedule, w, reduction, go)
    tol = dict(rtol=4e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss.detach().double(), want, **tol)
    torch.testing.assert_close(g.double(), gw, **tol)
    # fm_loss's own node (x0 needs a gradient as well): the same loss, bit for bit
    p2 = p0.clone().requires_grad_(True)
    a = x0.clone().requires_grad_(True)
    loss2 = fk.flow_matching_loss(p2, a, x1, t, schedule, weight=w, reduction=reduction)
    assert type(loss2.grad_fn).__name__ != "_LossAndGradBackward"
    assert torch.equal(loss.detach(), loss2.detach())
    (g2, _) = torch.autograd.grad(loss2, (p2, a), go)
    torch.testing.assert_close(g, g2, **tol)


def test_retain_graph_and_accumulation():
    x0, x1, p0, t, _ = data(dtype=torch.float32)
    p = p0.clone().requires_grad_(True)
    loss = fk.flow_matching_loss(p, x0, x1, t)
    (g1,) = torch.autograd.grad(loss, p, retain_graph=True)
    # the second backward cannot reuse the scaled buffer: it recomputes
    (g2,) = torch.autograd.grad(loss, p, retain_graph=True)
    assert torch.equal(g1, g2)  # fm_loss_backward for a loss gradient of 1: the same bits
    assert g1.data_ptr() != g2.data_ptr()
    (g3,) = torch.autograd.grad(loss, p, torch.tensor(3.0), retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1, rtol=0, atol=4e-7 * g1.abs().max().item())
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(p.grad, 2 * g1, rtol=0, atol=0)


def test_double_backward_is_the_formula():
    """create_graph=True takes fm_loss's differentiable formula: the Hessian
    of mean((pred - y)^2) in pred is 2/N, not 0."""
    x0, x1, p0, t, w = data()
    p = p0.clone().requires_grad_(True)
    loss = fk.flow_matching_loss(p, x0, x1, t, weight=w)
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), p)
    want = 2 * w.reshape(-1, 1, 1).expand(p.shape) / p.numel()
    torch.testing.assert_close(h, want, rtol=1e-12, atol=0)


def test_gradcheck():
    x0, x1, p0, t, w = data(shape=(3, 4))
    for reduction in REDUCTIONS:
        torch.autograd.gradcheck(
            lambda p: fk.flow_matching_loss(p, x0, x1, t, "cosine", weight=w,
                                            reduction=reduction),
            (p0.clone().requires_grad_(True),))


@pytest.mark.parametrize("case", ["x0 needs grad", "float16", "bfloat16", "broadcast x0",
                                  "dual level", "t needs grad"])
def test_other_calls_take_fm_loss_node(case):
    x0, x1, p0, t, _ = data(dtype=torch.float32)
    p = p0.clone().requires_grad_(True)
    if case == "x0 needs grad":
        x0 = x0.clone().requires_grad_(True)
    elif case in ("float16", "bfloat16"):
        dt = getattr(torch, case)
        x0, x1, p = x0.to(dt), x1.to(dt), p0.to(dt).requires_grad_(True)
    elif case == "broadcast x0":
        x0 = x0[:1]
    elif case == "t needs grad":
        t = t.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="argument 't' requires grad"):
            fk.flow_matching_loss(p, x0, x1, t)
        return
    if case == "dual level":
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            loss = fk.flow_matching_loss(fwAD.make_dual(p, torch.ones_like(p)), x0, x1, t)
            assert fwAD.unpack_dual(loss).tangent is not None
        return
    loss = fk.flow_matching_loss(p, x0, x1, t)
    assert type(loss.grad_fn).__name__ != "_LossAndGradBackward"
    loss.backward()
    assert p.grad is not None and p.grad.shape == p.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_op_against_fm_loss_and_its_backward(dtype):
    """fm_loss_with_grad.nograd: the loss of fm_loss.nograd and the g_pred of
    fm_loss_backward for a loss gradient of 1, bit for bit (the same partials
    and finish; the same scaled row applied to the inputs)."""
    x0, x1, p, t, w = data(dtype=dtype)
    for red in range(3):
        for weight in (None, w):
            args = (p, x0, x1, t, 0.0, 1, [], 0, weight, red, True)
            loss, g = OPS.fm_loss_with_grad.nograd(*args)
            assert torch.equal(loss, OPS.fm_loss.nograd(*args))
            ones = torch.ones(loss.shape, dtype=dtype)
            (gb,) = OPS.fm_loss_backward(ones, p, x0, x1, t, 0.0, 1, [], 0, weight, red, 1)
            assert torch.equal(g, gb), (g - gb).abs().max()


def test_opcheck():
    x0, x1, p, t, w = data(dtype=torch.float32)
    for red in range(3):
        for weight in (None, w):
            torch.library.opcheck(OPS.fm_loss_with_grad.nograd,
                                  (p, x0, x1, t, 0.0, 2, [1.5], 1, weight, red, True))
    torch.library.opcheck(OPS.fm_loss_with_grad.nograd,
                          (p.double(), x0.double(), x1.double(), None, 0.3, 0, [], 0, None, 0,
                           True))


def test_op_refuses_inputs_that_need_a_gradient():
    x0, x1, p, t, _ = data()
    with pytest.raises(RuntimeError, match="argument 'pred' requires grad"):
        OPS.fm_loss_with_grad.nograd(p.requires_grad_(True), x0, x1, t, 0.0, 0, [], 0, None, 0,
                                     True)


def test_glue_matches_cpu_op():
    """The CUDA glue (grid simulator): the same loss and gradient, bit for bit."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x0, x1, p, t, w = data(shape=(4, 3, 1500), dtype=dtype)
        for red in range(3):
            args = (p, x0, x1, t, 0.0, 5, [0.002, 80.0, 7.0], 2, w, red, False)
            got = torch.ops.flowkern_sim.fm_loss_with_grad.nograd(*args)
            want = OPS.fm_loss_with_grad.nograd(*args)
            # the loss: another summation order (the block's tree) than the CPU's
            rtol = {torch.float64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)
            torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=0)
            assert torch.equal(got[1], want[1])
