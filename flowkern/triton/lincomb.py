"""The Triton elementwise and row-sum engines (mirror of lincomb.h/rowsum.h):
their helpers and launchers; the two kernels are in kernels.py.

A (B, ...) tensor is a (rows, inner) matrix; a program owns a [ROWS, BLOCK_N]
tile (a 1-D grid, so neither grid-axis limit binds) and writes
out_k = sum_j M[k][j] in_j, where a row function
fn(P0, P1, P2, coef, stride, aux, w, r, rmask) returns the per-row matrix
M as a tuple of NO tuples of NI [ROWS, 1] tensors (NI + 1 with NOISE: the
last entry multiplies the in-kernel Gaussian xi, philox.py). Each op family
writes its own row functions (@triton.jit) and passes one to the launcher,
which hands the kernel its code (kernels.ROW_CODE), so the loops live here
once. Offsets are 64-bit; the coefficient table's row stride is 0 when one
row serves the whole batch.

What a row function gets as `coef` is named by the ROWS_OF constexpr (_row_coef):
SCHED_ROWS, a Sched tuple (coeffs.py; the training ops); STEP_ROWS, a StepRow
(the steps, the flow map); NO_ROWS, zeros of the accumulation dtype
(lincomb_step: host weights only). KIND = TABLE reads them from a table in
`coef`; KIND >= 0 is a built-in schedule evaluated here (schedules.py): at
each row's time (or the float t_value) for a Sched, at the float times
t_value, s_value, tp_value (NaN: no previous time) for a StepRow, as
csrc/cpu/step_args.h builds the row from `times` - no table is built. ACC is
the accumulation dtype (float64 for float64 data, float32 otherwise).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._validate import acc_dtype
from ..backend import triton_ops_traced
from .coeffs import ALPHA, SIGMA, load_sched, load_step
from .schedules import schedule_at

TILE = 2048          # elements per program: 16 per thread at 4 warps
HEAVY_TILE = 1024    # for the kernels is_heavy names (many inputs, Philox state, 3 x 3):
                     # 8 elements per thread keeps them free of spills (flowkern.triton.aot)
MAX_ROWS = 64        # rows per program: each row keeps its coefficient matrix in registers
NUM_WARPS = 4
# Register budget per thread given to ptxas. Left to itself it picks 64 for some
# 3-input fp16 tiles and spills; 128 x 4 warps still fits 4 programs per SM.
# flowkern.triton.aot compiles with the same option.
MAX_NREG = 128
MAX_IN, MAX_OUT = 6, 3
MAX_WEIGHTS = 12     # host weight scalars of lincomb_kernel (steps.weight_args: 6 pairs)
TABLE = -1  # the KIND of a table (flowkern/ops/training.py TABLE_KIND)
SCHED_ROWS, STEP_ROWS, NO_ROWS = 0, 1, 2  # ROWS_OF: what the row functions read
_TABLE = tl.constexpr(TABLE)
_SCHED_ROWS, _STEP_ROWS = tl.constexpr(SCHED_ROWS), tl.constexpr(STEP_ROWS)
ACC_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def is_heavy(n_in: int, noise: bool, n_out: int = 1) -> bool:
    """Whether a kernel takes the smaller tile: >= 4 inputs, in-kernel noise,
    or a 3 x 3 coefficient matrix (the flow-map backward spilled 120 bytes at
    8 rows x 128 with the full tile; flowkern.triton.aot)."""
    return n_in >= 4 or noise or n_in * n_out >= 9


def tile_config(inner: int, heavy: bool = False, itemsize: int = 4) -> tuple[int, int]:
    """(ROWS, BLOCK_N) for rows of length `inner`: several whole rows when they
    are short (tiny 2-D data), row segments of the tile otherwise. float64 tiles
    hold half the elements: each takes two registers, and at MAX_NREG the
    3-in/3-out loss backward spills at 2048 (flowkern.triton.aot)."""
    tile = HEAVY_TILE if heavy else TILE
    tile //= max(1, itemsize // 4)
    block_n = min(triton.next_power_of_2(max(inner, 1)), tile)
    if block_n < tile:
        # Multi-row tiles hold a coefficient matrix per row: half the elements keep
        # them spill-free (ptxas reports of flowkern.triton.aot).
        tile //= 2
    return max(1, min(tile // block_n, MAX_ROWS)), block_n


@triton.jit
def _tile(rows, inner, n_col_blocks, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_r = pid // n_col_blocks
    pid_c = pid - pid_r * n_col_blocks
    r = pid_r * ROWS + tl.arange(0, ROWS)
    c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < rows
    mask = rmask[:, None] & (c < inner)[None, :]
    offs = r.to(tl.int64)[:, None] * inner + c[None, :]
    return r, rmask, offs, mask, pid_c


@triton.jit
def _sched_at(KIND: tl.constexpr, t, sp0, sp1, sp2, ACC: tl.constexpr):
    al, sg, da, ds = schedule_at(KIND, t, sp0, sp1, sp2)
    return al.to(ACC), sg.to(ACC), da.to(ACC), ds.to(ACC)


@triton.jit
def _row_coef(coef, stride, tptr, t_step, t_value, s_value, tp_value, g_value, sp0, sp1, sp2,
              r, rmask, ROWS_OF: tl.constexpr, KIND: tl.constexpr, T_TENSOR: tl.constexpr,
              ACC: tl.constexpr):
    """What the row function receives as `coef` (see the module docstring). Times of
    masked rows read as 0.5, where every built-in's values are finite."""
    zero = tl.zeros([r.shape[0], 1], ACC)
    if ROWS_OF == _SCHED_ROWS:
        if KIND == _TABLE:
            return load_sched(coef, r, rmask)
        else:
            if T_TENSOR:
                t = tl.load(tptr + r.to(tl.int64) * t_step, mask=rmask, other=0.5)
                t = t.to(tl.float64)[:, None]
            else:
                t = zero.to(tl.float64) + t_value
            return _sched_at(KIND, t, sp0, sp1, sp2, ACC)
    elif ROWS_OF == _STEP_ROWS:
        if KIND == _TABLE:
            return load_step(coef, stride, r, rmask)
        else:  # one row for the batch, from the host's times (step_args.h step_coef)
            z64 = zero.to(tl.float64)
            t, s, tp = z64 + t_value, z64 + s_value, z64 + tp_value
            prev = _sched_at(KIND, tl.where(tp == tp, tp, 0.5), sp0, sp1, sp2, ACC)
            no_prev = tp != tp
            return (_sched_at(KIND, t, sp0, sp1, sp2, ACC),
                    _sched_at(KIND, s, sp0, sp1, sp2, ACC),
                    tl.where(no_prev, 1.0, prev[ALPHA]).to(ACC),
                    tl.where(no_prev, 1.0, prev[SIGMA]).to(ACC),
                    (s - t).to(ACC), (z64 + g_value).to(ACC))
    else:
        return zero


