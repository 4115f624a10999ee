"""The built-in schedules evaluated inside the Triton kernels: the mirror of
csrc/include/flowkern/schedules.h schedule_at (docs/design.md §2), so that a
training op on a built-in schedule launches one kernel and builds no
coefficient table (docs/design.md §8). Kinds are schedules.h SchedKind
(flowkern/schedules.py _NATIVE; tests/test_codes.py holds them equal).

Everything is float64 on [ROWS, 1] tensors. Only exp, log, sqrt, exp2, log2
and polynomials are used: the interpreter (TRITON_INTERPRET=1, the CPU tests)
has no libdevice, and CUDA's float64 sin/cos would bring their large-argument
reduction (a local-memory stack frame) into every kernel.
"""
import math

import triton
import triton.language as tl

LINEAR: tl.constexpr = tl.constexpr(0)
COSINE: tl.constexpr = tl.constexpr(1)
POLYNOMIAL: tl.constexpr = tl.constexpr(2)
VP: tl.constexpr = tl.constexpr(3)
VE: tl.constexpr = tl.constexpr(4)
EDM: tl.constexpr = tl.constexpr(5)


@triton.jit
def _sin_cos_quarter(x):
    """sin(x), cos(x) for |x| <= pi/4, their Taylor series nested:
    sin x = x (1 - x^2/(2*3) (1 - x^2/(4*5) (...))), cos x = 1 - x^2/(1*2)
    (1 - x^2/(3*4) (...)), to x^17 and x^16 (the next terms are below 5e-17)."""
    x2 = x * x
    s = tl.full(x.shape, 1.0, tl.float64)
    c = tl.full(x.shape, 1.0, tl.float64)
    for k in tl.static_range(8, 0, -1):
        s = 1.0 - x2 * s * (1.0 / ((2 * k) * (2 * k + 1)))
        c = 1.0 - x2 * c * (1.0 / ((2 * k - 1) * (2 * k)))
    return x * s, c


@triton.jit
def _sin_cos_half_pi(t):
    """sin(pi t / 2), cos(pi t / 2). t = n + f, n the nearest integer, so that
    pi t / 2 = n pi/2 + x with |x| <= pi/4 and f = t - n exact: near t = 1
    cos comes out as -sin(pi (t - 1) / 2), accurate to the last bit and exactly
    0 at t = 1 (the host's sin(pi (1 - t) / 2), schedules.h)."""
    n = tl.floor(t + 0.5)
    s, c = _sin_cos_quarter((t - n) * 1.5707963267948966)
    q = n - 4.0 * tl.floor(n * 0.25)  # n mod 4
    sin = tl.where(q == 0.0, s, tl.where(q == 1.0, c, tl.where(q == 2.0, -s, -c)))
    cos = tl.where(q == 0.0, c, tl.where(q == 1.0, -s, tl.where(q == 2.0, -c, s)))
    return sin, cos


@triton.jit
def _pow(x, y):
    """x^y as schedules.h pow_d on the GPU: exp2(y log2|x|) (relative error
    ~|y log2 x| ulp), with x^0 = 1^y = 1 and a negative base only to integer
    powers (NaN otherwise)."""
    m = tl.exp2(y * tl.log2(tl.abs(x)))
    integer = y == tl.floor(y)
    odd = integer & (0.5 * y != tl.floor(0.5 * y))
    neg = tl.where(integer, tl.where(odd, -m, m), float("nan"))
    return tl.where((y == 0.0) | (x == 1.0), 1.0, tl.where(x >= 0.0, m, neg))


# 1/k! for k = 17 down to 1: the Horner coefficients of (exp(x) - 1)/x.
_N_FACT = tl.constexpr(17)
_INV_FACT = tl.constexpr(tuple(1.0 / math.factorial(k) for k in range(17, 0, -1)))


@triton.jit
def _expm1(x, ex):
    """exp(x) - 1 accurate near 0, ex = exp(x) given: for |x| < 1/2 the Taylor
    series to x^17/17! by Horner (the next term is below 1e-19 there); ex - 1
    beyond (|ex - 1| > 0.39: no cancellation). One exp in all, no log: the
    log of Kahan's (u - 1) x / log u spilled the multi-row tiles on sm_90."""
    p = tl.zeros(x.shape, tl.float64)
    for i in tl.static_range(_N_FACT):
        p = _INV_FACT[i] + x * p
    return tl.where(tl.abs(x) < 0.5, x * p, ex - 1.0)


@triton.jit
def schedule_at(KIND: tl.constexpr, t, p0, p1, p2):
    """(alpha, sigma, d_alpha, d_sigma) of built-in schedule KIND at times t
    (float64); p0..p2 its parameters in the order of the Python constructor:
    polynomial (n), vp (beta_min, beta_max), ve (sigma_min, sigma_max), edm
    (sigma_min, sigma_max, rho)."""
    one = tl.full(t.shape, 1.0, tl.float64)
    zero = tl.zeros(t.shape, tl.float64)
    if KIND == LINEAR:
        return t, 1.0 - t, one, -one
    elif KIND == COSINE:
        a, s = _sin_cos_half_pi(t)
        return a, s, 1.5707963267948966 * s, -1.5707963267948966 * a
    elif KIND == POLYNOMIAL:
        a = _pow(t, zero + p0)
        d = p0 * _pow(t, zero + (p0 - 1.0))
        return a, 1.0 - a, d, -d
    elif KIND == VP:
        # s = 1 - t; log alpha = -s^2 (b_max - b_min)/4 - s b_min/2;
        # sigma^2 = -expm1(2 log alpha), accurate near t = 1.
        s = 1.0 - t
        la = -0.25 * s * s * (p1 - p0) - 0.5 * s * p0
        dla = 0.5 * s * (p1 - p0) + 0.5 * p0
        alpha = tl.exp(la)
        sigma = tl.sqrt(-_expm1(2.0 * la, alpha * alpha))
        return alpha, sigma, alpha * dla, -alpha * alpha * dla / sigma
    elif KIND == VE:
        r = tl.log(zero + p1 / p0)
        sigma = p0 * tl.exp(r * (1.0 - t))
        return one, sigma, zero, -r * sigma
    else:  # EDM: sigma = (hi + t (lo - hi))^rho, lo/hi = sigma_min/max^(1/rho)
        lo = _pow(zero + p0, zero + 1.0 / p2)
        hi = _pow(zero + p1, zero + 1.0 / p2)
        b = hi + t * (lo - hi)
        return one, _pow(b, zero + p2), zero, p2 * _pow(b, zero + (p2 - 1.0)) * (lo - hi)
