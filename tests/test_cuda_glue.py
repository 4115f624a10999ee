"""flowkern/cuda's tensor glue without a GPU: flowkern._cuda is replaced by a
stand-in with the launchers' exact signatures (csrc/cuda/launchers.h) that
reads and writes the host memory behind the pointers it is given and runs the
grid simulator on it. Wrong pointer order, dtype codes, sizes or output
allocation in the glue then show up as wrong results on CPU tensors."""
import contextlib
import ctypes
import inspect
import math
import sys
import types

import pytest
import torch

import flowkern
import flowkern._C  # noqa: F401
from cuda_sim_helpers import assert_within_fp32_ulp
from flowkern.cuda import _launch
from flowkern.cuda import fields as fkf
from flowkern.cuda import flowmap as fkm
from flowkern.cuda import steps as fks
from flowkern.cuda import training as fkc
from flowkern.ops import flowmap as ops_flowmap

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

    def fm_loss_backward_pred(self, dtype, rows, inner, grad_rows, pred, x0, x1, coef, target,
                              g_pred, stream, max_blocks):
        return self._lincomb("fm_loss_backward_pred", dtype, rows, inner, [pred, x0, x1], coef,
                             grad_rows, [target], [g_pred], stream, max_blocks)

    def fm_loss_partial(self, dtype, rows, inner, pred, x0, x1, coef, target, partial,
                        chunk_len, stream):
        self.calls.append(("fm_loss_partial", stream, None))
        T = DTYPES[dtype]
        x = [at(p, (rows, inner), T) for p in (pred, x0, x1)]
        res, plan = OPS._sim_fm_loss_partial(*x, at(coef, (rows, 4), acc(T)), target, chunk_len)
        at(partial, (rows, plan[2]), acc(T)).copy_(res)
        return 0

    # ------------------------------------------------------ sampler steps
    # As steps.cu: absent tensors are 0 and dropped, an unconditional
    # prediction selects guidance, dpmpp_2m_step passes x for an absent d_prev.

    def _step(self, op, dtype, rows, inner, ins, coef, coef_rows, outs, stream, max_blocks,
              prediction=0, variant=0, cfg=False, guidance=1.0, seed=0, offset=0):
        self.calls.append((op, stream, max_blocks))
        # pybind11 would reject what its int / uint64 / double casters cannot take.
        for a in (dtype, rows, inner, *ins, coef, coef_rows, *outs, stream, max_blocks,
                  prediction, variant, offset):
            assert isinstance(a, int) and not isinstance(a, bool), (op, a)
        assert isinstance(guidance, float) and 0 <= seed < 2 ** 64, (op, guidance, seed)
        if rows * inner == 0:
            return 0
        T = DTYPES[dtype]
        x = [at(p, (rows, inner), T) for p in ins if p]
        c = at(coef, (coef_rows, 12), acc(T))
        res, _ = OPS._sim_step(op, x, c, prediction, variant, cfg, guidance,
                               seed - 2 ** 64 if seed >= 2 ** 63 else seed, offset,
                               max_blocks, 0)
        for p, r in zip([p for p in outs if p], res, strict=True):
            at(p, (rows, inner), T).copy_(r)
        return 0

    def euler_step(self, dtype, rows, inner, x, pred, pred_uncond, coef, coef_rows,
                   prediction, guidance, out, stream, max_blocks):
        return self._step("euler_step", dtype, rows, inner, [x, pred, pred_uncond], coef,
                          coef_rows, [out], stream, max_blocks, prediction, 0,
                          pred_uncond != 0, guidance)

    def heun_step(self, dtype, rows, inner, x, pred, x_euler, pred_euler, pred_uncond,
                  pred_euler_uncond, coef, coef_rows, prediction, guidance, out, stream,
                  max_blocks):
        return self._step("heun_step", dtype, rows, inner,
                          [x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond], coef,
                          coef_rows, [out], stream, max_blocks, prediction, 0,
                          pred_uncond != 0, guidance)

    def ei_step(self, dtype, rows, inner, x, pred, pred_uncond, coef, coef_rows, prediction,
                form, guidance, out, stream, max_blocks):
        return self._step("ei_step", dtype, rows, inner, [x, pred, pred_uncond], coef,
                          coef_rows, [out], stream, max_blocks, prediction, form,
                          pred_uncond != 0, guidance)

    def ei_step_backward(self, dtype, rows, inner, grad, coef, coef_rows, prediction, form,
                         guidance, g_x, g_pred, g_pred_uncond, stream, max_blocks):
        return self._step("ei_step_backward", dtype, rows, inner, [grad], coef, coef_rows,
                          [g_x, g_pred, g_pred_uncond], stream, max_blocks, prediction, form,
                          g_pred_uncond != 0, guidance)

    def dpmpp_2m_step(self, dtype, rows, inner, x, pred, d_prev, pred_uncond, coef,
                      coef_rows, prediction, guidance, out, d_out, stream, max_blocks):
        return self._step("dpmpp_2m_step", dtype, rows, inner,
                          [x, pred, d_prev or x, pred_uncond], coef, coef_rows, [out, d_out],
                          stream, max_blocks, prediction, int(d_prev != 0), pred_uncond != 0,
                          guidance)

    def em_step(self, dtype, rows, inner, x, pred, pred_uncond, coef, coef_rows, prediction,
                guidance, seed, offset, out, stream, max_blocks):
        return self._step("em_step", dtype, rows, inner, [x, pred, pred_uncond], coef,
                          coef_rows, [out], stream, max_blocks, prediction, 0,
                          pred_uncond != 0, guidance, seed, offset)

    def churn(self, dtype, rows, inner, x, coef, coef_rows, seed, offset, out, stream,
              max_blocks):
        return self._step("churn", dtype, rows, inner, [x], coef, coef_rows, [out], stream,
                          max_blocks, seed=seed, offset=offset)

    # ------------------------------------------------------ flow-map loss
    # As flowmap.cu: an absent optional gradient is 0 and not computed.

    def flowmap_loss_partial(self, dtype, rows, inner, x, pred, target, coef, coef_rows,
                             prediction, form, partial, chunk_len, stream):
        self.calls.append(("flowmap_loss_partial", stream, None))
        for a in (dtype, rows, inner, x, pred, target, coef, coef_rows, prediction, form,
                  partial, chunk_len, stream):
            assert isinstance(a, int) and not isinstance(a, bool), a
        T = DTYPES[dtype]
        ins = [at(p, (rows, inner), T) for p in (x, pred, target)]
        res, plan = OPS._sim_flowmap_loss_partial(*ins, at(coef, (coef_rows, 12), acc(T)),
                                                  prediction, form, chunk_len)
        at(partial, (rows, plan[2]), acc(T)).copy_(res)
        return 0

    def flowmap_loss_backward(self, dtype, rows, inner, grad_rows, x, pred, target, coef,
                              coef_rows, prediction, form, g_pred, g_x, g_target, stream,
                              max_blocks):
        self.calls.append(("flowmap_loss_backward", stream, max_blocks))
        for a in (dtype, rows, inner, grad_rows, x, pred, target, coef, coef_rows, prediction,
                  form, g_pred, g_x, g_target, stream, max_blocks):
            assert isinstance(a, int) and not isinstance(a, bool), a
        if rows * inner == 0:
            return 0
        T = DTYPES[dtype]
        ins = [at(p, (rows, inner), T) for p in (x, pred, target)]
        res, _ = OPS._sim_flowmap_loss_backward(
            at(grad_rows, (rows,), acc(T)), *ins, at(coef, (coef_rows, 12), acc(T)), prediction,
            form, g_x != 0, g_target != 0, max_blocks, 0)
        for p, r in zip([p for p in (g_pred, g_x, g_target) if p], res, strict=True):
            at(p, (rows, inner), T).copy_(r)
        return 0

    # ------------------------------------------------------ empirical fields
    # As fields.cu: the plan's ranges, the workspace it sizes, the grid
    # simulator for the kernels themselves.

    def field_mean(self, dtype, rows, inner, R, x, ref, qp, kind, p0, p1, mean, best, sumexp,
                   workspace, workspace_size, splits, stream):
        self.calls.append(("field_mean", stream, splits))
        for a in (dtype, rows, inner, R, x, ref, qp, kind, mean, best, sumexp, workspace,
                  workspace_size, splits, stream):
            assert isinstance(a, int) and not isinstance(a, bool), ("field_mean", a)
        assert isinstance(p0, float) and isinstance(p1, float)
        T = DTYPES[dtype]
        A = acc(T)
        plan = OPS._sim_plan_fields(rows, R, inner, A.itemsize, splits, 0)
        if plan[4] > 1:  # the workspace exists and is large enough: fill all of it
            assert workspace and workspace_size >= plan[6]
            at(workspace, (workspace_size,), A).fill_(math.nan)
        if rows == 0:
            return 0
        res = OPS._sim_field_mean(at(x, (rows, inner), T), at(ref, (R, inner), T),
                                  at(qp, (rows, 2), A), kind, p0, p1, splits)
        for p, shape, r in zip((mean, best, sumexp), ((rows, inner), (rows,), (rows,)), res):
            at(p, shape, A).copy_(r)
        return 0

    def plan_fields(self, B, R, N, acc_size, splits, max_blocks):
        return tuple(OPS._sim_plan_fields(B, R, N, acc_size, splits, max_blocks))

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
    tab, ctab = (coef, 0.0, -1, []), (c, 0.0, -1, [])
    for target in range(4):
        for got, want in zip(fkc.interpolate(x0, x1_t, *tab, target),
                             OPS.interpolate(x0, x1, *ctab, target, False)):
            assert torch.equal(got, want)
        for got, want in zip(fkc.interpolate_backward(x0, x1_t, *tab, target),
                             OPS.interpolate_backward(x0, x1, *ctab, target)):
            assert torch.equal(got, want)
        for red in range(3):
            torch.testing.assert_close(
                fkc.fm_loss(pred, x0, x1_t, *tab, target, None, red),
                OPS.fm_loss(pred, x0, x1, *ctab, target, None, red, False),
                rtol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, atol=0)
        g = torch.randn(rows, dtype=torch.float64).to(acc(dtype))
        for nout in (1, 3):
            for got, want in zip(fkc.fm_loss_backward(torch.ones(()), pred, x0, x1_t, *tab,
                                                      target, g, 1, nout),
                                 OPS.fm_loss_backward(torch.ones(()), pred, x0, x1, *ctab, target,
                                                      g, 1, nout)):
                assert torch.equal(got, want)
    for src in range(4):
        for dst in range(4):
            assert torch.equal(fkc.convert(x1_t, x0, *tab, src, dst),
                               OPS.convert(x1, x0, *ctab, src, dst, False))
            for got, want in zip(fkc.convert_backward(x1_t, *tab, src, dst),
                                 OPS.convert_backward(x1, *ctab, src, dst)):
                assert torch.equal(got, want)
    if rows:
        assert {s for _, s, _ in sim.calls} == {1234}
        assert {m for _, _, m in sim.calls} == {MAX_BLOCKS, None}


