"""Quick bandwidth benchmark of the fused ops on one device, for `make gpu-check`.

    python bench/device_bench.py [--device cuda|cpu] [--n 16777216]

For each op and each backend that runs on the device, times the op (CUDA
events on a GPU, perf_counter on CPU; median of 20 after warm-up) and prints
its effective bandwidth (the bytes the op must move / time) as a fraction of
the device's measured copy bandwidth. The eager PyTorch formulation is timed
alongside. No pytest-benchmark: this must run on a bare GPU machine quickly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowkern as fk  # noqa: E402  (the in-place build of this checkout)


def timer(device):
    if device.type == "cuda":
        def run(fn, reps=20):
            fn(), fn()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            return statistics.median(ts)
    else:
        def run(fn, reps=20):
            fn(), fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=1 << 24)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    time_it = timer(dev)
    B, n = 64, args.n
    mk = lambda: torch.randn(B, n // B, device=dev)  # noqa: E731
    x0, x1, pr, xe, pe, dp = (mk() for _ in range(6))
    o1, o2 = torch.empty_like(x0), torch.empty_like(x0)
    t = torch.rand(B, device=dev)
    src, dst = mk(), torch.empty_like(x0)
    copy_bw = 8 * n / time_it(lambda: dst.copy_(src))
    tab = fk.step_table("vp", 0.4, 0.45, t_prev=0.35, g=0.5, device=dev)
    backends = [b for b in ("triton", "cuda", "cpu") if fk.available()[b]
                and ((b == "cpu") == (dev.type == "cpu"))]
    ops = {  # name: (bytes per element, {candidate: fn(backend)})
        "interpolate (out=)": (16, lambda be: fk.interpolate(x0, x1, t, out=(o1, o2), backend=be)),
        "flow_matching_loss fwd": (12, lambda be: fk.flow_matching_loss(pr, x0, x1, t, backend=be)),
        "euler_step": (12, lambda be: fk.euler_step(x0, pr, table=tab, out=o1, backend=be)),
        "heun_step (2nd stage)": (20, lambda be: fk.heun_step(x0, pr, xe, pe, table=tab, out=o1,
                                                               backend=be)),
        "dpmpp_2m_step": (20, lambda be: fk.dpmpp_2m_step(x0, pr, table=tab, prediction="eps",
                                                          d_prev=dp, out=o1, d_out=o2, backend=be)),
        "em_step": (12, lambda be: fk.em_step(x0, pr, table=tab, seed=1, out=o1, backend=be)),
    }
    eager = {
        "interpolate (out=)": lambda: (t[:, None] * x1 + (1 - t[:, None]) * x0, x1 - x0),
        "flow_matching_loss fwd": lambda: ((pr - (x1 - x0)) ** 2).mean(),
        "euler_step": lambda: x0 + 0.05 * pr,
        "em_step": lambda: x0 + 0.05 * pr + 0.1 * torch.randn_like(x0),
    }
    print(f"device {dev}, {n:,} fp32 elements, copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"{'op':26s} {'candidate':8s} {'time':>10s} {'GB/s':>8s} {'of copy':>8s}")
    for name, (bpe, fn) in ops.items():
        for be in backends:
            s = time_it(lambda: fn(be))
            print(f"{name:26s} {be:8s} {s * 1e3:8.3f}ms {bpe * n / s / 1e9:8.1f} "
                  f"{bpe * n / s / copy_bw:7.0%}")
        if name in eager:
            s = time_it(eager[name])
            print(f"{name:26s} {'eager':8s} {s * 1e3:8.3f}ms {bpe * n / s / 1e9:8.1f} "
                  f"{bpe * n / s / copy_bw:7.0%}")


if __name__ == "__main__":
    main()
