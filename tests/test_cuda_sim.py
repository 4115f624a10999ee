"""The CUDA training kernels' indexing, proven on CPU by the grid simulator.

torch.ops.flowkern_sim._sim_* run the kernels' header bodies over every block and
thread of the grid that csrc/cuda/training.cu launches (same launch plan, same
pointers). Each result is compared with the CPU kernel (same per-element
code, so bit-exact for the elementwise ops) and with float64 formulas written
here from docs/design.md §1/§3/§4 (within dtype tolerances). Outputs start as NaN, so
an element the grid never writes fails.
"""
import math

import numpy as np
import pytest
import torch

from cuda_sim_helpers import (DTYPES, OPS, SIM, SHAPES, THREADS, WIDE, acc, check_plan,
                              make_inputs)

VELOCITY, X1, EPS, SCORE = range(4)
PREDS = (VELOCITY, X1, EPS, SCORE)


# ---------------------------------------------------------------- inputs

def make_coef(rows, dtype, gen):
    """(alpha, sigma, d_alpha, d_sigma) of the linear schedule on even rows and
    the cosine schedule on odd rows, t in [0.05, 0.95] (docs/design.md §2)."""
    t = 0.05 + 0.9 * torch.rand(rows, generator=gen, dtype=torch.float64)
    lin = torch.stack([t, 1 - t, torch.ones_like(t), -torch.ones_like(t)], 1)
    h = math.pi / 2
    cos = torch.stack([torch.sin(h * t), torch.cos(h * t),
                       h * torch.cos(h * t), -h * torch.sin(h * t)], 1)
    odd = (torch.arange(rows) % 2 == 1)[:, None]
    return torch.where(odd, cos, lin).to(acc(dtype)).contiguous()


# ------------------------------------------------------ reference maps
# Every op is out_k = sum_j M[row, k, j] * in_j per element. M and the result
# are computed in numpy's extended precision (80-bit on x86-64), so that the
# reference's own rounding is far below a float64 kernel's: the conversions
# below compose through (d, eps), which cancels in float64.

LD = np.longdouble
EXTENDED = np.finfo(LD).eps < 1e-18


def target_pair(c, target):
    """Coefficients (on x1, on x0) of the training target y (docs/design.md §4)."""
    a, s, da, ds = c
    one, zero = a * 0 + 1, a * 0
    return {VELOCITY: (da, ds), X1: (one, zero), EPS: (zero, one), SCORE: (zero, -1 / s)}[target]


def interpolate_matrix(c, target):
    """(x0, x1) -> (x_t = alpha x1 + sigma x0, y)."""
    a, s = c[0], c[1]
    y1, y0 = target_pair(c, target)
    return [[s, a], [y0, y1]]


def convert_matrix(c, src, dst):
    """(x, pred of type src) -> pred as type dst: src gives the denoiser d and
    eps as affine maps of (x, pred) (docs/design.md §3), dst is read off them."""
    a, s, da, ds = c
    one, zero = a * 0 + 1, a * 0
    det = a * ds - s * da
    d, eps = {
        X1: ((zero, one), (1 / s, -a / s)),
        EPS: ((1 / a, -s / a), (zero, one)),
        VELOCITY: ((ds / det, -s / det), (-da / det, a / det)),
        SCORE: ((1 / a, s * s / a), (zero, -s)),  # eps = -sigma * score
    }[src]
    out = {
        X1: d,
        EPS: eps,
        VELOCITY: tuple(da * dj + ds * ej for dj, ej in zip(d, eps)),  # u = a' x1 + s' x0
        SCORE: tuple(-ej / s for ej in eps),
    }[dst]
    return [list(out)]


def residual_vector(c, target):
    """d(pred - y)/d(pred, x0, x1)."""
    y1, y0 = target_pair(c, target)
    return [y0 * 0 + 1, -y0, -y1]


def loss_backward_matrix(c, g, target):
    """d(g * (pred - y)^2)/d(pred, x0, x1) = 2 g rho p with rho = p . in."""
    p = residual_vector(c, target)
    return [[2 * g * pk * pj for pj in p] for pk in p]


def transpose(M):
    """A vector-Jacobian product is M^T."""
    return [list(col) for col in zip(*M)]


def reference_matrix(op, coef, params, grad_rows=None):
    """M as a (B, NO, NI) extended-precision array."""
    c = tuple(coef.double().numpy().astype(LD).T)
    M = {"interpolate": lambda: interpolate_matrix(c, *params),
         "interpolate_backward": lambda: transpose(interpolate_matrix(c, *params)),
         "convert": lambda: convert_matrix(c, *params),
         "convert_backward": lambda: transpose(convert_matrix(c, *params)),
         "fm_loss_backward": lambda: loss_backward_matrix(
             c, grad_rows.double().numpy().astype(LD), *params),
         "fm_loss_backward_pred": lambda: loss_backward_matrix(
             c, grad_rows.double().numpy().astype(LD), *params)[:1]}[op]()
    return np.stack([np.stack(row, -1) for row in M], -2)


