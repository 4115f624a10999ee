"""The Triton elementwise and row-sum engines (mirror of lincomb.h/rowsum.h).

A (B, ...) tensor is a (rows, inner) matrix; a program owns a [ROWS, BLOCK_N]
tile (one 1-D grid, so neither grid axis limit binds), loads the per-row
coefficient matrix M once per row, and writes out_k = sum_j M[k][j] in_j.
Offsets are 64-bit. Which matrix is chosen by the constexpr OP through
`row_matrix`, the one table of all op families (flowkern/triton/rows.py).
"""
import triton
import triton.language as tl

from .rows import row_matrix

TILE = 2048          # elements per program: 16 per thread at 4 warps
MAX_ROWS = 64        # rows per program: each row holds a 3x3 coefficient matrix in registers
NUM_WARPS = 4


def tile_config(inner: int) -> tuple[int, int]:
    """(ROWS, BLOCK_N) for rows of length `inner`: several whole rows when they
    are short (tiny 2-D data), row segments of TILE otherwise."""
    block_n = min(triton.next_power_of_2(max(inner, 1)), TILE)
    return min(TILE // block_n, MAX_ROWS), block_n


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
def _dot3(m0, m1, m2, x0, x1, x2, NI: tl.constexpr):
    y = m0 * x0
    if NI > 1:
        y += m1 * x1
    if NI > 2:
        y += m2 * x2
    return y


@triton.jit
def _load3(i0, i1, i2, offs, mask, ACC: tl.constexpr, NI: tl.constexpr):
    x0 = tl.load(i0 + offs, mask=mask, other=0.0).to(ACC)
    x1 = x0
    x2 = x0
    if NI > 1:
        x1 = tl.load(i1 + offs, mask=mask, other=0.0).to(ACC)
    if NI > 2:
        x2 = tl.load(i2 + offs, mask=mask, other=0.0).to(ACC)
    return x0, x1, x2


@triton.jit
def lincomb_kernel(i0, i1, i2, o0, o1, o2, coef, aux, rows, inner, n_col_blocks,
                   OP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
                   NI: tl.constexpr, NO: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    ACC: tl.constexpr = coef.dtype.element_ty
    r, rmask, offs, mask, _ = _tile(rows, inner, n_col_blocks, ROWS, BLOCK_N)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = row_matrix(OP, P0, P1, coef, aux, r, rmask)
    x0, x1, x2 = _load3(i0, i1, i2, offs, mask, ACC, NI)
    OUT: tl.constexpr = o0.dtype.element_ty
    tl.store(o0 + offs, _dot3(m00, m01, m02, x0, x1, x2, NI).to(OUT), mask=mask)
    if NO > 1:
        tl.store(o1 + offs, _dot3(m10, m11, m12, x0, x1, x2, NI).to(OUT), mask=mask)
    if NO > 2:
        tl.store(o2 + offs, _dot3(m20, m21, m22, x0, x1, x2, NI).to(OUT), mask=mask)


@triton.jit
def rowsum_kernel(i0, i1, i2, partial, coef, aux, rows, inner, n_col_blocks,
                  OP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, NI: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[r, pid_c] = sum over the tile's columns of (M_row[0] . in)^2."""
    ACC: tl.constexpr = coef.dtype.element_ty
    r, rmask, offs, mask, pid_c = _tile(rows, inner, n_col_blocks, ROWS, BLOCK_N)
    m00, m01, m02, _a, _b, _c, _d, _e, _f = row_matrix(OP, P0, P1, coef, aux, r, rmask)
    x0, x1, x2 = _load3(i0, i1, i2, offs, mask, ACC, NI)
    y = tl.where(mask, _dot3(m00, m01, m02, x0, x1, x2, NI), 0.0)
    tl.store(partial + r.to(tl.int64) * n_col_blocks + pid_c, tl.sum(y * y, axis=1), mask=rmask)


def _grid(rows, inner):
    rows_per, block_n = tile_config(inner)
    n_col = triton.cdiv(inner, block_n)
    return (triton.cdiv(rows, rows_per) * n_col,), rows_per, block_n, n_col


def launch_lincomb(op, p0, p1, inputs, outputs, coef, aux=None):
    """outputs[k] = M_row[k] . inputs for contiguous (rows, ...) tensors."""
    x = inputs[0]
    rows = x.shape[0]
    inner = x.numel() // rows if rows else 0
    if x.numel() == 0:
        return
    grid, rows_per, block_n, n_col = _grid(rows, inner)
    ins = list(inputs) + [inputs[0]] * (3 - len(inputs))
    outs = list(outputs) + [outputs[0]] * (3 - len(outputs))
    lincomb_kernel[grid](*ins, *outs, coef, coef if aux is None else aux, rows, inner, n_col,
                         OP=op, P0=p0, P1=p1, NI=len(inputs), NO=len(outputs),
                         ROWS=rows_per, BLOCK_N=block_n, num_warps=NUM_WARPS)


def launch_rowsum(op, p0, p1, inputs, coef, aux=None):
    """(rows,) sums of the squared first output row, in coef's dtype."""
    x = inputs[0]
    rows = x.shape[0]
    inner = x.numel() // rows if rows else 0
    if x.numel() == 0:
        return coef.new_zeros(rows)
    grid, rows_per, block_n, n_col = _grid(rows, inner)
    partial = coef.new_empty(rows, n_col)
    ins = list(inputs) + [inputs[0]] * (3 - len(inputs))
    rowsum_kernel[grid](*ins, partial, coef, coef if aux is None else aux, rows, inner, n_col,
                        OP=op, P0=p0, P1=p1, NI=len(inputs), ROWS=rows_per, BLOCK_N=block_n,
                        num_warps=NUM_WARPS)
    return partial.sum(1)
