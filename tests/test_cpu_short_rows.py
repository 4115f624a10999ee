"""The CPU engine's three ways over a (rows, inner) tensor (decided in
csrc/cpu/dispatch.h run_lincomb): rows whose coefficients are all the same
(a step at one time, one table row, a scalar t: lincomb.h uniform_rows) run
as one row of rows * inner elements; otherwise rows shorter than fk::kShortRow
(129 elements) go through lincomb_rows, one plain loop over whole rows, and
longer ones through lincomb_segment. The element math is the same, so the
three must agree bit for bit on rows that share their coefficients, noise
included: without per-sample seeds the noise of element e is the stream's
counter offset + e on every path. A table of B equal rows (one per sample)
takes the per-row paths; its one row shared takes the uniform path. With
per-sample seeds, row r of a batch equals a long row with seed seeds[r] (its
noise at counters offset + i).
"""
import pytest
import torch

import flowkern as fk

pytestmark = pytest.mark.skipif(not fk.backend.cpu_built(), reason="flowkern._C not built")

SHORT = [(300, 1), (257, 2), (97, 3), (40, 31), (5, 128)]  # rows x inner, inner < 129
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]


def _long(t):
    """The same elements as one row of rows * inner (>= 129: the segment path)."""
    return t.reshape(1, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHORT + [(3, 200), (2, 20000)])
def test_steps_rows_equal_one_long_row(shape, dtype):
    """Per-row (short rows, or segments from 129 on), uniform and one long row."""
    x, v, h = _data(shape, dtype)
    row = fk.step_table("vp", 0.3, 0.4, t_prev=0.2, g=0.7)  # one row: every row's
    rows = row.expand(shape[0], -1).contiguous()  # the same values, one row per sample
    for call in (
        lambda x, v, h, tab: fk.euler_step(x, v, table=tab, backend="cpu"),
        lambda x, v, h, tab: fk.dpmpp_2m_step(x, v, table=tab, d_prev=h, prediction="x1",
                                              backend="cpu")[0],
        lambda x, v, h, tab: fk.em_step(x, v, table=tab, seed=11, offset=3, backend="cpu"),
    ):
        per_row = call(x, v, h, rows)
        uniform = call(x, v, h, row)
        long = call(_long(x), _long(v), _long(h), row)
        assert torch.equal(per_row, long.view(shape)), (shape, dtype)
        assert torch.equal(uniform, long.view(shape)), (shape, dtype)
    # lincomb_step's coefficients are always one row: uniform against one long row
    comb = lambda x, v, h: fk.lincomb_step(x, [v, h], [1.0, 0.25, -0.5], noise_std=0.3,  # noqa: E731
                                           seed=5, offset=1, backend="cpu")
    assert torch.equal(comb(x, v, h), comb(_long(x), _long(v), _long(h)).view(shape))


@pytest.mark.parametrize("shape", SHORT)
def test_per_sample_seeds_short_rows(shape):
    rows, inner = shape
    x, v, _ = _data(shape, torch.float32, seed=1)
    seeds = torch.arange(rows, dtype=torch.int64) * 1009 + 7
    got = fk.lincomb_step(x, [v], [1.0, 0.5], noise_std=0.2, per_sample_seeds=seeds, offset=4,
                          backend="cpu")
    pad = max(129, inner)
    for r in {0, rows // 2, rows - 1}:
        xp, vp = torch.zeros(1, pad), torch.zeros(1, pad)
        xp[0, :inner], vp[0, :inner] = x[r], v[r]
        want = fk.lincomb_step(xp, [vp], [1.0, 0.5], noise_std=0.2, seed=int(seeds[r]),
                               offset=4, backend="cpu")
        assert torch.equal(got[r], want[0, :inner]), r


@pytest.mark.parametrize("shape", [(257, 2), (300, 1), (3, 200)])
def test_training_rows_equal_one_long_row(shape):
    """One time for the batch (a float, or a 0-dim t: uniform), the same time
    per row (t of shape (B,): per row) and one long row agree bit for bit."""
    x0, x1, _ = _data(shape, torch.float32, seed=2)
    want = fk.interpolate(_long(x0), _long(x1), 0.37, schedule="cosine", backend="cpu")
    for t in (0.37, torch.tensor(0.37, dtype=torch.float64),
              torch.full((shape[0],), 0.37, dtype=torch.float64)):
        got = fk.interpolate(x0, x1, t, schedule="cosine", backend="cpu")
        for g, w in zip(got, want):
            assert torch.equal(g, w.view(shape)), (shape, t)
    t = torch.full((shape[0],), 0.37, dtype=torch.float64)
    for dst in ("eps", "x1"):
        got = fk.convert(x0, x1, t, "cosine", src="velocity", dst=dst, backend="cpu")
        want = fk.convert(x0, x1, 0.37, "cosine", src="velocity", dst=dst, backend="cpu")
        assert torch.equal(got, want), dst


def test_short_rows_match_the_reference():
    """Per-sample coefficients (the rows differ), both paths' lengths, against
    the torch backend."""
    for shape in [(4096, 2), (33, 7), (9, 128), (9, 129)]:
        x, v, _ = _data(shape, torch.float64, seed=3)
        t = torch.rand(shape[0], dtype=torch.float64) * 0.9
        got = fk.ei_step(x, v, t, t + 0.05, "cosine", backend="cpu")
        want = fk.ei_step(x, v, t, t + 0.05, "cosine", backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
