"""The rectified-flow section of ``python -m flowkern demo``: the seeds'
answer to "fewer steps", reproduced on 2-D data with the fused ops.

1-RF    flow matching on independent (noise, data) pairs;
2-RF    one reflow: 1-RF's network trained further on (x0, ODE_1RF(x0)) pairs;
distill 2-RF distilled to one step on (x0, ODE_2RF(x0)) pairs;
flow map  g(t, s, x) initialised from 2-RF (d̄(t, t, .) = its denoiser) and
        trained with the local + semigroup losses;
MeanFlow  average velocities u(z, t, s) trained from scratch with the JVP
        target (flowkern.meanflow);
shortcut  jump directions s(x, t, d) trained from scratch with flow matching
        and self-consistency (flowkern.shortcut).

Sampled in ONE Euler step, 1-RF collapses toward the data mean (its
velocity at t = 0 is E[x1 - x0 | x0] = E[x1] - x0, so x0 + v = E[x1] for a
perfect model); 2-RF's straighter paths make one step much better;
distillation and the flow map better still. Prints the table and writes
``rectified_flow.png`` (straightened trajectories and one-step samples).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import torch

from .. import flowmap as fm_mod
from .. import meanflow, rectified, shortcut
from .._progress import progress_iter
from ..samplers import sample
from . import toy


@dataclasses.dataclass
class Config:
    dataset: str = "8gaussians"
    hidden: int = 128
    depth: int = 3
    n_freq: int = 3              # t features pi, 2pi, 4pi (toy.MLP's 8 left blurred modes)
    batch: int = 512
    lr: float = 3e-3
    steps_1rf: int = 1500
    steps_2rf: int = 1500
    steps_distill: int = 600
    steps_flowmap: int = 1200
    steps_meanflow: int = 1500   # MeanFlow and shortcut models train from scratch on the data
    steps_shortcut: int = 1500
    meanflow_time_std: float = 2.0  # logit-normal (t, s) spread; the paper's 1.0 left this toy's
                                    # one-step samples too narrow (tests/test_meanflow.py)
    semigroup_weight: float = 4.0
    t0_prob: float = 0.5        # semigroup: fraction of jumps that start from noise (t = 0)
    n_pairs: int = 20000
    pair_steps: int = 32
    pair_method: str = "heun"
    n_eval: int = 16000          # 16k samples: a difference of SW2s moves by ~0.003
    many_steps: int = 32
    seed: int = 0


QUICK = dict(steps_1rf=300, steps_2rf=300, steps_distill=150, steps_flowmap=200, n_pairs=4000,
             pair_steps=16, n_eval=4000, steps_meanflow=300, steps_shortcut=300)


def _fit(params, loss_fn, steps, lr, progress, desc, seed):
    """Adam with a cosine schedule; loss_fn(generator) -> scalar loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    hist = []
    for _ in progress_iter(range(steps), progress, desc=desc, leave=False):
        loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist.append(loss.item())
    return hist


def _batch(pairs, n, g):
    idx = torch.randint(0, pairs[0].shape[0], (n,), generator=g)
    return pairs[0][idx], pairs[1][idx]


def in_modes(x, dataset):
    """8 Gaussians only: the fraction of samples within 3 standard deviations
    of a mode centre (the data: 0.99); None for other data sets."""
    if dataset != "8gaussians":
        return None
    ang = torch.arange(8, dtype=x.dtype) * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return float((torch.cdist(x, centers).min(1).values < 3 * 0.15).float().mean())


def _spread(x, data):
    """RMS distance to the data mean, relative to the data's: 0 = collapsed on the mean."""
    mu = data.mean(0)
    return float(((x - mu) ** 2).sum(1).mean().sqrt() / ((data - mu) ** 2).sum(1).mean().sqrt())


