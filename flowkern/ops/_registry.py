"""One registration path for every op family.

Kernel-level ops live in two torch.library namespaces with identical schemas:
- ``flowkern::`` defined in C++ (csrc/cpu, TORCH_LIBRARY) with its CPU kernels
  and, when built against a CUDA torch, its CUDA kernels (csrc/cuda/register.cpp);
- ``flowkern_triton::`` defined here with ``torch.library.custom_op``; its
  implementation launches the Triton kernel on whatever device the tensors
  are on (CPU tensors only under TRITON_INTERPRET=1).
Each family registers its fake (meta) functions and autograd formulas once,
for both namespaces, through :func:`for_each_namespace`.
"""
from __future__ import annotations

import importlib

import torch
from torch.autograd.function import once_differentiable

from ..backend import cpu_built

TRITON_NS = "flowkern_triton"
NATIVE_NS = "flowkern"


def namespaces() -> list[str]:
    """Namespaces whose schemas exist in this process."""
    return [NATIVE_NS, TRITON_NS] if cpu_built() else [TRITON_NS]


def ops_for(backend: str):
    """torch.ops namespace that runs `backend` (cpu and cuda share flowkern::)."""
    return getattr(torch.ops, TRITON_NS if backend == "triton" else NATIVE_NS)


def lazy(module: str, name: str):
    """A function that imports flowkern.<module> on first call (the triton launchers)."""
    def call(*args):
        return getattr(importlib.import_module(module, "flowkern"), name)(*args)
    call.__name__ = name
    return call


def register(name: str, fake, backward=None, setup_context=None, nograd=False):
    """Fake + autograd for `name` in every namespace.
    nograd: flowkern::name also has the `.nograd` overload (same kernel, no
    autograd kernel), which the public functions call when no input needs a
    gradient: the Python autograd kernel costs ~10 us a call even then."""
    for ns in namespaces():
        qual = f"{ns}::{name}"
        torch.library.register_fake(qual)(fake)
        if backward is not None:
            torch.library.register_autograd(qual, backward(getattr(torch.ops, ns)),
                                            setup_context=setup_context)
    if not cpu_built():
        return
    if nograd:
        torch.library.register_fake(f"{NATIVE_NS}::{name}.nograd")(fake)


def autograd_function(name: str, setup_context, backward):
    """A torch.autograd.Function running flowkern::name.nograd with the autograd
    formula registered for flowkern::name: what the public functions use when
    an input needs a gradient, outside torch.compile. register_autograd's own
    wrapper costs ~50 us a call on the native schemas (torch._library's
    fill_defaults rebuilds the schema's argument list once per argument); this
    one a few. Under torch.compile the default overload (same formula) is traced."""
    op = getattr(getattr(torch.ops, NATIVE_NS), name).nograd

    class Fn(torch.autograd.Function):
        # forward(ctx, ...) form: with a separate setup_context, apply() binds
        # default arguments through inspect.signature, ~40 us a call.
        @staticmethod
        def forward(ctx, *args):
            out = op(*args)
            setup_context(ctx, args, out)
            return out

    # The backward ops have no autograd formula of their own: a second
    # derivative is a clear error, not a silent zero.
    Fn.backward = staticmethod(once_differentiable(backward(getattr(torch.ops, NATIVE_NS))))
    Fn.__name__ = Fn.__qualname__ = f"{name}_fn"
    return Fn


# Fresh outputs of at least this many bytes come from flowkern::empty_output
# (csrc/cpu/dispatch.h): on huge pages, so their first touch faults 512x less.
# Equal to dispatch.h's kHugeOutputBytes, the size below which that op would
# return a plain tensor anyway: smaller ones skip the op call.
HUGE_OUTPUT_BYTES = 8 << 20

if cpu_built():
    torch.library.register_fake(f"{NATIVE_NS}::empty_output")(
        lambda like: torch.empty_like(like, memory_format=torch.contiguous_format))


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous tensor like x (uninitialised): on huge pages when it
    is a large CPU tensor and flowkern._C is built."""
    if (x.device.type == "cpu" and x.numel() * x.element_size() >= HUGE_OUTPUT_BYTES
            and cpu_built() and not torch.compiler.is_compiling()):
        return torch.ops.flowkern.empty_output(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
