"""In-kernel Gaussian noise, the twin of csrc/include/flowkern/philox.h:
stream index n (the element's offset) draws Philox4x32-10 (tl.randint4x:
key = seed, counter = n // 4 as (lo, hi, 0, 0)), takes the uniform pair of
words (0, 1) or (2, 3) by n % 4 (Triton's uint -> [0, 1) map) and the
cosine (n even) or sine (n odd) output of Box-Muller on it. Same seed and
offset give the same Philox bits on every backend;
the normals agree to ~3 float32 ulps (libm, PyTorch and Triton round log and
cos differently in the last bits)."""
import triton
import triton.language as tl


@triton.jit
def _uniform(u):
    x = u.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _cos_or_sin(a, sine):
    """cos(a), or sin(a) where `sine`, for a float32 a in [0, 2 pi], rounded
    to float32: the host's cos_and_sin of csrc/include/flowkern/philox.h,
    formula for formula (a = q pi/2 + r in double with fdlibm's two-part
    pi/2, Taylor polynomials to r^14 and r^15, sin(q pi/2 + r) = cos((q - 1)
    pi/2 + r)). tl.cos is libdevice's cosf, whose Payne-Hanek branch for huge
    arguments costs every noise kernel a 32-byte stack frame under triton 3.8
    (flowkern.triton.aot); the angle here never needs it."""
    x = a.to(tl.float64)
    q = tl.floor(x * 0.6366197723675814 + 0.5)
    r = (x - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11
    r2 = r * r
    c = -1.0 / 87178291200.0
    c = c * r2 + 1.0 / 479001600.0
    c = c * r2 - 1.0 / 3628800.0
    c = c * r2 + 1.0 / 40320.0
    c = c * r2 - 1.0 / 720.0
    c = c * r2 + 1.0 / 24.0
    c = c * r2 - 0.5
    c = c * r2 + 1.0
    s = -1.0 / 1307674368000.0
    s = s * r2 + 1.0 / 6227020800.0
    s = s * r2 - 1.0 / 39916800.0
    s = s * r2 + 1.0 / 362880.0
    s = s * r2 - 1.0 / 5040.0
    s = s * r2 + 1.0 / 120.0
    s = s * r2 - 1.0 / 6.0
    s = r + r * r2 * s
    # cos(k pi/2 + r) for k = q - sine = -1..4: +s, +c, -s, -c, +s, +c
    k = tl.where(sine, q - 1.0, q)
    odd = (k == 1.0) | (k == 3.0) | (k == -1.0)
    neg = (k == 1.0) | (k == 2.0)
    v = tl.where(odd, s, c)
    return tl.where(neg, -v, v).to(tl.float32)


@triton.jit
def normal(seed, counter):
    """The normal of stream index `counter` (an int64 tensor) under `seed`."""
    c0, c1, c2, c3 = tl.randint4x(seed, counter >> 2)
    second = (counter & 2) != 0
    u1 = tl.maximum(_uniform(tl.where(second, c2, c0)), 1.0e-7)
    u2 = _uniform(tl.where(second, c3, c1))
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_or_sin(6.283185307179586 * u2, (counter & 1) != 0)
