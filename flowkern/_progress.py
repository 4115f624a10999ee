"""Optional tqdm progress bars, one place for the optional import (tqdm is
not a dependency: without it every bar is off)."""
from __future__ import annotations

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


def available() -> bool:
    return _tqdm is not None


def progress_bar(total, enabled=True, **kw):
    """A tqdm bar of `total` ticks (tqdm's keywords in kw), or None when it is
    not enabled or tqdm is not installed."""
    if not enabled or _tqdm is None:
        return None
    return _tqdm(total=total, **kw)


def progress_iter(iterable, enabled=True, **kw):
    """`iterable` behind a tqdm bar (tqdm's keywords in kw), or the iterable
    itself when the bar is not enabled or tqdm is not installed."""
    if not enabled or _tqdm is None:
        return iterable
    return _tqdm(iterable, **kw)
