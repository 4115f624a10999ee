"""The CUDA flow-map loss kernels' indexing, proven on CPU by the grid simulator.

torch.ops.flowkern_sim._sim_flowmap_loss_partial / _sim_flowmap_loss_backward
build the launchers' functors (flowkern/flowmap.h) and run the row-sum and
elementwise kernel bodies over every block and thread of the grids
csrc/cuda/flowmap.cu launches (same plans, same pointers), over a step table
(the whole ops, with the times evaluated in the kernel and the finishing
block, run on the simulated glue: tests/test_cuda_glue.py). The backward must
equal the CPU op (csrc/cpu/flowmap.cpp: same functor and per-element code);
the row sums, reduced in another order, must match the float64 reference
(flowkern/reference/flowmap.py) within a bound relative to the summed
squared magnitudes. Outputs start as NaN, so an element or partial the grid
never writes fails.
"""
import math

import pytest
import torch

import flowkern
from cuda_sim_helpers import DTYPES, OPS, SIM, THREADS, WIDE, acc, check_plan, make_inputs
from flowkern.reference import flowmap as ref

PREDS = range(4)  # velocity, x1, eps, score (flowkern/_rules.py)
FORMS = (0, 1)  # data, noise (fk::EIForm)
NAMES = {0: "velocity", 1: "x1", 2: "eps", 3: "score"}
FLAGS = [(False, False), (True, False), (False, True), (True, True)]  # (grad_x, grad_target)
# Batch sizes 1, 3, 17 against rows of 1, 7, 1023 and 4100 elements (not a
# multiple of the 4096-element row-sum chunk, nor of 256 threads), a
# multi-dimensional sample, and empty tensors.
SHAPES = [(r, n) for r in (1, 3, 17) for n in (1, 7, 1023, 4100)] + [(3, 2, 5, 7), (0, 8),
                                                                      (4, 0)]


def make_table(rows, per_sample, dtype, gen):
    """flowkern.step_table: one row per sample (vp schedule) or one shared row
    (linear schedule), t in [0.1, 0.6], s - t in [0, 0.3]."""
    n = rows if per_sample else 1
    t = 0.1 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)
    if not per_sample:
        t, s = float(t[0]), float(s[0])
    return flowkern.step_table("vp" if per_sample else "linear", t, s, dtype=acc(dtype))


def reference_rows(inputs, table, pred, form):
    """Per-row sum of (a x + b p - target)^2 in float64 and the sum of the
    squared magnitudes (|a x| + |b p| + |target|)^2 that bounds its rounding."""
    rows = inputs[0].shape[0]
    inner = inputs[0].numel() // rows if rows else 0
    x, p, y = (t.double().reshape(rows, inner) for t in inputs)
    tab = table.double().expand(rows, table.shape[1])
    ct, cs = tab[:, :4], tab[:, 4:8]
    one = torch.ones(rows, 1, dtype=torch.float64)
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    kind = (NAMES[pred], "data" if form == 0 else "noise")
    a = ref.flowmap(one, zero, ct, cs, *kind)  # the map is a x + b p
    b = ref.flowmap(zero, one, ct, cs, *kind)
    want = ref.flowmap_loss_rows(x, p, y, ct, cs, *kind)
    scale = ((a.abs() * x.abs() + b.abs() * p.abs() + y.abs()) ** 2).sum(1)
    return want, scale