def test_out_buffers_are_written_in_place(sim):
    x0, x1 = tensors(2, (4, 16), torch.float32)
    xt, y = torch.empty_like(x0), torch.empty_like(x0)
    rxt, ry = fkc.interpolate(x0, x1, coef_for(4), 0.0, -1, [], 0, False, xt, y)
    assert rxt is xt and ry is y
    assert torch.equal(xt, OPS.interpolate(x0, x1, coef_for(4).float(), 0.0, -1, [], 0, False)[0])
    with pytest.raises(ValueError, match="xt: must be contiguous"):
        fkc.interpolate(x0, x1, coef_for(4), 0.0, -1, [], 0, False, torch.empty(16, 4).t())


def test_bad_metadata_names_the_argument(sim):
    x0, x1 = tensors(2, (4, 16), torch.float32)
    with pytest.raises(ValueError, match=r"do not broadcast: x0\(4, 16\), x1\(4, 8\)"):
        fkc.interpolate(x0, x1[:, :8], coef_for(4), 0.0, -1, [], 0)
    with pytest.raises(ValueError, match="coef: expected shape"):
        fkc.interpolate(x0, x1, coef_for(3), 0.0, -1, [], 0)
    with pytest.raises(TypeError, match="x0: dtype torch.int32"):
        fkc.interpolate(x0.int(), x1.int(), coef_for(4), 0.0, -1, [], 0)