def train_all(cfg: Config, progress: bool = False):
    """Trains 1-RF, 2-RF, 2-RF + distill, the flow map, MeanFlow and a shortcut
    model; returns them and timings."""
    torch.manual_seed(cfg.seed)
    gdata = torch.Generator().manual_seed(cfg.seed + 1)
    data_fn = toy.DATASETS[cfg.dataset]
    mk = dict(hidden=cfg.hidden, depth=cfg.depth, n_freq=cfg.n_freq)
    timing = {}

    t0 = time.perf_counter()
    rf1 = toy.MLP(**mk)

    def loss_1rf(g):
        x1 = data_fn(cfg.batch, generator=gdata)
        x0 = torch.randn(x1.shape, generator=g)
        return rectified.reflow_loss(rf1, x0, x1, generator=g)
    _fit(rf1.parameters(), loss_1rf, cfg.steps_1rf, cfg.lr, progress, "1-RF", cfg.seed)
    timing["1-RF"] = time.perf_counter() - t0

    # reflow: pairs from the 1-RF ODE, 2-RF initialised from 1-RF (as Liu et al.)
    t0 = time.perf_counter()
    gz = torch.Generator().manual_seed(cfg.seed + 2)
    pairs1 = rectified.reflow_pairs(rf1, torch.randn(cfg.n_pairs, 2, generator=gz),
                                    cfg.pair_steps, cfg.pair_method, progress=progress,
                                    desc="reflow pairs (1-RF)")
    rf2 = toy.MLP(**mk)
    rf2.load_state_dict(rf1.state_dict())
    _fit(rf2.parameters(),
         lambda g: rectified.reflow_loss(rf2, *_batch(pairs1, cfg.batch, g), generator=g),
         cfg.steps_2rf, cfg.lr, progress, "2-RF", cfg.seed + 3)
    timing["2-RF"] = time.perf_counter() - t0

    # one-step distillation of 2-RF on its own ODE's pairs
    t0 = time.perf_counter()
    pairs2 = rectified.reflow_pairs(rf2, torch.randn(cfg.n_pairs, 2, generator=gz),
                                    cfg.pair_steps, cfg.pair_method, progress=progress,
                                    desc="distill pairs (2-RF)")
    dist = toy.MLP(**mk)
    dist.load_state_dict(rf2.state_dict())
    _fit(dist.parameters(),
         lambda g: rectified.distill_loss(dist, *_batch(pairs2, cfg.batch, g)),
         cfg.steps_distill, cfg.lr * 0.5, progress, "2-RF distill", cfg.seed + 4)
    timing["2-RF + distill"] = time.perf_counter() - t0

    # flow map from 2-RF: local loss on 2-RF's training pairs + semigroup loss
    t0 = time.perf_counter()
    fmap = fm_mod.FlowMap.from_pretrained(rf2, prediction="velocity")

    def loss_fm(g):
        x0, x1 = _batch(pairs1, cfg.batch, g)
        local = fm_mod.local_loss(fmap, x0, x1, generator=g)
        # jumps t -> s: half of them from noise (generation starts there), early
        # starts favoured, long jumps favoured (s = 1 is the one-step map)
        n = cfg.batch
        t = torch.rand(n, generator=g) ** 2
        t = torch.where(torch.rand(n, generator=g) < cfg.t0_prob, torch.zeros_like(t), t)
        s = t + (1 - t) * torch.rand(n, generator=g) ** 0.25
        with torch.no_grad():
            xt, _ = toy.interpolate(x0, x1, t, "linear", "x1")
        return local + cfg.semigroup_weight * fm_mod.semigroup_loss(fmap, xt, t, s, generator=g)
    _fit(fmap.parameters(), loss_fm, cfg.steps_flowmap, cfg.lr, progress, "flow map",
         cfg.seed + 5)
    timing["flow map"] = time.perf_counter() - t0
    # MeanFlow: average velocities u(z, t, s), its JVP target (flowkern.meanflow)
    t0 = time.perf_counter()
    mflow = toy.MLP(extra_time=True, **mk)

    def loss_mf(g):
        x1 = data_fn(cfg.batch, generator=gdata)
        t, s = meanflow.sample_times(cfg.batch, std=cfg.meanflow_time_std, generator=g)
        return meanflow.training_loss(mflow, x1, t=t, s=s, generator=g)
    _fit(mflow.parameters(), loss_mf, cfg.steps_meanflow, cfg.lr, progress, "MeanFlow",
         cfg.seed + 6)
    timing["MeanFlow"] = time.perf_counter() - t0

    # shortcut model s(x, t, d): flow matching + self-consistency (flowkern.shortcut)
    t0 = time.perf_counter()
    short = toy.MLP(extra_time=True, **mk)
    _fit(short.parameters(),
         lambda g: shortcut.training_loss(short, data_fn(cfg.batch, generator=gdata),
                                          generator=g),
         cfg.steps_shortcut, cfg.lr, progress, "shortcut", cfg.seed + 7)
    timing["shortcut"] = time.perf_counter() - t0
    for m in (rf1, rf2, dist, fmap, mflow, short):
        m.eval()
    return dict(rf1=rf1, rf2=rf2, distill=dist, flowmap=fmap, meanflow=mflow, shortcut=short,
                pairs1=pairs1), timing


