"""The CUDA glue (csrc/cuda/glue.h) without a GPU.

The glue is the CUDA-key kernel of every flowkern:: op: argument checks,
coefficient arguments, output allocation, device guard, stream, launch.
flowkern._C also instantiates it on the grid simulator's launchers
(csrc/cpu/cuda_sim_launchers.cpp: the launchers' own bodies, launch_ops.h,
with the kernels' thread functions swept over every block and thread of the
plan) as the CPU kernels of the test namespace flowkern_sim::, which has the
flowkern:: schemas. Here those ops run on CPU tensors, "device" memory being
host memory, against the CPU ops: wrong pointer order, dtype codes, sizes,
coefficient sources, output allocation or checks in the glue show up as
different results or messages.
"""
import math
import os

import pytest
import torch

import flowkern
from cuda_sim_helpers import assert_within_fp32_ulp
from helpers import STEP_EXAMPLES
from flowkern.backend import cuda_built
from flowkern.ops._registry import SCHEMA_LINES

pytestmark = pytest.mark.skipif(not flowkern.backend.cpu_built(), reason="needs flowkern._C")

SIM = torch.ops.flowkern_sim
CPU = torch.ops.flowkern
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5, 3, 8), (3, 1023), (0, 4)]
# (kind, params) of every built-in schedule (csrc/include/flowkern/schedules.h)
SCHEDULES = {"linear": (0, []), "cosine": (1, []), "polynomial": (2, [1.7]),
             "vp": (3, [0.1, 20.0]), "ve": (4, [0.01, 80.0]), "edm": (5, [0.002, 80.0, 7.0])}
NAN = float("nan")


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensors(n, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n)]