def test_launch_error_names_the_fallback(sim, monkeypatch):
    monkeypatch.setattr(sim, "interpolate", lambda *a: 35)
    x0, x1 = tensors(2, (2, 8), torch.float32)
    with pytest.raises(RuntimeError, match=r"error 35 \(simulated error 35\).*backend='triton' "
                                           r"or 'torch'"):
        fkc.interpolate(x0, x1, coef_for(2), 0.0, -1, [], 0)


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
        fkc.interpolate(x, x, coef_for(2), 0.0, -1, [], 0)


# ------------------------------------------------------------------ steps

# Every flowkern:: step op whose CUDA kernel flowkern/ops/steps.py registers.
STEP_OPS = ("euler_step", "heun_step", "ei_step", "ei_step_out", "ei_step_backward",
            "dpmpp_2m_step", "em_step", "churn")


def step_table(rows, per_sample, churn=False):
    """float64 on purpose (the glue converts it); churn renoises to t_hat < t."""
    gen = torch.Generator().manual_seed(rows)
    t = 0.1 + 0.7 * torch.rand(rows if per_sample else 1, generator=gen, dtype=torch.float64)
    s = t - 0.05 if churn else t + 0.1
    return flowkern.step_table("cosine", t, s, t_prev=t - 0.07, g=0.7, dtype=torch.float64)


