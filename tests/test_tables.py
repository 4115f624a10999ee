"""flowkern.tables names the coefficient tables' columns for the Python
layers; the kernels read the same layout by position. These tests hold the
names equal to the C++ layout (steps.h StepRow / load_step, coeffs.h Sched /
load_sched), to Triton's (triton/coeffs.py Sched, StepRow, load_step,
load_sched), and to what step_table and schedules.coefficients write."""
import inspect
import os
import re

import pytest
import torch

import flowkern as fk
from flowkern import tables as T
from flowkern.schedules import coefficients, evaluate, get_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _header(name):
    with open(os.path.join(ROOT, "csrc", "include", "flowkern", name)) as f:
        return f.read()


def test_cpp_layout():
    coeffs, steps = _header("coeffs.h"), _header("steps.h")
    fields = re.search(r"struct Sched \{ A ([\w, ]+); \};", coeffs).group(1).split(", ")
    assert [fields.index(n) for n in ("alpha", "sigma", "d_alpha", "d_sigma")] == \
        [T.ALPHA, T.SIGMA, T.D_ALPHA, T.D_SIGMA]
    assert "return Sched<A>{c[0], c[1], c[2], c[3]};" in coeffs  # load_sched
    assert f"constexpr int STEP_COLS = {T.STEP_COLS};" in steps
    row = re.search(r"struct StepRow \{\s*Sched<A> t, s;\s*A alpha_p, sigma_p, h, g;\s*\};",
                    steps)
    assert row, "StepRow's fields changed: update flowkern/tables.py"
    load = re.search(r"FK_HD StepRow<A> load_step\(.*?\{(.*?)\n\}", steps, re.S).group(1)
    assert "return {{c[0], c[1], c[2], c[3]}, {c[4], c[5], c[6], c[7]}, c[8], c[9], c[10], " \
           "c[11]};" in load
    # t, s, (alpha_p, sigma_p), h, g in that order
    assert (T.AT_T, T.AT_S, T.PREV) == (slice(0, 4), slice(4, 8), slice(8, 10))
    assert (T.ALPHA_P, T.SIGMA_P, T.H, T.G) == (8, 9, 10, 11)


def test_triton_layout():
    """Triton's rows are tuples with C++'s fields in C++'s order, read by the
    position constants of flowkern/triton/coeffs.py, and loaded from the
    tables in the tables' column order (flowkern/tables.py)."""
    from flowkern.triton import coeffs as C
    sched = [C.ALPHA, C.SIGMA, C.D_ALPHA, C.D_SIGMA]
    assert [c.value for c in sched] == [0, 1, 2, 3]
    assert [T.ALPHA_T, T.SIGMA_T] == [T.AT_T.start + C.ALPHA.value, T.AT_T.start + C.SIGMA.value]
    row = [C.ROW_T, C.ROW_S, C.ROW_ALPHA_P, C.ROW_SIGMA_P, C.ROW_H, C.ROW_G]
    assert [c.value for c in row] == [0, 1, 2, 3, 4, 5]
    src = inspect.getsource(C.load_step.fn)
    assert [int(k) for k in re.findall(r"tl\.load\(base \+ (\d+)", src)] == list(range(12))
    # ((schedule at t: columns 0-3), (at s: 4-7), prev alpha, prev sigma, h, g)
    assert re.search(r"return \(\(tl\.load\(base \+ 0,.*\),\s*\(tl\.load\(base \+ 4,.*\),"
                     r"\s*tl\.load\(base \+ 8,.*tl\.load\(base \+ 9,.*\s*tl\.load\(base \+ 10,"
                     r".*tl\.load\(base \+ 11,", src, re.S)
    assert (T.PREV.start, T.H, T.G) == (8, 10, 11)
    src = inspect.getsource(C.load_sched.fn)
    assert re.search(r"return \(tl\.load\(base,.*tl\.load\(base \+ 1,.*tl\.load\(base \+ 2,"
                     r".*tl\.load\(base \+ 3,", src, re.S)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "vp", "edm"])
def test_tables_write_the_named_columns(schedule):
    sched = get_schedule(schedule)
    t = torch.tensor([0.1, 0.4, 0.7], dtype=torch.float64)
    s, tp, g = t + 0.2, t - 0.05, torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    tab = fk.step_table(schedule, t, s, t_prev=tp, g=g, dtype=torch.float64)
    assert tab.shape == (3, T.STEP_COLS)
    torch.testing.assert_close(tab[:, T.AT_T], torch.stack(evaluate(sched, t, torch.float64), 1))
    torch.testing.assert_close(tab[:, T.AT_S], torch.stack(evaluate(sched, s, torch.float64), 1))
    torch.testing.assert_close(tab[:, T.PREV],
                               torch.stack(evaluate(sched, tp, torch.float64)[:2], 1))
    torch.testing.assert_close(tab[:, T.H], s - t)
    torch.testing.assert_close(tab[:, T.G], g)
    assert tab[0, T.ALPHA_T] == tab[0, T.AT_T][T.ALPHA]
    assert tab[0, T.SIGMA_S] == tab[0, T.AT_S][T.SIGMA]
    c = coefficients(sched, t, 3, torch.float64)
    torch.testing.assert_close(c[:, T.SIGMA], tab[:, T.SIGMA_T])
    torch.testing.assert_close(c[:, T.D_SIGMA], tab[:, T.AT_T][:, T.D_SIGMA])


def test_step_row():
    row = T.step_row((1, 2, 3, 4), (5, 6, 7, 8), (9, 10), 11, 12)
    assert row == [float(v) for v in range(1, 13)]
    assert T.step_row((1, 2, 3, 4), (5, 6, 7, 8))[T.PREV] == [1.0, 1.0]
    with pytest.raises(ValueError, match="step_row: expected t and s of 4 values"):
        T.step_row((1, 2, 3), (5, 6, 7, 8))


def test_ve_row():
    """A row from noise levels: alpha 1 and d_alpha 0 at t, s and the previous time."""
    row = T.ve_row(2.0, 0.5, -2.0, -0.5, sigma_p=3.0, h=0.75, g=0.1)
    assert row[T.AT_T] == [1.0, 2.0, 0.0, -2.0] and row[T.AT_S] == [1.0, 0.5, 0.0, -0.5]
    assert row[T.PREV] == [1.0, 3.0] and (row[T.H], row[T.G]) == (0.75, 0.1)


def test_step_table_with_a_step_size():
    """h= replaces the default s - t (an adapter's own time unit), nothing else;
    a non-finite h is refused by name."""
    t, s = torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.5])
    plain = fk.step_table("cosine", t, s)
    given = fk.step_table("cosine", t, s, h=torch.tensor([-2.0, 0.25]))
    torch.testing.assert_close(plain[:, T.H], s - t)
    assert given[:, T.H].tolist() == [-2.0, 0.25]
    keep = [c for c in range(T.STEP_COLS) if c != T.H]
    assert torch.equal(given[:, keep], plain[:, keep])
    assert fk.step_table("cosine", 0.1, 0.3, h=0.5)[0, T.H].item() == 0.5
    with pytest.raises(ValueError, match="h: expected finite"):
        fk.step_table("cosine", t, s, h=torch.tensor([1.0, float("nan")]))
