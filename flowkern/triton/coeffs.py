"""Per-sample coefficient math for Triton: mirrors csrc/include/flowkern/coeffs.h
line for line (same pairs, same direct formulas). Arguments are [ROWS, 1]
tensors in the accumulation dtype; prediction codes are flowkern._enums."""
import triton
import triton.language as tl

VELOCITY: tl.constexpr = tl.constexpr(0)
X1: tl.constexpr = tl.constexpr(1)
EPS: tl.constexpr = tl.constexpr(2)
SCORE: tl.constexpr = tl.constexpr(3)


@triton.jit
def load_sched(coef, r, rmask):
    """alpha, sigma, d_alpha, d_sigma of rows r as [ROWS, 1] tensors."""
    base = coef + r.to(tl.int64)[:, None] * 4
    m = rmask[:, None]
    # Masked rows get (1, 1, 0, 1): every denominator of coeffs.py is then nonzero.
    return (tl.load(base, mask=m, other=1.0), tl.load(base + 1, mask=m, other=1.0),
            tl.load(base + 2, mask=m, other=0.0), tl.load(base + 3, mask=m, other=1.0))


@triton.jit
def target_coeffs(target: tl.constexpr, al, sg, da, ds):
    """y = a*x1 + b*x0 for a training target (coeffs.h target_coeffs)."""
    one = tl.full(al.shape, 1.0, al.dtype)
    zero = tl.zeros(al.shape, al.dtype)
    if target == VELOCITY:
        return da, ds
    elif target == X1:
        return one, zero
    elif target == EPS:
        return zero, one
    else:
        return zero, -one / sg


@triton.jit
def _convert_plain(src: tl.constexpr, dst: tl.constexpr, al, sg, da, ds):
    """Pairs among velocity, x1, eps (no score): dst = a*x + b*pred."""
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
def convert_coeffs(src: tl.constexpr, dst: tl.constexpr, al, sg, da, ds):
    """dst = a*x + b*pred (coeffs.h convert_coeffs)."""
    zero = tl.zeros(al.shape, al.dtype)
    if src == dst:
        return zero, zero + 1.0
    elif src == SCORE:
        if dst == EPS:
            return zero, -sg
        else:
            a, b = _convert_plain(EPS, dst, al, sg, da, ds)
            return a, -sg * b
    elif dst == SCORE:
        if src == EPS:
            return zero, -1.0 / sg
        else:
            a, b = _convert_plain(src, EPS, al, sg, da, ds)
            return -a / sg, -b / sg
    else:
        return _convert_plain(src, dst, al, sg, da, ds)