@triton.jit
def _load(p, offs, mask, ACC: tl.constexpr):
    return tl.load(p + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_inputs(i0, i1, i2, i3, i4, i5, offs, mask, ACC: tl.constexpr, NI: tl.constexpr):
    """The NI inputs as a tuple (unused slots repeat the first; never read)."""
    x0 = _load(i0, offs, mask, ACC)
    x1, x2, x3, x4, x5 = x0, x0, x0, x0, x0
    if NI > 1:
        x1 = _load(i1, offs, mask, ACC)
    if NI > 2:
        x2 = _load(i2, offs, mask, ACC)
    if NI > 3:
        x3 = _load(i3, offs, mask, ACC)
    if NI > 4:
        x4 = _load(i4, offs, mask, ACC)
    if NI > 5:
        x5 = _load(i5, offs, mask, ACC)
    return x0, x1, x2, x3, x4, x5


@triton.jit
def _dot(m, xs, NI: tl.constexpr, SKIP: tl.constexpr):
    """sum_j m[j] * xs[j] for j < NI, leaving out the j whose bit is set in
    SKIP: structural zeros (lincomb.h reads()), so a NaN in an input that the
    output does not read stays out of it (0 * NaN = NaN)."""
    if SKIP & 1:
        y = tl.zeros_like(xs[0])
    else:
        y = m[0] * xs[0]
    for j in tl.static_range(1, NI):
        if (SKIP >> j) & 1 == 0:
            y += m[j] * xs[j]
    return y


@triton.jit
def _out(m, xs, xi, NI: tl.constexpr, NOISE: tl.constexpr, SKIP: tl.constexpr):
    y = _dot(m, xs, NI, SKIP)
    if NOISE:
        y += m[NI] * xi
    return y


def _kernels():
    """flowkern.triton.kernels (the two kernels and the row-function codes),
    imported at the first launch: it imports every family's row functions,
    and the families import this module."""
    from . import kernels
    return kernels


def launchable(kernel):
    """What a launch calls: the kernel, or where the flowkern_triton ops are
    triton_ops (backend.triton_ops_traced) wrap_triton(kernel), which a
    tracing torch.compile records as the kernel's call (outside tracing it
    is the kernel itself)."""
    return wrap_triton(kernel) if triton_ops_traced() else kernel


def _grid(x, heavy=False):
    rows = x.shape[0]
    inner = x.numel() // rows
    rows_per, block_n = tile_config(inner, heavy, x.element_size())
    n_col = triton.cdiv(inner, block_n)
    return (triton.cdiv(rows, rows_per) * n_col,), rows, inner, rows_per, block_n, n_col


def _pad(ts, n):
    return list(ts) + [ts[0]] * (n - len(ts))


def _stride(coef, rows):
    return 0 if coef.shape[0] == 1 and rows != 1 else coef.shape[1]


def skip_mask(*pairs) -> int:
    """The SKIP constexpr of lincomb_kernel: bit k * MAX_IN + j set for each
    (output k, input j) the output does not read (structural zeros)."""
    return sum(1 << (k * MAX_IN + j) for k, j in pairs)


def sched_rows(t, t_value, kind, params):
    """A training op's coefficient source: its (t, t_value, kind, params)."""
    return (SCHED_ROWS, t, t_value, kind, params)


def step_rows(table, times, kind, params):
    """A step's coefficient source: its (table, times, kind, params)."""
    return (STEP_ROWS, table, times, kind, params)


def _params(params):
    return [float(v) for v in params] + [0.0] * (3 - len(params))


def _coef_args(src, like):
    """The kernels' coefficient arguments (coef, stride, tptr, t_step, t_value,
    s_value, tp_value, g_value, sp0, sp1, sp2) and constexprs (ROWS_OF, KIND,
    T_TENSOR, ACC) of a source: sched_rows(...), step_rows(...) or None (no
    rows; a tensor stands in for the pointers, never read)."""
    acc = ACC_TL[acc_dtype(like.dtype)]
    if src is None:
        return ((like, 0, like, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                dict(ROWS_OF=NO_ROWS, KIND=TABLE, T_TENSOR=False, ACC=acc))
    rows_of, tab, tv, kind, params = src
    if kind == TABLE:
        stride = 4 if rows_of == SCHED_ROWS else _stride(tab, like.shape[0])
        return ((tab, stride, tab, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                dict(ROWS_OF=rows_of, KIND=TABLE, T_TENSOR=False, ACC=ACC_TL[tab.dtype]))
    const = dict(ROWS_OF=rows_of, KIND=kind, T_TENSOR=tab is not None, ACC=acc)
    if rows_of == STEP_ROWS:  # tv: the host's [t, s, t_prev (NaN: none), g]
        return (like, 0, like, 0, *(float(v) for v in tv), *_params(params)), const
    if tab is None:
        return (like, 0, like, 0, float(tv), 0.0, 0.0, 0.0, *_params(params)), const
    step = 0 if tab.shape[0] == 1 else tab.stride(0)
    return (like, 0, tab, step, 0.0, 0.0, 0.0, 0.0, *_params(params)), const


def launch_lincomb(row_fn, p0, p1, inputs, outputs, src, aux=None, p2=0, w=1.0,
                   noise=None, skip=0):
    """outputs[k] = M_row[k] . inputs (+ noise term) for contiguous (rows, ...)
    tensors; src: the coefficient source (_coef_args); noise=(seed,
    offset, seeds) draws xi per element (philox.py; seeds: None or the (rows,)
    int64 per-sample seeds; without them a tensor stands in for the pointer,
    never read, as for `aux`); skip: the terms no output reads (skip_mask);
    aux: a tensor the row function reads, or steps.weight_args's floats (the
    kernel's scalars wt0 .. wt11)."""
    assert 1 <= len(inputs) <= MAX_IN and 1 <= len(outputs) <= MAX_OUT
    if inputs[0].numel() == 0:
        return
    grid, rows, inner, rows_per, block_n, n_col = _grid(
        inputs[0], is_heavy(len(inputs), noise is not None, len(outputs)))
    seed, offset, seeds = noise if noise is not None else (0, 0, None)
    (c, stride, *times), const = _coef_args(src, inputs[0])
    weights = isinstance(aux, tuple)  # steps.weight_args's scalars, else a pointer or None
    wts = (aux + (0.0,) * (MAX_WEIGHTS - len(aux))) if weights else (0.0,) * MAX_WEIGHTS
    K = _kernels()
    launchable(K.lincomb_kernel)[grid](
        *_pad(inputs, MAX_IN), *_pad(outputs, MAX_OUT), c, stride,
        c if aux is None or weights else aux, *wts, float(w),
        seed, offset, c if seeds is None else seeds, *times, rows, inner, n_col,
        P0=p0, P1=p1, P2=p2, ROW=K.ROW_CODE[row_fn], NI=len(inputs), NO=len(outputs),
        NOISE=noise is not None, PER_SAMPLE=seeds is not None, SKIP=skip, ROWS=rows_per,
        BLOCK_N=block_n, WEIGHTS=weights, **const, num_warps=NUM_WARPS, maxnreg=MAX_NREG)


def launch_rowsum(row_fn, p0, p1, inputs, src, aux=None, p2=0, w=1.0):
    """(rows,) sums of the squared first output, in the accumulation dtype."""
    x = inputs[0]
    (c, stride, *times), const = _coef_args(src, x)
    acc = torch.float64 if const["ACC"] == tl.float64 else torch.float32
    if x.numel() == 0:
        return x.new_zeros(x.shape[0], dtype=acc)
    grid, rows, inner, rows_per, block_n, n_col = _grid(x)
    partial = x.new_empty(rows, n_col, dtype=acc)
    K = _kernels()
    launchable(K.rowsum_kernel)[grid](
        *_pad(inputs, MAX_IN), partial, c, stride, c if aux is None else aux, float(w),
        *times, rows, inner, n_col, P0=p0, P1=p1, P2=p2, ROW=K.ROW_CODE[row_fn],
        NI=len(inputs), ROWS=rows_per, BLOCK_N=block_n, **const, num_warps=NUM_WARPS,
        maxnreg=MAX_NREG)
    return partial.sum(1)