def times(rows, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (0.05 + 0.9 * torch.rand(rows, generator=gen, dtype=torch.float64)).to(dtype)


def noncontig(x):
    return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 1 else x


def coef_args(mode, rows, dtype, kind, params):
    """(t, t_value, kind, params) of each coefficient source of coef_arg.h."""
    if mode == "t_value":
        return None, 0.37, kind, params
    if mode == "t_tensor":  # per-sample times, evaluated in the kernel
        return times(rows), 0.0, kind, params
    if mode == "t_one":  # a one-element tensor: still in the kernel (reading it would sync)
        return times(1)[0], 0.0, kind, params
    if mode == "t_float64":  # times in another dtype than the accumulation's
        return times(rows, dtype=torch.float64), 0.0, kind, params
    if mode == "t_expanded":  # one time expanded to the batch (stride 0): read once, no copy
        return times(1).expand(rows), 0.0, kind, params
    # a custom schedule's (B, 4) table
    t = times(rows, dtype=torch.float64)
    tab = torch.stack([t, 1 - t, torch.ones_like(t), -torch.ones_like(t)], 1).to(acc(dtype))
    return tab, 0.0, -1, []


MODES = ["t_value", "t_tensor", "t_one", "t_float64", "t_expanded", "table"]


def equal(got, want):
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_training_glue_matches_cpu_ops(dtype, shape, mode):
    """interpolate (+out, backward), convert (+backward), the loss (+backward):
    every coefficient source, target, conversion; a non-contiguous and a
    broadcast input. The coefficients are the same doubles rounded once, the
    kernels the same functors: bit-identical results (the loss: reduction order)."""
    rows = shape[0]
    x0, x1, pred = tensors(3, shape, dtype)
    x1n, x0b = noncontig(x1), x0[:1].expand(shape) if rows else x0
    for name, (kind, params) in SCHEDULES.items():
        if mode == "table" and name != "linear":
            continue
        c = coef_args(mode, rows, dtype, kind, params)
        for target in range(4):
            if target == 3 and name in ("linear", "polynomial") and mode != "table":
                continue  # sigma may be ~0 at some t: fine, but skip the noise of inf - inf
            equal(SIM.interpolate(x0b, x1n, *c, target, False),
                  CPU.interpolate(x0b, x1n, *c, target, False))
            equal(SIM.interpolate_backward(x0, x1n, *c, target),
                  CPU.interpolate_backward(x0, x1n, *c, target))
            for red in range(3):
                w = times(rows, seed=5) if red != 1 else None
                torch.testing.assert_close(
                    SIM.fm_loss(pred, x0b, x1n, *c, target, w, red, False),
                    CPU.fm_loss(pred, x0b, x1n, *c, target, w, red, False),
                    rtol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, atol=1e-6)
                grad = torch.ones(rows) if red == 2 else torch.ones(())
                for nout in (1, 3):
                    equal(SIM.fm_loss_backward(grad, pred, x0, x1n, *c, target, w, red, nout),
                          CPU.fm_loss_backward(grad, pred, x0, x1n, *c, target, w, red, nout))
        for src in range(4):
            for dst in range(4):
                equal(SIM.convert(x1n, x0, *c, src, dst, False),
                      CPU.convert(x1n, x0, *c, src, dst, False))
                equal(SIM.convert_backward(x1n, *c, src, dst),
                      CPU.convert_backward(x1n, *c, src, dst))


def test_out_buffers_are_written_in_place():
    x0, x1 = tensors(2, (4, 16), torch.float32)
    xt, y = torch.empty_like(x0), torch.empty_like(x0)
    SIM.interpolate_out(x0, x1, None, 0.3, 1, [], 0, True, xt, y)
    equal((xt, y), CPU.interpolate(x0, x1, None, 0.3, 1, [], 0, True))


def step_table(rows, per_sample, churn=False):
    """float64 on purpose (the glue converts it); churn renoises to t_hat < t."""
    gen = torch.Generator().manual_seed(rows)
    t = 0.1 + 0.7 * torch.rand(rows if per_sample else 1, generator=gen, dtype=torch.float64)
    s = t - 0.05 if churn else t + 0.1
    return flowkern.step_table("cosine", t, s, t_prev=t - 0.07, g=0.7, dtype=torch.float64)


def step_times(rows, seed, dtype, lo=0.1):
    gen = torch.Generator().manual_seed(seed)
    return (lo + 0.7 * torch.rand(rows, generator=gen, dtype=torch.float64)).to(dtype)


def step_coefs(rows):
    """(table, t, s, t_prev, times, kind, params) of a step: a given table
    (one row, one per sample), the times with a built-in schedule (the row by
    value), or per-sample times as tensors (float32, float64 and 16-bit
    ones; one per row or one for the batch), which the kernel evaluates."""
    out = [(step_table(rows, False), None, None, None, [], -1, [])]
    if rows:
        out.append((step_table(rows, True), None, None, None, [], -1, []))
    out += [(None, None, None, None, [0.3, 0.45, 0.2, 0.7], 1, []),
            (None, None, None, None, [0.4, 0.5, NAN, 0.0], 3, [0.1, 20.0]),
            (None, None, None, None, [0.2, 0.6, 0.1, 0.3], 5, [0.002, 80.0, 7.0])]
    t = step_times(rows, 1, torch.float32)
    out += [(None, t, t + 0.1, t - 0.05, [0.0, 0.0, 0.0, 0.7], 1, []),
            (None, step_times(rows, 2, torch.float64), None, None, [0.0, 0.9, NAN, 0.0], 3,
             [0.1, 20.0]),
            (None, None, step_times(rows, 3, torch.bfloat16, 0.25), step_times(1, 4, torch.float16),
             [0.2, 0.0, 0.0, 0.3], 5, [0.002, 80.0, 7.0]),
            (None, None, step_times(1, 6, torch.float32).expand(rows), None,
             [0.05, 0.0, NAN, 0.0], 0, [])]
    return out


def churn_coefs(rows):
    t = step_times(rows, 5, torch.float32, 0.2)
    return [(step_table(rows, False, churn=True), None, None, None, [], -1, []),
            (None, None, None, None, [0.5, 0.4, NAN, 0.0], 1, []),
            (None, t, t - 0.1, None, [0.0, 0.0, NAN, 0.0], 1, [])]


def same(sim, cpu, like, n_out=1, noisy=False):
    """sim(*outs) and cpu(*outs) write equal outputs."""
    got = [torch.empty_like(like) for _ in range(n_out)]
    want = [torch.empty_like(like) for _ in range(n_out)]
    assert sim(*got) is None
    cpu(*want)
    for g, w in zip(got, want):
        if noisy:
            assert_within_fp32_ulp(g, w, "noise")
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_glue_matches_cpu_ops(dtype, shape):
    """Every step, prediction type, guidance on/off, EI form, DPM order and
    coefficient source; x non-contiguous."""
    rows = shape[0]
    x, pred, xe, pe, dp, pu, peu = tensors(7, shape, dtype)
    xn = noncontig(x)
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 2 ** 40  # per-sample seeds
    for coef in step_coefs(rows):
        for k in range(4):
            for u, eu, w in ((None, None, 1.0), (pu, peu, 2.5)):
                cfg = u is not None
                same(lambda o: SIM.euler_step(xn, pred, u, *coef, k, w, False, o),
                     lambda o: CPU.euler_step(xn, pred, u, *coef, k, w, False, o), x)
                same(lambda o: SIM.heun_step(xn, pred, xe, pe, u, eu, *coef, k, w, False, o),
                     lambda o: CPU.heun_step(xn, pred, xe, pe, u, eu, *coef, k, w, False, o), x)
                for form in (0, 1):
                    equal(SIM.ei_step(xn, pred, u, *coef, k, form, w, False),
                          CPU.ei_step(xn, pred, u, *coef, k, form, w, False))
                    equal(SIM.ei_step_backward(xn, *coef, k, form, w, cfg),
                          CPU.ei_step_backward(xn, *coef, k, form, w, cfg))
                for d in (None, dp):
                    same(lambda o, do: SIM.dpmpp_2m_step(xn, pred, d, u, *coef, k, w, False, o, do),
                         lambda o, do: CPU.dpmpp_2m_step(xn, pred, d, u, *coef, k, w, False, o, do),
                         x, 2)
                for ps in (None, seeds):
                    same(lambda o: SIM.em_step(xn, pred, u, *coef, k, w, 2 ** 40 + 3, 77, ps,
                                               False, o),
                         lambda o: CPU.em_step(xn, pred, u, *coef, k, w, 2 ** 40 + 3, 77, ps,
                                               False, o),
                         x, noisy=True)
                for nh in range(4):  # lms_step's history u1 (newest) .. u3
                    hist = ([pe, dp, xe][:nh] + [None] * 3)[:3]
                    wts = [0.3, -0.15, 0.07, -0.02][:nh + 1]
                    same(lambda o, uo: SIM.lms_step(xn, pred, *hist, u, wts, *coef, k, w, False,
                                                    o, uo),
                         lambda o, uo: CPU.lms_step(xn, pred, *hist, u, wts, *coef, k, w, False,
                                                    o, uo),
                         x, 2)
    for coef in churn_coefs(rows):
        for ps in (None, seeds):
            same(lambda o: SIM.churn(xn, *coef, 5, 2 ** 33, ps, False, o),
                 lambda o: CPU.churn(xn, *coef, 5, 2 ** 33, ps, False, o), x, noisy=True)
    terms = [noncontig(pred), xe, pe, dp]
    for nt in range(1, 5):  # lincomb_step: no coefficients but the caller's weights
        wts = [0.9, 0.3, -0.15, 0.07, -0.02][:nt + 1]
        for std, ps in ((0.0, None), (0.4, None), (0.4, seeds))[:1 if nt == 4 else 3]:
            same(lambda o: SIM.lincomb_step(xn, terms[:nt], wts, std, 2 ** 40 + 3, 77, ps,
                                            False, o),
                 lambda o: CPU.lincomb_step(xn, terms[:nt], wts, std, 2 ** 40 + 3, 77, ps,
                                            False, o),
                 x, noisy=bool(std))


class _Replay(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs every flowkern:: op a public call makes on the CPU kernel and, on
    clones of its arguments taken before, on the simulated CUDA glue
    (flowkern_sim::, the same schema), recording both."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "flowkern" or func._opname == "empty_output":
            return func(*args, **kwargs)

        def clone(a):
            if isinstance(a, torch.Tensor):
                return a.clone()
            return [clone(b) for b in a] if isinstance(a, (list, tuple)) else a
        sim_args = [clone(a) for a in args]
        out = func(*args, **kwargs)
        sim = getattr(getattr(SIM, func._opname), func._overloadname)
        self.calls.append((func._opname, args, out, sim_args, sim(*sim_args, **kwargs)))
        return out


def _tensors_of(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for a in v for t in _tensors_of(a)]
    return []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(STEP_EXAMPLES))
def test_every_public_step_is_the_same_on_the_glue(op, dtype):
    """Each public step (helpers.STEP_EXAMPLES, no per-op code here): the
    flowkern:: calls it makes on the cpu backend, replayed on the simulated
    CUDA glue, write the same outputs (the noisy ones to an fp32 ulp, as the
    device's Philox transcendentals are its own)."""
    g = torch.Generator().manual_seed(3)
    x, p = (torch.randn(5, 33, generator=g).to(dtype) for _ in range(2))
    with _Replay() as replay:
        STEP_EXAMPLES[op](x, p, backend="cpu")
    assert replay.calls, f"{op}: no flowkern:: op was called"
    for name, args, out, sim_args, sim_out in replay.calls:
        got, want = _tensors_of([sim_args, sim_out]), _tensors_of([args, out])
        assert len(got) == len(want), name
        for k, (a, b) in enumerate(zip(got, want)):
            if name in ("em_step", "churn", "lincomb_step") and a.is_floating_point():
                assert_within_fp32_ulp(a, b, f"{name} tensor {k}")
            else:
                assert torch.equal(a, b), f"{op} -> {name}: tensor {k} differs on the glue"


def test_steps_write_in_place():
    """out=x updates the state (samplers do this)."""
    x, pred = tensors(2, (4, 16), torch.float32)
    want = torch.empty_like(x)
    CPU.euler_step(x, pred, None, None, None, None, None, [0.2, 0.3, NAN, 0.0], 0, [], 0, 1.0, True, want)
    SIM.euler_step(x, pred, None, None, None, None, None, [0.2, 0.3, NAN, 0.0], 0, [], 0, 1.0, True, x)
    assert torch.equal(x, want)


def map_coefs(rows):
    """(t, t_value, s, s_value, kind, params) of flowmap_loss: a step table
    (one row, one per sample; float64, which the glue converts), per-sample
    times of a built-in schedule (float32 and float64, evaluated in the
    kernel), float times (by value), and one of each."""
    out = [(step_table(rows, False), 0.0, None, 0.0, -1, [])]
    if rows:
        out.append((step_table(rows, True), 0.0, None, 0.0, -1, []))
    t, s = times(rows) * 0.8, times(rows, seed=2) * 0.5 + 0.45
    kind, params = SCHEDULES["vp"]
    out += [(t, 0.0, s, 0.0, kind, params),
            (t.double(), 0.0, s.double(), 0.0, *SCHEDULES["cosine"]),
            (None, 0.3, None, 0.7, *SCHEDULES["edm"]),
            (t, 0.0, None, 0.7, kind, params),
            (times(1)[0], 0.0, s, 0.0, *SCHEDULES["polynomial"]),
            (t.half(), 0.0, s.bfloat16(), 0.0, *SCHEDULES["ve"])]  # 16-bit: widened exactly
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 8), (3, 1023), (0, 4), (4, 0)], ids=str)
def test_flowmap_glue_matches_cpu_ops(dtype, shape):
    """flowmap_loss on the simulated glue (row-sum grid, finishing block)
    against the CPU op, for every coefficient source, prediction, form and
    reduction, a weight, a target that broadcasts; its backward bit for bit."""
    rows = shape[0]
    x, pred, target = tensors(3, shape, dtype)
    w = times(rows, seed=5)
    for c in map_coefs(rows):
        for k in range(4):
            for form in (0, 1):
                red = (k + form) % 3
                y = target[:1] if k == 1 else target  # target broadcasts over the batch
                args = (noncontig(x), pred, y, *c, k, form, w, red, False)
                torch.testing.assert_close(
                    SIM.flowmap_loss(*args), CPU.flowmap_loss(*args),
                    rtol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, atol=1e-6)
                g = times(rows, seed=3).to(dtype) if red == 2 else torch.tensor(1.5)
                for gx in (False, True):
                    for gt in (False, True):
                        bwd = (g, x, pred, y, *c, k, form, w, red, gx, gt)
                        equal(SIM.flowmap_loss_backward(*bwd), CPU.flowmap_loss_backward(*bwd))


