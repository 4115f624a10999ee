"""Calling flowkern._cuda's raw-pointer launchers with tensors.

flowkern._cuda is imported on the first launch, never at ``import flowkern``:
built with nvcc 13 it needs an NVIDIA driver >= 580, and a CPU-only process
must not pay for (or fail on) loading it (docs/design.md §9).
Every failure names the fallback backends.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import torch

FALLBACK = "use backend='triton' or 'torch'"
# Must match the dtype codes of csrc/cuda/launchers.h.
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# The device the kernels run on; tests/test_cuda_glue.py swaps in "cpu" with a
# simulator standing in for flowkern._cuda.
DEVICE_TYPE = "cuda"


@functools.lru_cache(maxsize=None)
def lib():
    """The compiled module (cached once it imports; an ImportError is retried)."""
    try:
        return importlib.import_module("flowkern._cuda")
    except ImportError as e:
        raise RuntimeError(
            f"backend='cuda': flowkern._cuda is not available ({e}); it is built only when "
            f"nvcc is found at install time; {FALLBACK}") from e


def check(code: int, op: str) -> None:
    if code != 0:
        raise RuntimeError(f"backend='cuda': {op} failed with error {code} "
                           f"({lib().error_string(code)}); {FALLBACK}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coefficient and accumulation dtype (docs/design.md §6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_inner(t: torch.Tensor) -> tuple[int, int]:
    """A (B, ...) tensor as B rows of contiguous elements."""
    rows = t.shape[0] if t.dim() else 1
    return rows, (t.numel() // rows if rows else 0)


def inputs(**named: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors, contiguous, after checking they can share one launch; an
    absent optional input (None, after the first) stays None."""
    (name0, t0), *rest = named.items()
    if t0.device.type != DEVICE_TYPE:
        raise ValueError(f"{name0}: the cuda backend needs CUDA tensors, got {t0.device}; "
                         f"use backend='cpu' or 'torch'")
    if t0.dtype not in DTYPE_CODE:
        raise TypeError(f"{name0}: dtype {t0.dtype} is not supported by the cuda backend; "
                        f"expected float32, float64, float16 or bfloat16")
    for name, t in rest:
        if t is None:
            continue
        if t.device != t0.device or t.dtype != t0.dtype or t.shape != t0.shape:
            raise ValueError(f"{name}: expected {tuple(t0.shape)} {t0.dtype} on {t0.device} "
                             f"like {name0}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return [None if t is None else t.contiguous() for t in named.values()]


def per_row(t: torch.Tensor, like: torch.Tensor, name: str, cols: int | None) -> torch.Tensor:
    """A per-sample tensor ((B, cols), or (B,) when cols is None) in like's
    accumulation dtype, contiguous."""
    want = (like.shape[0] if like.dim() else 1,) + ((cols,) if cols else ())
    if tuple(t.shape) != want or t.device != like.device:
        raise ValueError(f"{name}: expected shape {want} on {like.device}, "
                         f"got {tuple(t.shape)} on {t.device}")
    return t.to(acc_dtype(like.dtype)).contiguous()


def output(out: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name}: expected {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (the kernel writes it in place)")
    return out


@functools.lru_cache(maxsize=None)
def _max_blocks(index: int) -> int:
    # Two waves of 256-thread blocks at full occupancy (fk::kDefaultMaxBlocks's reasoning).
    return torch.cuda.get_device_properties(index).multi_processor_count * 16


@contextlib.contextmanager
def device_of(t: torch.Tensor):
    """Makes t's device current; yields (stream handle, max_blocks) for it."""
    with torch.cuda.device(t.device):
        yield torch.cuda.current_stream().cuda_stream, _max_blocks(t.device.index)


def _arg(a):
    """A launcher argument: a tensor as its data pointer, an absent tensor
    (None) as 0, a float as itself, anything else as an int."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if a is None:
        return 0
    return a if isinstance(a, float) else int(a)


def launch(op: str, like: torch.Tensor, *args, capped: bool = True) -> None:
    """lib().op(dtype, rows, inner, *args, stream[, max_blocks]) with tensors
    passed as their data pointers (None as 0). `like` gives dtype, rows and inner."""
    fn = getattr(lib(), op)
    ptrs = [_arg(a) for a in args]
    with device_of(like) as (stream, max_blocks):
        code = fn(DTYPE_CODE[like.dtype], *rows_inner(like), *ptrs, stream,
                  *((max_blocks,) if capped else ()))
    check(code, op)
