"""flowkern/cuda's tensor glue without a GPU: flowkern._cuda is replaced by a
stand-in with the launchers' exact signatures (csrc/cuda/launchers.h) that
reads and writes the host memory behind the pointers it is given and runs the
grid simulator on it. Wrong pointer order, dtype codes, sizes or output
allocation in the glue then show up as wrong results on CPU tensors."""
import contextlib
import ctypes
import math
import sys

import pytest
import torch

import flowkern._C  # noqa: F401
from flowkern.cuda import _launch
from flowkern.cuda import training as fkc

OPS = torch.ops.flowkern
DTYPES = {0: torch.float32, 1: torch.float64, 2: torch.float16, 3: torch.bfloat16}
MAX_BLOCKS = 3


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def at(ptr, shape, dtype):
    """The tensor living at host address ptr."""
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    buf = (ctypes.c_byte * (n * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class SimLib:
    """flowkern._cuda as seen by the glue, backed by the grid simulator."""

    def __init__(self):
        self.calls = []

    def _lincomb(self, op, dtype, rows, inner, ins, coef, grad_rows, params, outs, stream,
                 max_blocks):
        self.calls.append((op, stream, max_blocks))
        T = DTYPES[dtype]
        x = [at(p, (rows, inner), T) for p in ins]
        c = at(coef, (rows, 4), acc(T))
        g = at(grad_rows, (rows,), acc(T)) if grad_rows is not None else None
        res, _ = OPS._sim_lincomb(op, x, c, g, list(params), max_blocks, 0)
        for p, r in zip(outs, res):
            at(p, (rows, inner), T).copy_(r)
        return 0

    def interpolate(self, dtype, rows, inner, x0, x1, coef, target, xt, y, stream, max_blocks):
        return self._lincomb("interpolate", dtype, rows, inner, [x0, x1], coef, None, [target],
                             [xt, y], stream, max_blocks)

    def interpolate_backward(self, dtype, rows, inner, g_xt, g_y, coef, target, g_x0, g_x1,
                             stream, max_blocks):
        return self._lincomb("interpolate_backward", dtype, rows, inner, [g_xt, g_y], coef,
                             None, [target], [g_x0, g_x1], stream, max_blocks)

    def convert(self, dtype, rows, inner, x, pred, coef, src, dst, out, stream, max_blocks):
        return self._lincomb("convert", dtype, rows, inner, [x, pred], coef, None, [src, dst],
                             [out], stream, max_blocks)

    def convert_backward(self, dtype, rows, inner, g, coef, src, dst, g_x, g_pred, stream,
                         max_blocks):
        return self._lincomb("convert_backward", dtype, rows, inner, [g], coef, None,
                             [src, dst], [g_x, g_pred], stream, max_blocks)

    def fm_loss_backward(self, dtype, rows, inner, grad_rows, pred, x0, x1, coef, target,
                         g_pred, g_x0, g_x1, stream, max_blocks):
        return self._lincomb("fm_loss_backward", dtype, rows, inner, [pred, x0, x1], coef,
                             grad_rows, [target], [g_pred, g_x0, g_x1], stream, max_blocks)

    def fm_loss_partial(self, dtype, rows, inner, pred, x0, x1, coef, target, partial,
                        chunk_len, stream):
        self.calls.append(("fm_loss_partial", stream, None))
        T = DTYPES[dtype]
        x = [at(p, (rows, inner), T) for p in (pred, x0, x1)]
        res, plan = OPS._sim_fm_loss_partial(*x, at(coef, (rows, 4), acc(T)), target, chunk_len)
        at(partial, (rows, plan[2]), acc(T)).copy_(res)
        return 0

    def plan_rowsum(self, rows, inner, chunk_len):
        return tuple(OPS._sim_plan_rowsum(rows, inner, chunk_len))

    def error_string(self, code):
        return f"simulated error {code}"


@pytest.fixture
def sim(monkeypatch):
    lib = SimLib()

    @contextlib.contextmanager
    def device_of(t):
        yield 1234, MAX_BLOCKS

    monkeypatch.setattr(_launch, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_launch, "lib", lambda: lib)
    monkeypatch.setattr(_launch, "device_of", device_of)
    return lib


def tensors(n, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n)]


def coef_for(rows, seed=0):
    """float64 on purpose: the glue converts it to the accumulation dtype."""
    gen = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(rows, generator=gen, dtype=torch.float64)
    return torch.stack([t, 1 - t, torch.ones_like(t), -torch.ones_like(t)], 1)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 8), (3, 1023), (0, 4)], ids=str)
