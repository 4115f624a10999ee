"""The CUDA sampler-step kernels' indexing, proven on CPU by the grid simulator.

torch.ops.flowkern_sim._sim_step builds a step's functor with the launchers' own
fk::with_step_fn and runs fk::lincomb_thread over every block and thread of
the grid csrc/cuda/steps.cu launches (same plan, same pointers). Each result
must equal the CPU op (csrc/cpu/steps.cpp, the ground truth: same per-element
code), the noisy steps to within 1 ulp of fp32. Outputs start as NaN, so an
element the grid never writes fails.
"""
import numpy as np
import pytest
import torch

import flowkern
from cuda_sim_helpers import (DTYPES, OPS, SIM, SHAPES, THREADS, WIDE, acc, assert_within_fp32_ulp,
                              check_plan, make_inputs)

PREDS = range(4)  # velocity, x1, eps, score (flowkern/_rules.py)

# (op, variant): variant is the EI form (0 data, 1 noise), DPM's second-order
# flag or lms_step's history length.
CONFIGS = [("euler_step", 0), ("heun_step", 0), ("ei_step", 0), ("ei_step", 1),
           ("ei_step_backward", 0), ("ei_step_backward", 1), ("dpmpp_2m_step", 0),
           ("dpmpp_2m_step", 1), ("em_step", 0), ("churn", 0), ("lms_step", 0),
           ("lms_step", 1), ("lms_step", 2), ("lms_step", 3)]
LMS_WEIGHTS = [0.21, -0.37, 0.125, -0.043]
NOISY = ("em_step", "churn")


def n_inputs(op, cfg, variant=0):
    """How many inputs the launcher passes to the kernel (steps.h order: the
    step's own, then with guidance the unconditional predictions)."""
    base = {"euler_step": 2, "heun_step": 4, "ei_step": 2, "ei_step_backward": 1,
            "dpmpp_2m_step": 3, "em_step": 2, "churn": 1, "lms_step": 2 + variant}[op]
    uncond = {"heun_step": 2, "ei_step_backward": 0, "churn": 0}.get(op, 1)
    return base + (uncond if cfg else 0)


def make_table(op, rows, per_sample, dtype, gen):
    """A step table from flowkern.step_table: one shared row (float times,
    linear schedule) or one row per sample (cosine schedule). t in [0.1, 0.8];
    s > t (toward the data) except for churn, which renoises to t_hat < t;
    t_prev < t for DPM-Solver++(2M); g > 0 for Euler-Maruyama."""
    n = rows if per_sample else 1
    t = 0.1 + 0.7 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t - 0.05 if op == "churn" else t + 0.1
    if not per_sample:
        t, s = float(t[0]), float(s[0])
    return flowkern.step_table("cosine" if per_sample else "linear", t, s, t_prev=t - 0.07,
                               g=0.7, dtype=acc(dtype))


def cpu_step(op, ins, table, pred, variant, cfg, w, seed, offset, seeds=None):
    """The CPU op on the same inputs; returns its outputs as a list."""
    x = ins[0]
    out, d_out = torch.empty_like(x), torch.empty_like(x)
    pu = ins[-1] if cfg else None
    # the schemas' coefficient arguments: a table as given
    tab = (table, None, None, None, [], -1, [])
    if op == "euler_step":
        OPS.euler_step(x, ins[1], pu, *tab, pred, w, False, out)
    elif op == "heun_step":
        OPS.heun_step(*ins[:4], ins[4] if cfg else None, ins[5] if cfg else None, *tab, pred,
                      w, False, out)
    elif op == "ei_step":
        out = OPS.ei_step(x, ins[1], pu, *tab, pred, variant, w, False)
    elif op == "ei_step_backward":
        return list(OPS.ei_step_backward(x, *tab, pred, variant, w, cfg))
    elif op == "dpmpp_2m_step":
        OPS.dpmpp_2m_step(x, ins[1], ins[2] if variant else None, pu, *tab, pred, w, False, out,
                          d_out)
        return [out, d_out]
    elif op == "em_step":
        OPS.em_step(x, ins[1], pu, *tab, pred, w, seed, offset, seeds, False, out)
    elif op == "lms_step":
        hist = ins[2:2 + variant] + [None] * (3 - variant)
        OPS.lms_step(x, ins[1], *hist, pu, LMS_WEIGHTS[:variant + 1], *tab, pred, w, False, out,
                     d_out)
        return [out, d_out]
    else:
        OPS.churn(x, *tab, seed, offset, seeds, False, out)
    return [out]


