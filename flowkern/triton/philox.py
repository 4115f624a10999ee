"""In-kernel Gaussian noise, the twin of csrc/include/flowkern/philox.h:
Philox4x32-10 (tl.randint4x: key = seed, counter = (lo, hi, 0, 0) of the
element's offset), Triton's uint -> [0, 1) map, and the cosine branch of
Box-Muller. Same seed and offset give the same noise on every backend."""
import triton
import triton.language as tl


@triton.jit
def _uniform(u):
    x = u.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def normal(seed, counter):
    c0, c1, _c2, _c3 = tl.randint4x(seed, counter)
    u1 = tl.maximum(_uniform(c0), 1.0e-7)
    u2 = _uniform(c1)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