NT = ([], -1, [])  # the schemas' (times, kind, params) beside a given table


def same(glue, cpu, like, n_out=1, noisy=False):
    """glue(*outs) and cpu(*outs) write equal outputs; the glue returns None."""
    got = [torch.empty_like(like) for _ in range(n_out)]
    want = [torch.empty_like(like) for _ in range(n_out)]
    assert glue(*got) is None
    cpu(*want)
    for g, w in zip(got, want):
        if noisy:
            assert_within_fp32_ulp(g, w, "noise")
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 8), (3, 1023), (0, 4)], ids=str)
def test_step_glue_matches_cpu_ops(sim, dtype, shape):
    """Every step, prediction type, guidance on/off, EI form, DPM order and
    table layout; x non-contiguous, the table in float64."""
    rows = shape[0]
    x, pred, xe, pe, dp, pu, peu = tensors(7, shape, dtype)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    for per_sample in (False, True) if rows else (False,):
        tab, ctab = step_table(rows, per_sample), step_table(rows, per_sample, churn=True)
        c, cc = tab.to(acc(dtype)), ctab.to(acc(dtype))
        for k in range(4):
            for u, eu, w in ((None, None, 1.0), (pu, peu, 2.5)):
                cfg = u is not None
                same(lambda o: fks.euler_step(xt, pred, u, tab, *NT, k, w, False, o),
                     lambda o: OPS.euler_step(x, pred, u, c, *NT, k, w, False, o), x)
                same(lambda o: fks.heun_step(xt, pred, xe, pe, u, eu, tab, *NT, k, w, False, o),
                     lambda o: OPS.heun_step(x, pred, xe, pe, u, eu, c, *NT, k, w, False, o), x)
                for form in (0, 1):
                    assert torch.equal(fks.ei_step(xt, pred, u, tab, *NT, k, form, w, False),
                                       OPS.ei_step(x, pred, u, c, *NT, k, form, w, False))
                    same(lambda o: fks.ei_step_out(xt, pred, u, tab, *NT, k, form, w, False, o),
                         lambda o: OPS.ei_step_out(x, pred, u, c, *NT, k, form, w, False, o), x)
                    for g, want in zip(fks.ei_step_backward(xt, tab, *NT, k, form, w, cfg),
                                       OPS.ei_step_backward(x, c, *NT, k, form, w, cfg), strict=True):
                        assert torch.equal(g, want)
                for d in (None, dp):
                    same(lambda o, do: fks.dpmpp_2m_step(xt, pred, d, u, tab, *NT, k, w, False, o, do),
                         lambda o, do: OPS.dpmpp_2m_step(x, pred, d, u, c, *NT, k, w, False, o, do), x, 2)
                same(lambda o: fks.em_step(xt, pred, u, tab, *NT, k, w, 2 ** 40 + 3, 77, False, o),
                     lambda o: OPS.em_step(x, pred, u, c, *NT, k, w, 2 ** 40 + 3, 77, False, o), x,
                     noisy=True)
        same(lambda o: fks.churn(xt, ctab, *NT, 5, 2 ** 33, False, o),
             lambda o: OPS.churn(x, cc, *NT, 5, 2 ** 33, False, o), x, noisy=True)
    if rows:
        assert {s for _, s, _ in sim.calls} == {1234}
        assert {m for _, _, m in sim.calls} == {MAX_BLOCKS}


