"""`python -m flowkern demo`: the main job.

Trains a small MLP flow model on built-in 2-D data with the fused training
ops, samples it with every fused sampler at several NFE (model evaluations),
prints NFE vs sample quality (sliced Wasserstein-2 to fresh data, and exact W2
with POT when installed) and wall time, and writes a PNG of the samples and a
quality-vs-NFE plot to an output folder. Then PFGM / PFGM++ and the PFGM
NFE claim against score SDEs (pfgm.py), rectified flow and the one-step
models (rectified.py), and real images: scikit-learn's 8x8 digits with a
conv U-Net, judged by a Fréchet distance in a classifier's features
(digits.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import toy
from ..samplers import sample

METHODS = ("euler", "heun", "ei", "dpmpp_2m", "em")
# Exact W2 (POT's network simplex) is O(n^3): 500 points cost ~0.05 s per call,
# 1000 points ~0.2 s, 2000 points ~1.5 s, over the demo's ~90 rows. The sliced
# W2 on all samples is the main measure; the data-vs-data row uses the same n.
W2_POINTS = 500
# model calls per step: heun evaluates twice per step (once where it falls back to Euler)
CALLS = {"euler": 1, "heun": 2, "ei": 1, "dpmpp_2m": 1, "em": 1}


def _steps_for(method, nfe):
    return max(1, (nfe + 1) // 2) if method == "heun" else nfe


def sweep(model, x0, nfes, seed):
    """Every fused sampler (METHODS) at every NFE from the same x0, for a
    velocity model on the linear schedule (em with g = 0.5): yields
    (method, nfe, steps, samples, seconds of sampling)."""
    for method in METHODS:
        for nfe in nfes:
            steps = _steps_for(method, nfe)
            t0 = time.perf_counter()
            with torch.no_grad():
                x = sample(model, x0, "linear", method, steps=steps, prediction="velocity",
                           seed=seed, progress=False, g=0.5)
            yield method, nfe, steps, x, time.perf_counter() - t0


def _evaluate(model, data, n, nfes, seed, progress):
    """Rows of (method, nfe, steps, sw2, w2, seconds) and the samples at the largest NFE."""
    rows, shown = [], {}
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(n, 2, generator=g)
    for method, nfe, steps, x, dt in sweep(model, x0, nfes, seed):
        rows.append(dict(method=method, nfe=nfe, steps=steps,
                         sw2=toy.sliced_wasserstein(x, data), w2=toy.exact_w2(x[:W2_POINTS], data[:W2_POINTS]),
                         seconds=dt))
        shown[method] = x
    return rows, shown


def _floor(name, n):
    """(SW2, W2) between two independent data samples: the distances' noise floor."""
    a, b = toy.dataset(name, n, seed=20_000), toy.dataset(name, n, seed=10_000)
    return toy.sliced_wasserstein(a, b), toy.exact_w2(a[:W2_POINTS], b[:W2_POINTS])


def _table(rows, floor):
    w = max([10] + [len(r["method"]) for r in rows])
    lines = [f"{'method':{w}s} {'NFE':>4s} {'steps':>5s} {'SW2':>8s} {'W2':>8s} {'time (s)':>9s}"]
    for r in rows:
        w2 = f"{r['w2']:.4f}" if r["w2"] is not None else "   n/a"
        lines.append(f"{r['method']:{w}s} {r['nfe']:4d} {r['steps']:5d} {r['sw2']:8.4f} {w2:>8s} "
                     f"{r['seconds']:9.3f}")
    sw_floor, w2_floor = floor
    w2 = f"{w2_floor:.4f}" if w2_floor is not None else "   n/a"
    lines.append(f"{'data':{w}s} {'':>4s} {'':>5s} {sw_floor:8.4f} {w2:>8s}   "
                 f"(two independent data samples)")
    return "\n".join(lines)


def _plots(out, name, data, shown, rows, floor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3 * (len(shown) + 1), 3.2))
    for ax, (title, pts) in zip(axes, [("data", data)] + list(shown.items())):
        p = pts[:4000].cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
        ax.set_title(title)
        ax.set_xlim(-3.5, 3.5), ax.set_ylim(-3.5, 3.5), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_samples.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        ax.plot([r["nfe"] for r in rs], [r["sw2"] for r in rs], "o-", label=method)
    ax.axhline(floor[0], color="gray", ls="--", label="data vs data")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations)"), ax.set_ylabel("sliced W2 to data")
    ax.set_title(name), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_quality_vs_nfe.png"), dpi=110)
    plt.close(fig)