@pytest.mark.parametrize("red", range(3))
def test_flowmap_glue_makes_no_torch_op(red):
    """flowmap_loss is the row-sum kernel and one finishing block, its
    backward one kernel, with the times evaluated in the kernel: besides
    allocations, no aten op."""
    rows = 6
    x, pred, target = tensors(3, (rows, 40), torch.float32)
    t, s, w = times(rows) * 0.5, times(rows, seed=2) * 0.5 + 0.5, times(rows, seed=5)
    grad = torch.ones(rows) if red == 2 else torch.ones(())
    for c in ((t, 0.0, s, 0.0, 1, []), (None, 0.2, None, 0.6, 1, [])):
        assert_kernels_alone(lambda: SIM.flowmap_loss(x, pred, target, *c, 2, 0, w, red, False),
                             "flowkern_sim::flowmap_loss")
        assert_kernels_alone(
            lambda: SIM.flowmap_loss_backward(grad, x, pred, target, *c, 2, 0, w, red, True,
                                              True),
            "flowkern_sim::flowmap_loss_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,R", [(3, 5), (40, 300), (0, 4)])
def test_field_glue_matches_cpu_kernel(dtype, B, R):
    """Small batches split the references (workspace + merge), large ones not."""
    x, = tensors(1, (B, 6), dtype)
    ref, = tensors(1, (R, 6), dtype, seed=2)
    qp = torch.rand(B, 2, dtype=acc(dtype)) + 0.5
    for kind in range(3):
        got = SIM.field_mean(noncontig(x), ref, qp, kind, 1.5, 0.5)
        want = CPU.field_mean(noncontig(x), ref, qp, kind, 1.5, 0.5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5 if dtype != torch.float64 else 1e-12,
                                       atol=1e-6 if dtype != torch.float64 else 1e-12)


