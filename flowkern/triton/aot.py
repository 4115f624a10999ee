"""Ahead-of-time compile of the shipped Triton kernel configurations for
sm_80 and sm_90, without a GPU, with ptxas's register/spill report.

    python -m flowkern.triton.aot [--quick] [--json]   # table; exit 1 on any spill

Must run WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit).
tests/test_aot.py runs it in a subprocess.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import sys

ARCHS = (80, 90)
DTYPES = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp32"), "bf16": ("bf16", "fp32"),
          "fp64": ("fp64", "fp64")}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def _ops():
    """(name, row function, NI, NO, NOISE, P0, P1, P2[, KIND]) of every shipped
    kernel (NOISE "per_sample": noise with per-sample seeds; KIND: -1, a
    table, unless given: a built-in schedule kind evaluated in the kernel):
    each family's module lists its own, next to its row functions (AOT_KERNELS)."""
    from . import flowmap as FM
    from . import steps as S
    from . import training as T

    return [*T.AOT_KERNELS, *S.AOT_KERNELS, *FM.AOT_KERNELS]


def _rows_of(fn):
    """The ROWS_OF constexpr (lincomb.py) of a row function: the training ops
    read a Sched, lincomb_step nothing, the other steps and the flow map a
    StepRow."""
    from . import lincomb as L
    from . import steps as S
    from . import training as T

    if fn in (T.interpolate_rows, T.interpolate_bwd_rows, T.convert_rows, T.convert_bwd_rows,
              T.loss_residual_rows, T.loss_bwd_rows):
        return L.SCHED_ROWS
    return L.NO_ROWS if fn is S.lincomb_step_rows else L.STEP_ROWS


def _sched(fn, kind, acc_t, idx_t):
    """The coefficient-source part of a signature and its constexprs: rows from
    a table (kind -1) or a built-in schedule of that kind evaluated in the
    kernel (per-row times for the training ops, the host's times for a step)."""
    import triton.language as tl

    rows_of = _rows_of(fn)
    sig = {"tptr": f"*{acc_t}", "t_step": idx_t, "t_value": "fp64", "s_value": "fp64",
           "tp_value": "fp64", "g_value": "fp64", "sp0": "fp64", "sp1": "fp64", "sp2": "fp64"}
    return sig, dict(ROWS_OF=rows_of, KIND=kind, T_TENSOR=kind >= 0 and rows_of == 0,
                     ACC=tl.float64 if acc_t == "fp64" else tl.float32)


def _weights(fn) -> bool:
    """The WEIGHTS constexpr: lms_step's and lincomb_step's row functions
    read host weights (the scalars wt0 .. wt11, steps.weight_args)."""
    from . import steps as S

    return fn in (S.lms_rows, S.lincomb_step_rows)


def _skip(fn, p1) -> int:
    """The SKIP constexpr the launcher passes with this row function (and P1)."""
    from . import steps as S

    if fn is S.lms_rows:
        return S.lms_skip(p1)
    return S.DPMPP_2M_SKIP if fn is S.dpmpp_2m_rows else 0


def _rowsums():
    """(name, row function, NI, P0, P1[, KIND]) of every shipped row-sum kernel
    (the modules' AOT_ROWSUMS)."""
    from . import flowmap as FM
    from . import training as T

    return [*T.AOT_ROWSUMS, *FM.AOT_ROWSUMS]


QUICK = ("interpolate", "interpolate_cosine", "loss_bwd_edm", "dpmpp_2m_cfg_x1_edm",
         "em_cfg_score_cosine", "convert_score2v", "loss_bwd", "loss_bwd_pred", "heun_cfg_x1",
         "dpmpp_2m_cfg_x1", "lms_cfg_eps_3", "em_cfg_score", "em_cfg_score_per_sample", "flowmap_bwd_v", "loss",
         "flowmap_score_noise")


