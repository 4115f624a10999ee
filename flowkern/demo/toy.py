"""Built-in 2-D data, distributional distances and a small flow model: what
the demo, the PFGM and rectified-flow code and their tests share.

Everything is generated in code (no downloads).
"""
from __future__ import annotations

import copy
import math

import torch

from .._progress import progress_iter
from ..ops.training import flow_matching_loss, interpolate

# ---------------------------------------------------------------------------
# data


def checkerboard(n: int, generator=None) -> torch.Tensor:
    """4x4 checkerboard on [-2, 2]^2 (the squares with even i + j)."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2_ = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2
    x2 = x2_ + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], 1) * 1.0


def eight_gaussians(n: int, generator=None, radius: float = 2.0, std: float = 0.15) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=generator)
    ang = k.float() * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centers + std * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator=None, noise: float = 0.08) -> torch.Tensor:
    k = torch.randint(0, 2, (n,), generator=generator)
    a = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(k[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
    return 1.6 * x + noise * torch.randn(n, 2, generator=generator)


DATASETS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians, "moons": two_moons}


def dataset(name: str, n: int, seed: int = 0) -> torch.Tensor:
    try:
        fn = DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset: unknown name {name!r}; expected one of {sorted(DATASETS)}") from None
    return fn(n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# distances between samples


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point clouds:
    sqrt(mean over random directions of W2^2 of the 1-D projections), each
    1-D W2 exact by sorting."""
    if a.shape != b.shape:
        n = min(a.shape[0], b.shape[0])
        a, b = a[:n], b[:n]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    # (n_proj, n) projections sorted along contiguous rows: torch.sort over
    # dim 0 of an (n, n_proj) tensor is 4-5x slower on CPU
    pa = torch.sort(dirs.T @ a.double().cpu().T, dim=1).values
    pb = torch.sort(dirs.T @ b.double().cpu().T, dim=1).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels (small clouds only: O(n^2))."""
    a, b = a.double().cpu(), b.double().cpu()

    def k(x, y):
        d = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d / (2 * h * h)) for h in bandwidths)

    n, m = a.shape[0], b.shape[0]
    kaa = (k(a, a).sum() - k(a, a).diagonal().sum()) / (n * (n - 1))
    kbb = (k(b, b).sum() - k(b, b).diagonal().sum()) / (m * (m - 1))
    return float(kaa + kbb - 2 * k(a, b).mean())


def exact_w2(a: torch.Tensor, b: torch.Tensor):
    """Exact 2-Wasserstein distance with POT (ot.emd2) when installed, else None."""
    try:
        import ot
    except ImportError:
        return None
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    w = torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=torch.float64).numpy()
    v = torch.full((b.shape[0],), 1.0 / b.shape[0], dtype=torch.float64).numpy()
    return float(ot.emd2(w, v, ot.dist(a, b), numItermax=10 ** 7)) ** 0.5


# ---------------------------------------------------------------------------
# a small flow model and its training loop on the fused ops


class MLP(torch.nn.Module):
    """v(x, t): an MLP over [x, Fourier features of t] (t in [0, 1])."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, n_freq: int = 8,
                 extra_time: bool = False):
        super().__init__()
        self.register_buffer("freq", math.pi * 2.0 ** torch.arange(n_freq).float())
        self.extra_time = extra_time  # a second time input (the flow map's s)
        n_t = 2 if extra_time else 1
        layers, width = [], dim + n_t * (1 + 2 * n_freq)
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, dim))
        self.net = torch.nn.Sequential(*layers)

    def _embed(self, t, like):
        t = t.to(like.dtype).reshape(-1, 1).expand(like.shape[0], 1)
        f = t * self.freq.to(like.dtype)
        return torch.cat([t, torch.sin(f), torch.cos(f)], 1)

    def extend_time_input(self) -> "MLP":
        """This model with a second time input (module function
        extend_time_input): what flowkern.flowmap.FlowMap.from_pretrained calls."""
        return extend_time_input(self)

    def forward(self, x, t, s=None):
        parts = [x, self._embed(t, x)]
        if self.extra_time:
            parts.append(self._embed(t if s is None else s, x))
        return self.net(torch.cat(parts, 1))


def extend_time_input(model):
    """A copy of an :class:`MLP` ``v(x, t)`` as an MLP with a second
    time input ``d̄(x, t, s)`` (``MLP(extra_time=True)``) that computes the same
    function for every s.

    How: the extra-time MLP's first layer reads [x, emb(t), emb(s)] instead
    of [x, emb(t)]; its weights on x and emb(t), its bias and every later
    layer are copied, and its weights on emb(s) are set to zero. Then
    net(x, t, s) = model(x, t) exactly, for all s; the emb(s) weights still
    get gradients (emb(s) = (s, sin, cos of s) is not zero), so training
    learns the s-dependence starting from the pretrained function (the
    zero-initialised new input of ControlNet / adaLN-zero)."""
    if not isinstance(model, MLP) or model.extra_time:
        raise TypeError("model: expected a flowkern.demo.toy.MLP with one time input; for "
                        "another network pass FlowMap.from_pretrained(model, extend=...)")
    first = model.net[0]
    n_freq = model.freq.numel()
    dim = model.net[-1].out_features
    hidden, depth = first.out_features, sum(isinstance(m, torch.nn.Linear) for m in model.net) - 1
    new = MLP(dim=dim, hidden=hidden, depth=depth, n_freq=n_freq, extra_time=True)
    new = new.to(device=first.weight.device, dtype=first.weight.dtype)
    state = copy.deepcopy(model.state_dict())
    w = state["net.0.weight"]
    state["net.0.weight"] = torch.cat([w, torch.zeros(w.shape[0], 1 + 2 * n_freq,
                                                       dtype=w.dtype, device=w.device)], 1)
    new.load_state_dict(state)
    return new


def train_flow(model, data_fn, steps: int = 2000, batch: int = 1024, lr: float = 2e-3,
               schedule="linear", target: str = "velocity", pairs=None, progress=True,
               seed: int = 0, desc: str = "train"):
    """Flow matching with the fused ops: x_t and the target built in one pass,
    the loss with its fused backward. data_fn(n) -> (n, d) data; or `pairs` =
    (x0, x1) fixed couplings to regress (reflow). Returns the loss history."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = progress_iter(range(steps), progress, desc=desc, leave=False)
    history = []
    for i in bar:
        if pairs is None:
            x1 = data_fn(batch)
            x0 = torch.randn(x1.shape, generator=g)
        else:
            idx = torch.randint(0, pairs[0].shape[0], (batch,), generator=g)
            x0, x1 = pairs[0][idx], pairs[1][idx]
        t = torch.rand(batch, generator=g)
        with torch.no_grad():
            xt, _ = interpolate(x0, x1, t, schedule)
        loss = flow_matching_loss(model(xt, t), x0, x1, t, schedule, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if progress and hasattr(bar, "set_postfix") and i % 50 == 0:
            bar.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.4f}")
    return history