# -- checks: the same rules and messages as the CPU ops ------------------------------


def _bad_calls():
    x0, x1 = tensors(2, (4, 16), torch.float32)
    x = x0
    o = torch.empty_like(x)
    row = [0.2, 0.3, NAN, 0.0]
    return {
        "broadcast": lambda ops: ops.interpolate(x0, x1[:, :8], None, 0.3, 0, [], 0, True),
        "int dtype": lambda ops: ops.interpolate(x0.int(), x1.int(), None, 0.3, 0, [], 0, True),
        "dtype mismatch": lambda ops: ops.interpolate(x0, x1.double(), None, 0.3, 0, [], 0, True),
        "target code": lambda ops: ops.interpolate(x0, x1, None, 0.3, 0, [], 9, True),
        "schedule kind": lambda ops: ops.interpolate(x0, x1, None, 0.3, 17, [], 0, True),
        "t range": lambda ops: ops.interpolate(x0, x1, None, 1.5, 0, [], 0, True),
        "t shape": lambda ops: ops.interpolate(x0, x1, torch.rand(3), 0.0, 0, [], 0, True),
        "t int": lambda ops: ops.interpolate(x0, x1, torch.ones(4, dtype=torch.int64), 0.0, 0,
                                             [], 0, True),
        "score at sigma 0": lambda ops: ops.interpolate(x0, x1, None, 1.0, 0, [], 3, True),
        "table shape": lambda ops: ops.interpolate(x0, x1, torch.rand(3, 4), 0.0, -1, [], 0,
                                                   True),
        "out shape": lambda ops: ops.interpolate_out(x0, x1, None, 0.3, 0, [], 0, True,
                                                     torch.empty(4, 8), torch.empty(4, 16)),
        "out layout": lambda ops: ops.interpolate_out(x0, x1, None, 0.3, 0, [], 0, True,
                                                      torch.empty(16, 4).t(), torch.empty(4, 16)),
        "convert by alpha 0": lambda ops: ops.convert(x0, x1, None, 0.0, 1, [], 2, 1, True),
        "reduction": lambda ops: ops.fm_loss(x0, x0, x1, None, 0.3, 0, [], 0, None, 7, True),
        "weight shape": lambda ops: ops.fm_loss(x0, x0, x1, None, 0.3, 0, [], 0, torch.ones(3),
                                                0, True),
        "pred shape": lambda ops: ops.euler_step(x, x1[:, :8], None, None, None, None, None, row, 0, [], 0, 1.0,
                                                 True, o),
        "step out": lambda ops: ops.euler_step(x, x1, None, None, None, None, None, row, 0, [], 0, 1.0, True,
                                               torch.empty(4, 8)),
        "prediction": lambda ops: ops.euler_step(x, x1, None, None, None, None, None, row, 0, [], 5, 1.0, True, o),
        "step table": lambda ops: ops.euler_step(x, x1, None, torch.rand(3, 12), None, None, None, [], -1, [], 0,
                                                 1.0, True, o),
        "s range": lambda ops: ops.euler_step(x, x1, None, None, None, None, None, [0.2, 1.3, NAN, 0.0], 0, [], 0,
                                              1.0, True, o),
        "ei sigma 0": lambda ops: ops.ei_step(x, x1, None, None, None, None, None, [1.0, 0.5, NAN, 0.0], 0, [], 1,
                                              0, 1.0, True),
        "form": lambda ops: ops.ei_step(x, x1, None, None, None, None, None, row, 0, [], 1, 4, 1.0, True),
        "heun uncond": lambda ops: ops.heun_step(x, x1, x, x1, x1, None, None, None, None, None, row, 0, [], 0,
                                                 1.0, True, o),
        "churn alpha 0": lambda ops: ops.churn(x, None, None, None, None, [0.0, 0.1, NAN, 0.0], 0, [], 1, 2, None,
                                               True, o),
        "seeds dtype": lambda ops: ops.churn(x, None, None, None, None, [0.5, 0.1, NAN, 0.0], 0, [], 1, 2,
                                             torch.zeros(x.shape[0]), True, o),
        "seeds shape": lambda ops: ops.churn(x, None, None, None, None, [0.5, 0.1, NAN, 0.0], 0, [], 1, 2,
                                             torch.zeros(x.shape[0] + 1, dtype=torch.int64),
                                             True, o),
        "lms gap": lambda ops: ops.lms_step(x, x1, None, x1, None, None, [0.1, 0.2], None, None, None, None, row,
                                            0, [], 0, 1.0, True, o, torch.empty_like(x)),
        "lms weights": lambda ops: ops.lms_step(x, x1, x1, None, None, None, [0.1], None, None, None, None, row, 0,
                                                [], 0, 1.0, True, o, torch.empty_like(x)),
        "lms weight nan": lambda ops: ops.lms_step(x, x1, None, None, None, None, [NAN], None,
                                                   None, None, None, row, 0, [], 0, 1.0, True, o,
                                                   torch.empty_like(x)),
        "lms u_out overlap": lambda ops: ops.lms_step(x, x1, None, None, None, None, [0.1], None,
                                                      None, None, None, row, 0, [], 0, 1.0, True,
                                                      o, o),
        "step t shape": lambda ops: ops.euler_step(x, x1, None, None, torch.rand(3), None, None,
                                                   row, 0, [], 0, 1.0, True, o),
        "step s int": lambda ops: ops.euler_step(x, x1, None, None, None, torch.ones(4, dtype=torch.int64),
                                                 None, row, 0, [], 0, 1.0, True, o),
        "step table and times": lambda ops: ops.euler_step(x, x1, None, torch.rand(1, 12),
                                                           torch.rand(4), None, None, [], -1, [],
                                                           0, 1.0, True, o),
        # a float time beside a times tensor: known on the host, checked always
        "step float s range": lambda ops: ops.euler_step(
            x, x1, None, None, torch.full((4,), 0.2), None, None, [0.0, 1.5, NAN, 0.0], 0, [],
            0, 1.0, True, o),
        "step float t_prev range": lambda ops: ops.dpmpp_2m_step(
            x, x1, x1, None, None, torch.full((4,), 0.2), None, None, [0.0, 0.3, -0.5, 0.0], 0,
            [], 1, 1.0, True, o, torch.empty_like(x)),
        "step custom kind without table": lambda ops: ops.euler_step(
            x, x1, None, None, torch.rand(4), None, None, row, -1, [], 0, 1.0, True, o),
        "lincomb terms": lambda ops: ops.lincomb_step(x, [], [0.1], 0.0, 0, 0, None, True, o),
        "lincomb weights": lambda ops: ops.lincomb_step(x, [x1], [0.1], 0.0, 0, 0, None, True, o),
        "lincomb noise_std": lambda ops: ops.lincomb_step(x, [x1], [0.1, 0.2], -1.0, 0, 0, None,
                                                          True, o),
        "lincomb noisy terms": lambda ops: ops.lincomb_step(x, [x1] * 4, [0.1] * 5, 0.5, 0, 0,
                                                            None, True, o),
        "lincomb term shape": lambda ops: ops.lincomb_step(x, [x1[:1]], [0.1, 0.2], 0.0, 0, 0,
                                                           None, True, o),
        "field ref": lambda ops: ops.field_mean(x, x[:, :3], torch.ones(4, 2), 0, 1.0, 0.5),
        "flowmap table": lambda ops: ops.flowmap_loss(x, x1, x1, torch.ones(3, 12), 0.0, None, 0.0,
                                                      -1, [], 0, 0, None, 0, True),
        "flowmap s shape": lambda ops: ops.flowmap_loss(x, x1, x1, None, 0.2, torch.ones(3) / 2,
                                                        0.0, 0, [], 0, 0, None, 0, True),
        "flowmap s range": lambda ops: ops.flowmap_loss(x, x1, x1, None, 0.2, None, 1.5, 0, [],
                                                        0, 0, None, 0, True),
        "flowmap sigma_t": lambda ops: ops.flowmap_loss(x, x1, x1, None, 1.0, None, 1.0, 0, [],
                                                        1, 0, None, 0, True),
        "flowmap target": lambda ops: ops.flowmap_loss(x, x1, x1[:, :2], None, 0.2, None, 0.5,
                                                       0, [], 1, 0, None, 0, True),
        "flowmap reduction": lambda ops: ops.flowmap_loss(x, x1, x1, None, 0.2, None, 0.5, 0,
                                                          [], 1, 0, None, 3, True),
        "flowmap grad": lambda ops: ops.flowmap_loss_backward(
            torch.ones(2), x, x1, x1, None, 0.2, None, 0.5, 0, [], 1, 0, None, 0, True, False),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_like_the_cpu_ops(case):
    """Same exception type and message as the CPU op (the rules are shared)."""
    call = _bad_calls()[case]
    with pytest.raises(Exception) as want:
        call(CPU)
    with pytest.raises(type(want.value)) as got:
        call(SIM)
    assert str(got.value).split("\n")[0] == str(want.value).split("\n")[0]


def test_values_on_the_device_are_checked_with_flowkern_debug(monkeypatch):
    """Per-sample times live on the device: their value checks need a copy to
    the host, so they run only with FLOWKERN_DEBUG=1 (flowkern/_validate.py);
    times the host knows are checked always, as on the CPU."""
    x0, x1 = tensors(2, (4, 16), torch.float32)
    t = torch.tensor([0.2, 1.5, 0.3, 0.4])
    monkeypatch.delenv("FLOWKERN_DEBUG", raising=False)
    SIM.interpolate(x0, x1, t, 0.0, 0, [], 0, True)  # unchecked on the "device"
    o = torch.empty_like(x0)
    bad_seeds = torch.tensor([1, -3, 2, 4])
    SIM.churn(x0, None, None, None, None, [0.5, 0.1, NAN, 0.0], 0, [], 1, 2, bad_seeds, True, o)
    with pytest.raises(ValueError, match=r"per_sample_seeds: expected ints in \[0, 2\^63\), "
                                         r"got -3 at sample 1"):
        CPU.churn(x0, None, None, None, None, [0.5, 0.1, NAN, 0.0], 0, [], 1, 2, bad_seeds, True, o)
    with pytest.raises(ValueError, match=r"t: times must lie in \[0, 1\]"):
        SIM.interpolate(x0, x1, None, 1.5, 0, [], 0, True)
    monkeypatch.setenv("FLOWKERN_DEBUG", "1")
    with pytest.raises(ValueError, match=r"t: times must lie in \[0, 1\]"):
        SIM.interpolate(x0, x1, t, 0.0, 0, [], 0, True)
    with pytest.raises(ValueError, match=r"per_sample_seeds: expected ints in \[0, 2\^63\), "
                                         r"got -3 at sample 1"):
        SIM.churn(x0, None, None, None, None, [0.5, 0.1, NAN, 0.0], 0, [], 1, 2, bad_seeds, True, o)
    with pytest.raises(ValueError, match="sigma_t is 0 at some sample"):
        SIM.fm_loss(x0, x0, x1, torch.tensor([0.2, 1.0, 0.3, 0.4]), 0.0, 0, [], 3, None, 0, True)
    tab = flowkern.step_table("linear", torch.tensor([0.2, 1.0, 0.3, 0.4]), 0.5)
    with pytest.raises(ValueError, match="sigma_t is 0 at some sample"):
        SIM.ei_step(x0, x1, None, tab, None, None, None, [], -1, [], 1, 0, 1.0, True)
    SIM.ei_step(x0, x1, None, tab, None, None, None, [], -1, [], 1, 0, 1.0, False)  # check=False: the caller did
    # a step's per-sample times given as tensors: the same, each value rule at a row
    half, row = torch.full((4,), 0.5), [0.0, 0.0, NAN, 0.0]
    step_cases = {
        "t_prev: times must lie in": lambda ops, check: ops.dpmpp_2m_step(
            x0, x1, x1, None, None, None, None, torch.tensor([0.1, 1.5, 0.2, 0.2]),
            [0.2, 0.3, 0.0, 0.0], 0, [], 1, 1.0, check, o, torch.empty_like(x0)),
        "sigma_t is 0 at some sample": lambda ops, check: ops.ei_step(
            x0, x1, None, None, torch.tensor([0.5, 1.0, 0.2, 0.3]), half, None, row, 0, [], 1, 0,
            1.0, check),
        "churn renoises to an earlier time": lambda ops, check: ops.churn(
            x0, None, half, torch.tensor([0.4, 0.6, 0.1, 0.2]), None, row, 0, [], 1, 2, None,
            check, o),
        "em_step integrates forward": lambda ops, check: ops.em_step(
            x0, x1, None, None, half, torch.tensor([0.6, 0.4, 0.7, 0.8]), None, [0.0, 0.0, NAN, 1.0],
            0, [], 0, 1.0, 1, 2, None, check, o),
    }
    for message, call in step_cases.items():
        with pytest.raises(ValueError, match=message):
            call(CPU, True)
        with pytest.raises(ValueError, match=message):
            call(SIM, True)
        call(SIM, False)  # check=False: the caller did
    monkeypatch.delenv("FLOWKERN_DEBUG")
    for call in step_cases.values():
        call(SIM, True)  # unchecked on the "device"


def test_one_op_no_table_construction():
    """A glue call with host-known times or per-sample times runs its one op
    plus output allocations and views: no coefficient table, no copy, no
    conversion (docs/design.md §8)."""
    x0, x1 = tensors(2, (8, 64), torch.float32)
    t = times(8)
    s, half_t, t64 = t.clamp(max=0.9) + 0.1, 0.5 * t, t.double()
    one = t[:1].expand(8)
    o, d = torch.empty_like(x0), torch.empty_like(x0)
    calls = [lambda: SIM.interpolate(x0, x1, None, 0.3, 1, [], 0, True),
             lambda: SIM.interpolate(x0, x1, t, 0.0, 3, [0.1, 20.0], 0, False),
             lambda: SIM.convert(x0, x1, t, 0.0, 5, [0.002, 80.0, 7.0], 0, 2, False),
             lambda: SIM.euler_step(x0, x1, None, None, None, None, None, [0.2, 0.3, NAN, 0.0], 1, [], 0, 1.0,
                                    True, o),
             lambda: SIM.em_step(x0, x1, None, None, None, None, None, [0.2, 0.3, NAN, 0.5], 1,
                                 [], 0, 1.0, 3, 4, None, True, o),
             # per-sample times as tensors: evaluated in the kernel, no table
             lambda: SIM.euler_step(x0, x1, None, None, t, s, None,
                                    [0.0, 0.0, NAN, 0.0], 1, [], 0, 1.0, False, o),
             lambda: SIM.dpmpp_2m_step(x0, x1, x1, None, None, t, half_t, t64,
                                       [0.0, 0.0, 0.0, 0.0], 3, [0.1, 20.0], 1, 1.0, False, o,
                                       d),
             lambda: SIM.ei_step(x0, x1, None, None, t, None, None, [0.0, 0.95, NAN, 0.0], 5,
                                 [0.002, 80.0, 7.0], 1, 0, 1.0, False),
             # one time expanded to the batch (stride 0): read as its one value, no copy
             lambda: SIM.interpolate(x0, x1, one, 0.0, 1, [], 0, False),
             lambda: SIM.euler_step(x0, x1, None, None, one, s, None, [0.0, 0.0, NAN, 0.0], 1,
                                    [], 0, 1.0, False, o)]
    for call in calls:
        assert_kernels_alone(call)


# What a glue call may record besides its own op: output allocations and views.
GLUE_ALLOWED = frozenset({"aten::empty", "aten::empty_strided", "aten::view"})


def assert_kernels_alone(call, op=None):
    """One call of `call` (after a warm one) records its one flowkern_sim::
    op (`op`, when given) and nothing else but GLUE_ALLOWED: on a GPU, only
    the op's kernel launches, no torch op (a launch and a host round trip
    each) around them. Returns the op's name."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    names = [e.name for e in prof.events()]
    ours = [n for n in names if n.startswith("flowkern_sim::")]
    others = [n for n in names if not n.startswith("flowkern_sim::") and n not in GLUE_ALLOWED]
    assert len(ours) == 1 and not others, names
    assert op is None or ours[0] == op, names
    return ours[0]


# -- registration -------------------------------------------------------------------

# Every op and overload of flowkern/ops/schemas.inc, the one schema list.
GLUE_OPS = [name for name, _ in SCHEMA_LINES]


def _op(ns, qual):
    name, _, overload = qual.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), name), overload or "default")


def test_simulator_ops_are_not_in_the_public_namespace():
    """The grid simulator's debug ops live in the test-only flowkern_sim::
    namespace; flowkern:: holds the public ops only."""
    names = torch._C._dispatch_get_all_op_names()
    assert not [n for n in names if n.startswith("flowkern::_sim")]
    assert {"flowkern_sim::_sim_step", "flowkern_sim::_sim_field_mean"} <= set(names)


@pytest.mark.parametrize("qual", GLUE_OPS)
def test_sim_schemas_are_the_native_ones(qual):
    """flowkern_sim:: tests the glue of exactly the flowkern:: schemas."""
    want = str(_op("flowkern", qual)._schema).replace("flowkern::", "")
    assert str(_op("flowkern_sim", qual)._schema).replace("flowkern_sim::", "") == want


@pytest.mark.skipif(not cuda_built(), reason="flowkern._C was built without the CUDA kernels")
@pytest.mark.parametrize("qual", GLUE_OPS)
def test_cuda_key_kernels_are_registered(qual):
    """Built against a CUDA torch, every op has its CUDA-key kernel in C++."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flowkern::{qual}", "CUDA")


