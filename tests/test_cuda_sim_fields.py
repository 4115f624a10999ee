"""The CUDA empirical-field kernels' indexing, proven on CPU by the grid simulator.

torch.ops.flowkern_sim._sim_field_mean runs the block bodies of
csrc/cuda/fields.cu (flowkern/fields_block.h) over every block, thread and
phase of the grids the launcher launches (same plan, same workspace layout),
into NaN-filled outputs and workspace. Each result is compared with the
float64 reference (flowkern/reference/fields.py) evaluated on the inputs as
stored, and must be as accurate as the CPU kernel (csrc/cpu/fields.cpp, same
score functions, other summation order) on the same inputs. B, R and N are
not multiples of the tiles (fp32: 32 queries x 64 references, 32/64-feature
chunks; fp64: 32 x 32, 16/32), with one reference range, the planned ranges
and forced ranges merged by the second kernel; the threads of every phase
also run last to first, which must not change a bit (no phase reads what
another thread of the same phase writes: the barriers are where the kernel
needs them).
"""
import itertools
import math

import pytest
import torch

import flowkern._C  # noqa: F401  (registers torch.ops.flowkern.*)
from flowkern.reference import fields as R

OPS = torch.ops.flowkern
SIM = torch.ops.flowkern_sim  # the simulator's debug ops (test-only namespace)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BS, RS, NS = (1, 7, 33), (1, 5, 130), (1, 3, 67, 300)
# (kind, D) of poisson; the others' parameters come from `case`.
KINDS = ["poisson", "pfgm++", "gaussian", "uniform-in", "uniform-out"]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def case(kind, B, Rn, N, dtype, seed=0):
    """Inputs (stored in dtype), qp in float64, kind code, p0, p1. uniform-in:
    box (-1.5, 1.5) with each query built from a reference plus noise inside
    the box (so references are inside); uniform-out: a box (2, 3) far from
    every x - alpha y (none inside: the least-violating fallback)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + 10 * Rn + N)
    ref = torch.randn(Rn, N, generator=g, dtype=torch.float64)
    if kind in ("poisson", "pfgm++"):
        x = torch.randn(B, N, generator=g, dtype=torch.float64)
        qp = torch.stack([torch.rand(B, generator=g, dtype=torch.float64) * 2,
                          torch.zeros(B, dtype=torch.float64)], 1)
        D = 1 if kind == "poisson" else 7.5
        return x.to(dtype), ref.to(dtype), qp, R.POISSON, (N + D) / 2, 0.0
    alpha = 0.2 + 0.7 * torch.rand(B, generator=g, dtype=torch.float64)
    sigma = 0.3 + torch.rand(B, generator=g, dtype=torch.float64)
    qp = torch.stack([alpha, sigma], 1)
    if kind == "gaussian":
        x = torch.randn(B, N, generator=g, dtype=torch.float64)
        return x.to(dtype), ref.to(dtype), qp, R.GAUSSIAN, 0.0, 0.0
    pick = ref[torch.randint(0, Rn, (B,), generator=g)]
    noise = torch.rand(B, N, generator=g, dtype=torch.float64) * 2 - 1
    x = alpha[:, None] * pick + sigma[:, None] * noise
    box = (-1.5, 1.5) if kind == "uniform-in" else (2.0, 3.0)
    return x.to(dtype), ref.to(dtype), qp, R.UNIFORM, *box


def simulate(x, ref, qp, kind, p0, p1, splits=0, max_blocks=0, reverse=False):
    m, b, l, plan = SIM._sim_field_mean(x, ref, qp.to(acc(x.dtype)), kind, p0, p1, splits,
                                        max_blocks, reverse)
    return (m, b, l), plan


def err(got, want):
    return (got.double() - want).abs().max().item() if want.numel() else 0.0


def truths(x, ref, qp, kind, p0, p1):
    """The float64 reference on the inputs as stored, and the CPU kernel."""
    return (R.field_mean(x.double(), ref.double(), qp, kind, p0, p1),
            OPS.field_mean(x, ref, qp.to(acc(x.dtype)), kind, p0, p1))


def check_accuracy(state, x, ref, qp, kind, p0, p1, what, truth=None):
    """state within the CPU kernel's error of the float64 reference (x4, plus
    (N + 1) ulps of the accumulation dtype at the data's scale: the logits
    multiply the keys' rounding by ~N; measured errors are <= 2 such units,
    an indexing error is O(1))."""
    want, cpu = truth or truths(x, ref, qp, kind, p0, p1)
    eps = torch.finfo(acc(x.dtype)).eps
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    for name, got, c, w in zip(("mean", "best", "sumexp"), state, cpu, want):
        assert got.dtype == acc(x.dtype) and got.shape == w.shape, (what, name)
        assert not got.isnan().any(), f"{what}: {name} has NaN (an element never written)"
        unit = scale if name == "mean" else w.abs().max().item() if w.numel() else 1.0
        tol = 4 * err(c, w) + eps * unit * (x.shape[1] + 1)
        assert err(got, w) <= tol, (what, name, err(got, w), err(c, w))
    if kind == R.UNIFORM:  # weights 0 or 1: sumexp counts references, exactly
        assert torch.equal(state[2], cpu[2]), what
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_every_shape(kind, dtype):
    """Every (B, R, N) of the grid against the reference (16-bit inputs and
    PFGM++, whose kernels differ from fp32's and PFGM's only in the load and
    c, every other shape), with one reference range and with two."""
    shapes = list(itertools.product(BS, RS, NS))
    if dtype in (torch.float16, torch.bfloat16) or kind == "pfgm++":
        shapes = shapes[::2]
    for B, Rn, N in shapes:
        x, ref, qp, k, p0, p1 = case(kind, B, Rn, N, dtype)
        truth = truths(x, ref, qp, k, p0, p1)
        for splits in (1, 2):
            plan = SIM._sim_plan_fields(B, Rn, N, acc(dtype).itemsize, splits)
            if splits > 1 and plan[4] == 1:
                continue  # a single tile
            what = f"{kind} {dtype} B={B} R={Rn} N={N} splits={splits}"
            state, sim_plan = simulate(x, ref, qp, k, p0, p1, splits)
            assert sim_plan == plan and plan[3] == math.ceil(B / plan[1])
            check_accuracy(state, x, ref, qp, k, p0, p1, what, truth)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_ranges_and_thread_order(kind, dtype):
    """Forced splits of the references (every range size down to one tile,
    a last range shorter than the others), merged by the second kernel; and
    every phase's threads in reverse order give the same bits."""
    B, Rn, N = 33, 130, 67
    x, ref, qp, k, p0, p1 = case(kind, B, Rn, N, dtype, seed=1)
    tiles = math.ceil(Rn / (64 if dtype == torch.float32 else 32))
    truth = truths(x, ref, qp, k, p0, p1)
    seen = set()
    for splits in range(1, tiles + 2):
        state, plan = simulate(x, ref, qp, k, p0, p1, splits)
        seen.add(plan[4])
        # ranges of whole tiles, every range non-empty
        per = math.ceil(tiles / min(splits, tiles))
        assert plan[5] == per * plan[2] and plan[4] == math.ceil(tiles / per)
        assert plan[5] * (plan[4] - 1) < Rn <= plan[5] * plan[4]
        assert plan[6] == (plan[4] * B * (N + 2) if plan[4] > 1 else 0)
        check_accuracy(state, x, ref, qp, k, p0, p1, f"{kind} {dtype} splits={splits}", truth)
        rev, _ = simulate(x, ref, qp, k, p0, p1, splits, reverse=True)
        for a, b in zip(state, rev):
            assert torch.equal(a, b), f"{kind} {dtype} splits={splits}: thread order matters"
    assert {1, 2, tiles} <= seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pfgm_targets(dtype):
    """PFGM (D = 1) and PFGM++ (D = 7.5): the weighted mean (normalize=False)
    and PFGM's normalised target sqrt(N) m / (||m|| + gamma) built from it
    (normalize=True, flowkern/ops/fields.py) against float64."""
    for D, (B, Rn, N) in itertools.product((1, 7.5), ((7, 130, 300), (33, 5, 67))):
        x, ref, qp, k, _, _ = case("poisson", B, Rn, N, dtype, seed=2)
        state, _ = simulate(x, ref, qp, k, (N + D) / 2, 0.0)
        want = check_accuracy(state, x, ref, qp, k, (N + D) / 2, 0.0, f"D={D} {dtype}")
        r = qp[:, 0]
        vx, vr = R.normalized_target(x.double(), r, state[0].double(), N, 5.0)
        wx, wr = R.normalized_target(x.double(), r, want[0], N, 5.0)
        tol = 1e-10 if dtype == torch.float64 else 1e-3 * math.sqrt(N)
        assert err(vx, wx) <= tol and err(vr, wr) <= tol, (D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_degenerate_inputs(dtype):
    """Finite, and the documented limits: a query on a reference with r = 0
    is that reference; weights that all underflow (far queries, sigma -> 0)
    renormalise to the largest; sigma = 0 gives the nearest reference; no
    reference in the uniform box gives the least-violating one; N = 0."""
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(70, 37, generator=g, dtype=torch.float64).to(dtype)
    zeros = torch.zeros(3, dtype=torch.float64)
    # on a reference, r = 0 (the tile's first, middle and last reference)
    x = ref[[0, 40, 69]].clone()
    qp = torch.stack([zeros, zeros], 1)
    (m, b, l), _ = simulate(x, ref, qp, R.POISSON, 19.0, 0.0, splits=2)
    assert torch.equal(m, x.to(m.dtype)) and torch.isfinite(b).all() and (l >= 1).all()
    # far queries: every Poisson / Gaussian weight exp(-huge) underflows
    far = torch.full((3, 37), 1e4, dtype=torch.float64).to(dtype)
    for kind, qp in ((R.POISSON, torch.stack([zeros + 1e-3, zeros], 1)),
                     (R.GAUSSIAN, torch.stack([zeros + 1.0, zeros + 1e-4], 1)),
                     (R.GAUSSIAN, torch.stack([zeros + 1.0, zeros], 1))):  # sigma = 0
        for splits in (1, 2):
            state, _ = simulate(far, ref, qp, kind, 19.0, 0.0, splits)
            assert all(torch.isfinite(t).all() for t in state)
            check_accuracy(state, far, ref, qp, kind, 19.0, 0.0, f"far kind={kind} {dtype}")
    # sigma = 0 near a reference: that reference
    near = ref[[3, 50]] + 1e-2
    qp = torch.stack([torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)], 1)
    (m, _, _), _ = simulate(near, ref, qp, R.GAUSSIAN, 0.0, 0.0, splits=2)
    assert torch.equal(m, ref[[3, 50]].to(m.dtype))
    # uniform prior with no reference inside: (x - alpha y)/sigma = -y for x = 0,
    # alpha = sigma = 1: -5 is 5 below the box [0, 1], 3 is 2 above it
    refs = torch.stack([torch.full((7,), 5.0), torch.full((7,), -3.0)]).to(dtype)
    q = torch.zeros(1, 7, dtype=dtype)
    qp = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    (m, b, l), _ = simulate(q, refs, qp, R.UNIFORM, 0.0, 1.0)
    assert torch.equal(m, refs[1:].to(m.dtype)) and b.item() == 2.0 and l.item() == 1.0
    # N = 0: no features, every reference at distance 0
    for kind in (R.POISSON, R.GAUSSIAN, R.UNIFORM):
        x0, r0 = torch.empty(3, 0, dtype=dtype), torch.empty(130, 0, dtype=dtype)
        qp = torch.stack([zeros + 0.5, zeros + 1.0], 1)
        (m, b, l), _ = simulate(x0, r0, qp, kind, 0.5, 1.0, splits=2)
        want = OPS.field_mean(x0, r0, qp.to(acc(dtype)), kind, 0.5, 1.0)
        assert m.shape == (3, 0)
        torch.testing.assert_close(b, want[1])
        torch.testing.assert_close(l, want[2])
    # an empty batch: nothing launched, empty outputs
    state, plan = simulate(ref[:0], ref, zeros[:0, None].expand(0, 2), R.GAUSSIAN, 0.0, 0.0)
    assert plan[3] == 0 and [t.shape[0] for t in state] == [0, 0, 0]