def check_step(op, variant, pred, cfg, dtype, shape, per_sample, offset, max_blocks,
               seed=0, noise=(12345, 678)):
    """Simulates the step's grid and compares with the CPU op; returns the plan."""
    gen = torch.Generator().manual_seed(seed)
    ins = make_inputs(n_inputs(op, cfg, variant), shape, dtype, gen, offset)
    if op == "dpmpp_2m_step" and not variant:
        ins[2] = ins[0]  # the launcher passes x for the absent d_prev
    table = make_table(op, shape[0], per_sample, dtype, gen)
    w = 2.5 if cfg else 1.0
    seed, noise_offset, seeds = (*noise, None)[:3]  # noise: (seed, offset[, per-sample seeds])
    outs, plan = SIM._sim_step(op, ins, table, pred, variant, cfg, w, seed, noise_offset,
                               max_blocks, offset, seeds,
                               LMS_WEIGHTS[:variant + 1] if op == "lms_step" else [])
    want = cpu_step(op, ins, table, pred, variant, cfg, w, seed, noise_offset, seeds)
    what = (f"{op} variant={variant} pred={pred} cfg={cfg} {dtype} {shape} "
            f"table={'per-sample' if per_sample else 'shared'} offset={offset} "
            f"max_blocks={max_blocks}")
    assert len(outs) == len(want), what
    for k, (g, c) in enumerate(zip(outs, want)):
        assert g.shape == torch.Size(shape) and g.dtype == dtype, what
        assert not c.isnan().any(), f"{what}: the CPU op made NaN (bad test table)"
        if op in NOISY:
            assert_within_fp32_ulp(g, c, f"{what} out {k}")
        else:
            assert torch.equal(g, c), f"{what}: output {k} differs from the CPU op"
    return plan


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,variant", CONFIGS, ids=str)
def test_step_every_config(op, variant, dtype):
    """Every prediction type, guidance on/off and table layout on the three
    launch paths: 128-bit packs with a grid-stride loop (2 blocks for
    9*1024/wide chunks), the scalar path (inner % wide != 0), and misaligned
    pointers with one block striding over rows of 1023."""
    wide = WIDE[dtype]
    for pred in PREDS if op != "churn" else (0,):
        for cfg in (False, True) if op != "churn" else (False,):
            for per_sample in (False, True):
                args = (op, variant, pred, cfg, dtype)
                plan = check_step(*args, (9, 1024), per_sample, 0, 2)
                assert plan[0] == wide and plan[2] == 2
                assert check_step(*args, (5, 7), per_sample, 0, 0)[0] == 1
                assert check_step(*args, (7, 1023), per_sample, 1, 1) == [1, THREADS, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,variant", [("euler_step", 0), ("heun_step", 0), ("ei_step", 1),
                                        ("ei_step_backward", 0), ("dpmpp_2m_step", 1),
                                        ("em_step", 0), ("churn", 0), ("lms_step", 3)],
                         ids=str)