def check_rows(dtype, shape, pred, form, per_sample, offset, chunk_len, seed=0):
    """Simulates the row-sum grid; returns its plan (threads, chunk_len, nchunks, blocks)."""
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    inner = math.prod(shape[1:]) if rows else 0  # as the launchers compute it
    inputs = make_inputs(3, shape, dtype, gen, offset)
    table = make_table(rows, per_sample, dtype, gen)
    partial, plan = SIM._sim_flowmap_loss_partial(*inputs, table, pred, form, chunk_len)
    what = (f"{dtype} {shape} pred={pred} form={form} "
            f"table={'per-sample' if per_sample else 'shared'} offset={offset} "
            f"chunk_len={chunk_len}")
    threads, clen, nchunks, blocks = plan
    assert threads == THREADS and blocks == rows * nchunks, what
    assert nchunks == max(1, -(-inner // clen)), what
    assert partial.shape == (rows, nchunks) and partial.dtype == acc(dtype), what
    got = partial.sum(1)
    assert not got.isnan().any(), f"{what}: a partial was never written"
    eps = torch.finfo(acc(dtype)).eps
    want, scale = reference_rows(inputs, table, pred, form)
    bound = 64 * eps * scale
    err = (got.double() - want).abs()
    assert (err <= bound).all(), (f"{what}: differs from the float64 reference by "
                                  f"{(err / bound.clamp(min=1e-300)).max().item():.3g} "
                                  f"x the bound")
    return plan


def check_backward(dtype, shape, pred, form, per_sample, flags, offset, max_blocks, seed=0):
    """Simulates the backward grid; equal to the CPU op; returns its plan. The
    loss's gradient: one per row (reduction 'none') with a per-sample table,
    else one value (reduction 'mean')."""
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    inputs = make_inputs(3, shape, dtype, gen, offset)
    table = make_table(rows, per_sample, dtype, gen)
    reduction = 2 if per_sample else 0
    g = torch.randn(rows if per_sample else (), generator=gen, dtype=torch.float64).to(dtype)
    outs, plan = SIM._sim_flowmap_loss_backward(g, *inputs, table, pred, form, reduction, *flags,
                                                max_blocks, offset)
    want = OPS.flowmap_loss_backward(g, *inputs, table, 0.0, None, 0.0, -1, [], pred, form, None,
                                     reduction, *flags)
    what = (f"{dtype} {shape} pred={pred} form={form} "
            f"table={'per-sample' if per_sample else 'shared'} grad_x/target={flags} "
            f"offset={offset} max_blocks={max_blocks}")
    assert len(outs) == len(want) == 1 + sum(flags), what
    for k, (o, w) in enumerate(zip(outs, want)):
        assert o.shape == torch.Size(shape) and o.dtype == dtype, what
        assert not w.isnan().any(), f"{what}: the CPU op made NaN (bad test table)"
        assert torch.equal(o, w), f"{what}: output {k} differs from the CPU op"
    return plan


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_every_config(dtype):
    """Every prediction type, form and table layout, with the default chunk
    (one chunk per row of 1023) and with 300-element chunks over misaligned
    rows of 4100 (14 chunks per row, the last one partial)."""
    for pred in PREDS:
        for form in FORMS:
            for per_sample in (False, True):
                args = (dtype, (3, 1023), pred, form, per_sample)
                assert check_rows(*args, 0, 0)[2] == 1
                assert check_rows(dtype, (3, 4100), pred, form, per_sample, 1, 300)[2] == 14


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_shapes(dtype):
    """Every shape, aligned and misaligned, with chunks of the default length
    (4096: rows of 4100 split in two), of 5 (most threads idle) and longer
    than any row; a per-sample table for non-empty batches."""
    for shape in SHAPES:
        for offset, chunk_len in ((0, 0), (1, 5), (0, 1 << 20)):
            check_rows(dtype, shape, 3, 1, shape[0] > 0, offset, chunk_len,
                       seed=len(shape) + shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_every_config(dtype):
    """Every prediction type, form, table layout and set of optional outputs
    on the three launch paths: 128-bit packs with a grid-stride loop (2 blocks
    for 9*1024/wide chunks), the scalar path (inner % wide != 0), and
    misaligned pointers with one block striding over rows of 1023."""
    wide = WIDE[dtype]
    for pred in PREDS:
        for form in FORMS:
            for per_sample in (False, True):
                for flags in FLAGS:
                    args = (dtype, pred, form, per_sample, flags)
                    plan = check_backward(dtype, (9, 1024), *args[1:], 0, 2)
                    assert plan[0] == wide and plan[2] == 2
                    assert check_backward(dtype, (5, 7), *args[1:], 0, 0)[0] == 1
                    assert check_backward(dtype, (7, 1023), *args[1:], 1, 1) == [1, THREADS, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(True, True), (False, False)], ids=str)
def test_backward_shapes(dtype, flags):
    """Tails, row boundaries inside chunks, grid strides and empty tensors:
    every shape aligned and misaligned, with the full grid and 1 or 3 blocks."""
    for shape in SHAPES:
        for offset in (0, 1):
            for max_blocks in (0, 1, 3):
                plan = check_backward(dtype, shape, 0, 0, shape[0] > 0, flags, offset,
                                      max_blocks, seed=len(shape) + shape[0])
                check_plan(plan, shape, dtype, offset, max_blocks)


def test_bad_arguments():
    x = torch.zeros(2, 8)
    table = flowkern.step_table("linear", 0.2, 0.3)
    with pytest.raises(RuntimeError, match="step table"):
        SIM._sim_flowmap_loss_partial(x, x, x, torch.zeros(3, 12), 1, 0)
    with pytest.raises(RuntimeError, match="step table"):
        SIM._sim_flowmap_loss_partial(x, x, x, table.double(), 1, 0)
    with pytest.raises(RuntimeError, match="unknown form 2"):
        SIM._sim_flowmap_loss_partial(x, x, x, table, 1, 2)
    with pytest.raises(RuntimeError, match="unknown prediction 4"):
        SIM._sim_flowmap_loss_backward(torch.zeros(2), x, x, x, table, 4, 0, 2, True, True)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        SIM._sim_flowmap_loss_backward(torch.zeros(2), x, x, x[:, :4], table, 1, 0, 2, True, True)
    with pytest.raises(RuntimeError, match="grad must be a scalar, or"):
        SIM._sim_flowmap_loss_backward(torch.zeros(3), x, x, x, table, 1, 0, 2, True, True)
    with pytest.raises((ValueError, RuntimeError), match="reduction: expected"):
        SIM._sim_flowmap_loss_backward(torch.zeros(2), x, x, x, table, 1, 0, 3, True, True)
