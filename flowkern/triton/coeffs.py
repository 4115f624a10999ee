"""Per-sample coefficient math for Triton: mirrors csrc/include/flowkern/coeffs.h
line for line (same pairs, same direct formulas), and the rows the kernels
read, named as in C++: Sched (coeffs.h) and StepRow (steps.h), whose fields
are [ROWS, 1] tensors in the accumulation dtype. Prediction codes are
flowkern._rules; the tables' column order is flowkern/tables.py."""
import triton
import triton.language as tl

VELOCITY: tl.constexpr = tl.constexpr(0)
X1: tl.constexpr = tl.constexpr(1)
EPS: tl.constexpr = tl.constexpr(2)
SCORE: tl.constexpr = tl.constexpr(3)


# A Sched (coeffs.h Sched) is the tuple (alpha, sigma, d_alpha, d_sigma), a
# StepRow (steps.h StepRow) the tuple (t, s, alpha_p, sigma_p, h, g): the
# schedule at t and at s, (alpha, sigma) at the previous time (DPM-Solver++(2M)),
# the step size h and Euler-Maruyama's g; their entries are [ROWS, 1] tensors.
# Plain tuples read at these positions, not NamedTuples: Inductor regenerates a
# kernel from its source and emits only the JIT functions and constexprs it
# uses (docs/design.md §5).
ALPHA: tl.constexpr = tl.constexpr(0)
SIGMA: tl.constexpr = tl.constexpr(1)
D_ALPHA: tl.constexpr = tl.constexpr(2)
D_SIGMA: tl.constexpr = tl.constexpr(3)
ROW_T: tl.constexpr = tl.constexpr(0)
ROW_S: tl.constexpr = tl.constexpr(1)
ROW_ALPHA_P: tl.constexpr = tl.constexpr(2)
ROW_SIGMA_P: tl.constexpr = tl.constexpr(3)
ROW_H: tl.constexpr = tl.constexpr(4)
ROW_G: tl.constexpr = tl.constexpr(5)


@triton.jit
def load_sched(coef, r, rmask):
    """The Sched of rows r of a (B, 4) table."""
    base = coef + r.to(tl.int64)[:, None] * 4
    m = rmask[:, None]
    # Masked rows get (1, 1, 0, 1): every denominator of coeffs.py is then nonzero.
    return (tl.load(base, mask=m, other=1.0), tl.load(base + 1, mask=m, other=1.0),
            tl.load(base + 2, mask=m, other=0.0), tl.load(base + 3, mask=m, other=1.0))


@triton.jit
def load_step(coef, stride, r, rmask):
    """The StepRow of rows r of a (B, 12) step table (stride 0: one shared row)."""
    base = coef + r.to(tl.int64)[:, None] * stride
    m = rmask[:, None]
    # Masked rows read a harmless table (t: (1, 1, 0, 1), s: (1, 0.5, 0, 1),
    # prev: (1, 2)): no division by zero, and h = r = log(2) in DPM-Solver++.
    return ((tl.load(base + 0, mask=m, other=1.0), tl.load(base + 1, mask=m, other=1.0),
             tl.load(base + 2, mask=m, other=0.0), tl.load(base + 3, mask=m, other=1.0)),
            (tl.load(base + 4, mask=m, other=1.0), tl.load(base + 5, mask=m, other=0.5),
             tl.load(base + 6, mask=m, other=0.0), tl.load(base + 7, mask=m, other=1.0)),
            tl.load(base + 8, mask=m, other=1.0), tl.load(base + 9, mask=m, other=2.0),
            tl.load(base + 10, mask=m, other=0.0), tl.load(base + 11, mask=m, other=0.0))


@triton.jit
def target_coeffs(target: tl.constexpr, c):
    """y = a*x1 + b*x0 for a training target, c a Sched (coeffs.h target_coeffs)."""
    one = tl.full(c[ALPHA].shape, 1.0, c[ALPHA].dtype)
    zero = tl.zeros(c[ALPHA].shape, c[ALPHA].dtype)
    if target == VELOCITY:
        return c[D_ALPHA], c[D_SIGMA]
    elif target == X1:
        return one, zero
    elif target == EPS:
        return zero, one
    else:
        return zero, -one / c[SIGMA]


@triton.jit
def _convert_plain(src: tl.constexpr, dst: tl.constexpr, c):
    """Pairs among velocity, x1, eps (no score): dst = a*x + b*pred."""
    al, sg, da, ds = c[ALPHA], c[SIGMA], c[D_ALPHA], c[D_SIGMA]
    if src == X1:
        if dst == EPS:
            return 1.0 / sg, -al / sg
        else:
            return ds / sg, da - al * ds / sg
    elif src == EPS:
        if dst == X1:
            return 1.0 / al, -sg / al
        else:
            return da / al, ds - sg * da / al
    else:
        det = al * ds - sg * da
        if dst == X1:
            return ds / det, -sg / det
        else:
            return -da / det, al / det


@triton.jit
def convert_coeffs(src: tl.constexpr, dst: tl.constexpr, c):
    """dst = a*x + b*pred, c a Sched (coeffs.h convert_coeffs)."""
    sg = c[SIGMA]
    zero = tl.zeros(sg.shape, sg.dtype)
    if src == dst:
        return zero, zero + 1.0
    elif src == SCORE:
        if dst == EPS:
            return zero, -sg
        else:
            a, b = _convert_plain(EPS, dst, c)
            return a, -sg * b
    elif dst == SCORE:
        if src == EPS:
            return zero, -1.0 / sg
        else:
            a, b = _convert_plain(src, EPS, c)
            return -a / sg, -b / sg
    else:
        return _convert_plain(src, dst, c)
