"""Do the shipped Triton kernels survive Inductor's regeneration? Without a GPU.

    python -m flowkern.triton.inductor_check [--quick]   # exit 1 on any difference
                                  (--quick: one tile shape per op and dtype)

When torch.compile (Inductor) meets a user Triton kernel it does not launch
the kernel object: it writes the kernel's source, and that of every JIT
function and constexpr it reaches, into generated Python
(torch._inductor.codegen.wrapper.user_defined_triton_kernel_transitive_closure_source_code),
with the constexpr values written by repr. This compiles that regenerated
source, with each constexpr read back from its repr, for every shipped
configuration (flowkern.triton.aot) and compares the PTX with the original
kernel's (names and debug sections aside). A name the regeneration misses, a
constexpr without a Python literal, or two helpers of one name (only the first
is emitted) show up as an error or a different PTX. It does not run
Inductor's own launch code (its typing of scalar arguments, its tuple
arguments): that needs a GPU (docs/design.md §5).

Must run WITHOUT TRITON_INTERPRET. tests/test_aot.py runs it in a subprocess.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile


def regenerated(kernel, folder: str):
    """The kernel as Inductor regenerates it, imported from a file in `folder`."""
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as closure)

    name = kernel.fn.__name__
    path = os.path.join(folder, f"regenerated_{name}.py")
    with open(path, "w") as f:
        f.write(TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n" + closure(kernel))
    spec = importlib.util.spec_from_file_location(f"regenerated_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def ptx(kernel, signature, constexprs, num_warps: int, arch: int = 90) -> str:
    """The kernel's PTX for sm_`arch` without its name and debug sections."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    text = re.sub(r"\.(entry|func) \w+", "", compiled.asm["ptx"].split(".section")[0])
    return "\n".join(line for line in text.splitlines()
                     if not line.strip().startswith((".loc", ".file", "//", "$L__")))


def check(full: bool = True) -> list[tuple[str, str]]:
    """[(configuration, what differs)] over the shipped configurations; not
    full: one tile shape of each op and dtype (every row function, every
    accumulation type: the regenerated source is one per kernel, and each
    configuration compiles its own branch of it)."""
    import triton

    from . import aot
    from .lincomb import NUM_WARPS

    configs = [(*c, NUM_WARPS) for c in aot.configs(True)] + aot.family_configs(True)
    if not full:
        one = {}
        for c in configs:
            one.setdefault(tuple(c[0].split("/")[:3]), c)  # kernel / op / dtype
        configs = list(one.values())
    literal_env = {"triton": triton, "tl": triton.language}
    bad, seen = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, kernel, signature, constexprs, warps in configs:
            try:
                if kernel not in seen:
                    seen[kernel] = regenerated(kernel, folder)
                # the constexpr values as Inductor writes them: repr, read back
                literal = {k: eval(repr(v), literal_env) for k, v in constexprs.items()}
                if ptx(seen[kernel], signature, literal, warps) != ptx(kernel, signature,
                                                                         constexprs, warps):
                    bad.append((name, "the regenerated kernel compiles to other PTX"))
            except Exception as e:  # noqa: BLE001 (reported per configuration)
                bad.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    print(f"{len(configs)} configurations, {len(bad)} differ")
    return bad


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("flowkern.triton.inductor_check: unset TRITON_INTERPRET (the interpreter "
                 "cannot compile)")
    bad = check(full="--quick" not in sys.argv)
    for name, why in bad:
        print(f"{name}: {why}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