def apply_matrix(M, xs):
    """(out_k, scale_k, own) as (B, NO or 1, inner) arrays: the kernel's
    rounding is relative to scale = |M| |in|; own = |in| * 2^10 extended ulps
    bounds the reference's own rounding (where a composed coefficient should
    be 0 it is ~1e-19, and the kernel's exact 0 must pass)."""
    rows = xs[0].shape[0]
    x = np.stack([t.double().reshape(rows, t.numel() // max(rows, 1)).numpy().astype(LD)
                  for t in xs], 1)  # (B, NI, inner)
    scale = np.einsum("bkj,bje->bke", np.abs(M), np.abs(x))
    own = np.abs(x).sum(1, keepdims=True) * (1024 * np.finfo(LD).eps)
    return np.einsum("bkj,bje->bke", M, x), scale, own


def assert_within(got, ref, scale, own, dtype, what):
    """|got - ref| <= 1 ulp of the storage dtype + 16 ulp of the accumulation
    dtype relative to the magnitude of the terms (coefficients are computed in
    the accumulation dtype) + the storage dtype's subnormal spacing + the
    reference's own error."""
    st, ac = torch.finfo(dtype), torch.finfo(acc(dtype))
    rel_out = st.eps if dtype in (torch.float16, torch.bfloat16) else 0.0
    k_acc = 16 if EXTENDED else 1024
    bound = rel_out * np.abs(ref) + k_acc * ac.eps * scale + st.tiny * st.eps + own
    err = np.abs(got.double().numpy().astype(LD) - ref)
    ok = err <= bound  # False for NaN: an unwritten element fails
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} bad elements; first flat index {i}: "
                             f"got {got.flatten()[i].item()} ref {float(ref.flat[i])} "
                             f"bound {float(bound.flat[i])}")


# ------------------------------------------------------------ simulation

NI = {"interpolate": 2, "interpolate_backward": 2, "convert": 2, "convert_backward": 1,
      "fm_loss_backward": 3, "fm_loss_backward_pred": 3}


def cpu_op(op, inputs, coef, params, grad_rows):
    """The CPU op of the kernel `op`, given the table (kind -1) as the kernel is."""
    tab = (coef, 0.0, -1, [])
    if op == "interpolate":
        return OPS.interpolate(*inputs, *tab, *params, False)
    if op == "interpolate_backward":
        return OPS.interpolate_backward(*inputs, *tab, *params)
    if op == "convert":  # the kernel's inputs are (x, pred), the op's (pred, x_t)
        return (OPS.convert(inputs[1], inputs[0], *tab, *params, False),)
    if op == "convert_backward":  # the kernel writes (g_x, g_pred), the op returns (g_pred, g_x)
        return OPS.convert_backward(*inputs, *tab, *params)[::-1]
    # The kernel's per-row gradient is the op's: reduction "sum" (1) of a unit
    # gradient with the weights w = grad_rows.
    nout = 1 if op == "fm_loss_backward_pred" else 3
    return OPS.fm_loss_backward(torch.ones(()), *inputs, *tab, *params, grad_rows, 1, nout)


def check_lincomb(op, params, dtype, shape, offset, max_blocks, seed=0):
    """Simulates the op's grid; returns the plan (vec, threads, blocks) it used."""
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    inputs = make_inputs(NI[op], shape, dtype, gen, offset)
    coef = make_coef(rows, dtype, gen)
    grad_rows = (torch.randn(rows, generator=gen, dtype=torch.float64).to(acc(dtype))
                 if op.startswith("fm_loss_backward") else None)
    outs, plan = SIM._sim_lincomb(op, inputs, coef, grad_rows, list(params), max_blocks, offset)
    what = f"{op}{tuple(params)} {dtype} {shape} offset={offset} max_blocks={max_blocks}"
    cpu = cpu_op(op, inputs, coef, params, grad_rows)
    assert len(outs) == len(cpu)
    M = reference_matrix(op, coef, params, grad_rows)
    ref, scale, own = apply_matrix(M, inputs)
    for k, (got, want) in enumerate(zip(outs, cpu)):
        assert got.shape == torch.Size(shape) and got.dtype == dtype
        assert torch.equal(got, want), f"{what}: output {k} differs from the CPU kernel"
        assert_within(got.reshape(ref.shape[0], ref.shape[2]), ref[:, k], scale[:, k], own[:, 0], dtype,
                      f"{what} out {k}")
    return plan


