"""The CUDA kernels compile for sm_80 and sm_90 without spills or local memory,
flowkern._cuda imports when built, and `import flowkern` does not load it."""
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")
# Kernels per arch of each source (x 4 dtypes x 2 vector widths per elementwise functor):
KERNELS_PER_ARCH = {
    # 6 elementwise ops x 4 dtypes x 2 vector widths + the loss's row-sum (with
    # and without the stored gradient) and finishing block x 4 dtypes.
    "training.cu": 6 * 4 * 2 + 2 * 4 + 4,
    # 6 steps with and without guidance + churn + lms_step's 4 history lengths with
    # and without guidance + lincomb_step's 4 term counts without noise and 3 with,
    # x 4 dtypes x 2 vector widths.
    "steps.cu": 6 * 2 * 4 * 2 + 4 * 2 + 4 * 2 * 4 * 2 + 7 * 4 * 2,
    # The backward with each set of optional outputs (4) x 4 dtypes x 2 vector widths
    # + the loss's row-sum and finishing block x 4 dtypes.
    "flowmap.cu": 4 * 4 * 2 + 4 + 4,
    # The tile kernel per score kind x 4 dtypes, the merge kernel per kind x 2
    # accumulation dtypes.
    "fields.cu": 3 * 4 + 3 * 2,
}
# Static shared memory of one block (the 48 KB a kernel may declare statically).
SMEM_LIMIT = 48 * 1024

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines()))


def short(name):
    """void fk_cuda::(anonymous namespace)::lincomb_kernel<8, fk::f16, ...>(...)
    -> lincomb_kernel<8, f16, ...>"""
    m = re.search(r"(\w+_kernel<.*>)\(", name)
    return (m.group(1) if m else name).replace("fk::", "")


def parse_ptxas(log):
    """{(arch, function): {registers, spill_stores, spill_loads, stack, lmem, smem, entry}}
    from ptxas -v output (entry kernels and any non-inlined device function)."""
    funcs = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            funcs.setdefault(cur, {}).update(entry=True)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            arch = cur[0] if cur else "?"
            cur = (arch, m.group(1))
            funcs.setdefault(cur, {}).setdefault("entry", False)
            continue
        if cur is None:
            continue
        info = funcs[cur]
        for key, pat in (("stack", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"),
                         ("registers", r"Used (\d+) registers"),
                         ("lmem", r"(\d+) bytes lmem"),
                         ("smem", r"(\d+) bytes smem")):
            m = re.search(pat, line)
            if m:
                info[key] = int(m.group(1))
    return funcs


@pytest.fixture(scope="module")
def resource_usage(tmp_path_factory):
    """{source: parse_ptxas(...)}; the sources compile concurrently."""
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for source in KERNELS_PER_ARCH:
        cmd = [NVCC, "-c", os.path.join(ROOT, "csrc", "cuda", source),
               "-o", str(out / f"{source}.o"), "-O3", "-std=c++17",
               "-I", os.path.join(ROOT, "csrc", "include"), "--expt-relaxed-constexpr",
               "--resource-usage", "-Xcompiler", "-fPIC"]
        cmd += [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
        procs[source] = subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    logs = {source: p.communicate()[0] for source, p in procs.items()}
    for source, p in procs.items():
        assert p.returncode == 0, logs[source]
    return {source: parse_ptxas(log) for source, log in logs.items()}


@needs_nvcc
@pytest.mark.parametrize("source", KERNELS_PER_ARCH)
def test_no_spills_no_local_memory(resource_usage, source):
    funcs = resource_usage[source]
    names = demangle(sorted({name for _, name in funcs}))
    rows = sorted((((arch, short(names[name])), info) for (arch, name), info in funcs.items()),
                  key=lambda r: r[0])
    print(f"\n{source}\n{'arch':6} {'kernel':58} {'regs':>4} {'spill st/ld':>11} {'stack':>5} "
          f"{'lmem':>4} {'smem':>5}")
    for (arch, name), info in rows:
        print(f"{arch:6} {name:58} {info.get('registers', '-'):>4} "
              f"{info.get('spill_stores', 0):>5}/{info.get('spill_loads', 0):<5} "
              f"{info.get('stack', 0):>5} {info.get('lmem', 0):>4} {info.get('smem', 0):>5}")
    bad = [(arch, name, info) for (arch, name), info in rows
           if not info["entry"] or info.get("spill_stores", 0) or info.get("spill_loads", 0)
           or info.get("stack", 0) or info.get("lmem", 0) or info.get("smem", 0) > SMEM_LIMIT]
    # A non-entry function in the log is a device function nvcc could not inline
    # (it costs a call, a stack frame and usually spills): also a failure.
    assert not bad, f"spills, local memory, out-of-line calls or too much shared memory: {bad}"
    for arch in ARCHS:
        kernels = [n for (a, n), info in funcs.items() if a == arch and info["entry"]]
        assert len(kernels) == KERNELS_PER_ARCH[source], (arch, len(kernels))
        assert all("registers" in funcs[(arch, n)] for n in kernels)


def test_import_needs_no_driver():
    """flowkern._C carries the CUDA kernels (cudart linked statically) when
    built against a CUDA torch: importing it, and registering the CUDA-key
    kernels, must work on a machine without an NVIDIA driver (this one)."""
    code = ("import flowkern, torch; from flowkern.backend import cuda_built; "
            "print(cuda_built(), torch.cuda.is_available())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
