"""One registration path for every op family.

Kernel-level ops live in two torch.library namespaces with identical schemas:
- ``flowkern::`` defined in C++ (csrc/cpu, TORCH_LIBRARY) with CPU kernels; its
  CUDA kernels are registered here from Python (flowkern.cuda, raw pointers);
- ``flowkern_triton::`` defined here with ``torch.library.custom_op``; its
  implementation launches the Triton kernel on whatever device the tensors
  are on (CPU tensors only under TRITON_INTERPRET=1).
Each family registers its fake (meta) functions and autograd formulas once,
for both namespaces, through :func:`for_each_namespace`.
"""
from __future__ import annotations

import importlib

import torch

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
    """A function that imports flowkern.<module> on first call (triton, _cuda)."""
    def call(*args):
        return getattr(importlib.import_module(module, "flowkern"), name)(*args)
    call.__name__ = name
    return call


def register(name: str, fake, backward=None, setup_context=None, cuda_impl=None):
    """Fake + autograd for `name` in every namespace; CUDA kernel for flowkern::."""
    for ns in namespaces():
        qual = f"{ns}::{name}"
        torch.library.register_fake(qual)(fake)
        if backward is not None:
            torch.library.register_autograd(qual, backward(getattr(torch.ops, ns)),
                                            setup_context=setup_context)
    if cuda_impl is not None and cpu_built():
        torch.library.register_kernel(f"{NATIVE_NS}::{name}", "cuda")(cuda_impl)
