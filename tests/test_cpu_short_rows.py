"""The CPU engine runs rows shorter than fk::kShortRow (129 elements) through
lincomb_rows, one plain loop over whole rows, and longer ones through
lincomb_segment (csrc/include/flowkern/lincomb.h, decided in
csrc/cpu/dispatch.h run_lincomb). The element math is the same, so a batch
of short rows must equal, bit for bit, the same elements run as one long
row when every row has the same coefficients (a shared table row), noise
included: without per-sample seeds the noise of element e is the stream's
counter offset + e on both paths, drawn a chunk of rows at a time on the
short-row path. With per-sample seeds, row r of a batch equals a long row
with seed seeds[r] (its noise at counters offset + i).
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
@pytest.mark.parametrize("shape", SHORT)
def test_steps_short_rows_equal_one_long_row(shape, dtype):
    x, v, h = _data(shape, dtype)
    row = fk.step_table("vp", 0.3, 0.4, t_prev=0.2, g=0.7)  # one row: every row's
    for call in (
        lambda x, v, h: fk.euler_step(x, v, table=row, backend="cpu"),
        lambda x, v, h: fk.dpmpp_2m_step(x, v, table=row, d_prev=h, prediction="x1",
                                         backend="cpu")[0],
        lambda x, v, h: fk.em_step(x, v, table=row, seed=11, offset=3, backend="cpu"),
        lambda x, v, h: fk.lincomb_step(x, [v, h], [1.0, 0.25, -0.5], noise_std=0.3, seed=5,
                                        offset=1, backend="cpu"),
    ):
        short = call(x, v, h)
        long = call(_long(x), _long(v), _long(h))
        assert torch.equal(short, long.view(shape)), (shape, dtype)


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


def test_training_short_rows_equal_one_long_row():
    x0, x1, _ = _data((257, 2), torch.float32, seed=2)
    xt, u = fk.interpolate(x0, x1, 0.37, schedule="cosine", backend="cpu")
    xt2, u2 = fk.interpolate(_long(x0), _long(x1), 0.37, schedule="cosine", backend="cpu")
    assert torch.equal(xt, xt2.view_as(xt)) and torch.equal(u, u2.view_as(u))


def test_short_rows_match_the_reference():
    """Per-sample coefficients (the rows differ), both paths' lengths, against
    the torch backend."""
    for shape in [(4096, 2), (33, 7), (9, 128), (9, 129)]:
        x, v, _ = _data(shape, torch.float64, seed=3)
        t = torch.rand(shape[0], dtype=torch.float64) * 0.9
        got = fk.ei_step(x, v, t, t + 0.05, "cosine", backend="cpu")
        want = fk.ei_step(x, v, t, t + 0.05, "cosine", backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
