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
    # 6 elementwise ops + the loss row-sum x 4 dtypes.
    "training.cu": 6 * 4 * 2 + 4,
    # 6 steps with and without guidance + churn.
    "steps.cu": 6 * 2 * 4 * 2 + 4 * 2,
    # The backward with each set of optional outputs (4) + the loss row-sum x 4 dtypes.
    "flowmap.cu": 4 * 4 * 2 + 4,
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


def cuda_module_built():
    return importlib.util.find_spec("flowkern._cuda") is not None


needs_cuda_module = pytest.mark.skipif(
    not cuda_module_built(),
    reason="flowkern._cuda was not built (needs nvcc at build time: "
           "python setup.py build_ext --inplace)")


@needs_cuda_module
def test_cuda_module_imports():
    import torch

    import flowkern._C  # noqa: F401
    import flowkern._cuda as m

    for fn in ("interpolate", "interpolate_backward", "convert", "convert_backward",
               "fm_loss_partial", "fm_loss_backward", "fm_loss_backward_pred", "error_string",
               "plan_lincomb", "plan_rowsum", "field_mean", "plan_fields"):
        assert callable(getattr(m, fn)), fn
    # The same launch.h / fields_block.h as the simulator's plans.
    for args in ((7, 1024, 4, True, 0), (1023, 7, 2, True, 3), (5, 4096, 8, False, 1)):
        assert list(m.plan_lincomb(*args)) == torch.ops.flowkern._sim_plan_lincomb(*args)
    for args in ((3, 4099, 0), (1, 0, 0), (2, 10, 3)):
        assert list(m.plan_rowsum(*args)) == torch.ops.flowkern._sim_plan_rowsum(*args)
    for args in ((1, 100000, 3072, 4, 0, 2112), (33, 130, 67, 8, 0, 32), (7, 300, 5, 4, 3, 0)):
        assert list(m.plan_fields(*args)) == torch.ops.flowkern._sim_plan_fields(*args)
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


@needs_cuda_module
def test_step_launchers_check_their_arguments():
    """Every code the step launchers reject is caught before any CUDA call
    (P: a fake non-null device pointer, never dereferenced)."""
    import flowkern._cuda as m

    assert m.STEP_COLS == 12
    P = 1 << 12
    # euler_step(dtype, rows, inner, x, pred, pred_uncond, coef, coef_rows, prediction,
    #            guidance, out, stream)
    assert m.euler_step(7, 1, 4, P, P, 0, P, 1, 0, 1.0, P, 0) == -1
    assert m.euler_step(0, 1, 4, P, P, 0, P, 1, 9, 1.0, P, 0) == -2
    assert m.ei_step(0, 1, 4, P, P, 0, P, 1, 0, 2, 1.0, P, 0) == -4
    assert m.ei_step_backward(0, 1, 4, P, P, 1, 0, -1, 1.0, P, P, 0, 0) == -4
    assert m.euler_step(0, 3, 4, P, P, 0, P, 2, 0, 1.0, P, 0) == -5  # table: 1 or 3 rows
    # Only one of heun's two unconditional predictions; a required tensor missing.
    assert m.heun_step(0, 1, 4, P, P, P, P, P, 0, P, 1, 0, 1.0, P, 0) == -6
    assert m.euler_step(0, 1, 4, 0, P, 0, P, 1, 0, 1.0, P, 0) == -6
    assert m.dpmpp_2m_step(0, 1, 4, P, P, 0, 0, P, 1, 0, 1.0, P, 0, 0) == -6
    for code, word in ((-4, "form"), (-5, "table"), (-6, "unconditional")):
        assert word in m.error_string(code)
    # Nothing to launch (empty tensors have null pointers), with a full uint64 seed.
    assert m.em_step(0, 0, 8, 0, 0, 0, P, 1, 0, 1.0, 2 ** 64 - 1, 2 ** 62, 0, 0) == 0
    assert m.churn(3, 4, 0, 0, P, 4, 1, 0, 0, 0) == 0
    if ctypes.util.find_library("cuda") is None:
        # No driver: the launch itself fails cleanly (see test_cuda_module_imports).
        code = m.churn(0, 1, 4, P, P, 1, 1, 0, P, 0)
        assert code > 0 and m.error_string(code)