def test_cuda_built_follows_the_registration():
    assert cuda_built() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "flowkern::interpolate", "CUDA")
    if torch.version.cuda and os.environ.get("FLOWKERN_SKIP_CUDA") != "1":
        import shutil
        if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
            assert cuda_built(), "a CUDA torch with nvcc should build the CUDA kernels"


def _sinpi(q):
    """sin(pi q) to ~1 ulp for q in [-0.25, 1.25]: the argument reduced exactly
    (Sterbenz) so that math.sin/cos only see |pi r| <= pi/4."""
    if abs(q) <= 0.25:
        return math.sin(math.pi * q)
    if q <= 0.75:
        return math.cos(math.pi * (0.5 - q))
    return math.sin(math.pi * (1.0 - q))


def _cospi(q):
    return math.cos(math.pi * q) if abs(q) <= 0.25 else _sinpi(0.5 - q)


@pytest.mark.parametrize("t", [0.0, 1e-12, 0.1, 0.3, 0.5, 0.77, 0.999999, 1.0 - 2 ** -40, 1.0,
                               1.3, -0.2])
def test_device_trig_emulation(t):
    """schedules.h sincos_half_pi on the GPU (no CUDA double sin/cos, whose
    reduction is a local-memory stack frame): q = fl(a/pi), e = a - pi q by
    two fma residuals (exact rationals here), sin(a) = sinpi(q) + e cospi(q),
    cos(a) = cospi(q) - e sinpi(q). Within 3 ulp of the host's sin(a), cos(a)
    for the same double a; cos at t = 1 is fl(pi/2)'s 6.1e-17, not 0."""
    from fractions import Fraction as F
    pi_hi, pi_lo = 3.141592653589793, 1.2246467991473532e-16
    a = 0.5 * math.pi * t
    q = a * (1 / math.pi)
    e = float(F(a) - F(q) * F(pi_hi))  # fma(-q, PI_HI, a): exact, then rounded
    e = float(F(e) - F(q) * F(pi_lo))
    sq, cq = _sinpi(q), _cospi(q)
    s, c = sq + e * cq, cq - e * sq
    for got, want in ((s, math.sin(a)), (c, math.cos(a))):
        assert abs(got - want) <= 3 * math.ulp(abs(want)), (t, got, want)
    if t == 1.0:
        assert c == pytest.approx(6.123233995736766e-17, rel=1e-15)


