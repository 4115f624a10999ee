"""Compiles every C++ source of flowkern's native modules against the running
Python's torch headers, as setup.py would build them (its own extensions,
macros and flags), but `g++ -fsyntax-only`: parsing, templates and overloads,
no code. It answers "does a source install build against this torch?" in
~30 s instead of a full build.

    python tools/compile_check.py        (tools/check_compat.sh runs it in each torch's venv)

Why: the wheel built against one torch loads into every torch from setup.py's
TORCH_TARGET up, but a source install compiles against the user's own torch
headers, and older ones lack what newer ones have (torch 2.11's stable
headers have no STABLE_TORCH_ERROR_CODE_CHECK and no == on IntArrayRef: the
build failed on a GPU machine's torch 2.11 until csrc/cpu/tensor.h's
FK_SHIM_CHECK and same_sizes). The .cu files include no torch header and are
not checked here. Exit status 1 if any source fails, with its first errors.
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extensions():
    """(setup.py's namespace, its ext_modules), without building: setup() is
    replaced while setup.py runs."""
    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        ns = runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    return ns, captured["ext_modules"]


def commands(ns, exts):
    """One g++ -fsyntax-only command per C++ source."""
    out = []
    for ext in exts:
        name = ext.name.rpartition(".")[2]
        macros = list(ext.define_macros or []) + [("TORCH_API_INCLUDE_EXTENSION_H", None),
                                                  ("TORCH_EXTENSION_NAME", name)]
        if getattr(ext, "py_limited_api", False):
            macros.append(("Py_LIMITED_API", ns["PY_LIMITED_API"]))
        flags = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in macros]
        incs = [f"-I{d}" for d in [*ext.include_dirs, sysconfig.get_paths()["include"]]]
        for src in ext.sources:
            if src.endswith((".cpp", ".cc")):
                out.append((src, ["g++", "-fsyntax-only", "-fPIC", *ext.extra_compile_args,
                                  *flags, *incs, os.path.join(ROOT, src)]))
    return out


def main() -> int:
    import torch
    ns, exts = extensions()
    cmds = commands(ns, exts)

    def run(item):
        src, cmd = item
        p = subprocess.run(cmd, capture_output=True, text=True)
        return src, p.returncode, p.stderr

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(pool.map(run, cmds))
    failed = [(s, err) for s, rc, err in results if rc != 0]
    for src, err in failed:
        errors = [ln for ln in err.splitlines() if "error" in ln][:8]
        print(f"FAIL {src}:\n  " + "\n  ".join(errors))
    print(f"compile_check: {len(cmds) - len(failed)}/{len(cmds)} sources compile against "
          f"torch {torch.__version__}'s headers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
