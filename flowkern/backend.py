"""Backend selection (docs/design.md §5).

Precedence: an explicit ``backend=`` argument > the innermost
:func:`use_backend` context > the ``FLOWKERN_BACKEND`` environment variable >
auto (CUDA tensors: cuda if flowkern._C has the CUDA kernels, else triton if
importable, else torch; CPU tensors: cpu if flowkern._C is built, else torch).
cuda comes first on a GPU for its host path: a public call is one C++
dispatcher call with the coefficients computed in the kernel, where triton
goes through a Python custom op and Triton's Python launcher and builds a
coefficient table with torch ops first (README "Backends").

``triton`` also accepts CPU tensors when ``TRITON_INTERPRET=1`` is set before
triton is imported (how the test-suite runs the Triton kernels without a GPU).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
# The backends whose public calls are one call of a flowkern:: op (the CPU
# kernels, the CUDA glue); triton and torch run their Python path.
NATIVE_BACKENDS = ("cpu", "cuda")
# The innermost use_backend() of this thread / task (a ContextVar: another
# thread's context never changes which backend a call runs on).
_current: contextvars.ContextVar = contextvars.ContextVar("flowkern_backend", default=None)
# os.environ's own byte dict on POSIX: a look-up there costs ~50 ns against
# ~500 ns for os.environ.get, on every public call. It is os.environ's
# storage, so setenv/monkeypatch.setenv show up in it.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FLOWKERN_BACKEND") if _ENV_DATA is not None else None


def _env_backend():
    if _ENV_DATA is None:
        return os.environ.get("FLOWKERN_BACKEND") or None
    v = _ENV_DATA.get(_ENV_KEY)
    return os.environ.decodevalue(v) if v else None


def _check_name(name, arg="backend"):
    if name not in BACKENDS:
        raise ValueError(f"{arg}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed flowkern calls on backend `name` unless a call passes
    ``backend=`` itself."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def _import_native() -> tuple[bool, bool]:
    """(whether flowkern._C loaded, whether flowkern._nograd did).

    _C is built on torch's stable ABI and loads into every torch from its
    target version up; _nograd (the C++ Autograd-key kernel of the
    no-derivative ops) is bound to the torch it was built against, so it is
    imported only into that torch (_C.TORCH_VERSION), and not at all with
    FLOWKERN_NOGRAD=python. Elsewhere flowkern/ops/_nograd.py registers the
    same rules in Python (docs/build.md)."""
    try:
        import flowkern._C as native  # registers torch.ops.flowkern.*
    except ImportError:
        return False, False
    if (getattr(native, "TORCH_VERSION", None) != torch.__version__
            or os.environ.get("FLOWKERN_NOGRAD") == "python"):
        return True, False
    try:
        import flowkern._nograd  # noqa: F401  (registers the Autograd-key kernels)
    except ImportError:
        return True, False
    return True, True


def _import_fastcall():
    """flowkern._fastcall (csrc/fastcall), or None: bound to the torch and the
    CPython it was built for, so imported only into that torch (the file name
    already limits it to its CPython); FLOWKERN_FASTCALL=0 turns it off (the
    ops' own binding then serves every call, as on any other torch)."""
    if not _CPU_BUILT or os.environ.get("FLOWKERN_FASTCALL") == "0":
        return None
    import flowkern._C as native  # built with _fastcall: its torch is _fastcall's
    if getattr(native, "TORCH_VERSION", None) != torch.__version__:
        return None
    try:
        import flowkern._fastcall as fastcall
    except ImportError:
        return None
    return fastcall


# Looked up once at import (cheap: _C is small, the others are find_spec), so
# that torch.compile traces constants instead of cached calls.
_CPU_BUILT, _NOGRAD_NATIVE = _import_native()
_FASTCALL = _import_fastcall()
# The CUDA kernels are part of flowkern._C when it was built against a CUDA
# torch with nvcc (setup.py): registered for the CUDA dispatch key, usable
# only where torch itself has CUDA.
_CUDA_BUILT = _CPU_BUILT and torch.version.cuda is not None and \
    torch._C._dispatch_has_kernel_for_dispatch_key("flowkern::interpolate", "CUDA")
_TRITON = importlib.util.find_spec("triton") is not None


def cpu_built() -> bool:
    return _CPU_BUILT


def fastcall():
    """The flowkern._fastcall module where it serves this torch, else None."""
    return _FASTCALL


def nograd_native() -> bool:
    """Whether the no-derivative ops' Autograd-key kernel is the C++ one
    (flowkern._nograd) rather than its Python twin (flowkern/ops/_nograd.py)."""
    return _NOGRAD_NATIVE


def cuda_built() -> bool:
    return _CUDA_BUILT


def triton_available() -> bool:
    return _TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# FLOWKERN_TRITON_OP=1 (read at import; experimental): the flowkern_triton::
# ops are torch.library.triton_ops launching through wrap_triton, which
# torch.compile traces into (docs/design.md §5). Not under the interpreter,
# whose kernels cannot run on the fake tensors tracing uses.
_TRITON_OPS_TRACED = os.environ.get("FLOWKERN_TRITON_OP") == "1" and not triton_interpreted()


def triton_ops_traced() -> bool:
    return _TRITON_OPS_TRACED


def available() -> dict[str, bool]:
    """Which backends can run here, for ``python -m flowkern info``."""
    return {"torch": True, "cpu": cpu_built(),
            "cuda": cuda_built() and torch.cuda.is_available(),
            "triton": triton_available() and (torch.cuda.is_available() or triton_interpreted())}


# the auto backend of a CPU and of a CUDA tensor (fixed at import, as the
# modules they depend on): _auto's answers, which resolve_for gives without
# reading a device
_AUTO_CPU = "cpu" if _CPU_BUILT else "torch"
_AUTO_CUDA = "cuda" if _CUDA_BUILT else "triton" if _TRITON else "torch"


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return _AUTO_CUDA
    if device.type == "cpu":
        return _AUTO_CPU
    return "torch"


def resolve_for(backend: str | None, x: torch.Tensor) -> str:
    """resolve(backend, x.device) for a tensor x, without reading x.device on
    the usual calls (no backend chosen, or the native one of x's device): a
    torch.device's .type costs ~0.25 us, a public call's whole budget is a
    few us (docs/design.md §8)."""
    if backend is None:
        if _current.get() is None and _env_backend() is None:
            if x.is_cpu:
                return _AUTO_CPU
            if x.is_cuda:
                return _AUTO_CUDA
    elif backend == "cpu":
        if x.is_cpu and _CPU_BUILT:
            return backend
    elif backend == "cuda" and x.is_cuda and _CUDA_BUILT:
        return backend
    return resolve(backend, x.device)


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend a call runs on, with a clear error when it cannot run."""
    if backend is None:
        backend = _current.get() or _env_backend()
        if backend is None:
            return _auto(device)
        _check_name(backend, "backend (from use_backend/FLOWKERN_BACKEND)")
    else:
        _check_name(backend)
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device}; "
                             f"use backend='triton', 'cuda' or 'torch'")
        if not cpu_built():
            raise RuntimeError("backend='cpu': flowkern._C is not built (reinstall flowkern "
                               "with a C++ compiler); falling back is explicit: use backend='torch'")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}; "
                             f"use backend='cpu' or 'torch'")
        if not cuda_built():
            raise RuntimeError("backend='cuda': flowkern._C has no CUDA kernels (built against a "
                               "CPU-only torch, without nvcc, or with FLOWKERN_SKIP_CUDA=1); "
                               "use backend='triton' or 'torch'")
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton': triton is not installed "
                               "(pip install triton); use backend='cuda' or 'torch'")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), got {device}; use backend='cpu' or 'torch'")
    return backend