def test_steps_write_in_place(sim):
    """out=x updates the state (samplers do this); given outputs are used."""
    x, pred = tensors(2, (4, 16), torch.float32)
    tab = step_table(4, True)
    want = torch.empty_like(x)
    OPS.euler_step(x, pred, None, tab.float(), *NT, 1, 1.0, False, want)
    fks.euler_step(x, pred, None, tab, *NT, 1, 1.0, False, x)
    assert torch.equal(x, want)
    outs = [torch.empty_like(x) for _ in range(3)]
    assert fks.ei_step_backward(pred, tab, *NT, 0, 0, 2.0, True, outs) == outs
    ei = torch.empty_like(x)
    assert fks.ei_step(x, pred, None, tab, *NT, 2, 1, 1.0, False, ei) is ei


def test_step_ops_match_their_schemas():
    """flowkern/ops/steps.py registers flowkern.cuda.steps.<op> as the CUDA
    kernel of flowkern::<op>; torch.library calls it with the schema's
    arguments in order, so the parameters must be those (extra ones optional)."""
    for op in STEP_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flowkern::{op}", "CUDA"), op
        schema = getattr(OPS, op).default._schema
        names = [a.name for a in schema.arguments]
        params = list(inspect.signature(getattr(fks, op)).parameters.values())
        assert [p.name for p in params[:len(names)]] == names, op
        assert all(p.default is not inspect.Parameter.empty for p in params[len(names):]), op


def test_step_bad_metadata_names_the_argument(sim):
    x, pred, pu = tensors(3, (4, 16), torch.float32)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="table: expected a step table"):
        fks.euler_step(x, pred, None, step_table(2, True), *NT, 0, 1.0, False, out)
    with pytest.raises(ValueError, match="table: expected a step table"):
        fks.churn(x, torch.zeros(4, 4), *NT, 0, 0, False, out)
    with pytest.raises(ValueError, match="pred_uncond: expected"):
        fks.em_step(x, pred, pu[:, :8], step_table(4, True), *NT, 0, 2.0, 0, 0, False, out)
    with pytest.raises(ValueError, match="give both unconditional predictions or neither"):
        fks.heun_step(x, pred, x, pred, pu, None, step_table(1, False), *NT, 0, 2.0, False, out)
    with pytest.raises(ValueError, match="outs: expected 3 gradients"):
        fks.ei_step_backward(x, step_table(1, False), *NT, 0, 0, 2.0, True, [out, out])
    with pytest.raises(ValueError, match="d_out: must be contiguous"):
        fks.dpmpp_2m_step(x, pred, None, None, step_table(1, False), *NT, 1, 1.0, False, out, torch.empty(16, 4).t())


# ---------------------------------------------------------- flow-map loss

FLOWMAP_OPS = ("flowmap_loss_rows", "flowmap_loss_backward")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 8), (3, 1023), (0, 4), (4, 0)], ids=str)
def test_flowmap_glue_matches_cpu_ops(sim, dtype, shape):
    """Row sums and every set of optional gradients, for each prediction type,
    form and table layout; x non-contiguous, the table in float64."""
    rows = shape[0]
    x, pred, target = tensors(3, shape, dtype)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous input
    g = torch.randn(rows, dtype=torch.float64)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for per_sample in (False, True) if rows else (False,):
        tab = step_table(rows, per_sample)
        c = tab.to(acc(dtype))
        for k in range(4):
            for form in (0, 1):
                got = fkm.flowmap_loss_rows(xt, pred, target, tab, k, form)
                assert got.shape == (rows,) and got.dtype == acc(dtype)
                torch.testing.assert_close(got, OPS.flowmap_loss_rows(x, pred, target, c, k,
                                                                      form),
                                           rtol=rtol, atol=0)
                for gx in (False, True):
                    for gt in (False, True):
                        outs = fkm.flowmap_loss_backward(g, xt, pred, target, tab, k, form, gx,
                                                         gt)
                        want = OPS.flowmap_loss_backward(g.to(acc(dtype)), x, pred, target, c,
                                                         k, form, gx, gt)
                        assert len(outs) == len(want) == 1 + gx + gt
                        for o, w in zip(outs, want):
                            assert torch.equal(o, w)
    if rows:
        assert {s for _, s, _ in sim.calls} == {1234}
        assert {m for _, _, m in sim.calls} == {MAX_BLOCKS, None}


