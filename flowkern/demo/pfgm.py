"""The PFGM section of ``python -m flowkern demo``: PFGM (D = 1) and PFGM++
(D = 128) on 8 gaussians, and the PFGM paper's NFE claim at toy scale.

The claim (Xu et al. 2022): PFGM's backward ODE reaches the quality of
score-based SDE samplers with 10-20x fewer function evaluations (NFE). On
the same data a VE and a VP score model (Song et al. 2021's schedules) are
trained with flowkern's fused ops, with at least the PFGM models' budget and
PFGM++'s recipe (:func:`train_score`), and the sliced W2 to data (the PFGM
rows' n and data) is measured against NFE for

* the PFGM ODE (D = 1) and the PFGM++ ODE (D = 128): pfgm.sample, Euler in log r;
* each score model's reverse SDE, Euler-Maruyama (flowkern's "em" with the
  forward SDE's g, :func:`reverse_sde_g`: score-SDE's "score-based SDE
  sampler") with its final denoising step;
* each score model's probability-flow ODE, Euler (the PFGM sampler's
  integrator; uniform in t, which for VE is uniform in log sigma as PFGM's
  grid is in log r).

Every model call is counted (the NFE), the SDE's denoising call included.
The verdict is computed from the table (:func:`verdict`, which states the
rule): the quality bar is the best score-SDE SW2 on the grid plus twice the
metric's noise at this n (the std of the SW2 between two independent data
samples, :func:`data_level`); each sampler's NFE is the smallest grid NFE at
or under the bar; the claim's ratio is the faster SDE's NFE over the PFGM
ODE's.
"""
from __future__ import annotations

import os
import time

import torch

from .. import pfgm
from ..grids import t_from_sigma_k
from ..ops.fields import empirical_denoiser
from ..ops.training import flow_matching_loss, interpolate
from .._progress import progress_iter
from ..samplers import sample
from ..schedules import VE, VP
from . import pfgm_models, toy
from .main import W2_POINTS, _floor, _table

DATASET = "8gaussians"
CLAIM = (10.0, 20.0)  # the claimed NFE ratio, SDE / PFGM ODE
MARGIN = 2.0          # quality bar: best score-SDE SW2 + MARGIN x the SW2 noise (verdict)

# VE: sigma_max = 10 is twice the data's largest pairwise distance (~4.9:
# Song & Ermon 2020, technique 1), so N(0, sigma_max^2) is the t = 0 marginal
# to 1% in std; sigma_min = 0.01 is 1/15 of a mode's std (0.15).
# VP: score-SDE's beta in [0.1, 20] and its end time eps = 1e-3 (sigma ~0.01
# there; at t = 1 sigma = 0 and the x1 -> score conversion divides by it).
SCORE_MODELS = {"VE": (VE(0.01, 10.0), 1.0), "VP": (VP(0.1, 20.0), 1.0 - 1e-3)}
# PFGM++'s reference batch (the Gaussian kernel, like D = 128's, weighs many
# references; D = 1 needs 2048, pfgm_models.train_toy)
SCORE_REFS = 1024
DATA_SD = 1.42  # per-coordinate std of 8 gaussians (radius 2, std 0.15): sqrt(2 + 0.15^2)


# ---------------------------------------------------------------------------
# score models