@needs_cuda_module
def test_flowmap_launchers_check_their_arguments():
    """Every code the flow-map launchers reject is caught before any CUDA call
    (P: a fake non-null device pointer, never dereferenced)."""
    import flowkern._cuda as m

    P = 1 << 12
    # flowmap_loss_partial(dtype, rows, inner, x, pred, target, coef, coef_rows, prediction,
    #                      form, partial, chunk_len, stream)
    assert m.flowmap_loss_partial(7, 1, 4, P, P, P, P, 1, 0, 0, P, 0, 0) == -1
    assert m.flowmap_loss_partial(0, 1, 4, P, P, P, P, 1, 4, 0, P, 0, 0) == -2
    assert m.flowmap_loss_partial(0, 1, 4, P, P, P, P, 1, 0, 2, P, 0, 0) == -4
    assert m.flowmap_loss_partial(0, 3, 4, P, P, P, P, 2, 0, 0, P, 0, 0) == -5
    assert m.flowmap_loss_partial(0, 1, 4, P, 0, P, P, 1, 0, 0, P, 0, 0) == -6
    assert m.flowmap_loss_partial(0, 1, 4, P, P, P, P, 1, 0, 0, 0, 0, 0) == -6
    # flowmap_loss_backward(dtype, rows, inner, grad_rows, x, pred, target, coef, coef_rows,
    #                       prediction, form, g_pred, g_x, g_target, stream)
    assert m.flowmap_loss_backward(7, 1, 4, P, P, P, P, P, 1, 0, 0, P, 0, 0, 0) == -1
    assert m.flowmap_loss_backward(0, 1, 4, P, P, P, P, P, 1, -1, 0, P, 0, 0, 0) == -2
    assert m.flowmap_loss_backward(0, 1, 4, P, P, P, P, P, 1, 0, 5, P, 0, 0, 0) == -4
    assert m.flowmap_loss_backward(0, 3, 4, P, P, P, P, P, 0, 0, 0, P, 0, 0, 0) == -5
    assert m.flowmap_loss_backward(0, 1, 4, P, P, P, P, P, 1, 0, 0, 0, P, P, 0) == -6
    # Nothing to launch (empty tensors have null pointers).
    assert m.flowmap_loss_partial(0, 0, 8, 0, 0, 0, P, 1, 0, 0, 0, 0, 0) == 0
    assert m.flowmap_loss_backward(3, 4, 0, P, 0, 0, 0, P, 4, 1, 1, 0, 0, 0, 0) == 0
    if ctypes.util.find_library("cuda") is None:
        # No driver: the launches themselves fail cleanly (see test_cuda_module_imports).
        for code in (m.flowmap_loss_partial(0, 1, 4, P, P, P, P, 1, 0, 0, P, 0, 0),
                     m.flowmap_loss_partial(0, 2, 0, 0, 0, 0, P, 1, 0, 0, P, 0, 0),
                     m.flowmap_loss_backward(0, 1, 4, P, P, P, P, P, 1, 0, 0, P, P, 0, 0)):
            assert code > 0 and m.error_string(code)


def test_import_flowkern_does_not_load_cuda_module():
    code = ("import sys, flowkern, flowkern.cuda; "
            "assert 'flowkern._cuda' not in sys.modules, 'flowkern._cuda imported eagerly'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_cuda_module
def test_field_launcher_checks_its_arguments():
    """Every code the field launcher rejects is caught before any CUDA call
    (P: a fake non-null device pointer, never dereferenced)."""
    import flowkern._cuda as m

    P = 1 << 12
    # field_mean(dtype, rows, inner, R, x, ref, qp, kind, p0, p1, mean, best, sumexp,
    #            workspace, workspace_size, splits, stream)
    ok = dict(dtype=0, rows=3, inner=5, R=130, x=P, ref=P, qp=P, kind=0, p0=3.0, p1=0.0,
              mean=P, best=P, sumexp=P, workspace=0, workspace_size=0, splits=1, stream=0)
    assert m.field_mean(**{**ok, "dtype": 7}) == -1
    assert m.field_mean(**{**ok, "kind": 3}) == -7
    assert m.field_mean(**{**ok, "R": 0}) == -8
    assert m.field_mean(**{**ok, "rows": -1}) == -8
    # Two ranges need the plan's workspace: 2 * 3 * (5 + 2) elements.
    assert m.plan_fields(3, 130, 5, 4, 2, 0)[4:] == (2, 128, 42)
    assert m.field_mean(**{**ok, "splits": 2}) == -9
    assert m.field_mean(**{**ok, "splits": 2, "workspace": P, "workspace_size": 41}) == -9
    for code, word in ((-7, "kind"), (-8, "sizes"), (-9, "workspace")):
        assert word in m.error_string(code)
    # Nothing to launch: an empty batch.
    assert m.field_mean(**{**ok, "rows": 0}) == 0
    if ctypes.util.find_library("cuda") is None:
        # No driver: the launch itself fails cleanly (see test_cuda_module_imports).
        code = m.field_mean(**ok)
        assert code > 0 and m.error_string(code)
