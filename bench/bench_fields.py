"""Benchmarks of the empirical-field family: flowkern.poisson_field (PFGM's
normalised target) against the ways the PFGM code and a careful PyTorch user
compute it. Self-contained (pytest-benchmark; no shared conftest needed).

    python -m pytest bench/bench_fields.py -o python_files='bench_*.py' -q \
        --benchmark-columns=min,median,rounds --benchmark-group-by=group
    python bench/bench_fields.py          # the same table without pytest (quick)

Candidates (fp32, CPU, torch's default thread count):
  flowkern                 flowkern.poisson_field(x, r, ref)         (auto backend: cpu)
  pfgm reference           the PFGM code's formulation: B x R x (N+1) broadcast,
                           row-min normalisation (flowkern.reference.fields.pfgm_field)
  torch.compile(pfgm ref)  the same, compiled once outside the timer
  gemm torch               ||x||^2 + ||y||^2 - 2 x y^T by one sgemm, log-softmax,
                           weights @ ref (a second sgemm): fast and O(B R) memory,
                           but the distance cancellation makes it inaccurate (its
                           error vs float64 is printed next to the time)
  two sgemms               x @ ref^T and (x @ ref^T) @ ref: the target's yardstick
Shapes: (B, R, N) = (64, 1024, 3072), (128, 4096, 3072), and R up to 65536
at B = 64, N = 3072. The PFGM formulation needs B*R*(N+1)*4 bytes per
temporary (6.4 GB at B = 128, R = 4096): it runs only where that is below
1.5 GB (at B = 64, R = 1024: 0.8 GB), and is skipped, with a note, elsewhere.
Peak memory: the growth of the peak RSS (/proc/self/status VmHWM, reset
through /proc/self/clear_refs after the inputs exist) of a fresh child process
running one call.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import flowkern
from flowkern.reference import fields as R

SHAPES = [(64, 1024, 3072), (128, 4096, 3072)]
SCALING = [(64, r, 3072) for r in (4096, 16384, 65536)]
REF_LIMIT = 1.5e9  # bytes of one B x R x (N+1) fp32 temporary


def inputs(B, Rn, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(Rn, N, generator=g) * 2 - 1
    m = torch.rand(B, generator=g, dtype=torch.float64) * 291
    x, r = flowkern.pfgm.perturb(data[:B].double(), D=1, m=m, generator=g)
    return x.float(), r.float(), data


def gemm_torch(x, r, ref, gamma=5.0):
    N = x.shape[1]
    d2 = (x * x).sum(1, keepdim=True) + (ref * ref).sum(1)[None, :] - 2 * x @ ref.T
    logit = -(N + 1) / 2 * torch.log(d2.clamp(min=0) + (r * r)[:, None])
    w = torch.softmax(logit, dim=1)
    mx = w @ ref - x
    norm = torch.sqrt((mx * mx).sum(1) + r * r)
    f = math.sqrt(N) / (norm + gamma)
    return mx * f[:, None], -r * f


def two_sgemms(x, r, ref):
    s = x @ ref.T
    return s @ ref


_COMPILED = {}


def compiled_ref(x, r, ref):
    if "f" not in _COMPILED:
        _COMPILED["f"] = torch.compile(R.pfgm_field)
    return _COMPILED["f"](x, r, ref)


CANDIDATES = {
    "flowkern": lambda x, r, ref: flowkern.poisson_field(x, r, ref),
    "pfgm reference": lambda x, r, ref: R.pfgm_field(x, r, ref),
    "torch.compile(pfgm ref)": compiled_ref,
    "gemm torch": gemm_torch,
    "two sgemms": two_sgemms,
}


def runs_reference(name, B, Rn, N):
    return not (name in ("pfgm reference", "torch.compile(pfgm ref)") and B * Rn * (N + 1) * 4 > REF_LIMIT)


def rel_error(out, x, r, ref):
    if not isinstance(out, tuple):
        return None
    truth = flowkern.poisson_field(x[:8].double(), r[:8].double(), ref.double(), backend="torch")
    num = ((out[0][:8].double() - truth[0]) ** 2).sum(1) + (out[1][:8].double() - truth[1]) ** 2
    den = (truth[0] ** 2).sum(1) + truth[1] ** 2
    return (num / den).sqrt().max().item()


def peak_memory(name, B, Rn, N):
    """Peak RSS growth (bytes) of one call in a fresh process, inputs excluded."""
    code = f"""
import torch, flowkern, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench_fields as bf
x, r, ref = bf.inputs({B}, {Rn}, {N})
f = bf.CANDIDATES[{name!r}]
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
if {name!r} == 'torch.compile(pfgm ref)':
    f(x[:2], r[:2], ref[:3])  # compile outside the measurement
base = rss()
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
f(x, r, ref)
print(hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


@pytest.mark.parametrize("shape", SHAPES + SCALING, ids=lambda s: "B%d-R%d-N%d" % s)
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_poisson_field(benchmark, name, shape):
    B, Rn, N = shape
    if not runs_reference(name, B, Rn, N):
        pytest.skip(f"{name}: a B x R x (N+1) fp32 temporary is "
                    f"{B * Rn * (N + 1) * 4 / 1e9:.1f} GB (x several); not run on this 24 GB machine")
    if (B, Rn, N) in SCALING and name in ("gemm torch",):
        pytest.skip("scaling rows compare flowkern with two sgemms only")
    x, r, ref = inputs(B, Rn, N)
    f = CANDIDATES[name]
    out = f(x, r, ref)
    benchmark.group = f"poisson_field · B={B} R={Rn} N={N}"
    benchmark.extra_info["rel_error_vs_fp64"] = rel_error(out, x, r, ref)
    benchmark.extra_info["peak_bytes"] = peak_memory(name, B, Rn, N)
    benchmark.pedantic(f, args=(x, r, ref), rounds=3 if Rn >= 16384 else 5, warmup_rounds=1)


def main():
    """Quick table without pytest: best of a few calls, one process."""
    rows = []
    for shape in SHAPES + SCALING:
        B, Rn, N = shape
        x, r, ref = inputs(B, Rn, N)
        for name, f in CANDIDATES.items():
            if not runs_reference(name, B, Rn, N) or (shape in SCALING and name == "gemm torch"):
                continue
            if shape in SCALING and name not in ("flowkern", "two sgemms"):
                continue
            out = f(x, r, ref)
            reps = 2 if Rn >= 16384 or "reference" in name or "pfgm" in name else 5
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f(x, r, ref)
                ts.append(time.perf_counter() - t0)
            rows.append(dict(shape=shape, name=name, s=min(ts), err=rel_error(out, x, r, ref),
                             peak=peak_memory(name, B, Rn, N)))
            print(f"B={B:4d} R={Rn:6d} N={N}  {name:26s} {min(ts) * 1e3:10.2f} ms  "
                  f"peak {rows[-1]['peak'] / 1e6 if rows[-1]['peak'] else float('nan'):9.1f} MB  "
                  f"rel.err {rows[-1]['err'] if rows[-1]['err'] is not None else float('nan'):.2e}",
                  flush=True)
    print("JSON:" + json.dumps(rows))


if __name__ == "__main__":
    main()