class ScoreDenoiser(torch.nn.Module):
    """The denoiser E[x1 | x_t] of a schedule (alpha_t, sigma_t), which is a
    score model (score = (alpha x̂ - x_t) / sigma^2): pfgm_models.ToyDenoiser's
    network and EDM preconditioning (Karras et al. 2022, Table 1) in the
    noise level n = sigma/alpha of the state x_t/alpha,
    x̂ = c_skip x_t/alpha + c_out F([c_in x_t/alpha, log(n)/4]), so the
    comparison with PFGM++ differs in the generative process, not the network."""

    def __init__(self, schedule, dim: int = 2, hidden: int = 128, sd: float = DATA_SD):
        super().__init__()
        self.schedule, self.sd = schedule, float(sd)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim))

    def _levels(self, t, like):
        a, s = self.schedule.alpha_sigma(t.to(like.dtype).reshape(-1).expand(like.shape[0]))
        n = s.clamp(min=1e-6) / a  # VP's sigma is 0 at t = 1 exactly (never sampled there)
        return a, n, n * n + self.sd ** 2

    def forward(self, x, t):
        a, n, v = self._levels(t, x)
        xs = x / a[:, None]
        o = self.net(torch.cat([xs * torch.rsqrt(v)[:, None], torch.log(n)[:, None] / 4], 1))
        return (self.sd ** 2 / v)[:, None] * xs + (n * self.sd * torch.rsqrt(v))[:, None] * o

    def weight(self, t, like):
        """EDM's loss weight 1/c_out^2 = (n^2 + sd^2) / (n sd)^2."""
        _, n, v = self._levels(t, like)
        return v / (n * self.sd) ** 2


