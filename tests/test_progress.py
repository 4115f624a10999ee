"""flowkern._progress: the one optional-tqdm helper every loop uses."""
import pytest

from flowkern import _progress as P


def test_disabled_bars_cost_nothing():
    it = range(3)
    assert P.progress_iter(it, False) is it
    assert P.progress_bar(3, False) is None


def test_enabled_bars_are_tqdm_when_installed(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    bar = P.progress_bar(3, True, disable=True)
    assert isinstance(bar, tqdm.std.tqdm)
    bar.close()
    assert list(P.progress_iter(range(3), True, disable=True)) == [0, 1, 2]
    monkeypatch.setattr(P, "_tqdm", None)  # tqdm missing: every bar is off
    assert P.progress_bar(3, True) is None and P.progress_iter([1], True) == [1]
