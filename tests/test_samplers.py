"""flowkern.samplers.sample and flowkern.grids: every method x prediction on
every backend against a plain-PyTorch loop over the reference steps; the
loop's buffer reuse (no full-size allocation per step, no host sync);
guidance, churn, Euler-Maruyama noise; bad inputs; NaN reports; progress,
callback and trajectory."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowkern
from flowkern import _validate
from flowkern import grids as G
from flowkern.reference import steps as R
from flowkern.reference.gmm import GaussianMixture
from flowkern.samplers import METHODS, sample
from flowkern.schedules import coefficients, get_schedule

from conftest import DEVICE, backends_under_test

BACKENDS = backends_under_test()
PREDS = ("velocity", "x1", "eps", "score")
GMM = GaussianMixture([[-1.0, 0.5, 0.0, 1.0, -0.5, 0.2], [1.0, -0.5, 0.5, 0.0, 0.5, -1.0]],
                      [0.3, 0.6], [0.4, 0.6])
# linear schedule from t = 0.02 (eps/score need alpha > 0) to t = 1 (sigma = 0:
# Heun falls back to Euler for x1/score there).
SCHED, T0, T1, STEPS = "linear", 0.02, 1.0, 5


def _x(shape=(3, 6), dtype=torch.float64, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _pair(model):
    """A (cond, uncond) model for classifier-free guidance."""
    def m(x, t):
        c = model(x, t)
        return c, 0.5 * c + 0.1 * x
    return m


# ---------------------------------------------------------------------------
# the plain-PyTorch loop, from flowkern.reference.steps


def reference_sample(model, x, method, prediction, grid, schedule=SCHED, guidance=None, g=1.0,
                     seed=0, churn_t_hat=None):
    """float64 sampling loop written directly from the reference steps.
    churn_t_hat: per step the churn time (or None) — noise offsets advance by
    x.numel() per draw, churn first, in loop order."""
    x = x.double()
    n, B, numel = len(grid) - 1, x.shape[0], x.numel()

    def coef(t):
        return coefficients(schedule, torch.tensor([t], dtype=torch.float64), B, torch.float64)

    def call(x, t):
        out = model(x, torch.full((B,), t, dtype=torch.float64, device=x.device))
        return out if guidance is not None else (out, None)

    def defined_at(c, src):     # the conversion src -> velocity
        a, s = c[0, 0].item(), c[0, 1].item()
        return not ((src in ("x1", "score") and s == 0) or (src in ("eps", "score") and a == 0))

    offset, d_prev, t_prev = 0, None, None
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        if churn_t_hat is not None and churn_t_hat[i] is not None:
            xi = R.philox_normal(seed, offset, x.shape, torch.float64, x.device)
            x = R.churn(x, coef(t), coef(churn_t_hat[i]), xi)
            offset += numel
            t = churn_t_hat[i]
        ct, cs = coef(t), coef(s)
        h = torch.full((B,), s - t, dtype=torch.float64, device=x.device)
        p, pu = call(x, t)
        if method == "euler" or (method == "heun" and not defined_at(cs, prediction)):
            x = R.euler_step(x, p, ct, h, prediction, pu, guidance)
        elif method == "heun":
            xe = R.euler_step(x, p, ct, h, prediction, pu, guidance)
            pe, peu = call(xe, s)
            x = R.heun_step(x, p, xe, pe, ct, cs, h, prediction, pu, peu, guidance)
        elif method == "ei":
            form = "data" if prediction in ("x1", "velocity") else "noise"
            x = R.ei_step(x, p, ct, cs, prediction, form, pu, guidance)
        elif method == "dpmpp_2m":
            cp = coef(t_prev) if t_prev is not None else None
            x, d_prev = R.dpmpp_2m_step(x, p, ct, cs, prediction, d_prev, cp, pu, guidance)
            t_prev = t
        else:
            xi = R.philox_normal(seed, offset, x.shape, torch.float64, x.device)
            gg = torch.full((B,), g, dtype=torch.float64, device=x.device)
            x = R.em_step(x, p, ct, h, gg, xi, prediction, pu, guidance)
            offset += numel
    return x


def _grid():
    return G.uniform(STEPS, T0, T1).tolist()


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------
# agreement with the reference loop


# Under the Triton interpreter (no GPU) the full matrix would take minutes:
# triton runs the subset below there, and the full matrix on a GPU.
LOOP_BACKENDS = [b for b in BACKENDS if b != "triton" or DEVICE == "cuda"]


@pytest.mark.parametrize("backend", LOOP_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prediction", PREDS)
def test_matches_reference_loop(backend, method, prediction):
    dtype = torch.float64 if backend in ("torch", "cpu") else torch.float32   # cuda: no fp64
    x = _x(dtype=dtype)
    model = GMM.model(prediction, SCHED)
    out = sample(model, x, SCHED, method, STEPS, prediction=prediction, t_start=T0, t_end=T1,
                 backend=backend, progress=False, seed=7)
    ref = reference_sample(model, x, method, prediction, _grid(), seed=7)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    # the Philox normals are float32 numbers (Box-Muller in float32) on every backend
    tol = (1e-6 if method == "em" else 1e-10) if dtype == torch.float64 else 1e-4
    assert _rel(out, ref) < tol, f"{method}/{prediction} on {backend}"


TRITON_CASES = [("euler", "velocity"), ("heun", "x1"), ("ei", "eps"), ("dpmpp_2m", "x1"),
                ("em", "score")]


@pytest.mark.skipif("triton" not in BACKENDS or DEVICE == "cuda",
                    reason="the interpreter subset; on a GPU the full matrix runs triton")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")   # log(sigma = 0), numpy
@pytest.mark.parametrize("method,prediction", TRITON_CASES)
def test_matches_reference_loop_triton(method, prediction):
    x = _x((2, 6), torch.float32)
    model = GMM.model(prediction, SCHED)
    out = sample(model, x, SCHED, method, 3, prediction=prediction, t_start=T0, t_end=T1,
                 backend="triton", progress=False, seed=7)
    ref = reference_sample(model, x, method, prediction, G.uniform(3, T0, T1).tolist(), seed=7)
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["heun", "dpmpp_2m", "em"])
def test_low_precision_states(dtype, method):
    x = _x((4, 6), dtype)
    pred = "velocity" if method != "dpmpp_2m" else "x1"
    model = GMM.model(pred, SCHED)
    out = sample(model, x, SCHED, method, STEPS, prediction=pred, t_start=T0, progress=False,
                 seed=3)
    ref = reference_sample(model, x, method, pred, _grid(), seed=3)
    assert out.dtype == dtype
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("method", METHODS)
def test_guidance(method):
    x = _x()
    pred = "x1" if method in ("ei", "dpmpp_2m") else "velocity"
    model = _pair(GMM.model(pred, SCHED))
    out = sample(model, x, SCHED, method, STEPS, prediction=pred, guidance=2.5, t_start=T0,
                 progress=False, seed=1)
    ref = reference_sample(model, x, method, pred, _grid(), guidance=2.5, seed=1)
    assert _rel(out, ref) < (1e-6 if method == "em" else 1e-10)


@pytest.mark.parametrize("method", ["heun", "em", "dpmpp_2m"])
def test_churn(method):
    x = _x()
    pred = "x1" if method == "dpmpp_2m" else "velocity"
    model = GMM.model(pred, SCHED)
    churn, grid = 2.0, _grid()
    out = sample(model, x, SCHED, method, STEPS, prediction=pred, churn=churn, t_start=T0,
                 progress=False, seed=11)
    gamma = min(churn / STEPS, math.sqrt(2) - 1)
    t_hat = []
    for t in grid[:-1]:
        sk = G.sigma_k(SCHED, t).item()
        t_hat.append(None if not (0 < sk < math.inf) else
                     1.0 / (1.0 + sk * (1 + gamma)))      # linear: t = 1 / (1 + sigma_k)
    assert t_hat[0] is not None and t_hat[0] < grid[0]
    ref = reference_sample(model, x, method, pred, grid, seed=11, churn_t_hat=t_hat)
    assert _rel(out, ref) < 1e-6              # float32 Philox normals
    plain = sample(model, x, SCHED, method, STEPS, prediction=pred, t_start=T0, progress=False,
                   seed=11)
    assert _rel(out, plain) > 1e-3            # the churn did something


def test_dpmpp_from_pure_noise():
    """t = 0 on the linear schedule: alpha = 0 (lambda = -inf); the first step
    is the data-form DDIM step (the limit of the first-order DPM-Solver++)."""
    x = _x()
    for pred in ("x1", "velocity"):
        model = GMM.model(pred, SCHED)
        for grid in ("uniform", "logsnr"):
            out = sample(model, x, SCHED, "dpmpp_2m", 6, grid, pred, progress=False)
            ref = reference_sample(model, x, "dpmpp_2m", pred, G.make_grid(grid, SCHED, 6).tolist())
            assert torch.isfinite(out).all() and _rel(out, ref) < 1e-10


def test_heun_falls_back_to_euler_at_sigma_zero():
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return GMM.model("x1", SCHED)(x, t)

    sample(model, _x(), SCHED, "heun", 4, prediction="x1", t_start=T0, progress=False)
    assert len(calls) == 2 * 4 - 1 and 1.0 not in calls
    calls.clear()
    sample(model, _x(), SCHED, "heun", 4, prediction="x1", t_start=T0, t_end=0.9, progress=False)
    assert len(calls) == 2 * 4


def test_em_with_g_zero_is_euler():
    x, model = _x(), GMM.model("velocity", SCHED)
    a = sample(model, x, SCHED, "em", STEPS, g=0.0, t_start=T0, progress=False, seed=5)
    b = sample(model, x, SCHED, "euler", STEPS, t_start=T0, progress=False)
    assert _rel(a, b) < 1e-12


def test_em_seed_and_g_forms():
    x, model = _x(), GMM.model("velocity", SCHED)
    kw = dict(schedule=SCHED, method="em", steps=STEPS, t_start=T0, progress=False)
    a = sample(model, x, seed=5, **kw)
    assert torch.equal(a, sample(model, x, seed=5, **kw))
    assert not torch.equal(a, sample(model, x, seed=6, **kw))
    torch.manual_seed(0)
    b = sample(model, x, seed=None, **kw)
    torch.manual_seed(0)
    assert torch.equal(b, sample(model, x, seed=None, **kw))
    c = sample(model, x, seed=5, g=torch.full((STEPS,), 1.0), **kw)
    d = sample(model, x, seed=5, g=lambda t: torch.ones_like(t), **kw)
    assert torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(method="em"), dict(method="heun", churn=3.0)],
                         ids=["em", "heun-churn"])
def test_per_sample_seeds_are_batch_invariant(backend, kw):
    """per_sample_seeds: a sample's result is the same alone (seeded with its
    seed), in another batch and at another position; equal seeds give equal
    noise; seeds and per_sample_seeds together and bad seeds raise."""
    x = _x((5, 6))
    model = GMM.model("velocity", SCHED)
    kw = dict(schedule=SCHED, steps=6, t_start=T0, progress=False, backend=backend, **kw)
    seeds = [3, 2 ** 62 + 1, 0, 3, 17]
    full = sample(model, x, per_sample_seeds=seeds, **kw)
    assert torch.equal(full, sample(model, x, per_sample_seeds=torch.tensor(seeds), **kw))
    perm = [4, 1, 3]
    part = sample(model, x[perm], per_sample_seeds=[seeds[i] for i in perm], **kw)
    assert torch.equal(part, full[perm])
    for b in (1, 2):
        assert torch.equal(sample(model, x[b:b + 1], seed=seeds[b], **kw)[0], full[b])
    same_x = x[[0, 0]]
    twin = sample(model, same_x, per_sample_seeds=[3, 3], **kw)
    assert torch.equal(twin[0], twin[1])
    assert not torch.equal(twin[0], sample(model, same_x, per_sample_seeds=[3, 4], **kw)[1])
    for bad, err, msg in ((dict(seed=1, per_sample_seeds=seeds), ValueError, "not both"),
                          (dict(per_sample_seeds=seeds[:4]), ValueError, r"shape \(5,\)"),
                          (dict(per_sample_seeds=[1, 2, 3, -1, 5]), ValueError,
                           r"got -1 at sample 3"),
                          (dict(per_sample_seeds=[1, 2, 3, 4.0, 5]), ValueError,
                           r"got 4.0 at sample 3"),
                          (dict(per_sample_seeds=7), TypeError, "list of ints"),
                          (dict(per_sample_seeds=torch.ones(5)), TypeError, "int64")):
        with pytest.raises(err, match="per_sample_seeds: .*" + msg):
            sample(model, x, **bad, **kw)


def test_x_init_untouched_and_shapes():
    x = _x((2, 3, 2))
    keep = x.clone()
    for method in METHODS:
        out = sample(GMM.model("x1", SCHED), x, SCHED, method, 3, prediction="x1", t_start=T0,
                     progress=False, seed=0)
        assert out.shape == x.shape
    assert torch.equal(x, keep)


# ---------------------------------------------------------------------------
# the loop: buffers, allocations, host syncs


def _model_with_out(x):
    buf = torch.empty_like(x)

    def model(x, t):          # writes into its own buffer: allocates nothing per call
        torch.mul(x, 0.5, out=buf)
        return buf
    return model


def _full_size_allocations(method, steps, backend):
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(4, 4096)
    model = _model_with_out(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sample(model, x, "vp", method, steps, prediction="velocity", backend=backend,
               progress=False, seed=0, t_end=0.99)
    return sum(1 for e in prof.events() if e.cpu_memory_usage >= x.numel() * x.element_size())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("method", METHODS)
def test_no_full_size_allocation_per_step(method):
    """The profiler's allocation events of at least a full state: the same
    number for 3 and 9 steps (only the warm-up buffers)."""
    few, many = (_full_size_allocations(method, n, "cpu") for n in (3, 9))
    assert few == many, f"{method}: {few} full-size allocations for 3 steps, {many} for 9"
    # the state buffer, plus Heun's predictor or DPM-Solver's d (each is an
    # empty_like event and the empty event inside it)
    assert many <= (4 if method in ("heun", "dpmpp_2m") else 2)


def test_allocation_counter_sees_per_step_allocations():
    """Negative control: the reference backend allocates per step, and the
    measurement above sees it."""
    few, many = (_full_size_allocations("euler", n, "torch") for n in (3, 9))
    assert many > few


@pytest.mark.parametrize("method", METHODS)
def test_one_state_buffer_updated_in_place(method):
    """Every step writes the same buffer (the steps update it in place), which
    is the result; x_init is only read."""
    ptrs = set()
    x = _x()
    x0 = x.clone()
    out = sample(GMM.model("velocity", SCHED), x, SCHED, method, 6, t_start=T0, progress=False,
                 seed=0, callback=lambda i, t, y: ptrs.add(y.data_ptr()))
    assert ptrs == {out.data_ptr()} and x.data_ptr() not in ptrs
    assert torch.equal(x, x0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_model_output_aliasing_the_state(method, backend):
    """A model that returns its input (or a view of it) is read by the
    in-place step before the step overwrites it: same result as a model that
    returns a copy."""
    kw = dict(schedule="linear", method=method, steps=5, progress=False, seed=3, t_end=0.9,
              backend=backend)
    x = _x()
    same = sample(lambda y, t: y, x, **kw)
    view = sample(lambda y, t: y.view(y.shape), x, **kw)
    copy = sample(lambda y, t: y.clone(), x, **kw)
    assert torch.equal(same, copy) and torch.equal(view, copy)


class _SyncSpy(TorchDispatchMode):
    SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNC:
            self.log.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
def test_loop_never_syncs_without_value_checks(method, monkeypatch):
    """With value checks off (the GPU fast path), no op in the loop reads a
    tensor value on the host: the log between the first and last model call
    holds no _local_scalar_dense/item/is_nonzero."""
    monkeypatch.setattr(_validate, "values_checked", lambda x: False)
    spy = _SyncSpy()
    inner = GMM.model("x1", "vp")
    marks = []

    def model(x, t):
        marks.append(len(spy.log))
        with torch.utils._python_dispatch._disable_current_modes():
            return inner(x, t)

    with spy:
        sample(model, _x(device="cpu"), "vp", method, 5, prediction="x1", t_end=0.99,
               churn=1.0, progress=False, seed=0,
               callback=lambda i, t, x: marks.append(len(spy.log)))
    assert marks[0] == marks[-1], spy.log[marks[0]:]


# ---------------------------------------------------------------------------
# errors, NaN reports


def _m(x, t):
    return torch.zeros_like(x)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(method="rk4"), ValueError, "method: unknown method 'rk4'"),
    (dict(prediction="v"), ValueError, "prediction: unknown prediction type 'v'"),
    (dict(grid="cosine"), ValueError, "grid: unknown grid 'cosine'"),
    (dict(steps=0), ValueError, "steps: expected an int >= 1"),
    (dict(steps=2.5), TypeError, "steps: expected an int"),
    (dict(grid=torch.tensor([0.0, 0.5, 0.4, 1.0]), steps=None), ValueError,
     r"strictly increasing .* t\[1\] = 0.5 >= t\[2\] = 0.4"),
    (dict(grid=torch.tensor([0.0, 0.5, 1.2]), steps=None), ValueError,
     r"grid: times must lie in \[0, 1\]"),
    (dict(grid=torch.tensor([[0.0, 1.0]]), steps=None), ValueError, "grid: expected a 1-D"),
    (dict(grid=[0.3]), ValueError, "grid: expected a 1-D floating tensor of at least 2"),
    (dict(grid=torch.tensor([0.0, 0.5, 1.0]), steps=5), ValueError, "steps: 5 disagrees"),
    (dict(t_start=0.5, t_end=0.5), ValueError, "t_start, t_end"),
    (dict(t_end=1.5), ValueError, r"t_end: expected a float in \[0, 1\]"),
    (dict(churn=-1.0), ValueError, "churn: expected a float >= 0"),
    (dict(seed=-3, method="em"), ValueError, "seed: expected None or an int"),
    (dict(method="em", g="big"), TypeError, "g: expected a float"),
    (dict(method="em", g=torch.ones(3)), ValueError, "g: expected 4 finite values"),
    (dict(guidance="3"), TypeError, "guidance: expected a float"),
    (dict(prediction="eps"), ValueError, "divides by alpha_t, which is 0 there"),
    (dict(method="ei", prediction="score"), ValueError, "undefined at t=0"),
    (dict(backend="nope"), ValueError, "backend: unknown backend"),
    (dict(cuda_graph=True), ValueError, "cuda_graph: CUDA graphs need CUDA tensors"),
    (dict(cuda_graph=True, method="em"), ValueError, "seed: cuda_graph=True with noise"),
    (dict(cuda_graph=True, callback=print), ValueError, "cuda_graph: callback"),
])
def test_bad_arguments(kwargs, exc, pattern):
    kw = dict(steps=4, progress=False)
    kw.update(kwargs)
    with pytest.raises(exc, match=pattern):
        sample(_m, torch.zeros(2, 3), **kw)


@pytest.mark.parametrize("model,exc,pattern", [
    (lambda x, t: torch.zeros(2, 4), ValueError, r"model: the prediction must match the state"),
    (lambda x, t: torch.zeros_like(x, dtype=torch.float64), ValueError, "float64"),
    (lambda x, t: x.numpy(), TypeError, "model: expected a tensor prediction"),
    (lambda x, t: (x, x), ValueError, "model: returned a tuple; .*guidance"),
])
def test_bad_model_outputs(model, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sample(model, torch.zeros(2, 3), steps=3, progress=False)


def test_guidance_needs_a_pair():
    with pytest.raises(ValueError, match=r"guidance: with guidance=2.0 the model must return a "
                                         r"pair \(cond, uncond\)"):
        sample(_m, torch.zeros(2, 3), steps=3, guidance=2.0, progress=False)
    with pytest.raises(ValueError, match="model \\(uncond\\): the prediction must match"):
        sample(lambda x, t: (x, x[:1]), torch.zeros(2, 3), steps=3, guidance=2.0,
               progress=False)
    with pytest.raises(TypeError, match="model: expected a callable"):
        sample("model", torch.zeros(2, 3), steps=3, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_nan_reports_step_and_time(method, monkeypatch):
    monkeypatch.setenv("FLOWKERN_DEBUG", "1")
    def model(x, t):
        out = 0.1 * x
        if float(t[0]) > 0.55:
            out[1, 0] = float("nan")
        return out
    step = 2 if method == "heun" else 3         # Heun's second stage of step 2 runs at t_3
    with pytest.raises(ValueError, match=rf"model: returned NaN at step {step} of 5 \(t=0.594"):
        sample(model, torch.ones(2, 3), "vp", method, 5, progress=False, seed=0, t_end=0.99)


def test_nan_reported_at_the_end_without_debug(monkeypatch):
    monkeypatch.delenv("FLOWKERN_DEBUG", raising=False)
    with pytest.raises(ValueError, match="FLOWKERN_DEBUG=1 to find the step"):
        sample(lambda x, t: torch.full_like(x, float("nan")), torch.ones(2, 3), steps=2,
               progress=False)


def test_nan_check_ignores_infinite_sums(monkeypatch):
    monkeypatch.setenv("FLOWKERN_DEBUG", "1")
    big = torch.finfo(torch.float32).max

    def model(x, t):
        out = torch.zeros_like(x)
        out[0, 0], out[1, 0] = big, big      # the sum overflows to inf: not NaN
        return out
    sample(model, torch.zeros(2, 3), steps=2, method="euler", progress=False)


def test_nan_check_off_the_fast_path(monkeypatch):
    monkeypatch.setattr(_validate, "values_checked", lambda x: False)
    out = sample(lambda x, t: torch.full_like(x, float("nan")), torch.ones(2, 3), steps=2,
                 progress=False)
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------
# progress, callback, trajectory


def test_callback_and_trajectory():
    x = _x()
    seen = []
    out, traj = sample(GMM.model("velocity", SCHED), x, SCHED, "heun", 4, t_start=T0,
                       progress=False, return_trajectory=True,
                       callback=lambda i, t, y: seen.append((i, t, y.clone())))
    grid = G.uniform(4, T0, T1).tolist()
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == pytest.approx(grid[1:])
    assert len(traj) == 5 and torch.equal(traj[0], x) and torch.equal(traj[-1], out)
    for (_, _, y), z in zip(seen, traj[1:]):
        assert torch.equal(y, z)
    assert len({z.data_ptr() for z in traj}) == 5       # copies, not the reused buffers


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    sample(_m, torch.zeros(2, 3), steps=3, progress=True)
    assert "flowkern euler" in capsys.readouterr().err
    sample(_m, torch.zeros(2, 3), steps=3, progress=False)
    assert "flowkern" not in capsys.readouterr().err


def test_model_sees_batch_times():
    ts = []

    def model(x, t):
        ts.append(t)
        return torch.zeros_like(x)
    sample(model, torch.zeros(3, 2), steps=4, progress=False)
    assert all(t.shape == (3,) and t.dtype == torch.float32 for t in ts)
    assert [float(t[0]) for t in ts] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    ts.clear()
    sample(model, torch.zeros(3, 2, dtype=torch.float64), steps=2, progress=False)
    assert ts[0].dtype == torch.float64


# ---------------------------------------------------------------------------
# grids


class _Opaque(flowkern.schedules.Schedule):
    """Wraps a built-in schedule so that t_from_sigma_k must bisect."""

    def __init__(self, inner):
        self.inner = get_schedule(inner)

    def alpha_sigma(self, t):
        return self.inner.alpha_sigma(t)

    def derivatives(self, t):
        return self.inner.derivatives(t)


@pytest.mark.parametrize("schedule", ["linear", "cosine", flowkern.schedules.Polynomial(2.0),
                                      "vp", "ve", "edm"])
def test_t_from_sigma_k(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    sk = G.sigma_k(schedule, t)
    assert torch.allclose(G.t_from_sigma_k(schedule, sk), t, atol=1e-10)
    assert torch.allclose(G.t_from_sigma_k(_Opaque(schedule), sk), t, atol=1e-12)


def test_karras_and_logsnr_spacing():
    # the EDM schedule *is* Karras' spacing: its karras grid is uniform in t
    assert torch.allclose(G.make_grid("karras", "edm", 8), G.uniform(8), atol=1e-12)
    # VE: sigma_k = sigma, log-linear in t, so logsnr is uniform in t
    assert torch.allclose(G.make_grid("logsnr", "ve", 8), G.uniform(8), atol=1e-12)
    # linear: pure noise at 0, data at 1 are kept as their own points
    g = G.make_grid("karras", "linear", 6)
    assert g[0] == 0 and g[-1] == 1
    sk = G.sigma_k("linear", g[1:-1])
    assert sk[0].item() == pytest.approx(G.SIGMA_MAX)
    assert sk[-1].item() == pytest.approx(G.SIGMA_MIN)
    r = sk ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(4), rtol=1e-9)
    lam = -torch.log(G.sigma_k("cosine", G.make_grid("logsnr", "cosine", 7)[1:-1]))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(5), rtol=1e-9)
    for name in G.GRIDS:
        for sched in ("linear", "cosine", "vp", "ve", "edm"):
            for n in (1, 2, 3, 30):
                g = G.make_grid(name, sched, n)
                assert g.numel() == n + 1 and g[0] == 0 and g[-1] == 1
                assert bool((g[1:] > g[:-1]).all()), (name, sched, n)
    g = G.make_grid("karras", "vp", 5, 0.1, 0.9)
    assert g[0] == 0.1 and g[-1] == 0.9 and bool((g[1:] > g[:-1]).all())


def test_tensor_grid_is_used():
    ts = []

    def model(x, t):
        ts.append(float(t[0]))
        return torch.zeros_like(x)
    sample(model, torch.zeros(2, 2), grid=torch.tensor([0.0, 0.1, 0.7, 1.0]), progress=False)
    assert ts == pytest.approx([0.0, 0.1, 0.7])
    sample(model, torch.zeros(2, 2), grid=[0.2, 0.3], progress=False)
    assert ts[-1] == pytest.approx(0.2)


PER_METHOD = {"euler": "sample_euler", "heun": "sample_heun", "ei": "sample_ei",
              "dpmpp_2m": "sample_dpmpp_2m", "em": "sample_em"}


@pytest.mark.parametrize("method", METHODS)
def test_per_method_functions_are_what_sample_dispatches_to(method):
    """flowkern.sampling.sample_<method> (one short loop each) is sample(method=...)
    bit for bit, with churn, guidance and per-sample seeds; options they do
    not take are errors naming them."""
    from flowkern import sampling

    fn = getattr(sampling, PER_METHOD[method])
    assert getattr(flowkern.samplers, PER_METHOD[method]) is fn
    model = _pair(lambda x, t: GMM.velocity(x, t))
    x = _x((4, 6))
    kw = dict(steps=6, grid="karras", prediction="velocity", guidance=1.5, churn=2.0,
              per_sample_seeds=[3, 5, 7, 9], t_start=0.02, progress=False)
    if method == "em":
        kw["g"] = 0.3
    want = sample(model, x, "vp", method, **kw)
    got = fn(model, x, "vp", **kw)
    assert torch.equal(got, want)
    if method != "em":
        with pytest.raises(TypeError, match="g: only method 'em'"):
            fn(model, x, "vp", g=0.3, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        fn(model, x, "vp", stepz=3)


# -- the plan cache: a repeated call reuses the grid part of its plan ---------


def _plans():
    from flowkern.sampling import plan
    return plan._PLANS


@pytest.mark.parametrize("method", METHODS)
def test_a_repeated_call_reuses_its_plan_and_gives_the_same_samples(method):
    from flowkern.sampling import clear_plan_cache

    clear_plan_cache()
    model = lambda x, t: GMM.velocity(x, t)  # noqa: E731
    x = _x((4, 6))
    kw = dict(steps=6, grid="karras", churn=1.0, seed=3, t_start=0.02, progress=False)
    first = sample(model, x, "vp", method, **kw)
    assert len(_plans()) == 1
    (shared,) = _plans().values()
    again = sample(model, x, "vp", method, **kw)
    assert len(_plans()) == 1 and next(iter(_plans().values())) is shared
    assert torch.equal(again, first)
    clear_plan_cache()
    assert torch.equal(sample(model, x, "vp", method, **kw), first)  # rebuilt: the same


@pytest.mark.parametrize("change", [
    dict(steps=7), dict(grid="uniform"), dict(churn=0.5), dict(t_start=0.03), dict(t_end=0.9),
    dict(schedule=flowkern.schedules.VP(beta_max=19.0)), dict(schedule="cosine"),
    dict(prediction="x1"), dict(guidance=2.0), dict(dtype=torch.float32), dict(backend="torch"),
])
def test_another_argument_gets_its_own_plan(change):
    """Each argument the plan depends on is in its key: changing one gives the
    result of a fresh build, not the cached plan of the first call."""
    from flowkern.sampling import clear_plan_cache

    change = dict(change)
    dtype = change.pop("dtype", torch.float64)
    base = dict(schedule="vp", steps=6, grid="karras", churn=1.0, seed=3, t_start=0.02,
                t_end=1.0, prediction="velocity", guidance=None, progress=False)
    x = _x((4, 6), dtype)

    def model(x, t):
        v = GMM.velocity(x.double(), t.double()).to(x.dtype)
        return (v, 0.5 * v) if kw["guidance"] is not None else v

    kw = dict(base)
    sample(model, x, **kw)                     # caches the first plan
    kw = {**base, **change}
    got = sample(model, x, **kw)
    assert len(_plans()) >= 2
    clear_plan_cache()
    want = sample(model, x, **kw)              # built from scratch
    assert torch.equal(got, want)


def test_a_model_writing_into_its_times_does_not_change_the_next_run():
    """The model's time vectors are per run: a model that scales its t in
    place (t *= 1000, as some diffusion models do) leaves the cached plan
    alone."""
    x = _x((4, 6))

    def scaling(x, t):
        t.mul_(1000)
        return GMM.velocity(x, t / 1000)

    kw = dict(steps=5, grid="uniform", t_start=0.02, progress=False)
    first = sample(scaling, x, "linear", "euler", **kw)
    second = sample(scaling, x, "linear", "euler", **kw)
    assert torch.equal(first, second)


@pytest.mark.parametrize("kind", ["tensor grid", "custom schedule", "callable g", "tensor g"])
def test_arguments_that_may_change_in_place_are_not_cached(kind):
    from flowkern.sampling import clear_plan_cache

    class Mine(flowkern.schedules.Linear):
        pass

    clear_plan_cache()
    model = lambda x, t: GMM.velocity(x, t)  # noqa: E731
    x = _x((4, 6))
    kw = dict(schedule="linear", method="euler", steps=5, grid="uniform", t_start=0.02,
              progress=False)
    if kind == "tensor grid":
        kw.update(grid=torch.linspace(0.02, 1.0, 6, dtype=torch.float64), steps=None)
    elif kind == "custom schedule":
        kw.update(schedule=Mine())
    else:
        kw.update(method="em", seed=1, g=(lambda t: 0.2 + 0 * t) if kind == "callable g"
                  else torch.full((5,), 0.2, dtype=torch.float64))
    sample(model, x, **kw)
    assert len(_plans()) == 0


def test_a_failed_plan_is_not_cached_and_the_cache_is_bounded():
    from flowkern.sampling import clear_plan_cache, plan

    clear_plan_cache()
    x = _x((2, 3))
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="undefined at t=0"):
        sample(model, x, "linear", "euler", steps=3, prediction="eps", progress=False)
    assert len(_plans()) == 0
    for steps in range(1, plan._MAX_PLANS + 6):
        sample(model, x, "linear", "euler", steps=steps, t_start=0.1, progress=False)
    assert len(_plans()) == plan._MAX_PLANS
    clear_plan_cache()


def test_a_schedule_changed_in_place_gets_a_fresh_plan():
    """The key holds a built-in schedule's parameters, not its identity: the
    same object with a parameter changed between calls is planned anew."""
    from flowkern.sampling import clear_plan_cache

    x = _x((3, 4))
    model = lambda x, t: -x  # noqa: E731
    kw = dict(steps=5, t_start=0.02, t_end=0.9, prediction="eps", progress=False)
    sched = flowkern.schedules.VP()
    before = sample(model, x, sched, "euler", **kw)
    sched.beta_max = 5.0
    after = sample(model, x, sched, "euler", **kw)
    clear_plan_cache()
    assert torch.equal(after, sample(model, x, sched, "euler", **kw))
    assert not torch.equal(after, before)