class SlicedW2:
    """toy.sliced_wasserstein(x, data, n_proj, seed) against one fixed data
    set, with the data's sorted projections computed once."""

    def __init__(self, data, n_proj=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(data.shape[1], n_proj, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        self.ref = self._sorted(data)

    def _sorted(self, x):
        return torch.sort(self.dirs.T @ x.double().cpu().T, dim=1).values

    def __call__(self, x):
        return float(((self._sorted(x) - self.ref) ** 2).mean().sqrt())


@torch.no_grad()
def evaluate(models, cfg: Config, eval_seed=None):
    """One row per model: sliced W2 to cfg.n_eval fresh data points after 1, 2
    and cfg.many_steps Euler steps (the flow map: jumps), the one-step
    spread, the one-step error against the ODE endpoint it approximates (the
    many-step solve of 1-RF for 1-RF, of 2-RF for distill and the flow map,
    their own many-jump result for MeanFlow and shortcut), and the
    straightness of the model's ODE. Noise and data come from eval_seed
    (default: cfg.seed) and are the same for every model (common random
    numbers: differences between models are not differences of draws)."""
    es = cfg.seed if eval_seed is None else eval_seed
    data = toy.dataset(cfg.dataset, cfg.n_eval, seed=10_000 + es)
    sw2 = SlicedW2(data)
    floor = sw2(toy.dataset(cfg.dataset, cfg.n_eval, seed=20_000 + es))
    x0 = torch.randn(cfg.n_eval, 2, generator=torch.Generator().manual_seed(30_000 + es))
    rows, shown, many = [], {}, {}
    for name, key, teacher in (("1-RF", "rf1", "rf1"), ("2-RF", "rf2", "rf2"),
                               ("2-RF + distill", "distill", "rf2"),
                               ("flow map", "flowmap", "rf2"),
                               ("MeanFlow", "meanflow", "meanflow"),
                               ("shortcut", "shortcut", "shortcut")):
        m = models[key]
        if key == "flowmap":
            run = m.sample
        elif key in ("meanflow", "shortcut"):  # k jumps; ODE err(1): vs their own k = many
            def run(x, k, m=m, mod=meanflow if key == "meanflow" else shortcut):
                return mod.sample(m, x, steps=k)
        else:
            def run(x, k, m=m):
                return sample(m, x, "linear", "euler", steps=k, progress=False)
        one = run(x0, 1)
        shown[name] = one
        many[key] = run(x0, cfg.many_steps)
        rows.append(dict(
            model=name, sw2_1=sw2(one), sw2_2=sw2(run(x0, 2)), sw2_many=sw2(many[key]),
            spread_1=_spread(one, data), modes_1=in_modes(one, cfg.dataset),
            modes_many=in_modes(many[key], cfg.dataset),
            ode_err_1=float(((one - many[teacher]) ** 2).sum(1).mean().sqrt()),
            straightness=(rectified.straightness(m, x0[:1000], 16)
                          if key in ("rf1", "rf2", "distill") else None)))
    return rows, shown, data, floor, x0


def table(rows, floor, many, data_modes=None):
    head = (f"{'model':16s} {'SW2 1 step':>10s} {'2 steps':>8s} {f'{many} steps':>9s} "
            f"{'in modes(1)':>11s} {f'({many})':>6s} {'spread(1)':>9s} {'ODE err(1)':>10s} "
            f"{'straightness':>12s}")
    lines = [head]

    def pct(v):
        return "—" if v is None else f"{100 * v:.0f}%"
    for r in rows:
        s = "—" if r["straightness"] is None else f"{r['straightness']:.4f}"
        lines.append(f"{r['model']:16s} {r['sw2_1']:10.4f} {r['sw2_2']:8.4f} "
                     f"{r['sw2_many']:9.4f} {pct(r['modes_1']):>11s} {pct(r['modes_many']):>6s} "
                     f"{r['spread_1']:9.3f} {r['ode_err_1']:10.4f} {s:>12s}")
    lines.append(f"{'data vs data':16s} {floor:10.4f} {'':8s} {'':9s} {pct(data_modes):>11s}")
    return "\n".join(lines)


def _plot(path, models, shown, data, x0, many, dataset):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14.5, 7.6))
    axes = axes.ravel()
    z = x0[:64]
    grey = data[:3000]
    for ax, key, title in ((axes[0], "rf1", "1-RF ODE paths (curved)"),
                           (axes[1], "rf2", "2-RF ODE paths (one reflow: straight)")):
        _, traj = sample(models[key], z, "linear", "euler", steps=many, progress=False,
                         return_trajectory=True)
        tr = torch.stack(traj).numpy()  # (steps + 1, n, 2)
        ax.scatter(grey[:, 0], grey[:, 1], s=1, c="0.85")
        for i in range(tr.shape[1]):
            ax.plot(tr[:, i, 0], tr[:, i, 1], lw=0.8, alpha=0.8)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=5, c="k", zorder=3, label="noise x0")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=5, c="C3", zorder=3, label="x1")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    for ax, (name, pts) in zip(axes[2:], shown.items()):
        ax.scatter(grey[:, 0], grey[:, 1], s=1, c="0.85")
        ax.scatter(pts[:3000, 0], pts[:3000, 1], s=1, c="C3")
        jump = {"flow map": "one jump g(0, 1, x0)", "MeanFlow": "one jump x0 + u(x0, 0, 1)",
                "shortcut": "one jump x0 + s(x0, 0, 1)"}
        ax.set_title(f"{name}: {jump.get(name, 'ONE Euler step')}", fontsize=10)
    for ax in axes:
        ax.set_xlim(-3.2, 3.2), ax.set_ylim(-3.2, 3.2), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"rectified flow on {dataset}: grey = data, red = samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def single_thread():
    """torch intra-op threads = 1 for the block. At these sizes (512 x 128
    matmuls) a second thread gains little, and on a shared 2-core machine it
    makes each step up to 10x slower (threads wait for a busy core); one
    thread also makes the table independent of the machine's thread count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def rectified_section(args, out):
    cfg = Config(seed=args.seed, **(QUICK if args.quick else {}))
    t0 = time.perf_counter()
    with single_thread():
        models, timing = train_all(cfg, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        rows, shown, data, floor, x0 = evaluate(models, cfg)
    print(f"\n== {cfg.dataset}: rectified flow, reflow, distillation, flow map, MeanFlow, "
          f"shortcut "
          f"(trained in {train_s:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ") ==")
    print(f"SW2: sliced W2 to {cfg.n_eval} fresh data points (lower is better) after 1, 2 and "
          f"{cfg.many_steps} Euler steps (flow map, MeanFlow, shortcut: jumps)\n"
          "in modes: fraction of samples within 3 std of a mode centre, after 1 and "
          f"{cfg.many_steps} steps\n"
          "spread(1): one-step samples' RMS distance to the data mean / the data's "
          "(0 = collapsed on the mean)\n"
          f"ODE err(1): RMS distance of the one-step sample to the ODE endpoint it stands "
          f"for (the {cfg.many_steps}-step solve of 1-RF for 1-RF, of 2-RF for distill and "
          f"the flow map; MeanFlow, shortcut: their own {cfg.many_steps} jumps)\n"
          "straightness: Liu et al.'s S of the model's own ODE, per dimension (0 = straight)")
    print(table(rows, floor, cfg.many_steps, in_modes(data, cfg.dataset)))
    path = os.path.join(out, "rectified_flow.png")
    with single_thread():
        _plot(path, models, shown, data, x0, cfg.many_steps, cfg.dataset)
    return dict(config=dataclasses.asdict(cfg), train_seconds=timing, rows=rows,
                data_floor=floor, total_seconds=time.perf_counter() - t0)