def flow_matching_section(args, out):
    report = {}
    for name in args.datasets:
        torch.manual_seed(args.seed)
        model = toy.MLP()
        t0 = time.perf_counter()
        hist = toy.train_flow(model, lambda n, _d=name: toy.dataset(_d, n, seed=torch.randint(0, 2**31, ()).item()),
                              steps=args.train_steps, progress=not args.no_progress,
                              desc=f"train {name}")
        train_s = time.perf_counter() - t0
        model.eval()
        data = toy.dataset(name, args.samples, seed=10_000)
        floor = _floor(name, args.samples)
        rows, shown = _evaluate(model, data, args.samples, args.nfe, args.seed, not args.no_progress)
        print(f"\n== {name}: flow matching, {args.train_steps} training steps in {train_s:.1f} s "
              f"(final loss {sum(hist[-50:]) / len(hist[-50:]):.4f}) ==")
        print(_table(rows, floor))
        _plots(out, name, data, shown, rows, floor)
        report[name] = dict(train_seconds=train_s, rows=rows, data_floor=floor)
    return report


def pfgm_section(args, out):
    """PFGM (D = 1) and PFGM++ (D = 128) on 8 gaussians, and the PFGM paper's
    NFE claim against VE / VP score models (flowkern/demo/pfgm.py)."""
    from .pfgm import pfgm_section as run
    return run(args, out)


def rectified_section(args, out):
    """Rectified flow, reflow, distillation and the one-step flow map
    (flowkern/demo/rectified.py)."""
    from .rectified import rectified_section as run
    return run(args, out)


def digits_section(args, out):
    """Real images: scikit-learn's 8x8 digits, a conv U-Net, every sampler,
    Fréchet distance in a classifier's features (flowkern/demo/digits.py)."""
    from .digits import digits_section as run
    return run(args, out)


SECTIONS = [("flow matching", flow_matching_section), ("pfgm", pfgm_section),
            ("rectified flow", rectified_section), ("digits", digits_section)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m flowkern demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: one dataset, few steps")
    p.add_argument("--out", default="flowkern-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the flow-matching and PFGM sections "
                        "(default: torch's own, all cores); the rectified-flow section "
                        "always runs on one")
    p.add_argument("--only", action="append", metavar="SECTION",
                   choices=[title for title, _ in SECTIONS],
                   help="run only this section (repeatable); default: all of "
                        + ", ".join(repr(title) for title, _ in SECTIONS))
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.train_steps, args.samples, args.nfe = ["8gaussians"], 300, 2000, [4, 16]
        args.pfgm_steps, args.pfgm1_steps, args.pfgm_nfe = 150, 300, [50]
        args.score_steps, args.score_batch, args.sde_nfe = 300, 256, [10, 50]
        args.digits_steps, args.digits_nfe, args.digits_classifier_steps = 100, [4, 16], 150
    else:
        args.datasets, args.train_steps, args.samples, args.nfe = (list(toy.DATASETS), 1200, 5000,
                                                                   [2, 4, 8, 16, 32])
        args.pfgm_steps, args.pfgm1_steps, args.pfgm_nfe = 1000, 1500, [10, 20, 50, 100, 200]
        args.score_steps, args.score_batch, args.sde_nfe = (1500, 256,
                                                            [10, 20, 50, 100, 200, 500, 1000])
        args.digits_steps, args.digits_nfe, args.digits_classifier_steps = 1500, [4, 8, 16, 32], 300
    os.makedirs(args.out, exist_ok=True)
    # On an idle 2-core machine two threads train the 2-D MLPs 1.6x faster
    # than one (batch 1024, 12 vs 20 ms a step); on a busy shared machine
    # --threads 1 avoids the second thread's waits for a core.
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    report = {}
    for title, fn in SECTIONS:
        if args.only and title not in args.only:
            continue
        report[title] = fn(args, args.out)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"\nwrote {os.path.abspath(args.out)}/ (PNG plots, report.json) in "
          f"{time.perf_counter() - t0:.1f} s")
    torch.set_num_threads(threads)
    return report
