"""Empirical-field op family on the CUDA C++ kernels (csrc/cuda/fields.cu).

``field_mean`` is the flowkern:: CUDA kernel that flowkern/ops/fields.py
registers: same name and arguments as the schema (csrc/cpu/fields.cpp) and the
Triton launcher (flowkern/triton/fields.py). Small batches split the
references into ranges whose partial states a second kernel merges; the
launch plan (flowkern/fields_block.h) sizes the workspace they need. Launches
are asynchronous on the current stream.
"""
from __future__ import annotations

import torch

from . import _launch


def _refs(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The references as the kernel reads them: (R, N) like x, contiguous."""
    if ref.device != x.device or ref.dtype != x.dtype:
        raise ValueError(f"ref: expected {x.dtype} on {x.device} like x, "
                         f"got {ref.dtype} on {ref.device}")
    if ref.dim() != 2 or ref.shape[1] != x.shape[1]:
        raise ValueError(f"ref: expected shape (R, {x.shape[1]}) for queries of "
                         f"{x.shape[1]} features, got {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("ref: the reference set is empty; give at least one reference")
    return ref.contiguous()


def field_mean(x, ref, qp, kind: int, p0: float, p1: float):
    """(mean (B, N), best (B,), sumexp (B,)) in the accumulation dtype: the
    online-softmax state of every query over all references (fields.h)."""
    (x,) = _launch.inputs(x=x)
    if x.dim() != 2:
        raise ValueError(f"x: expected queries of shape (B, N), got {tuple(x.shape)}")
    ref = _refs(ref, x)
    qp = _launch.per_row(qp, x, "qp", 2)
    B, N = x.shape
    R = ref.shape[0]
    acc = _launch.acc_dtype(x.dtype)
    mean = torch.empty(B, N, dtype=acc, device=x.device)
    best = torch.empty(B, dtype=acc, device=x.device)
    sumexp = torch.empty(B, dtype=acc, device=x.device)
    if B == 0:
        return mean, best, sumexp
    with _launch.device_of(x) as (_, max_blocks):
        plan = _launch.lib().plan_fields(B, R, N, acc.itemsize, 0, max_blocks)
    splits, size = plan[4], plan[6]
    ws = torch.empty(size, dtype=acc, device=x.device) if size else None
    _launch.launch("field_mean", x, R, x, ref, qp, int(kind), float(p0), float(p1), mean, best,
                   sumexp, ws, size, splits, capped=False)
    return mean, best, sumexp