def test_plan():
    """The launcher's plan (flowkern/fields_block.h): ranges only for batches
    that leave the device idle, at least two tiles each, within the
    workspace budget and the merge kernel's limit, idempotent."""
    plan = SIM._sim_plan_fields
    # (B, R, N, acc_size, splits, max_blocks) -> (splits, rchunk)
    assert plan(1, 100000, 3072, 4, 0, 2112)[4:6] == [32, 3136]  # capped at 32 ranges
    assert plan(128, 4096, 3072, 4, 0, 2112)[3:6] == [4, 32, 128]  # 64 tiles / 32
    assert plan(4096, 4096, 3072, 4, 0, 2112)[3:5] == [128, 2]  # 264 / 128 -> 3, budget: 2
    assert plan(100000, 4096, 3072, 4, 0, 2112)[4] == 1  # enough query blocks
    assert plan(64, 64, 16, 4, 0, 2112)[4] == 1  # one tile: nothing to split
    assert plan(64, 256, 16, 4, 0, 2112)[4:6] == [2, 128]  # at least two tiles a range
    assert plan(1, 10 ** 6, 2 ** 22, 4, 0, 2112)[4] == 7  # budget 2^25 / (2^22 + 2) -> 7
    assert plan(3, 130, 5, 8, 0, 0)[1:3] == [32, 32]  # fp64 tiles
    for args in itertools.product((1, 33, 3000), (1, 130, 5000), (0, 300), (4, 8), (0, 2, 9),
                                  (0, 32, 2112)):
        p = plan(*args)
        B, Rn, N = args[:3]
        assert p[:3] == [256, 32, 64 if args[3] == 4 else 32]
        assert 1 <= p[4] <= 32 and p[5] % p[2] == 0 and (p[4] - 1) * p[5] < Rn <= p[4] * p[5]
        assert p[6] == (p[4] * B * (N + 2) if p[4] > 1 else 0) and p[6] <= 2 ** 25
        assert plan(B, Rn, N, args[3], p[4], 0) == p, args
