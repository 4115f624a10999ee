"""The coefficient tables' columns, named: the one layout of
csrc/include/flowkern/steps.h (StepRow, load_step) and coeffs.h (Sched) for
the Python layers, so that no Python code indexes a table by a bare number.

A schedule row (flowkern.schedules.coefficients, a training op's (B, 4)
table) is ``[alpha, sigma, d_alpha, d_sigma]``. A step row
(flowkern.step_table, what every sampler step reads) is twelve columns::

    [alpha_t, sigma_t, d_alpha_t, d_sigma_t,  alpha_s, sigma_s, d_alpha_s, d_sigma_s,
     alpha_p, sigma_p,  h,  g]

t: where the step starts; s: where it ends; p: DPM-Solver++(2M)'s previous
time; h: the step size the kernels multiply by (s - t in step_table; the
adapters choose other units); g: Euler-Maruyama's diffusion coefficient.
tests/test_tables.py holds these equal to the C++ and Triton layouts.
"""
from __future__ import annotations

# a schedule row
ALPHA, SIGMA, D_ALPHA, D_SIGMA = 0, 1, 2, 3
SCHED_COLS = 4

# a step row
STEP_COLS = 12
AT_T = slice(0, 4)          # the schedule row at t
AT_S = slice(4, 8)          # the schedule row at s
PREV = slice(8, 10)         # (alpha, sigma) at the previous time
ALPHA_T, SIGMA_T = AT_T.start + ALPHA, AT_T.start + SIGMA
ALPHA_S, SIGMA_S = AT_S.start + ALPHA, AT_S.start + SIGMA
ALPHA_P, SIGMA_P = PREV.start, PREV.start + 1
H, G = 10, 11


def step_row(t, s, prev=(1.0, 1.0), h=0.0, g=0.0) -> list[float]:
    """One step row from the schedule rows (alpha, sigma, d_alpha, d_sigma)
    at t and at s, (alpha, sigma) at the previous time, h and g."""
    t, s, prev = tuple(t), tuple(s), tuple(prev)
    if len(t) != SCHED_COLS or len(s) != SCHED_COLS or len(prev) != 2:
        raise ValueError(f"step_row: expected t and s of {SCHED_COLS} values and prev of 2, "
                         f"got {len(t)}, {len(s)}, {len(prev)}")
    return [float(v) for v in (*t, *s, *prev, h, g)]


def ve_row(sigma_t, sigma_s, d_sigma_t=0.0, d_sigma_s=0.0, sigma_p=1.0, h=0.0,
           g=0.0) -> list[float]:
    """One step row from noise levels (the variance-exploding state of
    k-diffusion and diffusers' sigma schedulers: alpha = 1, d_alpha = 0):
    sigma and d_sigma at t and s, sigma at the previous time, h and g."""
    return step_row((1.0, sigma_t, 0.0, d_sigma_t), (1.0, sigma_s, 0.0, d_sigma_s),
                    (1.0, sigma_p), h, g)

