"""Host time per public call on CUDA tensors (`make gpu-check`): the cases of
bench/bench_overhead.py (8x64 fp32, every public op, its eager formulation,
one torch.add, the bare op, and the 20-step Euler loops) run on a GPU.

    python bench/gpu_overhead.py [--backend cuda|triton] [--n 2000] [--reps 7]

On a GPU a tiny op's kernel takes ~2-3 us, so back-to-back calls without a
synchronisation measure the host: each case is timed as `n` calls in a row
(min and median of `reps` runs), synchronised before and after, with
`host_us` = time to issue the calls / n and `wall_us` = time until the device
has finished them / n (wall > host: the GPU, not the host, was the bound).
Every flowkern case is first checked against its eager formulation on the
same tensors. Ratios are to torch.add in the same run.

The triton backend is timed as the process finds it: set
FLOWKERN_TRITON_OP=1 in the environment for the torch.library.triton_op
registration (it is read at import).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import pytest  # noqa: E402  (bench_overhead's helpers raise pytest.skip)

import bench_overhead as bo  # noqa: E402


def sync():
    if bo.DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, n, reps):
    """(host_us, wall_us) per call: min over reps, and the medians."""
    fn()
    sync()
    host, wall = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) / n * 1e6)
        wall.append((t2 - t0) / n * 1e6)
    return min(host), statistics.median(host), min(wall)


def profile(op_name, n):
    """cProfile n calls of op_name's flowkern candidate: the functions that
    take the host time (tottime), to see what a call spends it on."""
    import cProfile
    import pstats
    case = next(c for c in bo.OPS if c[0] == op_name)
    fn, _ = case[3][1](bo.data())
    fn()
    sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    sync()
    print(f"cProfile of {n} calls of {case[3][0]} (backend {bo.BACKEND}):")
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--shape", default=f"{bo.ROWS}x{bo.COLS}",
                   help="rows x cols (an odd shape with --n 1 --reps 1: a run under "
                        "compute-sanitizer that checks every case's kernels)")
    p.add_argument("--profile", default="",
                   help="also cProfile this many calls of the named case's flowkern "
                        "candidate (e.g. 'euler_step (table)') and print where host time goes")
    a = p.parse_args(argv)
    bo.ROWS, bo.COLS = map(int, a.shape.split("x"))
    bo.SHAPE_TXT = a.shape
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; skipped")
        return 0
    bo.DEVICE, bo.BACKEND = a.device, a.backend
    import flowkern as fk
    from flowkern.backend import fastcall, triton_ops_traced
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"host overhead on {where}: torch {torch.__version__}, "
          f"backend={a.backend}, triton_op={triton_ops_traced()}, "
          f"fastcall={'yes' if fastcall() is not None else 'no'}, "
          f"available={fk.available()}, {bo.SHAPE_TXT} fp32, n={a.n}, reps={a.reps}")
    d = bo.data()
    add_min, add_med, add_wall = timed(lambda: torch.add(d.x0, d.x1), a.n, a.reps)
    rows = [("torch.add", "floor", add_min, add_med, add_wall)]
    if a.backend in ("cuda", "cpu"):
        from flowkern.ops.training import _NATIVE
        op = _NATIVE.direct.interpolate
        rows.append(("flowkern::interpolate.nograd (bare op)", "floor",
                     *timed(lambda: op(d.x0, d.x1, d.t, 0.0, 0, [], 0, True), a.n, a.reps)))
    failed = 0
    for op, _kind, _note, fk_case, eager_case in bo.OPS:
        for role, (name, factory) in (("flowkern", fk_case), ("eager", eager_case)):
            d = bo.data()
            try:
                fn, check = factory(d)
                if check is not None:
                    check()
                rows.append((f"{op}: {name}", role, *timed(fn, a.n, a.reps)))
            except Exception as e:  # one failing case must not hide the others
                failed += 1
                rows.append((f"{op}: {name}", f"FAIL {type(e).__name__}: {str(e)[:200]}",
                             float("nan"), float("nan"), float("nan")))
    for role, name, factory in bo.LOOPS:
        d = bo.data()
        try:
            fn = factory(d)
            out = fn()
            assert torch.isfinite(out).all()
            h, m, w = timed(fn, max(1, a.n // 40), a.reps)
            rows.append((f"{bo.SAMPLE_OP}: {name} (per step)", role,
                         h / bo.STEPS, m / bo.STEPS, w / bo.STEPS))
        except pytest.skip.Exception as e:
            rows.append((f"{bo.SAMPLE_OP}: {name}", f"SKIP {e}", *(float("nan"),) * 3))
        except Exception as e:
            failed += 1
            rows.append((f"{bo.SAMPLE_OP}: {name}", f"FAIL {type(e).__name__}: {str(e)[:200]}",
                         *(float("nan"),) * 3))
    if a.profile:
        profile(a.profile, a.n)
    print(f"{'case':<78} {'role':<10} {'host min':>9} {'host med':>9} {'wall min':>9} "
          f"{'x add':>6}")
    for name, role, h, m, w in rows:
        print(f"{name[:78]:<78} {role[:10]:<10} {h:9.2f} {m:9.2f} {w:9.2f} {h / add_min:6.2f}"
              + (f"  {role}" if role.startswith(("FAIL", "SKIP")) else ""))
    print(f"gpu_overhead: {len(rows)} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
