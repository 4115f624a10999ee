"""CPU kernels on working sets larger than the last-level cache write their
outputs with cache-bypassing stores (csrc/include/flowkern/lincomb.h,
lincomb_segment's `stream`; decided in csrc/cpu/dispatch.h). The element math
is the same either way, so a streamed result must equal, bit for bit, the
same call with outputs whose 16-byte misalignments differ (which forces plain
stores). Covers the short first block that aligns a misaligned output, the
tail, in-place updates, three outputs, noise, and each dtype.

The cases are 4M elements (>= 64 MiB of inputs + outputs in fp32, twice the
32 MiB L3 of the CI machine); on a machine whose cache holds them both sides
take plain stores and the test still checks the kernels agree.
"""
import pytest
import torch

import flowkern

pytestmark = pytest.mark.skipif(not flowkern.backend.cpu_built(),
                                reason="flowkern._C not built")

ROWS, INNER = 64, 65536 + 7  # the tail of every row is not a whole block


def _buffer(shape, dtype, shift):
    """A contiguous tensor of `shape` starting `shift` elements into its storage."""
    n = torch.Size(shape).numel()
    return torch.empty(n + 16, dtype=dtype)[shift:shift + n].view(shape)


def _pair(shape, dtype, shifts):
    """Output buffers at the given storage shifts, NaN-filled."""
    return tuple(_buffer(shape, dtype, s).fill_(float("nan")) for s in shifts)


# shifts giving equal misalignment (streamable; 1 element: a short first block)
# and differing misalignment (plain stores)
STREAMED = [(0, 0, 0), (1, 1, 1)]
PLAIN = (0, 1, 2)


def _data(dtype, n_tensors, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ROWS, INNER, generator=g).to(dtype) for _ in range(n_tensors)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shifts", STREAMED)
def test_interpolate_streamed_equals_plain(dtype, shifts):
    x0, x1 = _data(dtype, 2)
    t = torch.rand(ROWS, generator=torch.Generator().manual_seed(1)).to(dtype)
    a = _pair(x0.shape, dtype, shifts[:2])
    b = _pair(x0.shape, dtype, PLAIN[:2])
    flowkern.interpolate(x0, x1, t, schedule="cosine", out=a, backend="cpu")
    flowkern.interpolate(x0, x1, t, schedule="cosine", out=b, backend="cpu")
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    ref = flowkern.interpolate(x0[:2], x1[:2], t[:2], schedule="cosine", backend="cpu")
    for u, v in zip(a, ref):
        assert torch.equal(u[:2], v)


def test_loss_backward_three_outputs_streamed():
    pred, x0, x1 = (z.requires_grad_() for z in _data(torch.float32, 3, seed=2))
    t = torch.rand(ROWS, generator=torch.Generator().manual_seed(3))
    loss = flowkern.flow_matching_loss(pred, x0, x1, t, backend="cpu")
    grads = torch.autograd.grad(loss, (pred, x0, x1))
    small = [z[:2].detach().clone().requires_grad_() for z in (pred, x0, x1)]
    # the loss is a mean over ROWS rows: the 2-row slice's grads are ROWS/2 times larger
    loss2 = flowkern.flow_matching_loss(*small, t[:2], backend="cpu") * (2 / ROWS)
    grads2 = torch.autograd.grad(loss2, small)
    for g, g2 in zip(grads, grads2):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g[:2], g2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [0, 1])
def test_em_step_streamed_equals_plain(shift):
    x, v = _data(torch.float32, 2, seed=4)
    a = _buffer(x.shape, torch.float32, shift)
    b = _buffer(x.shape, torch.float32, 3)
    flowkern.em_step(x, v, 0.3, 0.35, g=0.7, seed=11, offset=5, out=a, backend="cpu")
    flowkern.em_step(x, v, 0.3, 0.35, g=0.7, seed=11, offset=5, out=b, backend="cpu")
    assert torch.equal(a, b)
    assert a.std() > 0.1  # noise was drawn, and the outputs hold it


def test_in_place_euler_streamed():
    x, v = _data(torch.float32, 2, seed=5)
    expect = flowkern.euler_step(x[:2], v[:2], 0.2, 0.45, backend="cpu")
    y = x.clone()
    flowkern.euler_step(y, v, 0.2, 0.45, out=y, backend="cpu")
    assert torch.equal(y[:2], expect)
    torch.testing.assert_close(y, x + 0.25 * v, rtol=1e-6, atol=1e-6)