@pytest.fixture
def cuda_path(sim, monkeypatch):
    """flowkern.flowmap_loss(backend="cuda") on CPU tensors: the op's own
    validation, table, weights and reduction around flowkern.cuda.flowmap."""
    resolve, ops_for = ops_flowmap.resolve, ops_flowmap.ops_for
    glue = types.SimpleNamespace(flowmap_loss_rows=fkm.flowmap_loss_rows)
    monkeypatch.setattr(ops_flowmap, "resolve",
                        lambda b, device: "cuda" if b == "cuda" else resolve(b, device))
    monkeypatch.setattr(ops_flowmap, "ops_for", lambda b: glue if b == "cuda" else ops_for(b))
    return sim


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_flowmap_loss_weights_and_reductions(cuda_path, dtype):
    """Every reduction with and without per-sample or scalar weights, times as
    floats, per-sample tensors or a table, a broadcast target: the cuda path
    gives the cpu backend's loss."""
    shape = (6, 5, 7)
    x, pred, target = tensors(3, shape, dtype, seed=3)
    t = 0.1 + 0.5 * torch.rand(6, generator=torch.Generator().manual_seed(4),
                               dtype=torch.float64)
    times = [dict(t=0.3, s=0.7), dict(t=t, s=t + 0.2),
             dict(table=flowkern.step_table("vp", t, t + 0.2, dtype=acc(dtype)))]
    weights = [None, torch.rand(6, dtype=torch.float64).to(dtype), 0.5]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for when in times:
        for weight in weights:
            for reduction in ("mean", "sum", "none"):
                for prediction, form, y in (("x1", "data", target), ("velocity", "noise",
                                                                     target[:1])):
                    args = dict(schedule="vp", prediction=prediction, form=form,
                                weight=weight, reduction=reduction, **when)
                    got = flowkern.flowmap_loss(x, pred, y, backend="cuda", **args)
                    want = flowkern.flowmap_loss(x, pred, y, backend="cpu", **args)
                    assert got.dtype == dtype and got.shape == want.shape
                    torch.testing.assert_close(got, want, rtol=max(rtol, 2 * torch.finfo(
                        dtype).eps), atol=0)
    assert {op for op, _, _ in cuda_path.calls} == {"flowmap_loss_partial"}


def test_flowmap_backward_formula_on_the_glue(sim):
    """The op's registered backward (flowkern/ops/flowmap.py) driving the glue
    returns what autograd of the CPU op returns, for each subset of inputs
    that needs a gradient."""
    x, pred, target = tensors(3, (4, 9), torch.float32, seed=5)
    tab = step_table(4, True).float()
    g = torch.randn(4)
    backward = ops_flowmap._backward(types.SimpleNamespace(
        flowmap_loss_backward=fkm.flowmap_loss_backward))
    for need_x in (False, True):
        for need_t in (False, True):
            leaves = [t.clone().requires_grad_(n) for t, n in ((x, need_x), (pred, True),
                                                              (target, need_t))]
            rows = OPS.flowmap_loss_rows(*leaves, tab, 2, 1)
            want = torch.autograd.grad(rows, [t for t in leaves if t.requires_grad], g)
            ctx = types.SimpleNamespace(saved_tensors=(x, pred, target, tab),
                                        needs_input_grad=(need_x, True, need_t, False, False,
                                                          False),
                                        prediction=2, form=1)
            got = backward(ctx, g)
            assert len(got) == 6 and got[3:] == (None, None, None)
            assert (got[0] is not None, got[2] is not None) == (need_x, need_t)
            for a, b in zip([v for v in got[:3] if v is not None], want, strict=True):
                assert torch.equal(a, b)


def test_flowmap_ops_match_their_schemas():
    """flowkern/ops/flowmap.py registers flowkern.cuda.flowmap.<op> as the CUDA
    kernel of flowkern::<op>, called with the schema's arguments in order."""
    for op in FLOWMAP_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flowkern::{op}", "CUDA"), op
        names = [a.name for a in getattr(OPS, op).default._schema.arguments]
        params = list(inspect.signature(getattr(fkm, op)).parameters)
        assert params == names, op