def configs(full: bool = True, sizes=None):
    """(name, kernel, signature, constexprs) for the shipped launch configs:
    each op and dtype, the tile shapes tile_config picks from tiny rows (2-D
    data) to long rows, with a 64-bit `inner` (and 32-bit for fp32).
    full=False is the quick set: the widest tiles of both kinds, the heaviest ops."""
    from . import kernels as K
    from . import lincomb as L

    ops = _ops()
    rowsums = _rowsums()
    sizes = sizes or ((1, 2, 3, 100, 3072, 1 << 20) if full else (2, 1 << 20))
    if not full:
        ops = [o for o in ops if o[0] in QUICK]
        rowsums = [o for o in rowsums if o[0] in QUICK]
    out = []
    for dname, (io_t, acc_t) in DTYPES.items():
        for heavy in (False, True):
            for (rows_per, block_n), idx_t in itertools.product(
                    sorted({L.tile_config(n, heavy, ITEMSIZE[dname]) for n in sizes}),
                    ("i32", "i64") if dname == "fp32" else ("i64",)):
                ins = {f"i{k}": f"*{io_t}" for k in range(L.MAX_IN)}
                tail = dict(rows="i32", inner=idx_t, n_col_blocks="i32")
                for name, fn, ni, no, noise, p0, p1, p2, *kind in ops:
                    if L.is_heavy(ni, bool(noise), no) != heavy:
                        continue
                    ssig, sconst = _sched(fn, kind[0] if kind else -1, acc_t, idx_t)
                    sig = {**ins, **{f"o{k}": f"*{io_t}" for k in range(L.MAX_OUT)},
                           "coef": f"*{acc_t}", "stride": "i32", "aux": f"*{acc_t}",
                           **{f"wt{k}": "fp32" for k in range(L.MAX_WEIGHTS)},
                           "w": "fp32", "seed": "i64", "offset": "i64",
                           # without per-sample seeds the launcher passes coef there
                           "seeds": "*i64" if noise == "per_sample" else f"*{acc_t}",
                           **ssig, **tail}
                    const = dict(P0=p0, P1=p1, P2=p2, ROW=K.ROW_CODE[fn], NI=ni, NO=no,
                                 NOISE=bool(noise), PER_SAMPLE=noise == "per_sample",
                                 SKIP=_skip(fn, p1), ROWS=rows_per, BLOCK_N=block_n,
                                 WEIGHTS=_weights(fn), **sconst)
                    sig.update({k: "constexpr" for k in const})
                    out.append((f"lincomb/{name}/{dname}/{rows_per}x{block_n}/{idx_t}",
                                K.lincomb_kernel, sig, const))
                if heavy:
                    continue
                for name, fn, ni, p0, p1, *kind in rowsums:
                    ssig, sconst = _sched(fn, kind[0] if kind else -1, acc_t, idx_t)
                    sig = {**ins, "partial": f"*{acc_t}", "coef": f"*{acc_t}", "stride": "i32",
                           "aux": f"*{acc_t}", "w": "fp32", **ssig, **tail}
                    const = dict(P0=p0, P1=p1, P2=0, ROW=K.ROW_CODE[fn], NI=ni,
                                 ROWS=rows_per, BLOCK_N=block_n, **sconst)
                    sig.update({k: "constexpr" for k in const})
                    out.append((f"rowsum/{name}/{dname}/{rows_per}x{block_n}/{idx_t}",
                                K.rowsum_kernel, sig, const))
    return out


# Modules of other op families that ship their own kernels: each has
# aot_configs(full) -> [(name, kernel, signature, constexprs, num_warps)].
FAMILY_MODULES = ("flowkern.triton.fields",)


def family_configs(full: bool = True):
    import importlib

    out = []
    for mod in FAMILY_MODULES:
        out += importlib.import_module(mod).aot_configs(full)
    return out


def compile_one(kernel, signature, constexprs, arch, num_warps=None, maxnreg=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .lincomb import NUM_WARPS

    if num_warps is None:
        num_warps = NUM_WARPS

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    buf = io.StringIO()
    # ptxas -v writes to the process's stderr/stdout file descriptors
    r, w = os.pipe()
    saved = os.dup(2), os.dup(1)
    os.dup2(w, 2), os.dup2(w, 1)
    try:
        options = {"num_warps": num_warps}
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        os.dup2(saved[0], 2), os.dup2(saved[1], 1)
        os.close(w)
        with os.fdopen(r) as f:
            buf.write(f.read())
        os.close(saved[0]), os.close(saved[1])
    log = buf.getvalue()
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    stack = [int(m) for m in re.findall(r"(\d+) bytes stack frame", log)]
    return {"registers": max(regs) if regs else None, "spill_bytes": sum(spills),
            "stack_bytes": sum(stack), "shared": compiled.metadata.shared,
            "parsed": bool(regs)}


def report(full: bool = True):
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    from .lincomb import MAX_NREG

    rows = []
    for name, kernel, sig, const in configs(full):
        for arch in ARCHS:
            rows.append({"kernel": name, "arch": f"sm_{arch}",
                         **compile_one(kernel, sig, const, arch, maxnreg=MAX_NREG)})
    for name, kernel, sig, const, warps in family_configs(full):
        for arch in ARCHS:
            rows.append({"kernel": name, "arch": f"sm_{arch}",
                         **compile_one(kernel, sig, const, arch, warps)})
    return rows


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("flowkern.triton.aot: unset TRITON_INTERPRET (the interpreter cannot compile)")
    rows = report(full="--quick" not in sys.argv)
    print(f"{'kernel':48s} {'arch':6s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>6s}")
    for r in rows:
        print(f"{r['kernel']:48s} {r['arch']:6s} {r['registers']!s:>5s} {r['spill_bytes']:6d} "
              f"{r['stack_bytes']:6d} {r['shared']:6d}")
    if "--json" in sys.argv:
        print("JSON:" + json.dumps(rows))
    bad = [r for r in rows if r["spill_bytes"] or r["stack_bytes"] or not r["parsed"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
