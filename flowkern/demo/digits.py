"""`python -m flowkern demo --only digits`: real images in the main job.

scikit-learn's 8x8 handwritten digits (1,797 grey images, 0-16, shipped with
the package: no download) are split once into a training set and a held-out
set. A small convolutional U-Net v(x, t) is trained on the training set with
the fused ops (`toy.train_flow`: `interpolate` and `flow_matching_loss` with its
fused backward), then sampled with every fused sampler at several NFE.

Quality is a Fréchet distance (FID's formula) in the feature space of a small
classifier trained on the same training digits: the reader gets the
classifier's held-out accuracy (are its features meaningful?) and the
real-vs-real floor (training digits vs held-out digits, same n) beside every
number. Each method also gets a PNG grid of its samples at the largest NFE.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import toy
from .main import METHODS, sweep
HELD_OUT = 500          # held-out digits: the reference set of every distance
FEATURES = 32           # classifier feature width: the Fréchet distance's dimension
GRID = 40               # samples shown per panel (4 rows of 10)


# ---------------------------------------------------------------------------
# data


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) float32 in [-1, 1], labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:  # the demo's venv has it (Makefile DEPS)
        raise ImportError("the digits section needs scikit-learn (pip install scikit-learn)") from e
    d = sk_load()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.as_tensor(d.target, dtype=torch.int64)


def split(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random (train, held-out) index split; HELD_OUT images held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[HELD_OUT:], perm[:HELD_OUT]


# ---------------------------------------------------------------------------
# the flow model: a two-level U-Net with FiLM time conditioning


class _Block(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding as scale and shift (FiLM)."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(temb, 2 * cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, 1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class DigitUNet(nn.Module):
    """v(x, t) for (B, 1, 8, 8) images: 8x8 at `width` channels, 4x4 at 2x."""

    def __init__(self, width: int = 32, temb: int = 64, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freq", math.pi * 2.0 ** torch.arange(n_freq).float())
        self.embed = nn.Sequential(nn.Linear(1 + 2 * n_freq, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.enc = _Block(width, width, temb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid1, self.mid2 = _Block(2 * width, 2 * width, temb), _Block(2 * width, 2 * width, temb)
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.dec = _Block(2 * width, width, temb)
        self.norm, self.out = nn.GroupNorm(8, width), nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, t):
        t = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        f = t * self.freq.to(x.dtype)
        e = self.embed(torch.cat([t, torch.sin(f), torch.cos(f)], 1))
        h0 = self.enc(self.inp(x), e)
        h = self.mid2(self.mid1(self.down(h0), e), e)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.dec(torch.cat([h, h0], 1), e)
        return self.out(F.silu(self.norm(h)))


# ---------------------------------------------------------------------------
# the judge: a small classifier, its features, the Fréchet distance


class DigitClassifier(nn.Module):
    """A small CNN; `features` is its FEATURES-wide penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),       # 4x4
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),       # 2x2
            nn.Flatten(), nn.Linear(256, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, steps: int = 300, batch: int = 128, seed: int = 0) -> DigitClassifier:
    """Adam on cross-entropy with a cosine learning-rate decay: 0.980-0.984
    held-out accuracy at 300 steps (seeds 0-2; one-pixel random shifts as
    augmentation gave 0.966-0.972 at 600)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


@torch.no_grad()
def accuracy(clf, x, y) -> float:
    return float((clf(x).argmax(1) == y).double().mean())


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2) (FID's formula)
    between the Gaussians fitted to two feature sets, in float64. The matrix
    square roots come from symmetric eigendecompositions (both matrices are
    PSD), so no scipy and no complex round-off."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = torch.cov(fa.T), torch.cov(fb.T)
    w, q = torch.linalg.eigh(sa)
    sa_half = (q * w.clamp_min(0).sqrt()) @ q.T
    cross = torch.linalg.eigvalsh(sa_half @ sb @ sa_half).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + sa.trace() + sb.trace() - 2 * cross)


class Judge:
    """Features of the held-out digits, computed once; fd(x) of any sample set."""

    def __init__(self, clf, held_out):
        self.clf = clf
        with torch.no_grad():
            self.ref = clf.features(held_out)

    @torch.no_grad()
    def fd(self, x) -> float:
        return frechet_distance(self.clf.features(x.float().clamp(-1, 1)), self.ref)

    @torch.no_grad()
    def classes(self, x) -> torch.Tensor:
        """How many samples the classifier puts in each class: mode coverage."""
        return torch.bincount(self.clf(x.float().clamp(-1, 1)).argmax(1), minlength=10)


# ---------------------------------------------------------------------------
# the section


def evaluate(model, judge, n: int, nfes, seed: int):
    """Rows of (method, nfe, steps, fd, seconds, classes) and, per method and
    NFE, the first GRID samples (every method starts from the same noise)."""
    x0 = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
    rows, shown = [], {}
    for method, nfe, steps, x, dt in sweep(model, x0, nfes, seed):
        rows.append(dict(method=method, nfe=nfe, steps=steps, fd=judge.fd(x), seconds=dt,
                         classes=judge.classes(x).tolist()))
        shown.setdefault(method, {})[nfe] = x[:GRID].clone()
    return rows, shown


def table(rows, floor, noise_fd) -> str:
    lines = [f"{'method':10s} {'NFE':>4s} {'steps':>5s} {'FD':>8s} {'min class':>9s} {'time (s)':>9s}"]
    for r in rows:
        lines.append(f"{r['method']:10s} {r['nfe']:4d} {r['steps']:5d} {r['fd']:8.3f} "
                     f"{min(r['classes']):9d} {r['seconds']:9.3f}")
    lines.append(f"{'real':10s} {'':4s} {'':5s} {floor:8.3f} {'':9s}   (training vs held-out digits)")
    lines.append(f"{'noise':10s} {'':4s} {'':5s} {noise_fd:8.3f} {'':9s}   (the sampler's input)")
    return "\n".join(lines)


def _grid_png(path, panels, cols: int = 10):
    """One panel per (title, images): GRID digits in rows of `cols`, grey on black."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 1.3))
    for ax, (title, x) in zip(axes, panels):
        x = x[:GRID, 0].clamp(-1, 1).cpu()
        rows = x.shape[0] // cols
        tiles = x[:rows * cols].reshape(rows, cols, 8, 8).permute(0, 2, 1, 3).reshape(rows * 8, cols * 8)
        ax.imshow(tiles.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fd_plot(path, rows, floor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        # ei is euler's twin on the linear schedule (same update): dashed, on top
        style = dict(ls="--", marker="x", zorder=3) if method == "ei" else dict(marker="o")
        ax.plot([r["nfe"] for r in rs], [r["fd"] for r in rs], label=method, **style)
    ax.axhline(floor, color="gray", ls=":", label="real vs real")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations)"), ax.set_ylabel("Fréchet distance (classifier features)")
    ax.set_title("8x8 digits"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(train_steps: int, nfes, n: int = HELD_OUT, seed: int = 0, width: int = 32,
        classifier_steps: int = 300, progress: bool = False, out=None):
    """The whole section; returns the report dict (and writes the PNGs to `out`)."""
    images, labels = load_digits()
    tr, ho = split(images.shape[0], seed=0)
    x_tr, y_tr, x_ho, y_ho = images[tr], labels[tr], images[ho], labels[ho]

    t0 = time.perf_counter()
    clf = train_classifier(x_tr, y_tr, steps=classifier_steps, seed=seed)
    clf_s = time.perf_counter() - t0
    judge = Judge(clf, x_ho)
    n = min(n, x_ho.shape[0])
    floor = judge.fd(x_tr[torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(seed))[:n]])
    noise_fd = judge.fd(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1)))

    torch.manual_seed(seed)
    model = DigitUNet(width)
    data_g = torch.Generator().manual_seed(seed + 2)
    t0 = time.perf_counter()
    hist = toy.train_flow(model, lambda b: x_tr[torch.randint(0, x_tr.shape[0], (b,), generator=data_g)],
                          steps=train_steps, batch=128, lr=2e-3, progress=progress, seed=seed,
                          desc="train digits")
    train_s = time.perf_counter() - t0
    model.eval()
    rows, shown = evaluate(model, judge, n, nfes, seed)
    report = dict(train_seconds=train_s, train_steps=train_steps, classifier_seconds=clf_s,
                  classifier_accuracy=accuracy(clf, x_ho, y_ho), real_floor=floor, noise_fd=noise_fd,
                  final_loss=sum(hist[-50:]) / len(hist[-50:]), rows=rows)
    if out is not None:
        # per method: the same noise sampled at each NFE, held-out digits first
        for method, by_nfe in shown.items():
            _grid_png(os.path.join(out, f"digits_{method}.png"),
                      [("held-out digits", x_ho)] + [(f"{method}, NFE {k}", v) for k, v in by_nfe.items()])
        _fd_plot(os.path.join(out, "digits_fd_vs_nfe.png"), rows, floor)
    return report


def digits_section(args, out):
    r = run(args.digits_steps, args.digits_nfe, seed=args.seed, progress=not args.no_progress, out=out,
            classifier_steps=args.digits_classifier_steps)
    print(f"\n== 8x8 digits (scikit-learn, {HELD_OUT} held out): conv U-Net flow matching, "
          f"{r['train_steps']} training steps in {r['train_seconds']:.1f} s (final loss "
          f"{r['final_loss']:.4f}); judge: a CNN classifier, held-out accuracy "
          f"{r['classifier_accuracy']:.3f}, FD in its {FEATURES}-d features, n = {HELD_OUT} ==")
    print(table(r["rows"], r["real_floor"], r["noise_fd"]))
    return r
