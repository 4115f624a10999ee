"""The two engine kernels (lincomb.py has their helpers and launchers) and
the table of row functions they apply.

A kernel names its row function by an integer code, ROW (ROW_CODE below),
not by passing the function as a constexpr: Inductor regenerates a user
kernel from its source and writes its constexpr values as Python literals,
which a function object is not (docs/design.md §5). row_matrix selects the
function at compile time, so each (ROW, ...) specialisation compiles only
its own. This module imports every family's row functions; the families
import lincomb.py, which reaches this module at the first launch.
"""
import triton
import triton.language as tl

from .flowmap import flowmap_bwd_rows, flowmap_residual_rows
from .lincomb import _dot, _load_inputs, _out, _row_coef, _tile
from .philox import normal
from .steps import (churn_rows, dpmpp_2m_rows, ei_bwd_rows, ei_rows, em_rows, euler_rows,
                    heun_rows, lincomb_step_rows, lms_rows)
from .training import (convert_bwd_rows, convert_rows, interpolate_bwd_rows, interpolate_rows,
                       loss_bwd_rows, loss_residual_rows)

# ROW_FNS[code]: the row function of code ROW, in row_matrix's order
ROW_FNS = (interpolate_rows, interpolate_bwd_rows, convert_rows, convert_bwd_rows,
           loss_residual_rows, loss_bwd_rows, euler_rows, heun_rows, ei_rows, ei_bwd_rows,
           dpmpp_2m_rows, em_rows, churn_rows, lms_rows, lincomb_step_rows,
           flowmap_residual_rows, flowmap_bwd_rows)
ROW_CODE = {fn: code for code, fn in enumerate(ROW_FNS)}


@triton.jit
def row_matrix(ROW: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, coef,
               stride, aux, w, r, rmask):
    """ROW_FNS[ROW](P0, P1, P2, coef, stride, aux, w, r, rmask): the per-row
    coefficient matrix M (lincomb.py)."""
    if ROW == 0:
        return interpolate_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 1:
        return interpolate_bwd_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 2:
        return convert_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 3:
        return convert_bwd_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 4:
        return loss_residual_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 5:
        return loss_bwd_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 6:
        return euler_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 7:
        return heun_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 8:
        return ei_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 9:
        return ei_bwd_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 10:
        return dpmpp_2m_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 11:
        return em_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 12:
        return churn_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 13:
        return lms_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 14:
        return lincomb_step_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    elif ROW == 15:
        return flowmap_residual_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)
    else:
        tl.static_assert(ROW == 16, "row_matrix: unknown row function code")
        return flowmap_bwd_rows(P0, P1, P2, coef, stride, aux, w, r, rmask)


@triton.jit
def lincomb_kernel(i0, i1, i2, i3, i4, i5, o0, o1, o2, coef, stride, aux, wt0, wt1, wt2, wt3,
                   wt4, wt5, wt6, wt7, wt8, wt9, wt10, wt11, w, seed, offset,
                   seeds, tptr, t_step, t_value: tl.float64, s_value: tl.float64,
                   tp_value: tl.float64, g_value: tl.float64, sp0: tl.float64,
                   sp1: tl.float64, sp2: tl.float64, rows, inner, n_col_blocks,
                   P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, ROW: tl.constexpr,
                   NI: tl.constexpr, NO: tl.constexpr, NOISE: tl.constexpr,
                   PER_SAMPLE: tl.constexpr, SKIP: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, ROWS_OF: tl.constexpr, KIND: tl.constexpr,
                   T_TENSOR: tl.constexpr, ACC: tl.constexpr, WEIGHTS: tl.constexpr):
    """WEIGHTS: the row function's `aux` is the host weights wt0 .. wt11
    (steps.weight_args pairs), not the pointer `aux`: scalars, since a tuple
    argument is what Inductor cannot pass to a kernel (docs/design.md §5)."""
    OUT: tl.constexpr = o0.dtype.element_ty
    r, rmask, offs, mask, _ = _tile(rows, inner, n_col_blocks, ROWS, BLOCK_N)
    rc = _row_coef(coef, stride, tptr, t_step, t_value, s_value, tp_value, g_value, sp0, sp1,
                   sp2, r, rmask, ROWS_OF, KIND, T_TENSOR, ACC)
    if WEIGHTS:
        M = row_matrix(ROW, P0, P1, P2, rc, stride,
                       (wt0, wt1, wt2, wt3, wt4, wt5, wt6, wt7, wt8, wt9, wt10, wt11), w, r,
                       rmask)
    else:
        M = row_matrix(ROW, P0, P1, P2, rc, stride, aux, w, r, rmask)
    xs = _load_inputs(i0, i1, i2, i3, i4, i5, offs, mask, ACC, NI)
    xi = 0.0
    if NOISE:
        if PER_SAMPLE:  # row r: seed seeds[r], counter offset + its index in the row (philox.h)
            row_seed = tl.load(seeds + r, mask=rmask, other=0)
            xi = normal(row_seed[:, None], offset + (offs - r.to(tl.int64)[:, None] * inner))
        else:
            xi = normal(seed, offset + offs)
        xi = xi.to(ACC)
    tl.store(o0 + offs, _out(M[0], xs, xi, NI, NOISE, SKIP & 63).to(OUT), mask=mask)
    if NO > 1:
        tl.store(o1 + offs, _out(M[1], xs, xi, NI, NOISE, (SKIP >> 6) & 63).to(OUT), mask=mask)
    if NO > 2:
        tl.store(o2 + offs, _out(M[2], xs, xi, NI, NOISE, (SKIP >> 12) & 63).to(OUT), mask=mask)


@triton.jit
def rowsum_kernel(i0, i1, i2, i3, i4, i5, partial, coef, stride, aux, w, tptr, t_step,
                  t_value: tl.float64, s_value: tl.float64, tp_value: tl.float64,
                  g_value: tl.float64, sp0: tl.float64, sp1: tl.float64, sp2: tl.float64,
                  rows, inner, n_col_blocks, P0: tl.constexpr, P1: tl.constexpr,
                  P2: tl.constexpr, ROW: tl.constexpr, NI: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_OF: tl.constexpr,
                  KIND: tl.constexpr, T_TENSOR: tl.constexpr, ACC: tl.constexpr):
    """partial[r, pid_c] = sum over the tile's columns of (M_row[0] . in)^2."""
    r, rmask, offs, mask, pid_c = _tile(rows, inner, n_col_blocks, ROWS, BLOCK_N)
    rc = _row_coef(coef, stride, tptr, t_step, t_value, s_value, tp_value, g_value, sp0, sp1,
                   sp2, r, rmask, ROWS_OF, KIND, T_TENSOR, ACC)
    M = row_matrix(ROW, P0, P1, P2, rc, stride, aux, w, r, rmask)
    xs = _load_inputs(i0, i1, i2, i3, i4, i5, offs, mask, ACC, NI)
    y = tl.where(mask, _dot(M[0], xs, NI, 0), 0.0)
    tl.store(partial + r.to(tl.int64) * n_col_blocks + pid_c, tl.sum(y * y, axis=1), mask=rmask)
