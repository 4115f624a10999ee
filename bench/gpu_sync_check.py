"""On a CUDA GPU: flowkern's sampling loops never synchronise with the host, and a
whole sampling call can be captured in a CUDA graph (`make gpu-check`).

    python bench/gpu_sync_check.py [--backends triton,cuda,torch] [--steps 4]
    python bench/gpu_sync_check.py --cpu-dry-run      # exercise the cases on CPU

(a) sync: every flowkern.sample case (each method, churn, guidance, ...) and
    each adapter loop (the k-diffusion samplers, the diffusers schedulers'
    step(), the flow_matching ODESolver) on every backend that runs on CUDA,
    with torch.cuda.set_sync_debug_mode("error") from the end of planning
    (sample: the grid and step tables are host work by design) or from the
    second model call (the adapters' loops after their first step) to the
    return. Any device->host read (item, nonzero, .cpu(), ...) or blocking
    host->device copy then raises. The result must match an eager run.
(b) graph: per method, one full flowkern.sample call captured in a
    torch.cuda.CUDAGraph (static input buffer, warm-up on a side stream as
    PyTorch's CUDA-graph docs prescribe), replayed on a new input and compared
    with an eager run (same seed); and the same through sample(cuda_graph=True),
    flowkern's own capture (the plan outside the graph, the loop inside). The
    whole-call capture is expected to fail (listed in known(), never run on a
    GPU when written): sample()'s plan uploads its tables with blocking
    host->device copies, which a capturing stream refuses.

One line per case: PASS, FAIL (with the error and the innermost flowkern
frame), XFAIL (a known issue, listed in known(), failing as expected), XPASS
(a known issue that no longer fails: remove it from known(); counts as a
failure) or SKIP (a dtype the backend lacks).
Exit status 1 on any FAIL or XPASS. Without a CUDA device it prints
"no CUDA device; skipped" and exits 0. This file is a script, not a pytest
module (bench/pytest.ini collects bench_*.py only); the CPU proof of (a) is
tests/test_no_sync.py.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from sync_cases import D_CASES, K_CASES  # noqa: E402  (the table tests/test_no_sync.py runs)

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Known issues: known(check, backend, case, noisy) -> (a regex the error must
# match, why). A known case that fails with another error is a FAIL.
_PLAN = ("flowkern.sample plans on the host and uploads its step table, churn table and "
         "time vectors with blocking host->device copies (flowkern/sampling/plan.py Plan: "
         "self.table64.to(dev, ...), churn_table ... .to(dev), t_model ... .to(dev)), which "
         "cannot be captured; sample(cuda_graph=True) plans outside the graph")
_CAPTURE_ERR = r"captur|synchroniz|not permitted"


def known(check, backend, case, noisy):
    """(regex, why) when (check, backend, case) is a known failure, else None."""
    if check == "graph-full":
        return _CAPTURE_ERR, _PLAN
    return None


# ---------------------------------------------------------------------------
# cases (tiny: a (3, 4) state, 4 steps; the models read nothing on the host)

SAMPLE_CASES = {
    "euler": dict(method="euler"),
    "euler-x1-cosine": dict(method="euler", schedule="cosine", prediction="x1", t_end=0.95),
    "euler-eps-vp-float64": dict(method="euler", schedule="vp", prediction="eps", t_end=0.95,
                                 dtype=torch.float64),
    "euler-callback-trajectory": dict(method="euler", callback=lambda i, t, x: None,
                                      return_trajectory=True),
    "heun": dict(method="heun"),
    "heun-x1-euler-at-sigma-0": dict(method="heun", prediction="x1", t_start=0.02),
    "heun-score-vp-bfloat16": dict(method="heun", schedule="vp", prediction="score",
                                   t_end=0.95, dtype=torch.bfloat16),
    "ei-data": dict(method="ei", prediction="x1", schedule="cosine"),
    "ei-noise": dict(method="ei", prediction="eps", schedule="vp", t_end=0.95),
    "dpmpp_2m": dict(method="dpmpp_2m", prediction="x1"),
    "dpmpp_2m-velocity-vp-karras": dict(method="dpmpp_2m", schedule="vp", grid="karras",
                                        t_end=0.95),
    "em": dict(method="em", seed=3, g=0.5),
    "euler-churn": dict(method="euler", churn=2.0, seed=5),
    "heun-churn-x1-vp-logsnr": dict(method="heun", schedule="vp", prediction="x1", churn=1.0,
                                    grid="logsnr", t_end=0.95, seed=6),
    "euler-guidance": dict(method="euler", guidance=2.5),
    "heun-guidance": dict(method="heun", guidance=2.5),
    "dpmpp_2m-guidance": dict(method="dpmpp_2m", prediction="x1", guidance=2.5),
    "em-guidance-churn": dict(method="em", guidance=2.5, churn=1.0, seed=7),
}
# (b): one call per method (+ churn and guidance), capturable (no callback/trajectory)
GRAPH_CASES = ["euler", "heun", "ei-data", "ei-noise", "dpmpp_2m", "em", "euler-churn",
               "heun-guidance"]

FM_CASES = {
    "euler": dict(method="euler", step_size=0.25),
    "midpoint": dict(method="midpoint", step_size=0.25),
    "heun2": dict(method="heun2", step_size=0.25),
    "heun2-time_grid-intermediates": dict(method="heun2", step_size=None,
                                          time_grid=[0.0, 0.2, 0.5, 1.0],
                                          return_intermediates=True),
}


class Ctx:
    def __init__(self, device, steps):
        self.device, self.steps = device, steps
        g = torch.Generator().manual_seed(0)
        self.W = (torch.randn(4, 4, generator=g) * 0.3).to(device)

    def x(self, dtype=torch.float32, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(3, 4, generator=g).to(self.device, dtype)

    # models: device ops only
    def model(self, x, t):
        return torch.tanh(x @ self.W.to(x.dtype)) * (1 + t[:, None].to(x.dtype)) - 0.5 * x

    def pair(self, x, t):
        c = self.model(x, t)
        return c, 0.5 * c + 0.1 * x

    def denoiser(self, x, sigma, **extra):
        return torch.tanh(x @ self.W) / (1 + sigma[:, None]) * extra.get("scale", 1.0)

    def d_model(self, x, t):
        return torch.tanh(x @ self.W) * (1 + t[:, None].float() / 1000)

    def velocity(self, x, t, **extras):
        return torch.tanh(x @ self.W) * (1 + t) + extras.get("bias", 0.0)


# ---------------------------------------------------------------------------
# arming: set_sync_debug_mode("error") over a region


class Arm:
    """Turns torch.cuda.set_sync_debug_mode("error") on (arm) and back off
    (disarm); on CPU (--cpu-dry-run) it only records that it was armed."""

    def __init__(self, cuda):
        self.cuda, self.armed = cuda, False

    def arm(self):
        if not self.armed:
            self.armed = True
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")

    def disarm(self):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")

    def on_call(self, fn, at=2):
        calls = [0]

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                self.arm()
            return fn(*args, **kwargs)
        return wrapped


def armed_after_planning(arm):
    """Patch flowkern.sampling.plan.Plan.__init__ to arm when the plan is done;
    returns the undo function."""
    from flowkern.sampling.plan import Plan
    init = Plan.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        arm.arm()
    Plan.__init__ = patched
    return lambda: setattr(Plan, "__init__", init)


# ---------------------------------------------------------------------------
# runs


def run_sample(c, case, backend, x=None, **extra):
    import flowkern as fk
    kw = dict(SAMPLE_CASES[case])
    dtype = kw.pop("dtype", torch.float32)
    kw.setdefault("steps", c.steps)
    model = c.pair if kw.get("guidance") is not None else c.model
    x = c.x(dtype) if x is None else x
    out = fk.sample(model, x, backend=backend, progress=False, **kw, **extra)
    return out[0] if kw.get("return_trajectory") else out


def run_k(c, case, backend, model):
    from flowkern.integrations import k_diffusion as fk_k
    kw, x = dict(K_CASES[case]), c.x()
    if kw.pop("noise_sampler", False):
        g = torch.Generator(c.device).manual_seed(9)
        kw["noise_sampler"] = lambda s, sn: torch.randn(x.shape, generator=g, device=c.device)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], device=c.device)
    grid = () if "sigma_max" in kw else (sigmas,)  # sample_dpm_fast: its own grid
    return getattr(fk_k, case.split("-")[0])(model, x, *grid, extra_args={"scale": 2.0},
                                             disable=True, backend=backend, **kw)


def run_d(c, case, backend, arm=None):
    import flowkern as fk
    from flowkern.integrations import diffusers as fk_d
    sched = getattr(fk_d, case.split("-")[0])(**D_CASES[case])
    sched.set_timesteps(c.steps + 1, device=c.device)
    x = c.x()
    torch.manual_seed(0)  # the stochastic schedulers draw from torch's generator: same noise
    with fk.use_backend(backend):
        for k, t in enumerate(sched.timesteps):
            if k == 1 and arm is not None:
                arm.arm()                    # after set_timesteps and the first step
            x = sched.step(c.d_model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def run_fm(c, case, backend, model):
    from flowkern.integrations import flow_matching as fk_fm
    kw = dict(FM_CASES[case])
    if "time_grid" in kw:
        kw["time_grid"] = torch.tensor(kw["time_grid"])
    return fk_fm.ODESolver(model, backend=backend).sample(c.x(), kw.pop("step_size"),
                                                          bias=0.1, **kw)


def close(a, b):
    a, b = a.double(), b.double()
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and \
        bool(((a - b).abs() <= 1e-5 + 1e-4 * b.abs()).all())


def sync_check(c, backend, kind, case, cuda):
    """(a): an untrapped run (warm-up: Triton compiles, lazy state), then
    the same run armed; the results must agree."""
    arm = Arm(cuda)
    if kind == "sample":
        expected = run_sample(c, case, backend)
        undo = armed_after_planning(arm)
        try:
            out = run_sample(c, case, backend)
        finally:
            arm.disarm()
            undo()
    elif kind == "k_diffusion":
        expected = run_k(c, case, backend, c.denoiser)
        try:
            out = run_k(c, case, backend, arm.on_call(c.denoiser))
        finally:
            arm.disarm()
    elif kind == "diffusers":
        expected = run_d(c, case, backend)
        try:
            out = run_d(c, case, backend, arm)
        finally:
            arm.disarm()
    else:
        expected = run_fm(c, case, backend, c.velocity)
        try:
            out = run_fm(c, case, backend, arm.on_call(c.velocity))
        finally:
            arm.disarm()
    if not arm.armed:
        raise AssertionError("the check was never armed")
    if not close(out, expected):
        raise AssertionError("the armed run differs from the eager run")


def graph_full_check(c, backend, case):
    """(b): one whole flowkern.sample call captured in a CUDA graph."""
    x_static = c.x().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up on a side stream
        for _ in range(2):
            run_sample(c, case, backend, x_static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = run_sample(c, case, backend, x_static)
    x_new = c.x(seed=2)
    x_static.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()
    eager = run_sample(c, case, backend, x_new)
    if not close(out_static, eager):
        raise AssertionError(f"replay differs from eager: max |diff| "
                             f"{(out_static.double() - eager.double()).abs().max().item():.3g}")


def graph_flowkern_check(c, backend, case):
    """(b'): sample(cuda_graph=True): capture on the first call, replay on the second."""
    import flowkern as fk
    fk.clear_graph_cache()
    model = c.pair if SAMPLE_CASES[case].get("guidance") is not None else c.model
    kw = {k: v for k, v in SAMPLE_CASES[case].items() if k != "dtype"}
    kw.setdefault("steps", c.steps)
    first = fk.sample(model, c.x(), backend=backend, progress=False, cuda_graph=True, **kw)
    x_new = c.x(seed=2)
    replay = fk.sample(model, x_new, backend=backend, progress=False, cuda_graph=True, **kw)
    torch.cuda.synchronize()
    for got, x in ((first, c.x()), (replay, x_new)):
        eager = fk.sample(model, x, backend=backend, progress=False, **kw)
        if not close(got, eager):
            raise AssertionError("the graph's result differs from eager")
    fk.clear_graph_cache()


# ---------------------------------------------------------------------------


def _where(exc):
    """The innermost frame in flowkern (else the innermost) of a traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if os.sep + "flowkern" + os.sep in f.filename]
    f = (mine or frames or [None])[-1]
    return "" if f is None else f"{os.path.relpath(f.filename)}:{f.lineno} ({f.line})"


class Report:
    def __init__(self):
        self.counts = {"PASS": 0, "FAIL": 0, "XFAIL": 0, "XPASS": 0, "SKIP": 0}

    def run(self, label, fn, expect=None, skip=None):
        if skip:
            self.line("SKIP", label, skip)
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if expect is not None and re.search(expect[0], str(exc), re.I):
                self.line("XFAIL", label, f"{type(exc).__name__}: {msg[:160]} [known: "
                          f"{expect[1]}]")
            else:
                self.line("FAIL", label, f"{type(exc).__name__}: {msg[:300]} at {_where(exc)}")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
            return
        if expect is not None:
            self.line("XPASS", label, f"known issue no longer fails: {expect[1]} "
                                      f"(remove it from known())")
        else:
            self.line("PASS", label, "")

    def line(self, status, label, detail):
        self.counts[status] += 1
        # The Makefile's gpu-check summary shows the last 3 log lines matching
        # lowercase passed|failed|error (pytest's result line): keep those words
        # out of the per-case lines, so that it shows pytest's line and ours.
        detail = re.sub(r"error|failed|passed", lambda m: m.group(0).capitalize(), detail)
        print(f"{status:5} {label}" + (f": {detail}" if detail else ""), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default=None,
                    help="comma-separated (default: every backend that runs on the device)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the cases and comparisons on CPU without the CUDA checks "
                         "(to develop this script on a machine without a GPU)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("gpu_sync_check: no CUDA device; skipped")
        return 0
    if os.environ.pop("FLOWKERN_DEBUG", None) == "1":
        print("gpu_sync_check: FLOWKERN_DEBUG=1 unset (its value checks synchronise by design)")
    # On CPU nothing synchronises: the known GPU issues cannot show.
    expect = known if cuda else (lambda *args: None)
    import flowkern as fk
    device = torch.device("cuda" if cuda else "cpu")
    avail = fk.available()
    wanted = ("triton", "cuda", "torch") if cuda else ("cpu", "torch")
    backends = [b for b in (args.backends.split(",") if args.backends else wanted)
                if avail.get(b)]
    print(f"gpu_sync_check: device={torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}"
          f", torch {torch.__version__}, backends={backends}", flush=True)
    c = Ctx(device, args.steps)
    rep = Report()

    def noisy_sample(case):
        kw = SAMPLE_CASES[case]
        return kw["method"] == "em" or bool(kw.get("churn"))

    def unsupported(backend, case):
        if backend == "cuda" and SAMPLE_CASES[case].get("dtype") == torch.float64:
            return "the cuda backend has no float64 kernels (tests/conftest.py dtypes_for)"
        return None

    # (a) no sync in the loops
    for backend in backends:
        for case in SAMPLE_CASES:
            rep.run(f"sync  sample[{case}] backend={backend}",
                    functools.partial(sync_check, c, backend, "sample", case, cuda),
                    expect("sync", backend, case, noisy_sample(case)),
                    unsupported(backend, case))
        for kind, cases in (("k_diffusion", K_CASES), ("diffusers", D_CASES),
                            ("flow_matching", FM_CASES)):
            for case in cases:
                noisy = kind == "k_diffusion" and "seed" in K_CASES[case]
                rep.run(f"sync  {kind}[{case}] backend={backend}",
                        functools.partial(sync_check, c, backend, kind, case, cuda),
                        expect("sync", backend, case, noisy))
    # (b) CUDA graphs: flowkern's own capture first, the whole-call capture last
    # (a failed capture leaves nothing behind, but run it after everything else)
    if cuda:
        for check, fn in (("graph-flowkern", graph_flowkern_check),
                          ("graph-full", graph_full_check)):
            for backend in backends:
                for case in GRAPH_CASES:
                    rep.run(f"{check} sample[{case}] backend={backend}",
                            functools.partial(fn, c, backend, case),
                            expect(check, backend, case, noisy_sample(case)),
                            unsupported(backend, case))
    else:
        print("(b) CUDA-graph checks: skipped in the CPU dry run")
    n = rep.counts
    bad = n["FAIL"] + n["XPASS"]
    print(f"=== gpu_sync_check: {'PASS' if not bad else 'FAIL'}: {n['PASS']} passed, "
          f"{n['FAIL']} failed, {n['XFAIL']} xfailed (known), {n['XPASS']} xpassed, "
          f"{n['SKIP']} skipped ===", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
