"""Triton kernels of the sampler-step family: per-row coefficient matrices
(twins of the functors in csrc/include/flowkern/steps.h) for the shared
engine, and the launchers (same names as flowkern/ops/steps.py).

P0 is the prediction type, P1 the EI form / DPM second-order flag, P2 whether
an unconditional prediction follows (classifier-free guidance, weight w).
`coef` is the rows' StepRow (coeffs.py), which the engine reads from a step
table or evaluates from the times (lincomb._row_coef)."""
import struct

import triton
import triton.language as tl

from .coeffs import (ALPHA, EPS, ROW_ALPHA_P, ROW_G, ROW_H, ROW_S, ROW_SIGMA_P,  # noqa: F401
                     ROW_T, SCORE, SIGMA, VELOCITY, X1, convert_coeffs)  # (the codes, once)
from .lincomb import launch_lincomb, skip_mask, step_rows


@triton.jit
def _guided(c, w, CFG: tl.constexpr):
    """Coefficient c of the guided prediction, split over (p_c, p_u)."""
    if CFG:
        return w * c, (1.0 - w) * c
    else:
        return c, c


@triton.jit
def euler_rows(PRED: tl.constexpr, _P1: tl.constexpr, CFG: tl.constexpr, coef, stride, aux,
               w, r, rmask):
    """(x, p[, p_u]) -> x + h u_t."""
    h = coef[ROW_H]
    ua, ub = convert_coeffs(PRED, VELOCITY, coef[ROW_T])
    pc, pu = _guided(h * ub, w, CFG)
    if CFG:
        return ((1.0 + h * ua, pc, pu),)
    else:
        return ((1.0 + h * ua, pc),)


@triton.jit
def heun_rows(PRED: tl.constexpr, _P1: tl.constexpr, CFG: tl.constexpr, coef, stride, aux,
              w, r, rmask):
    """(x, p, x_e, p_e[, p_u, p_e_u]) -> x + h/2 (u_t + u_s)."""
    ta, tb = convert_coeffs(PRED, VELOCITY, coef[ROW_T])
    sa, sb = convert_coeffs(PRED, VELOCITY, coef[ROW_S])
    hh = 0.5 * coef[ROW_H]
    tc, tu = _guided(hh * tb, w, CFG)
    sc, su = _guided(hh * sb, w, CFG)
    if CFG:
        return ((1.0 + hh * ta, tc, hh * sa, sc, tu, su),)
    else:
        return ((1.0 + hh * ta, tc, hh * sa, sc),)


@triton.jit
def _ei(PRED: tl.constexpr, FORM: tl.constexpr, c):
    """x_s = a x + b p (steps.h ei_coeffs): data form (FORM 0) or noise form;
    c the StepRow."""
    at, st, as_, ss = c[ROW_T][ALPHA], c[ROW_T][SIGMA], c[ROW_S][ALPHA], c[ROW_S][SIGMA]
    if FORM == 0:
        da, db = convert_coeffs(PRED, X1, c[ROW_T])
        q = ss / st
        B = as_ - q * at
        return q + B * da, B * db
    else:
        ea, eb = convert_coeffs(PRED, EPS, c[ROW_T])
        q = as_ / at
        C = ss - q * st
        return q + C * ea, C * eb


@triton.jit
def ei_rows(PRED: tl.constexpr, FORM: tl.constexpr, CFG: tl.constexpr, coef, stride, aux, w,
            r, rmask):
    """(x, p[, p_u]) -> x_s."""
    a, b = _ei(PRED, FORM, coef)
    pc, pu = _guided(b, w, CFG)
    if CFG:
        return ((a, pc, pu),)
    else:
        return ((a, pc),)


@triton.jit
def ei_bwd_rows(PRED: tl.constexpr, FORM: tl.constexpr, CFG: tl.constexpr, coef, stride, aux,
                w, r, rmask):
    """(g,) -> (g_x, g_p[, g_p_u])."""
    a, b = _ei(PRED, FORM, coef)
    pc, pu = _guided(b, w, CFG)
    if CFG:
        return (a,), (pc,), (pu,)
    else:
        return (a,), (pc,)


# d_t (output 1) does not read d_prev (input 2): steps.h DPMpp2MFn::reads
DPMPP_2M_SKIP = skip_mask((1, 2))