@pytest.mark.parametrize("x,y", [(0.0, 0.0), (0.0, 2.0), (0.0, -1.0), (0.0, 0.7), (1.0, 1e300),
                                 (0.3, 1.7), (0.3, 0.7), (1.87, 7.0), (1.87, 6.0),
                                 (-0.5, 3.0), (-0.5, 2.0), (-0.5, 0.5), (2.0, -1.0)])
def test_device_pow_emulation(x, y):
    """schedules.h pow_d on the GPU (CUDA's accurate pow is an out-of-line call):
    exp2(y log2|x|) with pow's special cases, here with Python's math (same
    formula in double) against math.pow: equal special cases, ~1e-15 otherwise."""
    def pow_d(x, y):
        if y == 0.0 or x == 1.0:
            return 1.0
        lx = math.log2(abs(x)) if x != 0.0 else -math.inf
        m = 2.0 ** (y * lx) if y * lx < 1024 else math.inf
        if x >= 0.0:
            return m
        if y != math.floor(y):
            return math.nan
        return -m if 0.5 * y != math.floor(0.5 * y) else m
    try:
        want = math.pow(x, y)
    except (ValueError, ZeroDivisionError):
        want = math.nan if x < 0 else math.inf
    got = pow_d(x, y)
    if math.isnan(want) or math.isinf(want) or want == 0.0:
        assert (math.isnan(got) and math.isnan(want)) or got == want, (got, want)
    else:
        assert got == pytest.approx(want, rel=1e-14)