def test_flowmap_bad_metadata_names_the_argument(sim):
    x, pred, target = tensors(3, (4, 16), torch.float32)
    tab = step_table(4, True)
    with pytest.raises(ValueError, match="target: expected"):
        fkm.flowmap_loss_rows(x, pred, target[:, :8], tab, 1, 0)
    with pytest.raises(ValueError, match="table: expected a step table"):
        fkm.flowmap_loss_rows(x, pred, target, step_table(2, True), 1, 0)
    with pytest.raises(ValueError, match="grad_rows: expected shape"):
        fkm.flowmap_loss_backward(torch.zeros(3), x, pred, target, tab, 1, 0, True, True)
# ------------------------------------------------------------------ fields


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_field_glue_matches_cpu_kernel(sim, monkeypatch, dtype):
    """Every kind; references non-contiguous, qp in float64; a device of 4
    SMs (max_blocks 64) so that a small batch splits the references and the
    glue allocates the plan's workspace; an empty batch launches nothing."""
    @contextlib.contextmanager
    def device_of(t):
        yield 1234, 64

    monkeypatch.setattr(_launch, "device_of", device_of)
    gen = torch.Generator().manual_seed(0)
    for B, Rn, N in ((5, 37, 3), (3, 300, 19), (40, 70, 9), (0, 4, 3)):
        x = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype)
        ref = torch.randn(N, Rn, generator=gen, dtype=torch.float64).to(dtype).t()
        qp = torch.stack([torch.rand(B, generator=gen, dtype=torch.float64),
                          0.5 + torch.rand(B, generator=gen, dtype=torch.float64)], 1)
        for kind, p0, p1 in ((0, (N + 1) / 2, 0.0), (1, 0.0, 0.0), (2, -1.5, 1.5)):
            sim.calls.clear()
            got = fkf.field_mean(x, ref, qp, kind, p0, p1)
            want = OPS.field_mean(x, ref.contiguous(), qp.to(acc(dtype)), kind, p0, p1)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            splits = [s for op, _, s in sim.calls if op == "field_mean"]
            want_splits = OPS._sim_plan_fields(B, Rn, N, acc(dtype).itemsize, 0, 64)[4]
            assert splits == ([] if B == 0 else [want_splits]), (B, Rn, splits)
            assert (want_splits > 1) == (Rn == 300)


def test_field_mean_matches_its_schema():
    """flowkern/ops/fields.py registers flowkern.cuda.fields.field_mean as the
    CUDA kernel of flowkern::field_mean, called with the schema's arguments."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flowkern::field_mean", "CUDA")
    names = [a.name for a in OPS.field_mean.default._schema.arguments]
    assert list(inspect.signature(fkf.field_mean).parameters) == names


def test_field_bad_metadata_names_the_argument(sim):
    x, ref = torch.randn(4, 6), torch.randn(9, 6)
    qp = torch.rand(4, 2)
    with pytest.raises(ValueError, match="ref: expected torch.float32"):
        fkf.field_mean(x, ref.double(), qp, 0, 3.5, 0.0)
    with pytest.raises(ValueError, match=r"ref: expected shape \(R, 6\)"):
        fkf.field_mean(x, ref[:, :5], qp, 0, 3.5, 0.0)
    with pytest.raises(ValueError, match="ref: the reference set is empty"):
        fkf.field_mean(x, ref[:0], qp, 0, 3.5, 0.0)
    with pytest.raises(ValueError, match="x: expected queries of shape"):
        fkf.field_mean(x[None], ref, qp, 0, 3.5, 0.0)
    with pytest.raises(ValueError, match="qp: expected shape"):
        fkf.field_mean(x, ref, qp[:3], 0, 3.5, 0.0)


def test_field_cpu_tensors_are_rejected():
    """The kernel entry and the public ops name the backends that take CPU
    tensors (flowkern/backend.py), whether or not flowkern._cuda is built."""
    x, ref = torch.randn(4, 6), torch.randn(9, 6)
    with pytest.raises(ValueError, match="x: the cuda backend needs CUDA tensors"):
        fkf.field_mean(x, ref, torch.rand(4, 2), 0, 3.5, 0.0)
    for call in (lambda: flowkern.poisson_field(x, 0.5, ref, backend="cuda"),
                 lambda: flowkern.empirical_denoiser(x, 0.5, ref, backend="cuda")):
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got cpu; "
                                             "use backend='cpu' or 'torch'"):
            call()
    with flowkern.use_backend("cuda"):
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            flowkern.poisson_field(x, 0.5, ref)