def train_score(kind: str, steps: int, batch: int, ref_batch: int = 1024, lr: float = 5e-3,
                seed: int = 0, progress: bool = False):
    """A VE or VP :class:`ScoreDenoiser` trained like the PFGM models: each
    step draws `ref_batch` data points, perturbs the first `batch` of them
    (flowkern.interpolate) at EDM's log-normal noise levels n = sigma/alpha
    (ln n ~ N(-1.2, 1.2^2), as pfgm.perturb for D > 1; t from
    grids.t_from_sigma_k) and regresses the ideal denoiser of the reference
    batch (flowkern.empirical_denoiser: the stable-target-field target of
    Xu et al. 2023, the diffusion twin of PFGM's empirical field mean) with
    the fused flow_matching_loss (target "x1", EDM's weight).
    Returns (model, seconds, mean loss of the last 50 steps)."""
    if kind not in SCORE_MODELS:
        raise ValueError(f"kind: expected one of {sorted(SCORE_MODELS)}, got {kind!r}")
    if not 1 <= batch <= ref_batch:
        raise ValueError(f"batch: expected 1 <= batch <= ref_batch ({ref_batch}), got {batch}")
    sched, t_end = SCORE_MODELS[kind]
    torch.manual_seed(seed)
    model = ScoreDenoiser(sched)
    g = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hist = []
    t0 = time.perf_counter()
    for _ in progress_iter(range(steps), progress, desc=f"train {kind} score", leave=False):
        ref = toy.eight_gaussians(ref_batch, generator=g)
        x0 = torch.randn(batch, 2, generator=g)
        n = torch.exp(torch.randn(batch, generator=g, dtype=torch.float64) * 1.2 - 1.2)
        t = t_from_sigma_k(sched, n).clamp(0.0, t_end).float()
        with torch.no_grad():
            xt, _ = interpolate(x0, ref[:batch], t, sched)
            target = empirical_denoiser(xt, t, ref, sched)
        loss = flow_matching_loss(model(xt, t), x0, target, t, sched, "x1",
                                  weight=model.weight(t, xt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        hist.append(loss.item())
    model.eval()
    return model, time.perf_counter() - t0, sum(hist[-50:]) / len(hist[-50:])


def reverse_sde_g(schedule):
    """g(t) of the forward SDE for x_t = alpha x1 + sigma x0 in flowkern's time
    (t = 1 data): g^2 = 2 sigma^2 d/dt log(alpha / sigma) = 2 (sigma^2
    alpha'/alpha - sigma sigma'). With it, em's dX = [u + g^2/2 score] dt +
    g dW is score-SDE's reverse SDE (VE: g^2 = d sigma^2 / d tau; VP: g^2 =
    beta)."""
    def g(t):
        a, s, da, ds = schedule(t)
        return torch.sqrt(2 * (s * s * da / a - s * ds))
    return g


class _Counted:
    """A model that counts its calls: the NFE as the sampler spent it."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model(x, t)


def sample_score(model, kind: str, method: str, nfe: int, x_init, seed: int):
    """Samples of a score model for a budget of `nfe` model calls, on the
    uniform time grid (VE: geometric in sigma) from 0 to t_end:
    "em" the reverse SDE, nfe - 1 steps and score-SDE's final denoising step
    x <- E[x1 | x_t] at t_end (one call); "euler" the probability-flow ODE,
    nfe steps; "heun" the same with nfe // 2 steps of two calls (one where
    it falls back to Euler). Returns (samples, the model calls made)."""
    sched, t_end = SCORE_MODELS[kind]
    if method == "em":
        steps = nfe - 1
    elif method == "heun":
        steps = nfe // 2
    elif method == "euler":
        steps = nfe
    else:
        raise ValueError(f"method: expected 'em', 'euler' or 'heun', got {method!r}")
    if steps < 1:
        raise ValueError(f"nfe: {nfe} model calls leave no step for method {method!r}")
    m = _Counted(model)
    x = sample(m, x_init, sched, method, steps=steps, grid="uniform", prediction="x1",
               t_end=t_end, seed=seed, g=reverse_sde_g(sched), progress=False)
    if method == "em":
        with torch.no_grad():
            x = m(x, torch.full((x.shape[0],), t_end))
    return x, m.calls


def score_prior(kind: str, n: int, generator):
    """x at t = 0: sigma_0 N(0, I) (the alpha_0 x1 part is dropped: alpha_0 = 1
    for VE, where sigma_0 = 10 dwarfs the data; 0.0066 for VP)."""
    sched, _ = SCORE_MODELS[kind]
    _, s = sched.alpha_sigma(torch.zeros(()))
    return float(s) * torch.randn(n, 2, generator=generator)


# ---------------------------------------------------------------------------
# the verdict


def data_level(name: str, n: int, pairs: int = 16):
    """(mean, std) of the sliced W2 between two independent n-point data
    samples over `pairs` pairs: what a perfect sampler scores, and the
    metric's noise. On 8 gaussians at n = 5000 about 0.076 +- 0.022 (64
    pairs; 0.03 to 0.13): the two samples' mode counts differ by ~sqrt(n/8)
    points, which the transport moves between modes; a sampler's SW2 is as
    noisy."""
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 2:
        raise ValueError(f"pairs: expected an int >= 2 (for a spread), got {pairs!r}")
    d = torch.tensor([toy.sliced_wasserstein(toy.dataset(name, n, seed=30_000 + 2 * k),
                                             toy.dataset(name, n, seed=30_001 + 2 * k))
                      for k in range(pairs)], dtype=torch.float64)
    return float(d.mean()), float(d.std())


def reach(rows, sampler: str, bar: float):
    """(lo, hi): hi the smallest NFE of `sampler` in `rows` whose SW2 is at
    or under `bar`, lo the next smaller NFE measured (0 if none): the NFE it
    needs lies in (lo, hi]. None if no NFE reaches the bar."""
    pts = sorted((r["nfe"], r["sw2"]) for r in rows if r["sampler"] == sampler)
    if not pts:
        raise ValueError(f"sampler: no rows for {sampler!r}")
    for i, (nfe, sw2) in enumerate(pts):
        if sw2 <= bar:
            return (pts[i - 1][0] if i else 0), nfe
    return None


def verdict(rows, sde, claimants, noise: float, margin: float = MARGIN, claim=CLAIM):
    """The claim's test on measured rows (dicts with sampler, nfe, sw2).

    bar = the best SW2 of any `sde` sampler + margin x noise: "the quality of
    the score-based SDE samplers", up to what SW2 can resolve at this n
    (`noise`: the std of the data-vs-data SW2, :func:`data_level`; at n =
    5000 30% of the value, so a multiplicative bar such as 1.25x the best
    would sit inside the noise: two independent data samples exceed 1.25x
    their mean SW2 one time in six). Each sampler's NFE is the smallest grid
    NFE at or under the bar (:func:`reach`); the SDE's NFE is the faster
    `sde` sampler's (one always reaches: the bar is above its best). For
    each other sampler, ratio = SDE NFE / its NFE, and the bracket the true
    ratio lies in given the grid: SDE NFE in (s_lo, s_hi], its NFE in
    (p_lo, p_hi], so the ratio is in (s_lo / p_hi, s_hi / p_lo). The claim
    holds if some claimant's ratio is >= claim[0].
    """
    if not margin >= 0:
        raise ValueError(f"margin: expected a float >= 0, got {margin!r}")
    if not noise >= 0:
        raise ValueError(f"noise: expected the std of the data-vs-data SW2 (>= 0), "
                         f"got {noise!r}")
    sde_rows = [r for r in rows if r["sampler"] in sde]
    if not sde_rows:
        raise ValueError(f"sde: no rows for any of {list(sde)}")
    missing = [c for c in claimants if not any(r["sampler"] == c for r in rows)]
    if missing:
        raise ValueError(f"claimants: no rows for {missing}")
    best = min(r["sw2"] for r in sde_rows)
    bar = best + margin * noise
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    need = {s: reach(rows, s, bar) for s in samplers}
    s_lo, s_hi = min((need[s] for s in sde if need.get(s)), key=lambda b: b[1])
    ratios = {}
    for s in samplers:
        if s in sde or need[s] is None:
            ratios[s] = None
            continue
        p_lo, p_hi = need[s]
        ratios[s] = dict(ratio=s_hi / p_hi, lo=s_lo / p_hi, hi=s_hi / p_lo if p_lo else None)  # None: no upper bound (JSON has no inf)
    held = [c for c in claimants if ratios[c] and ratios[c]["ratio"] >= claim[0]]
    out = dict(rule=f"bar = best score-SDE SW2 on the grid + {margin:g} x std of the "
                    f"data-vs-data SW2; a sampler's NFE = the smallest grid NFE with "
                    f"SW2 <= bar; ratio = the faster SDE's NFE / the sampler's NFE",
               best_sde_sw2=best, noise=noise, margin=margin, bar=bar,
               need={s: None if b is None else b[1] for s, b in need.items()},
               sde_nfe=s_hi, ratios=ratios, claim=list(claim), holds=bool(held))
    out["text"] = _verdict_text(out, claimants, held)
    return out


def _x(r):
    return "open" if r is None else f"{r:.2g}x"


def _verdict_text(v, claimants, held):
    parts = []
    for c in claimants:
        r = v["ratios"][c]
        if r is None:
            parts.append(f"{c} never reaches SW2 <= {v['bar']:.4f}")
        else:
            parts.append(f"{c}: {v['need'][c]} NFE vs the SDE's {v['sde_nfe']}, "
                         f"{_x(r['ratio'])} (grid bracket {_x(r['lo'])} to {_x(r['hi'])})")
    ratios = [v["ratios"][c]["ratio"] for c in claimants if v["ratios"][c]]
    head = "claim holds here" if held else "claim does not hold here"
    ratio = f"ratio {_x(max(ratios))}" if ratios else "no PFGM ODE reaches the SDE's quality"
    lo, hi = v["claim"]
    return f"{head} ({ratio}, claim {lo:g}-{hi:g}x): " + "; ".join(parts)


# ---------------------------------------------------------------------------
# the section


def _pfgm_rows(args, g, data):
    """Trains PFGM (D = 1) and PFGM++ (D = 128) and samples them at
    args.pfgm_nfe: rows (method, nfe, steps, sw2, w2, seconds), training times."""
    rows, train_s = [], {}
    for D, steps, label in ((1, args.pfgm1_steps, "pfgm D=1"),
                            (128, args.pfgm_steps, "pfgm++ D=128")):
        t0 = time.perf_counter()
        model = pfgm_models.train_toy(toy.eight_gaussians, D=D, steps=steps, generator=g,
                               progress=not args.no_progress)
        train_s[label] = time.perf_counter() - t0
        r_max, r_min, cap = pfgm_models.toy_sampling_range(D)
        # one prior draw for all NFE (as the flow-matching rows): along NFE the
        # rows then differ by the discretisation, not by SW2's sampling noise
        x = pfgm.prior(args.samples, (2,), r_max=r_max, D=D, generator=g, max_norm=cap)
        for nfe in args.pfgm_nfe:
            m = _Counted(model)
            t1 = time.perf_counter()
            with torch.no_grad():
                y = pfgm.sample(m, x, r_max, r_min, steps=nfe, prediction="denoiser")
            secs = time.perf_counter() - t1  # sampling only (SW2 at n = 5000 takes ~0.3 s)
            rows.append(dict(method=label, nfe=m.calls, steps=nfe,
                             sw2=toy.sliced_wasserstein(y, data),
                             w2=toy.exact_w2(y[:W2_POINTS], data[:W2_POINTS]), seconds=secs))
    return rows, train_s


# (label, score model, method, kind): the score-model samplers of the comparison
SCORE_SAMPLERS = [("VE SDE (EM)", "VE", "em", "sde"), ("VE ODE (euler)", "VE", "euler", "ode"),
                  ("VP SDE (EM)", "VP", "em", "sde"), ("VP ODE (euler)", "VP", "euler", "ode")]
PFGM_LABELS = {"pfgm D=1": "PFGM ODE D=1", "pfgm++ D=128": "PFGM++ ODE D=128"}


def score_rows(models, sde_nfe, ode_nfe, data, seed):
    """Rows (sampler, kind, nfe, sw2, seconds) of every score sampler: the SDEs
    at sde_nfe, the ODEs at ode_nfe; the same prior draw for every sampler
    and NFE of a score model, the same SDE noise seed."""
    rows = []
    for label, kind, method, family in SCORE_SAMPLERS:
        x0 = score_prior(kind, data.shape[0], torch.Generator().manual_seed(seed + 1))
        for nfe in (sde_nfe if family == "sde" else ode_nfe):
            t0 = time.perf_counter()
            with torch.no_grad():
                y, calls = sample_score(models[kind], kind, method, nfe, x0, seed)
            secs = time.perf_counter() - t0
            rows.append(dict(sampler=label, kind=family, nfe=calls,
                             sw2=toy.sliced_wasserstein(y, data), seconds=secs))
    return rows


def _nfe_table(rows, floor, level):
    w = max(len(r["sampler"]) for r in rows)
    lines = [f"{'sampler':{w}s} {'NFE':>5s} {'SW2':>8s} {'time (s)':>9s}"]
    for r in rows:
        lines.append(f"{r['sampler']:{w}s} {r['nfe']:5d} {r['sw2']:8.4f} {r['seconds']:9.3f}")
    lines.append(f"{'data':{w}s} {'':>5s} {floor:8.4f}   (two independent data samples; "
                 f"over 16 pairs {level[0]:.4f} +- {level[1]:.4f})")
    return "\n".join(lines)


def _nfe_plot(path, rows, level, bar):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"pfgm": "o-", "sde": "s--", "ode": "^:"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == s), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rs], [r["sw2"] for r in rs], style[rs[0]["kind"]], ms=4,
                label=s)
    ax.axhline(level[0], color="gray", ls="--", lw=1, label="data vs data (mean, +-1 std)")
    ax.axhspan(level[0] - level[1], level[0] + level[1], color="gray", alpha=0.15, lw=0)
    ax.axhline(bar, color="k", ls=":", lw=1, label="quality bar (best SDE + noise)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations)"), ax.set_ylabel("sliced W2 to data")
    ax.set_title(f"{DATASET}: PFGM ODE vs score SDE and PF ODE"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pfgm_section(args, out):
    """PFGM (D = 1) and PFGM++ (D = 128) on 8 gaussians: the training target
    is the empirical Poisson field mean over a reference batch (the fused,
    tiled poisson_field), the sampler the backward ODE in log r with fused
    Euler steps, over pfgm_models.toy_sampling_range(D). Then the NFE comparison
    (:func:`nfe_comparison`)."""
    g = torch.Generator().manual_seed(args.seed)
    data = toy.dataset(DATASET, args.samples, seed=10_000)
    floor = _floor(DATASET, args.samples)
    rows, train_s = _pfgm_rows(args, g, data)
    print(f"\n== {DATASET}: PFGM (D=1), {args.pfgm1_steps} training steps in "
          f"{train_s['pfgm D=1']:.1f} s; PFGM++ (D=128), {args.pfgm_steps} training steps in "
          f"{train_s['pfgm++ D=128']:.1f} s ==")
    print(_table(rows, floor))
    report = dict(train_seconds=train_s, rows=rows, data_floor=floor)
    report["nfe_comparison"] = nfe_comparison(args, out, rows, data, floor)
    return report


def nfe_comparison(args, out, pfgm_rows, data, floor):
    """The PFGM rows against a VE and a VP score model trained here
    (args.score_steps steps of args.score_batch each, SCORE_REFS references):
    their SDEs at args.sde_nfe, their PF ODEs at args.pfgm_nfe (the PFGM
    rows' NFE). Prints the table and the verdict, writes
    pfgm_quality_vs_nfe.png; returns the numbers."""
    t0 = time.perf_counter()
    models, training = {}, {}
    for i, kind in enumerate(SCORE_MODELS):
        model, secs, loss = train_score(kind, args.score_steps, args.score_batch,
                                        ref_batch=SCORE_REFS, seed=args.seed + 100 + i,
                                        progress=not args.no_progress)
        models[kind] = model
        training[kind] = dict(steps=args.score_steps, batch=args.score_batch,
                              references=SCORE_REFS, seconds=secs, final_loss=loss)
    rows = [dict(sampler=PFGM_LABELS[r["method"]], kind="pfgm", nfe=r["nfe"], sw2=r["sw2"],
                 seconds=r["seconds"]) for r in pfgm_rows]
    rows += score_rows(models, args.sde_nfe, args.pfgm_nfe, data, args.seed)
    level = data_level(DATASET, data.shape[0])
    v = verdict(rows, sde=[s for s, _, _, f in SCORE_SAMPLERS if f == "sde"],
                claimants=list(PFGM_LABELS.values()), noise=level[1])
    budget = (f"PFGM D=1 {args.pfgm1_steps} steps x 256 (2048 references), PFGM++ "
              f"{args.pfgm_steps} x 256 (1024); VE and VP score models {args.score_steps} x "
              f"{args.score_batch} ({SCORE_REFS}) each, in "
              + " and ".join(f"{t['seconds']:.1f} s" for t in training.values()))
    seconds = time.perf_counter() - t0
    print(f"\n== {DATASET}: PFGM ODE vs score SDE and PF ODE, quality vs NFE "
          f"({seconds:.1f} s) ==\ntraining (steps x batch (references)): {budget}")
    print(_nfe_table(rows, floor[0], level))
    print(f"rule: {v['rule']}: bar = {v['best_sde_sw2']:.4f} + {v['margin']:g} x "
          f"{v['noise']:.4f} = {v['bar']:.4f}")
    print("NFE to reach the bar: " + ", ".join(
        f"{s} {n if n is not None else '-'}" for s, n in v["need"].items()))
    print("verdict: " + v["text"])
    others = [s for s, r in v["ratios"].items() if r and s not in PFGM_LABELS.values()]
    if others:  # where a speed-up over the SDE comes from: the ODE itself
        print("the score models' own PF ODEs vs the SDE: " + "; ".join(
            f"{s} {_x(v['ratios'][s]['ratio'])} (bracket {_x(v['ratios'][s]['lo'])} to "
            f"{_x(v['ratios'][s]['hi'])})" for s in others))
    _nfe_plot(os.path.join(out, "pfgm_quality_vs_nfe.png"), rows, level, v["bar"])
    return dict(rows=rows, data_floor_sw2=floor[0], data_level=list(level),
                score_training=training, budgets=budget, verdict=v, seconds=seconds)