def test_step_shapes(op, variant, dtype):
    """Tails, row boundaries inside chunks, grid strides and empty tensors:
    every shape aligned and misaligned, with the full grid and 1 or 3 blocks,
    guided, with a per-sample table for an even batch (step_table cannot
    build an empty one) and a shared one otherwise."""
    for shape in SHAPES:
        for offset in (0, 1):
            for max_blocks in (0, 1, 3):
                per_sample = shape[0] > 0 and shape[0] % 2 == 0
                plan = check_step(op, variant, 3 if op != "churn" else 0, op != "churn",
                                  dtype, shape, per_sample, offset, max_blocks,
                                  seed=len(shape) + shape[0])
                check_plan(plan, shape, dtype, offset, max_blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", NOISY)
def test_noise_counters(op, dtype):
    """Seeds and offsets past 2^32 (both Philox key words, the counter's high
    word) give the CPU op's noise on every launch path; the noise is really
    drawn (seed and offset change it) and keyed by the flat element index."""
    for seed, offset in ((0, 0), (2 ** 40 + 7, 3), (5, 2 ** 33 - 100), (2 ** 63 - 1, 2 ** 62)):
        for shape, off, max_blocks in (((6, 1024), 0, 2), ((3, 4099), 1, 0), ((2, 8), 0, 1)):
            check_step(op, 0, 0, False, dtype, shape, True, off, max_blocks,
                       noise=(seed, offset))
    gen = torch.Generator().manual_seed(1)
    ins = make_inputs(n_inputs(op, False), (4, 256), dtype, gen)
    table = make_table(op, 4, False, dtype, gen)

    def run(seed, offset, inputs=ins):
        return SIM._sim_step(op, inputs, table, 0, 0, False, 1.0, seed, offset, 3, 0)[0][0]

    a = run(1, 0)
    assert not torch.equal(a, run(2, 0)) and not torch.equal(a, run(1, 1))
    # Element e draws counter offset + e: dropping the first row of the batch
    # and advancing the offset by its length gives the same rows 1..3.
    assert torch.equal(run(1, 256, [t[1:] for t in ins]), a[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", NOISY)
def test_per_sample_seed_counters(op, dtype):
    """Per-sample seeds (philox.h for_row): every launch path draws the CPU
    op's noise, for seeds using both key words, rows that split across
    chunks and blocks, and counters past 2^32; row r's noise is that of a
    batch of one with seed seeds[r] (the scalar-seed path), whatever its
    position in the batch."""
    seeds = torch.tensor([2 ** 63 - 1, 0, 2 ** 40 + 7, 5, 5, 123456789], dtype=torch.int64)
    for offset in (0, 2 ** 33 - 100):
        for shape, off, max_blocks in (((6, 1024), 0, 2), ((3, 4099), 1, 0), ((2, 8), 0, 1),
                                       ((5, 1), 0, 0)):
            check_step(op, 0, 0, False, dtype, shape, True, off, max_blocks,
                       noise=(0, offset, seeds[:shape[0]]))
    gen = torch.Generator().manual_seed(2)
    ins = make_inputs(n_inputs(op, False), (4, 300), dtype, gen)
    table = make_table(op, 4, False, dtype, gen)
    s4 = seeds[2:6]
    both = SIM._sim_step(op, ins, table, 0, 0, False, 1.0, 0, 9, 3, 0, s4)[0][0]
    for r in range(4):
        alone = SIM._sim_step(op, [t[r:r + 1] for t in ins], table, 0, 0, False, 1.0,
                              int(s4[r]), 9, 0, 0)[0][0]
        assert torch.equal(alone[0], both[r]), r
    flipped = SIM._sim_step(op, [t.flip(0).contiguous() for t in ins], table, 0, 0, False, 1.0,
                            0, 9, 3, 0, s4.flip(0))[0][0]
    assert torch.equal(flipped.flip(0), both)


def test_bad_arguments():
    x = torch.zeros(2, 8)
    table = flowkern.step_table("linear", 0.2, 0.3)
    with pytest.raises(RuntimeError, match=r"_sim_step\(euler_step\): expected 2 inputs"):
        SIM._sim_step("euler_step", [x], table)
    with pytest.raises(RuntimeError, match="step table"):
        SIM._sim_step("euler_step", [x, x], torch.zeros(3, 12))
    with pytest.raises(RuntimeError, match="unknown op 'nope'"):
        SIM._sim_step("nope", [x, x], table)
    # scalars a functor cannot take (its maker's valid(), which the CUDA
    # launcher also asks: kBadParams)
    out_of_range = "out of range for the op"
    with pytest.raises(RuntimeError, match=out_of_range):
        SIM._sim_step("ei_step", [x, x], table, 0, 2)  # no EI form 2
    with pytest.raises(RuntimeError, match=out_of_range):
        SIM._sim_step("churn", [x], table, 0, 0, True)  # churn has no guidance
    with pytest.raises(RuntimeError, match=out_of_range):
        SIM._sim_step("lms_step", [x] * 6, table, 0, 4)  # at most 3 earlier velocities
    with pytest.raises(RuntimeError, match=out_of_range):
        SIM._sim_step("lincomb_step", [x] * 5, table, 0, 4, False, 1.0, 0, 0, 0, 0, None,
                      [1.0] * 5, 0.5)  # the noisy variant takes at most 3 terms


def test_device_cos_formula():
    """philox.h cos_or_sin on the GPU, emulated in numpy float32 with exactly
    rounded sinpi/cospi standing in for CUDA's sincospif (<= 1 ulp): over
    Box-Muller angles a = fl(2 pi) u2 it stays within 1.5 ulp of cos(a) and
    of sin(a), so the GPU's noise matches the host's (correctly rounded) to
    about CUDA cosf's own accuracy (2 ulp)."""
    f32 = np.float32
    u = np.random.default_rng(0).integers(0, 2 ** 31, size=200_000).astype(f32) * f32(2 ** -31)
    a = f32(6.283185307179586) * u
    inv_pi_hi, inv_pi_lo = f32(0.31830987334251404), f32(1.2841276486597053e-08)
    hi = a * inv_pi_hi
    # fmaf(a, inv_pi_lo, fmaf(a, inv_pi_hi, -hi)): the products are exact in float64.
    lo = (a.astype(np.float64) * float(inv_pi_lo)
          + f32(a.astype(np.float64) * float(inv_pi_hi) - hi)).astype(f32)
    s, c = (f(np.pi * hi.astype(np.float64)).astype(f32) for f in (np.sin, np.cos))
    d = (f32(3.14159265) * lo).astype(np.float64)
    # fmaf(-d, s, c) and fmaf(d, c, s): one rounding each
    for got, exact in (((-d * s + c).astype(f32), np.cos(a.astype(np.float64))),
                       ((d * c + s).astype(f32), np.sin(a.astype(np.float64)))):
        ulp = np.spacing(np.abs(exact.astype(f32))).astype(np.float64)
        assert (np.abs(got - exact) <= 1.5 * ulp).all()


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_dpmpp_nan_in_d_prev_stays_out_of_d_t(cfg):
    """The CUDA body leaves d_prev out of d_t like the CPU op (steps.h
    DPMpp2MFn::reads): NaN in d_prev, d_t equal to the run without it."""
    gen = torch.Generator().manual_seed(3)
    ins = make_inputs(n_inputs("dpmpp_2m_step", cfg), (5, 7), torch.float32, gen, 0)
    table = make_table("dpmpp_2m_step", 5, True, torch.float32, gen)
    w = 2.5 if cfg else 1.0
    clean = SIM._sim_step("dpmpp_2m_step", ins, table, 1, 1, cfg, w, 0, 0, 0, 0)[0]
    ins[2] = ins[2].clone()
    ins[2][2, 3] = float("nan")
    poisoned = SIM._sim_step("dpmpp_2m_step", ins, table, 1, 1, cfg, w, 0, 0, 0, 0)[0]
    assert torch.equal(poisoned[1], clean[1])
    assert poisoned[0].isnan().sum() == 1 and poisoned[0][2, 3].isnan()


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_lms_nan_in_history_stays_out_of_u_t(cfg):
    """u_t does not read the history (steps.h LMSFn::reads) on the CUDA body
    as on the CPU: NaN in u2 reaches x_s only, and the launch equals the CPU op."""
    gen = torch.Generator().manual_seed(4)
    ins = make_inputs(n_inputs("lms_step", cfg, 3), (5, 7), torch.float32, gen, 0)
    table = make_table("lms_step", 5, True, torch.float32, gen)
    w = 2.5 if cfg else 1.0
    clean = SIM._sim_step("lms_step", ins, table, 1, 3, cfg, w, 0, 0, 0, 0, None, LMS_WEIGHTS)[0]
    ins[3] = ins[3].clone()
    ins[3][2, 3] = float("nan")
    poisoned = SIM._sim_step("lms_step", ins, table, 1, 3, cfg, w, 0, 0, 0, 0, None,
                             LMS_WEIGHTS)[0]
    assert torch.equal(poisoned[1], clean[1])
    assert poisoned[0].isnan().sum() == 1 and poisoned[0][2, 3].isnan()
    want = cpu_step("lms_step", ins, table, 1, 3, cfg, w, 0, 0)
    assert torch.equal(want[1], clean[1]) and want[0].isnan().sum() == 1


LINCOMB_WEIGHTS = [0.83, 0.21, -0.37, 0.125, -0.043]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nt,noise", [(nt, noise) for nt in range(1, 5)
                                      for noise in ("none", "seed", "per_sample")
                                      if nt <= 3 or noise == "none"])
def test_lincomb_step(nt, noise, dtype):
    """lincomb_step's launcher (no table: the caller's weights; the noise
    instantiation when noise_std != 0) on the three launch paths, against the
    CPU op: bit for bit without noise, to float32 ulps with it."""
    std = 0.0 if noise == "none" else 0.31
    for shape, offset, max_blocks in (((9, 1024), 0, 2), ((5, 7), 0, 0), ((7, 1023), 1, 1)):
        gen = torch.Generator().manual_seed(nt)
        ins = make_inputs(1 + nt, shape, dtype, gen, offset)
        table = make_table("euler_step", shape[0], False, dtype, gen)  # the launcher reads none
        seeds = (torch.arange(shape[0], dtype=torch.int64) * 31 + 7
                 if noise == "per_sample" else None)
        wts = LINCOMB_WEIGHTS[:nt + 1]
        outs, plan = SIM._sim_step("lincomb_step", ins, table, 0, nt, False, 1.0, 12345, 678,
                                   max_blocks, offset, seeds, wts, std)
        want = torch.empty_like(ins[0])
        OPS.lincomb_step(ins[0], ins[1:], wts, std, 12345, 678, seeds, False, want)
        what = f"lincomb_step nt={nt} noise={noise} {dtype} {shape} offset={offset}"
        assert outs[0].shape == torch.Size(shape) and outs[0].dtype == dtype, what
        if std:
            assert_within_fp32_ulp(outs[0], want, what)
        else:
            assert torch.equal(outs[0], want), what
        if shape == (9, 1024):
            assert plan[0] == WIDE[dtype] and plan[2] == 2, what