def test_glue_matches_cpu_kernels(sim, dtype, shape):
    rows = shape[0]
    x0, x1, pred = tensors(3, shape, dtype)
    coef = coef_for(rows)
    c = coef.to(acc(dtype))
    x1_t = x1.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous input
    for target in range(4):
        for got, want in zip(fkc.interpolate(x0, x1_t, coef, target),
                             OPS.interpolate(x0, x1, c, target)):
            assert torch.equal(got, want)
        for got, want in zip(fkc.interpolate_backward(x0, x1_t, coef, target),
                             OPS.interpolate_backward(x0, x1, c, target)):
            assert torch.equal(got, want)
        torch.testing.assert_close(fkc.fm_loss_rows(pred, x0, x1_t, coef, target),
                                   OPS.fm_loss_rows(pred, x0, x1, c, target), rtol=1e-5,
                                   atol=0)
        g = torch.randn(rows, dtype=torch.float64)
        for got, want in zip(fkc.fm_loss_backward(g, pred, x0, x1_t, coef, target),
                             OPS.fm_loss_backward(g.to(acc(dtype)), pred, x0, x1, c, target)):
            assert torch.equal(got, want)
    for src in range(4):
        for dst in range(4):
            assert torch.equal(fkc.convert(x0, x1_t, coef, src, dst),
                               OPS.convert(x0, x1, c, src, dst))
            for got, want in zip(fkc.convert_backward(x1_t, coef, src, dst),
                                 OPS.convert_backward(x1, c, src, dst)):
                assert torch.equal(got, want)
    if rows:
        assert {s for _, s, _ in sim.calls} == {1234}
        assert {m for _, _, m in sim.calls} == {MAX_BLOCKS, None}


def test_out_buffers_are_written_in_place(sim):
    x0, x1 = tensors(2, (4, 16), torch.float32)
    xt, y = torch.empty_like(x0), torch.empty_like(x0)
    rxt, ry = fkc.interpolate(x0, x1, coef_for(4), 0, xt=xt, y=y)
    assert rxt is xt and ry is y
    assert torch.equal(xt, OPS.interpolate(x0, x1, coef_for(4).float(), 0)[0])
    with pytest.raises(ValueError, match="xt: must be contiguous"):
        fkc.interpolate(x0, x1, coef_for(4), 0, xt=torch.empty(16, 4).t())


def test_bad_metadata_names_the_argument(sim):
    x0, x1 = tensors(2, (4, 16), torch.float32)
    with pytest.raises(ValueError, match="x1: expected"):
        fkc.interpolate(x0, x1[:, :8], coef_for(4), 0)
    with pytest.raises(ValueError, match="coef: expected shape"):
        fkc.interpolate(x0, x1, coef_for(3), 0)
    with pytest.raises(TypeError, match="x0: dtype torch.int32"):
        fkc.interpolate(x0.int(), x1.int(), coef_for(4), 0)


def test_launch_error_names_the_fallback(sim, monkeypatch):
    monkeypatch.setattr(sim, "interpolate", lambda *a: 35)
    x0, x1 = tensors(2, (2, 8), torch.float32)
    with pytest.raises(RuntimeError, match=r"error 35 \(simulated error 35\).*backend='triton' "
                                           r"or 'torch'"):
        fkc.interpolate(x0, x1, coef_for(2), 0)


def test_missing_module_names_the_fallback(monkeypatch):
    _launch.lib.cache_clear()
    monkeypatch.setitem(sys.modules, "flowkern._cuda", None)  # import raises ImportError
    try:
        with pytest.raises(RuntimeError, match="flowkern._cuda is not available.*"
                                               "backend='triton' or 'torch'"):
            _launch.lib()
    finally:
        _launch.lib.cache_clear()


def test_cpu_tensors_are_rejected():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="x0: the cuda backend needs CUDA tensors"):
        fkc.interpolate(x, x, coef_for(2), 0)