@triton.jit
def dpmpp_2m_rows(PRED: tl.constexpr, SECOND: tl.constexpr, CFG: tl.constexpr, coef, stride,
                  aux, w, r, rmask):
    """(x, p, d_prev[, p_u]) -> (x_s, d_t), DPM-Solver++(2M) (steps.h DPMpp2MFn)."""
    at, st, as_, ss = coef[ROW_T][ALPHA], coef[ROW_T][SIGMA], coef[ROW_S][ALPHA], coef[ROW_S][SIGMA]
    ap, sp = coef[ROW_ALPHA_P], coef[ROW_SIGMA_P]
    da, db = convert_coeffs(PRED, X1, coef[ROW_T])
    lt = tl.log(at / st)
    h = tl.log(as_ / ss) - lt
    c1 = tl.full(at.shape, 1.0, at.dtype)
    c2 = tl.zeros(at.shape, at.dtype)
    if SECOND:
        rr = (lt - tl.log(ap / sp)) / h
        finite = h < float("inf")
        c2 = tl.where(finite, 1.0 / (2.0 * rr), 0.0)
        c1 = 1.0 + c2
    # alpha_s (1 - e^{-h}) = alpha_s - sigma_s alpha_t / sigma_t, the exact form of
    # -alpha_s expm1(-h) (libdevice's expm1 is not available to the interpreter).
    E = as_ - ss * at / st
    xc, xu = _guided(E * c1 * db, w, CFG)
    dc, du = _guided(db, w, CFG)
    if CFG:
        return (ss / st + E * c1 * da, xc, -E * c2, xu), (da, dc, 0.0 * da, du)
    else:
        return (ss / st + E * c1 * da, xc, -E * c2), (da, dc, 0.0 * da)


@triton.jit
def em_rows(PRED: tl.constexpr, _P1: tl.constexpr, CFG: tl.constexpr, coef, stride, aux, w,
            r, rmask):
    """(x, p[, p_u]) -> x + h (u + g^2/2 score) + g sqrt(h) xi."""
    h, g = coef[ROW_H], coef[ROW_G]
    ua, ub = convert_coeffs(PRED, VELOCITY, coef[ROW_T])
    sa, sb = convert_coeffs(PRED, SCORE, coef[ROW_T])
    k = 0.5 * g * g
    pc, pu = _guided(h * (ub + k * sb), w, CFG)
    nz = g * tl.sqrt(h)
    if CFG:
        return ((1.0 + h * (ua + k * sa), pc, pu, nz),)
    else:
        return ((1.0 + h * (ua + k * sa), pc, nz),)


@triton.jit
def churn_rows(_P0: tl.constexpr, _P1: tl.constexpr, _P2: tl.constexpr, coef, stride, aux, w,
               r, rmask):
    """(x,) -> (alpha_that/alpha_t) x + sqrt(sigma_that^2 - (alpha_that sigma_t/alpha_t)^2) xi."""
    q = coef[ROW_S][ALPHA] / coef[ROW_T][ALPHA]
    base = q * coef[ROW_T][SIGMA]
    var = tl.maximum(coef[ROW_S][SIGMA] * coef[ROW_S][SIGMA] - base * base, 0.0)
    return ((q, tl.sqrt(var)),)


@triton.jit
def _weight(wts, j: tl.constexpr, like):
    """Weight j of weight_args's pairs, in like's dtype."""
    return tl.cast(wts[2 * j], like.dtype) + tl.cast(wts[2 * j + 1], like.dtype)


@triton.jit
def lms_rows(PRED: tl.constexpr, NH: tl.constexpr, CFG: tl.constexpr, coef, stride, aux, w,
             r, rmask):
    """(x, p, u_1 .. u_NH[, p_u]) -> (x + wts_0 u_t + sum_j wts_j u_j, u_t), the
    weights wts in `aux`: kernel scalars, each as a float32 pair (hi, lo),
    wts_j = hi + lo in the accumulation dtype (weight_args; steps.h
    LMSFn). u_t's history entries are never read (lms_skip)."""
    at = coef[ROW_T][ALPHA]
    ua, ub = convert_coeffs(PRED, VELOCITY, coef[ROW_T])
    w0 = _weight(aux, 0, at)
    xc, xu = _guided(w0 * ub, w, CFG)
    uc, uu = _guided(ub, w, CFG)
    xa = 1.0 + w0 * ua
    z = 0.0 * ua  # the history terms of u_t: never read
    if NH == 0:
        if CFG:
            return (xa, xc, xu), (ua, uc, uu)
        else:
            return (xa, xc), (ua, uc)
    elif NH == 1:
        w1 = _weight(aux, 1, at)
        if CFG:
            return (xa, xc, w1, xu), (ua, uc, z, uu)
        else:
            return (xa, xc, w1), (ua, uc, z)
    elif NH == 2:
        w1 = _weight(aux, 1, at)
        w2 = _weight(aux, 2, at)
        if CFG:
            return (xa, xc, w1, w2, xu), (ua, uc, z, z, uu)
        else:
            return (xa, xc, w1, w2), (ua, uc, z, z)
    else:
        w1 = _weight(aux, 1, at)
        w2 = _weight(aux, 2, at)
        w3 = _weight(aux, 3, at)
        if CFG:
            return (xa, xc, w1, w2, w3, xu), (ua, uc, z, z, z, uu)
        else:
            return (xa, xc, w1, w2, w3), (ua, uc, z, z, z)


