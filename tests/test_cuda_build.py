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
SOURCE = os.path.join(ROOT, "csrc", "cuda", "training.cu")
ARCHS = ("sm_80", "sm_90")
# 5 elementwise ops x 4 dtypes x 2 vector widths + the loss row-sum x 4 dtypes.
KERNELS_PER_ARCH = 5 * 4 * 2 + 4

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
    out = tmp_path_factory.mktemp("nvcc")
    cmd = [NVCC, "-c", SOURCE, "-o", str(out / "training.o"), "-O3", "-std=c++17",
           "-I", os.path.join(ROOT, "csrc", "include"), "--expt-relaxed-constexpr",
           "--resource-usage", "-Xcompiler", "-fPIC"]
    cmd += [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    res = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return parse_ptxas(res.stdout + res.stderr)


@needs_nvcc
def test_no_spills_no_local_memory(resource_usage):
    funcs = resource_usage
    names = demangle(sorted({name for _, name in funcs}))
    rows = sorted((((arch, short(names[name])), info) for (arch, name), info in funcs.items()),
                  key=lambda r: r[0])
    print(f"\n{'arch':6} {'kernel':58} {'regs':>4} {'spill st/ld':>11} {'stack':>5} "
          f"{'lmem':>4} {'smem':>5}")
    for (arch, name), info in rows:
        print(f"{arch:6} {name:58} {info.get('registers', '-'):>4} "
              f"{info.get('spill_stores', 0):>5}/{info.get('spill_loads', 0):<5} "
              f"{info.get('stack', 0):>5} {info.get('lmem', 0):>4} {info.get('smem', 0):>5}")
    bad = [(arch, name, info) for (arch, name), info in rows
           if not info["entry"] or info.get("spill_stores", 0) or info.get("spill_loads", 0)
           or info.get("stack", 0) or info.get("lmem", 0)]
    # A non-entry function in the log is a device function nvcc could not inline
    # (it costs a call, a stack frame and usually spills): also a failure.
    assert not bad, f"spills, local memory or out-of-line calls: {bad}"
    for arch in ARCHS:
        kernels = [n for (a, n), info in funcs.items() if a == arch and info["entry"]]
        assert len(kernels) == KERNELS_PER_ARCH, (arch, len(kernels))
        assert all("registers" in funcs[(arch, n)] for n in kernels)


def cuda_module_built():
    return importlib.util.find_spec("flowkern._cuda") is not None


@pytest.mark.skipif(not cuda_module_built(),
                    reason="flowkern._cuda was not built (needs nvcc at build time: "
                           "python setup.py build_ext --inplace)")
def test_cuda_module_imports():
    import torch

    import flowkern._C  # noqa: F401
    import flowkern._cuda as m

    for fn in ("interpolate", "interpolate_backward", "convert", "convert_backward",
               "fm_loss_partial", "fm_loss_backward", "error_string", "plan_lincomb",
               "plan_rowsum"):
        assert callable(getattr(m, fn)), fn
    # The same launch.h as the simulator's plans.
    for args in ((7, 1024, 4, True, 0), (1023, 7, 2, True, 3), (5, 4096, 8, False, 1)):
        assert list(m.plan_lincomb(*args)) == torch.ops.flowkern._sim_plan_lincomb(*args)
    for args in ((3, 4099, 0), (1, 0, 0), (2, 10, 3)):
        assert list(m.plan_rowsum(*args)) == torch.ops.flowkern._sim_plan_rowsum(*args)
    # Argument errors are caught before any CUDA call.
    assert m.interpolate(7, 1, 1, 0, 0, 0, 0, 0, 0, 0) == -1
    assert "dtype" in m.error_string(-1)
    assert m.convert(0, 1, 1, 0, 0, 0, 9, 0, 0, 0) == -2
    # Nothing to launch: success without touching the device.
    assert m.interpolate(0, 0, 8, 0, 0, 0, 0, 0, 0, 0) == 0
    if ctypes.util.find_library("cuda") is None:
        # No driver (the dev machines): a real launch reaches the CUDA runtime and
        # fails cleanly with cudaErrorInsufficientDriver (35) or similar. Never
        # tried where a driver exists: the pointers here are null.
        code = m.interpolate(0, 1, 4, 0, 0, 0, 0, 0, 0, 0)
        assert code > 0 and m.error_string(code)


def test_import_flowkern_does_not_load_cuda_module():
    code = ("import sys, flowkern, flowkern.cuda; "
            "assert 'flowkern._cuda' not in sys.modules, 'flowkern._cuda imported eagerly'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
