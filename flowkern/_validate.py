"""Argument checks shared by every op (docs/design.md §6).

Metadata errors (type, shape, dtype, device, names) are always raised, since
they cost no device sync. Value checks (t in [0, 1], NaN, sigma = 0 where a
form divides by it) run on CPU tensors only, and on GPU tensors when
FLOWKERN_DEBUG=1, so the fast path never synchronises with the host; they are
skipped while torch.compile traces.
"""
from __future__ import annotations

import contextvars
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

# the rule book's validators, called as V.prediction, V.seed, ... by the ops
from ._rules import form, prediction, reduction, seed  # noqa: F401
from .tables import D_ALPHA, D_SIGMA

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coefficient/accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16, "
                        f"float32 or float64")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a batch of shape (B, ...), got a scalar tensor")
    return x


def same_shape(names: list[str], tensors: list[torch.Tensor]) -> torch.Size:
    """The common shape of tensors that must broadcast to one (B, ...) shape,
    with a clear error naming the first that does not, and one dtype/device."""
    first = tensors[0]
    for n, x in zip(names[1:], tensors[1:]):
        if x.dtype != first.dtype:
            raise TypeError(f"{n}: dtype {x.dtype} differs from {names[0]}'s {first.dtype}; "
                            f"cast one of them")
        if x.device != first.device:
            raise ValueError(f"{n}: on {x.device} but {names[0]} is on {first.device}; "
                             f"move them to one device")
    if all(x.shape == first.shape for x in tensors):
        return first.shape  # the common case, without broadcast_shapes' Python cost
    try:
        shape = torch.broadcast_shapes(*(x.shape for x in tensors))
    except RuntimeError:
        shapes = ", ".join(f"{n}{tuple(x.shape)}" for n, x in zip(names, tensors))
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    return shape


def dense(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """x broadcast to shape and made contiguous (a no-op when it already is)."""
    if x.shape != shape:
        x = x.expand(shape)
    return x.contiguous()


_PRECHECKED = contextvars.ContextVar("flowkern_values_prechecked", default=False)


class values_prechecked:  # noqa: N801 (used as a context manager)
    """Skip the value checks of the ops called inside: for callers that have
    checked the same values already (the samplers validate the whole grid
    before the loop). on=False restores them inside, e.g. around a user's
    model. A class, not a generator: it is entered on every sampler step."""

    __slots__ = ("on", "token")

    def __init__(self, on: bool = True):
        self.on = on

    def __enter__(self):
        self.token = _PRECHECKED.set(self.on)

    def __exit__(self, *exc):
        _PRECHECKED.reset(self.token)


def sample_weight(weight, rows: int, like: torch.Tensor):
    """An optional per-sample loss weight as a tensor of shape (B,) or (1,)."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, device=like.device)
    if weight.device != like.device:
        raise ValueError(f"weight: on {weight.device} but the data is on {like.device}")
    if weight.numel() not in (1, rows) or weight.dim() > 1:
        raise ValueError(f"weight: expected shape ({rows},) or a scalar, got {tuple(weight.shape)}")
    return weight


def reduce_rows(row_sums: torch.Tensor, weight, reduction: str, inner: int) -> torch.Tensor:
    """A loss from per-sample sums of squares over `inner` features: w_b times
    each, then the mean over all elements ("mean"), their sum ("sum"), or the
    per-sample mean over the features ("none", shape (B,))."""
    if weight is not None:
        row_sums = row_sums * weight.to(row_sums.dtype).reshape(-1)
    if reduction == "none":
        return row_sums / max(inner, 1)
    if reduction == "sum":
        return row_sums.sum()
    return row_sums.sum() / max(row_sums.shape[0] * inner, 1)


def check_flag() -> bool:
    """The `check` argument of the native ops: False inside values_prechecked().
    Dynamo cannot trace a ContextVar, and a compiled call checks like eager."""
    return True if torch.compiler.is_compiling() else not _PRECHECKED.get()


def _fake(x: torch.Tensor) -> bool:
    """A FakeTensor (FakeTensorMode, torch.export, meta tracing), a meta
    tensor, or AOTAutograd's FunctionalTensor wrapper (around a fake one when
    it traces): no values or memory to read, as under torch.compile."""
    return isinstance(x, (FakeTensor, FunctionalTensor)) or x.device.type == "meta"


def _under_vmap() -> bool:
    """A torch.func.vmap is active: its batched tensors cannot be read on the host."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def values_checked(x: torch.Tensor) -> bool:
    """Whether value checks (host reads) run here: on CPU data (any device with
    FLOWKERN_DEBUG=1), not while torch.compile traces nor under vmap (the
    native ops then check inside the op, per batch)."""
    if torch.compiler.is_compiling() or _PRECHECKED.get():  # Dynamo cannot trace ContextVar
        return False
    if _under_vmap() or _fake(x):
        return False
    return x.device.type == "cpu" or os.environ.get("FLOWKERN_DEBUG") == "1"