@triton.jit
def lincomb_step_rows(NT: tl.constexpr, NOISE: tl.constexpr, _P2: tl.constexpr, coef, _stride,
                      aux, _w, r, rmask):
    """(x, p_1 .. p_NT) -> c_x x + sum_k c_k p_k (+ noise_std xi): the weights
    (c_x, c_1 .. c_NT) and then noise_std as weight_args pairs in `aux`
    (steps.h LincombStepFn); `coef`: zeros of the accumulation dtype (the
    engine's KIND NO_TABLE)."""
    z = coef
    c0 = z + _weight(aux, 0, z)
    c1 = z + _weight(aux, 1, z)
    c2 = z + _weight(aux, 2, z)
    c3 = z + _weight(aux, 3, z)
    c4 = z + _weight(aux, 4, z)
    sd = z + _weight(aux, 5, z)
    if NT == 1:
        if NOISE:
            return ((c0, c1, sd),)
        else:
            return ((c0, c1),)
    elif NT == 2:
        if NOISE:
            return ((c0, c1, c2, sd),)
        else:
            return ((c0, c1, c2),)
    elif NT == 3:
        if NOISE:
            return ((c0, c1, c2, c3, sd),)
        else:
            return ((c0, c1, c2, c3),)
    else:
        if NOISE:
            return ((c0, c1, c2, c3, c4, sd),)
        else:
            return ((c0, c1, c2, c3, c4),)


_F32_MAX = 3.4028234663852886e38


def weight_args(weights, n: int = 4) -> tuple:
    """lms_step's weights as kernel scalars: Triton passes a Python float as
    float32, so each weight w goes as the pair (hi, lo), hi = fl32(w), lo =
    fl32(w - hi), and the kernel adds them in the accumulation dtype (w to
    ~2^-48 relative: float64 steps keep float64 accuracy). Four pairs, the
    missing weights zero. No tensor is built: nothing is copied to the
    device per call, and a captured CUDA graph holds the values. n: the pairs
    the kernel reads (lms_step 4, lincomb_step 6: five weights and noise_std)."""
    out = []
    for j, w in enumerate(weights):
        if not abs(w) <= _F32_MAX:
            raise ValueError(f"weights: the triton backend takes weights up to {_F32_MAX:.3g} in "
                             f"magnitude, got {w} at {j}")
        hi = struct.unpack("f", struct.pack("f", w))[0]
        out += [hi, struct.unpack("f", struct.pack("f", w - hi))[0]]
    return tuple(out + [0.0] * (2 * n - len(out)))


def lms_skip(nh: int) -> int:
    """u_t (output 1) reads no history input (2 .. 1 + nh): steps.h LMSFn::reads."""
    return skip_mask(*((1, 2 + j) for j in range(nh)))


def _ins(*ts):
    return tuple(t for t in ts if t is not None)


# `rows` is a step's (table, times, kind, params) as the ops take them
# (lincomb.step_rows): a step table, or float times and a built-in schedule
# the kernel evaluates.


def euler_step(x, pred, pred_uncond, rows, prediction, guidance, out):
    launch_lincomb(euler_rows, prediction, 0, _ins(x, pred, pred_uncond), (out,),
                   step_rows(*rows), p2=pred_uncond is not None, w=guidance)


def heun_step(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond, rows, prediction,
              guidance, out):
    launch_lincomb(heun_rows, prediction, 0,
                   _ins(x, pred, x_euler, pred_euler, pred_uncond, pred_euler_uncond), (out,),
                   step_rows(*rows), p2=pred_uncond is not None, w=guidance)


def ei_step(x, pred, pred_uncond, rows, prediction, form, guidance, out):
    launch_lincomb(ei_rows, prediction, form, _ins(x, pred, pred_uncond), (out,),
                   step_rows(*rows), p2=pred_uncond is not None, w=guidance)


def ei_step_backward(grad, rows, prediction, form, guidance, cfg, outs):
    launch_lincomb(ei_bwd_rows, prediction, form, (grad,), tuple(outs), step_rows(*rows),
                   p2=cfg, w=guidance)


