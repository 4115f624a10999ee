"""Per-row coefficient matrices of every Triton op, selected by a constexpr OP
code: the Triton twin of the row functors in csrc/include/flowkern/*.h.
Each returns the nine entries m00..m22 of M (out_k = sum_j m_kj in_j) as
[ROWS, 1] tensors; unused entries are zero."""
import triton
import triton.language as tl

from .coeffs import convert_coeffs, load_sched, target_coeffs

# Op codes (training family; later families append).
INTERPOLATE: tl.constexpr = tl.constexpr(0)
INTERPOLATE_BWD: tl.constexpr = tl.constexpr(1)
CONVERT: tl.constexpr = tl.constexpr(2)
CONVERT_BWD: tl.constexpr = tl.constexpr(3)
LOSS_RESIDUAL: tl.constexpr = tl.constexpr(4)
LOSS_BWD: tl.constexpr = tl.constexpr(5)


@triton.jit
def row_matrix(OP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, coef, aux, r, rmask):
    al, sg, da, ds = load_sched(coef, r, rmask)
    z = tl.zeros(al.shape, al.dtype)
    if OP == INTERPOLATE:        # (x0, x1) -> (x_t, y)
        ya, yb = target_coeffs(P0, al, sg, da, ds)
        return sg, al, z, yb, ya, z, z, z, z
    elif OP == INTERPOLATE_BWD:  # (g_xt, g_y) -> (g_x0, g_x1)
        ya, yb = target_coeffs(P0, al, sg, da, ds)
        return sg, yb, z, al, ya, z, z, z, z
    elif OP == CONVERT:          # (x, pred) -> out
        ca, cb = convert_coeffs(P0, P1, al, sg, da, ds)
        return ca, cb, z, z, z, z, z, z, z
    elif OP == CONVERT_BWD:      # (g) -> (g_x, g_pred)
        ca, cb = convert_coeffs(P0, P1, al, sg, da, ds)
        return ca, z, z, cb, z, z, z, z, z
    elif OP == LOSS_RESIDUAL:    # (pred, x0, x1) -> pred - y
        ya, yb = target_coeffs(P0, al, sg, da, ds)
        return z + 1.0, -yb, -ya, z, z, z, z, z, z
    else:                        # LOSS_BWD: (pred, x0, x1) -> 2 g rho * d rho/d(pred, x0, x1)
        ya, yb = target_coeffs(P0, al, sg, da, ds)
        g = 2.0 * tl.load(aux + r[:, None], mask=rmask[:, None], other=0.0)
        p1 = -yb
        p2 = -ya
        return (g, g * p1, g * p2, g * p1, g * p1 * p1, g * p1 * p2,
                g * p2, g * p2 * p1, g * p2 * p2)