def time(name: str, t, rows: int, like: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """t as a tensor of shape (1,) or (rows,), on like's device. check_values:
    whether to check here that the times lie in [0, 1] (when values_checked);
    callers that pass the check on to schedules.coefficients say False."""
    if isinstance(t, (int, float)):
        t = torch.tensor([float(t)], dtype=torch.float64, device=like.device)  # exact
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape (B,), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: on {t.device} but the data is on {like.device}")
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] in (1, rows))):
        raise ValueError(f"{name}: expected shape () or ({rows},) for a batch of {rows}, "
                         f"got {tuple(t.shape)}")
    t = t.reshape(-1)
    if check_values and values_checked(t):
        check_unit_interval(name, t)
    return t


def check_unit_interval(name: str, t: torch.Tensor) -> None:
    """ValueError naming `name` unless every time lies in [0, 1] (NaN fails).
    csrc/cpu/schedules.cpp raises the same message."""
    if t.numel() and not _within_unit(t):
        raise ValueError(f"{name}: times must lie in [0, 1] (0 = noise, 1 = data); got values "
                         f"in [{t.min().item():g}, {t.max().item():g}]")


def _within_unit(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return bool(lo >= 0) and bool(hi <= 1)  # False for NaN


def _span(t: torch.Tensor):
    """[first, last] byte addresses of t's elements."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        step = (size - 1) * stride * t.element_size()
        lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
    return lo, hi + t.element_size() - 1


def overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """"no", "full" (the same elements: an in-place write) or "partial"; the
    rule of csrc/cpu/args.h overlap for the backends that do not go through it."""
    if a is None or b is None or a.numel() == 0 or b.numel() == 0:
        return "no"
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return "no"
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 < b0 or b1 < a0:
        return "no"
    same = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    return "full" if same else "partial"


def check_no_overlap(outs: dict, ins: dict):
    """csrc/cpu/args.h check_no_overlap: outputs pairwise disjoint, each one
    either exactly an input (in place) or disjoint from it. Not while
    torch.compile traces (fake tensors have no memory): the compiled graph's
    native ops check at run time, the Python backends' do not. Nor under a
    torch.func transform, whose wrapped tensors expose no memory either."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return
    if any(_fake(t) for t in (*outs.values(), *ins.values()) if isinstance(t, torch.Tensor)):
        return
    names = list(outs)
    for i, name in enumerate(names):
        for prev in names[:i]:
            if overlap(outs[name], outs[prev]) != "no":
                raise ValueError(f"{name}: shares memory with {prev}; give separate output buffers")
        for src, x in ins.items():
            if overlap(outs[name], x) == "partial":
                raise ValueError(f"{name}: overlaps {src} without being it; write in place only "
                                 f"as {name}={src} exactly (same memory and layout), or give a "
                                 f"separate buffer")


def finite_rates(coef: torch.Tensor, why: str, at: str = "t"):
    """csrc/cpu/coef_checks.h check_rates (step_args.h check_conversion for
    the steps): a velocity reads d_alpha, d_sigma (columns 2, 3 of a
    coefficient table at time `at`), which vp makes -inf at t = 1."""
    rates = coef[:, D_ALPHA:D_SIGMA + 1]
    if values_checked(rates) and rates.numel() and not bool(torch.isfinite(rates).all()):
        raise ValueError(f"{at}: d_alpha_{at} or d_sigma_{at} is not finite at some sample "
                         f"(vp's d_sigma at t = 1), and {why}")


def nonzero(name: str, what: str, v: torch.Tensor, why: str):
    """Raise when a coefficient the chosen form divides by is zero (value check)."""
    if values_checked(v) and v.numel() and bool((v == 0).any()):
        raise ValueError(f"{name}: {what} is 0 at some sample, and {why}")