def test_cuda_is_the_gpu_default_when_built():
    """The cheaper host path (one C++ op, coefficients in the kernel) is the
    default on CUDA tensors; triton when the CUDA kernels are not built."""
    from flowkern.backend import _auto, triton_available
    want = "cuda" if cuda_built() else ("triton" if triton_available() else "torch")
    assert _auto(torch.device("cuda")) == want
    assert _auto(torch.device("cpu")) == "cpu"


# ---------------------------------------------------------------------------
# the loss on the GPU launches its two kernels and no torch op


@pytest.mark.parametrize("red", [0, 1, 2], ids=["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_glue_makes_no_torch_op(red, weighted):
    """fm_loss is the row-sum kernel and one finishing block (weight,
    reduction and the cast in the kernel), fm_loss_backward one kernel that
    reads the loss's gradient and the weight itself: besides allocations, no
    aten op (each would be a launch and a host round trip on a GPU)."""
    rows = 6
    x0, x1, pred = tensors(3, (rows, 40), torch.float32)
    w = times(rows, seed=5) if weighted else None
    t = times(rows)
    grad = torch.ones(rows) if red == 2 else torch.ones(())
    assert_kernels_alone(lambda: SIM.fm_loss(pred, x0, x1, t, 0.0, 1, [], 0, w, red, False),
                         "flowkern_sim::fm_loss")
    assert_kernels_alone(
        lambda: SIM.fm_loss_backward(grad, pred, x0, x1, t, 0.0, 1, [], 0, w, red, 1),
        "flowkern_sim::fm_loss_backward")


LOSS_WEIGHTS = {  # weight and loss-gradient storage the kernels read as they lie
    "float32": lambda w: w.float(), "float64": lambda w: w.double(),
    "float16": lambda w: w.half(), "bfloat16": lambda w: w.bfloat16(),
    "int64 (converted)": lambda w: (w * 4).round().long(),
    "strided": lambda w: torch.stack([w, -w], 1)[:, 0],
    "one value": lambda w: w[:1],
    "0-dim": lambda w: w[0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LOSS_WEIGHTS))
def test_loss_glue_weight_and_grad_storage(dtype, kind):
    """The weight and the loss's gradient in every storage the glue passes
    through fk::Reals: the CPU op's result (it reads them the same way),
    and the loss against its float64 formula (linear schedule: the
    velocity target is x1 - x0)."""
    rows = 5
    x0, x1, pred = tensors(3, (rows, 2, 33), dtype)
    t = times(rows)
    make = LOSS_WEIGHTS[kind]
    w = make(times(rows, seed=5))
    for red in range(3):
        got = SIM.fm_loss(pred, x0, x1, t, 0.0, 0, [], 0, w, red, False)
        want = CPU.fm_loss(pred, x0, x1, t, 0.0, 0, [], 0, w, red, False)
        torch.testing.assert_close(got, want, rtol=2e-7 if dtype != torch.float64 else 1e-15,
                                   atol=0)
        # the float64 formula: w_b * mean over the row of (pred - (x1 - x0))^2
        err = (pred.double() - (x1.double() - x0.double())).reshape(rows, -1)
        per = (err * err).mean(1) * w.double().reshape(-1).expand(rows)
        ref = per if red == 2 else per.sum() * (1.0 / rows if red == 0 else err.shape[1])
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=0)
        g0 = make(times(rows, seed=7) + 0.5)
        grad = g0.reshape(-1).expand(rows).contiguous() if red == 2 else g0.reshape(-1)[0]
        if red == 2 and kind == "strided":
            grad = torch.stack([grad, -grad], 1)[:, 0]
        if red == 2 and kind == "one value":
            grad = grad.reshape(1, rows)  # (1, B): read as B values
        for nout in (1, 3):
            equal(SIM.fm_loss_backward(grad, pred, x0, x1, t, 0.0, 0, [], 0, w, red, nout),
                  CPU.fm_loss_backward(grad, pred, x0, x1, t, 0.0, 0, [], 0, w, red, nout))


def test_loss_glue_finishes_many_rows():
    """More rows than the finishing block's threads (fk::kFinishThreads =
    1024): each thread sums several rows; and rows of several chunks (the
    row-sum plan's partials)."""
    for shape in [(3000, 3), (3, 20000)]:
        x0, x1, pred = tensors(3, shape, torch.float64)
        t = times(shape[0], dtype=torch.float64)
        w = times(shape[0], seed=5, dtype=torch.float64)
        for red in range(3):
            got = SIM.fm_loss(pred, x0, x1, t, 0.0, 2, [1.7], 1, w, red, False)
            want = CPU.fm_loss(pred, x0, x1, t, 0.0, 2, [1.7], 1, w, red, False)
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


class _Record(torch.utils._python_dispatch.TorchDispatchMode):
    """The flowkern:: calls a public call makes (clones of their arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "flowkern" and func._opname != "empty_output":
            def clone(a):
                if isinstance(a, torch.Tensor):
                    return a.detach().clone()
                return [clone(b) for b in a] if isinstance(a, (list, tuple)) else a
            self.calls.append((func, [clone(a) for a in args], dict(kwargs)))
        return func(*args, **kwargs)


def _with_backward():
    """Public training calls (the flow-map loss too) whose backward runs as
    well (its fused kernels)."""
    g = torch.Generator().manual_seed(1)
    x, x1, p = (torch.randn(5, 7, generator=g) for _ in range(3))
    t = torch.rand(5, generator=g) * 0.8 + 0.1

    def grad_of(make):
        def call():
            leaves = [v.clone().requires_grad_(True) for v in (x, x1, p)]
            out = make(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)
        return call
    yield grad_of(lambda a, b, c: flowkern.interpolate(a, b, t))
    yield grad_of(lambda a, b, c: flowkern.convert(c, a, t, src="x1", dst="velocity"))
    yield grad_of(lambda a, b, c: flowkern.flow_matching_loss(c, a, b, t, weight=t))
    yield grad_of(lambda a, b, c: flowkern.flow_matching_loss(c, a.detach(), b.detach(), t,
                                                              reduction="none"))
    yield grad_of(lambda a, b, c: flowkern.flowmap_loss(a, c, b, t * 0.5, t))


def test_every_public_call_is_kernels_alone_on_the_glue():
    """Each flowkern:: op that a public call (helpers.public_calls, and the
    training ops' backward) makes, run on the simulated CUDA glue, records no
    aten op besides allocations and views: on a GPU a call is its kernel
    launches, with no torch op (a launch and a host round trip each) around
    them."""
    from helpers import public_calls
    seen = set()
    for call in list(public_calls()) + list(_with_backward()):
        with _Record() as rec:
            call()
        for func, args, kwargs in rec.calls:
            sim = getattr(getattr(SIM, func._opname), func._overloadname)
            assert_kernels_alone(lambda: sim(*args, **kwargs), f"flowkern_sim::{func._opname}")
            seen.add(func._opname)
    assert {"interpolate", "fm_loss", "fm_loss_backward", "convert_backward",
            "interpolate_backward", "euler_step", "em_step", "lms_step",
            "flowmap_loss", "flowmap_loss_backward"} <= seen, seen