def dpmpp_2m_step(x, pred, d_prev, pred_uncond, rows, prediction, guidance, out, d_out):
    third = x if d_prev is None else d_prev  # unused by the first-order step
    launch_lincomb(dpmpp_2m_rows, prediction, d_prev is not None,
                   _ins(x, pred, third, pred_uncond), (out, d_out), step_rows(*rows),
                   p2=pred_uncond is not None, w=guidance, skip=DPMPP_2M_SKIP)


def em_step(x, pred, pred_uncond, rows, prediction, guidance, seed, offset, seeds, out):
    launch_lincomb(em_rows, prediction, 0, _ins(x, pred, pred_uncond), (out,),
                   step_rows(*rows), p2=pred_uncond is not None, w=guidance,
                   noise=(seed, offset, seeds))


def churn(x, rows, seed, offset, seeds, out):
    launch_lincomb(churn_rows, 0, 0, (x,), (out,), step_rows(*rows), noise=(seed, offset, seeds))


def lms_step(x, pred, u1, u2, u3, pred_uncond, weights, rows, prediction, guidance, out, u_out):
    """weights: the 1 + len(history) floats (host values, weight_args)."""
    hist = _ins(u1, u2, u3)
    launch_lincomb(lms_rows, prediction, len(hist), _ins(x, pred, *hist, pred_uncond),
                   (out, u_out), step_rows(*rows), aux=weight_args(weights),
                   p2=pred_uncond is not None, w=guidance, skip=lms_skip(len(hist)))


def lincomb_step(x, terms, weights, noise_std, seed, offset, seeds, out):
    """weights: 1 + len(terms) floats; noise_std 0: no noise term (host values,
    weight_args). No table: the engine takes the accumulation dtype from x."""
    nt = len(terms)
    if not abs(noise_std) <= _F32_MAX:
        raise ValueError(f"noise_std: the triton backend takes values up to {_F32_MAX:.3g}, "
                         f"got {noise_std}")
    aux = weight_args(list(weights) + [0.0] * (5 - len(weights)) + [noise_std], n=6)
    noise = (seed, offset, seeds) if noise_std else None
    launch_lincomb(lincomb_step_rows, nt, int(bool(noise_std)), (x, *terms), (out,), None,
                   aux=aux, noise=noise)

# This family's kernels in the ahead-of-time report (flowkern/triton/aot.py
# _ops and _rowsums, which give the tuples' layout).
AOT_KERNELS = [("heun_cfg_x1_vp", heun_rows, 6, 1, False, 1, 0, 1, 3),
               ("dpmpp_2m_cfg_x1_edm", dpmpp_2m_rows, 4, 2, False, 1, 1, 1, 5),
               ("em_cfg_score_cosine", em_rows, 3, 1, True, 3, 0, 1, 1),
               ("lms_cfg_eps_3_ve", lms_rows, 6, 2, False, 2, 3, 1, 4),
               ("churn_poly", churn_rows, 1, 1, True, 0, 0, 0, 2),
               ("euler_x1", euler_rows, 2, 1, False, 1, 0, 0),
               ("euler_cfg_v", euler_rows, 3, 1, False, 0, 0, 1),
               ("heun_cfg_x1", heun_rows, 6, 1, False, 1, 0, 1),
               ("ei_data_eps", ei_rows, 2, 1, False, 2, 0, 0),
               ("ei_noise_cfg_v", ei_rows, 3, 1, False, 0, 1, 1),
               ("ei_bwd_cfg", ei_bwd_rows, 1, 3, False, 1, 0, 1),
               ("dpmpp_2m_cfg_x1", dpmpp_2m_rows, 4, 2, False, 1, 1, 1),
               ("em_cfg_score", em_rows, 3, 1, True, 3, 0, 1),
               ("em_cfg_score_per_sample", em_rows, 3, 1, "per_sample", 3, 0, 1),
               ("churn", churn_rows, 1, 1, True, 0, 0, 0),
               ("lms_v_1", lms_rows, 3, 2, False, 0, 1, 0),
               ("lms_x1_3", lms_rows, 5, 2, False, 1, 3, 0),
               ("lms_cfg_eps_3", lms_rows, 6, 2, False, 2, 3, 1),
               ("lincomb_3", lincomb_step_rows, 4, 1, False, 3, 0, 0),
               ("lincomb_4", lincomb_step_rows, 5, 1, False, 4, 0, 0),
               ("lincomb_noise_3", lincomb_step_rows, 4, 1, True, 3, 1, 0),
               ("lincomb_noise_3_per_sample", lincomb_step_rows, 4, 1, "per_sample", 3, 1, 0)]