LINCOMB_CONFIGS = (
    [("interpolate", (t,)) for t in PREDS]
    + [("interpolate_backward", (t,)) for t in PREDS]
    + [("convert", (s, d)) for s in PREDS for d in PREDS]
    + [("convert_backward", (s, d)) for s in PREDS for d in PREDS]
    + [("fm_loss_backward", (t,)) for t in PREDS]
    + [("fm_loss_backward_pred", (t,)) for t in PREDS]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,params", LINCOMB_CONFIGS, ids=str)
def test_lincomb_every_config(op, params, dtype):
    """Every target / conversion pair on the three launch paths."""
    wide = WIDE[dtype]
    # 128-bit packs, grid-stride (2 blocks of 256 threads < 9*1024/wide chunks)
    plan = check_lincomb(op, params, dtype, (9, 1024), 0, 2)
    assert plan[0] == wide and plan[2] == 2
    # inner not divisible by the vector width: scalar path, one pass
    assert check_lincomb(op, params, dtype, (5, 7), 0, 0)[0] == 1
    # misaligned pointers, one block striding over rows of 1023
    assert check_lincomb(op, params, dtype, (7, 1023), 1, 1) == [1, THREADS, 1]


REPRESENTATIVE = [("interpolate", (SCORE,)), ("interpolate_backward", (VELOCITY,)),
                  ("convert", (VELOCITY, SCORE)), ("convert_backward", (SCORE, X1)),
                  ("fm_loss_backward", (EPS,)), ("fm_loss_backward_pred", (X1,))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,params", REPRESENTATIVE, ids=str)
def test_lincomb_shapes(op, params, dtype):
    """Tails, row boundaries inside chunks and strides, empty tensors: every
    shape aligned and misaligned, with the full grid and with 1 or 3 blocks."""
    for shape in SHAPES:
        for offset in (0, 1):
            for max_blocks in (0, 1, 3):
                plan = check_lincomb(op, params, dtype, shape, offset, max_blocks,
                                     seed=len(shape) + shape[0])
                check_plan(plan, shape, dtype, offset, max_blocks)


# ------------------------------------------------------------------- loss

def loss_reference(inputs, coef, target):
    """Per-row sum of (pred - y)^2 in float64 and a bound on its fp error."""
    c = tuple(coef.double().numpy().astype(LD).T)
    p = np.stack(residual_vector(c, target), -1)[:, None, :]
    rho, scale, own = apply_matrix(p, inputs)
    return (rho[:, 0] ** 2).sum(1), ((scale + own)[:, 0] ** 2).sum(1)


LOSS_SHAPES = [(1, 1), (7, 7), (1023, 1), (1, 1023), (1023, 7), (7, 4099), (1, 4099),
               (4, 4096), (3, 2, 5, 7), (0, 8), (4, 0)]


@pytest.mark.parametrize("target", PREDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fm_loss_partial(dtype, target):
    """Partials per (row, chunk) through the shared-memory tree; chunk lengths
    that split rows unevenly, leave threads idle, or exceed the row."""
    gen = torch.Generator().manual_seed(target)
    ac = torch.finfo(acc(dtype))
    for shape in LOSS_SHAPES:
        rows = shape[0]
        inner = math.prod(shape[1:]) if rows else 0  # as the launchers compute it
        for offset, chunk_len in ((0, 0), (1, 5), (0, 300), (1, 1 << 20)):
            inputs = make_inputs(3, shape, dtype, gen, offset)
            coef = make_coef(rows, dtype, gen)
            partial, plan = SIM._sim_fm_loss_partial(*inputs, coef, target, chunk_len)
            what = f"{dtype} target={target} {shape} offset={offset} chunk_len={chunk_len}"
            threads, clen, nchunks, blocks = plan
            assert threads == THREADS and blocks == rows * nchunks
            assert nchunks == (max(1, -(-inner // clen)))
            assert partial.shape == (rows, nchunks) and partial.dtype == acc(dtype)
            got = partial.sum(1)
            if dtype in (torch.float32, torch.float64):  # the op's per-sample means are in dtype
                cpu = OPS.fm_loss(*inputs, coef, 0.0, -1, [], target, None, 2, False) * inner
                torch.testing.assert_close(got, cpu, rtol=64 * ac.eps, atol=0, msg=what)
            ref, scale = loss_reference(inputs, coef, target)
            err = np.abs(got.double().numpy().astype(LD) - ref)
            assert (err <= 64 * ac.eps * scale).all(), what


# ------------------------------------------------------------------ plans

def test_plans_64bit():
    """Plan arithmetic past 2^31 elements and the grid caps (the simulator
    cannot sweep such sizes, so the plan is checked on its own)."""
    rows, inner = 1 << 20, (1 << 13) + 8
    vec, threads, blocks = SIM._sim_plan_lincomb(rows, inner, 2, True, 0)
    assert (vec, threads, blocks) == (8, THREADS, 132 * 16)
    assert SIM._sim_plan_lincomb(rows, inner, 2, True, 1 << 40) == [8, THREADS,
                                                                    rows * inner // 8 // THREADS]
    assert SIM._sim_plan_lincomb(3, 1 << 33, 4, False, 7) == [1, THREADS, 7]
    assert SIM._sim_plan_lincomb(3, 6, 4, True, 0)[0] == 1  # 6 % 4 != 0
    assert SIM._sim_plan_lincomb(0, 8, 4, True, 0)[2] == 0
    threads, clen, nchunks, blocks = SIM._sim_plan_rowsum(5, (1 << 33) + 1, 0)
    assert (threads, clen) == (THREADS, 16 * THREADS)
    assert nchunks == (1 << 33) // clen + 1 and blocks == 5 * nchunks
    assert SIM._sim_plan_rowsum(5, 0, 0)[2:] == [1, 5]
