"""Sampler-step family on every backend against the float64 reference:
prediction types, guidance, shared and per-sample tables, in-place updates,
the in-kernel noise (same numbers on every backend), autograd of ei_step,
opcheck, torch.compile, and bad input."""
import pytest
import torch

import flowkern as fk
from flowkern._rules import PREDICTIONS
from flowkern.reference import steps as R

from conftest import DEVICE, backends_under_test, dtypes_for
from helpers import assert_close, assert_nan_only_at, step_overloads

BACKENDS = backends_under_test()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
CASES = [(b, d) for b in KERNEL_BACKENDS for d in dtypes_for(b)]
STEPS = ["euler", "heun", "ei_data", "ei_noise", "dpmpp_2m", "dpmpp_2m_first", "em"]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
            for _ in range(7)]


def _call(step, x, p, xe, pe, pu, peu, dp, tab, prediction, cfg, backend=None, out=None):
    """One step through the public API with a precomputed table."""
    kw = dict(table=tab, prediction=prediction, backend=backend)
    if cfg:
        kw.update(pred_uncond=pu, guidance=2.5)
    if step == "euler":
        return fk.euler_step(x, p, out=out, **kw)
    if step == "heun":
        if cfg:
            kw["pred_euler_uncond"] = peu
        return fk.heun_step(x, p, xe, pe, out=out, **kw)
    if step.startswith("ei"):
        return fk.ei_step(x, p, form=step[3:], out=out, **kw)
    if step.startswith("dpmpp"):
        return fk.dpmpp_2m_step(x, p, d_prev=None if step.endswith("first") else dp, out=out,
                                **kw)[0]
    return fk.em_step(x, p, seed=7, offset=123, out=out, **kw)


def _table(rows, dtype, per_sample):
    n = rows if per_sample else 1
    g = torch.Generator().manual_seed(1)
    t = 0.2 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    return fk.step_table("vp", t, t + 0.1, t_prev=t - 0.08, g=0.8 + 0 * t, dtype=dtype,
                         device=DEVICE)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cfg", [False, True])
def test_step_matches_reference(backend, dtype, step, prediction, cfg):
    shape = (5, 3, 37)
    args = _inputs(shape, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tab = _table(shape[0], acc, per_sample=cfg)  # shared table without CFG, per-sample with
    out = _call(step, *args, tab, prediction, cfg, backend)
    assert out.dtype == dtype and out.shape == shape
    ref64 = _call(step, *[a.double() for a in args], tab.double(), prediction, cfg, "torch")
    # PyTorch's own error: the reference evaluated with inputs and table in `dtype`.
    naive = _call(step, *args, tab.to(dtype), prediction, cfg, "torch") if dtype != torch.float64 \
        else ref64
    # Terms of these combinations can cancel (cfg weight 2.5, conversions dividing by
    # sigma): error is relative to the largest term, which the inputs' scale bounds.
    scale = max(a.abs().max().item() for a in args) * tab.abs().max().item() ** 2 * 10
    # Noise is drawn in fp32 on every backend (Box-Muller's log/cos may differ by an
    # ulp between libm, libdevice and the interpreter): |xi| < 6, g sqrt(h) < 1.
    atol = 4 * 2.0 ** -23 * 6 if step == "em" else 0.0
    assert_close(out, ref64, naive, f"{step} {prediction} cfg={cfg} {backend} {dtype}",
                 factor=4.0, ulps=8.0, scale=scale, atol=atol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("step", ["euler", "ei_data", "dpmpp_2m", "em"])
def test_in_place_and_times(backend, step):
    """out=x updates in place; t/s given as floats equal the shared table."""
    x, p, xe, pe, pu, peu, dp = _inputs((4, 65), torch.float32)
    tab = fk.step_table("cosine", 0.3, 0.4, t_prev=0.25, g=0.5, device=DEVICE)
    want = _call(step, x, p, xe, pe, pu, peu, dp, tab, "x1", False, backend)
    y = x.clone()
    got = _call(step, y, p, xe, pe, pu, peu, dp, tab, "x1", False, backend, out=y)
    assert got.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, want)


# Which inputs each step reads (positions in _inputs' list: x, p, xe, pe, pu, peu, dp).
_READS = {"euler": (0, 1, 4), "heun": (0, 1, 2, 3, 4, 5), "ei_data": (0, 1, 4),
          "dpmpp_2m": (0, 1, 4, 6), "em": (0, 1, 4)}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("step", list(_READS))
@pytest.mark.parametrize("shape", [(4, 65), (3, 131)])
def test_out_is_any_input(backend, step, shape):
    """out= may be any input exactly (same memory and layout): the CPU engine's
    element loop is compiled as independent iterations (FK_IVDEP, hd.h), so
    aliasing an input other than x, across the vectorised body and its tail,
    must give the same numbers as a separate buffer."""
    args = _inputs(shape, torch.float32, seed=3)
    tab = fk.step_table("cosine", 0.3, 0.4, t_prev=0.25, g=0.5, device=DEVICE)
    want = _call(step, *args, tab, "x1", True, backend)
    for k in _READS[step]:
        mine = [a.clone() for a in args]
        got = _call(step, *mine, tab, "x1", True, backend, out=mine[k])
        assert got.data_ptr() == mine[k].data_ptr()
        torch.testing.assert_close(got, want, msg=lambda m: f"{step} out=input {k}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_public_times_match_table(backend):
    x, p = _inputs((3, 10), torch.float32)[:2]
    t = torch.tensor([0.1, 0.4, 0.6], device=DEVICE)
    a = fk.euler_step(x, p, t, t + 0.05, "vp", "eps", backend=backend)
    b = fk.euler_step(x, p, table=fk.step_table("vp", t, t + 0.05, device=DEVICE),
                      prediction="eps", backend=backend)
    torch.testing.assert_close(a, b)
    c = fk.euler_step(x, p, 0.3, 0.35, "vp", "eps", backend=backend)
    d = fk.euler_step(x, p, torch.full((3,), 0.3, device=DEVICE), torch.full((3,), 0.35, device=DEVICE),
                      "vp", "eps", backend=backend)
    torch.testing.assert_close(c, d)


def _per_sample_calls(x, p, q, T, S, P, backend, rows=None):
    """Every public step at the times T, S, P (tensors, or one row's floats);
    em_step's noise per sample (its seed), so a row alone draws the same."""
    seeds = torch.tensor([5, 9, 2 ** 40, 7, 1], device=DEVICE)
    seeds = seeds if rows is None else seeds[rows]
    kw = dict(backend=backend)
    return {
        "euler": lambda: fk.euler_step(x, p, T, S, "cosine", "eps", **kw),
        "heun": lambda: fk.heun_step(x, p, q, p, T, S, "vp", "x1", **kw),
        "ei_data": lambda: fk.ei_step(x, p, T, S, "edm", "x1", **kw),
        "ei_noise": lambda: fk.ei_step(x, p, T, S, "linear", "eps", "noise", **kw),
        "dpmpp_2m": lambda: fk.dpmpp_2m_step(x, p, T, S, "cosine", d_prev=q, t_prev=P,
                                             **kw)[0],
        "em": lambda: fk.em_step(x, p, T, S, "vp", "velocity", g=0.5, per_sample_seeds=seeds,
                                 offset=3, **kw),
        "churn": lambda: fk.churn(x, S, T, "edm", per_sample_seeds=seeds, **kw),
        "lms": lambda: fk.lms_step(x, p, [0.1, 0.05], [q], T, "cosine", "x1", **kw)[0],
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_per_sample_times_are_each_rows_float_times(backend, dtype):
    """Per-sample times given as tensors (float32 t, float64 s, 16-bit t_prev),
    which the native ops evaluate at each row with no table: row b equals the
    same step at row b's times as floats, bit for bit (both evaluate the
    schedule in double); triton builds a table (step_table) and agrees to
    rounding. Also against the torch backend at the same tensors."""
    if dtype == torch.float64 and backend not in ("cpu", "triton"):
        pytest.skip("float64 on the cpu and triton backends")
    x, p, q = (a.to(dtype) for a in _inputs((5, 3, 7), torch.float64, seed=4)[:3])
    T = torch.tensor([0.2, 0.35, 0.5, 0.05, 0.7], device=DEVICE)
    S = (T.double() + torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25], device=DEVICE,
                                   dtype=torch.float64))
    P = (T - 0.04).to(torch.float16)
    whole = _per_sample_calls(x, p, q, T, S, P, backend)
    ref = _per_sample_calls(x, p, q, T, S, P, "torch")
    for name, call in whole.items():
        got = call()
        for b in range(x.shape[0]):
            one = _per_sample_calls(x[b:b + 1], p[b:b + 1], q[b:b + 1], float(T[b]), float(S[b]),
                                    float(P[b]), backend, rows=[b])[name]()
            if backend == "triton":
                torch.testing.assert_close(got[b:b + 1], one, msg=lambda m: f"{name} row {b}: {m}")
            else:
                assert torch.equal(got[b:b + 1], one), f"{name}: row {b} differs"
        want = ref[name]()
        # the torch backend's table is step_table's, computed in x's accumulation dtype
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        if name in ("em", "churn"):
            tol = max(tol, 1e-6)  # the kernels draw the noise in float32 (docs/design.md §4)
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * max(1.0, want.double().abs().max().item()), f"{name}: {err}"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_per_sample_times_broadcast_and_errors():
    """A () or (1,) times tensor serves the batch as its float does; bad
    times tensors raise naming the argument; times that need a gradient are
    refused (the fused ops do not differentiate in t)."""
    x, p = _inputs((4, 9), torch.float32)[:2]
    a = fk.dpmpp_2m_step(x, p, torch.tensor(0.3), torch.tensor([0.5]), d_prev=p, t_prev=0.2)[0]
    b = fk.dpmpp_2m_step(x, p, 0.3, 0.5, d_prev=p, t_prev=0.2)[0]
    assert torch.equal(a, b)
    bad = [
        (lambda: fk.euler_step(x, p, torch.rand(3), 0.5), ValueError,
         r"t: expected shape \(\) or \(4,\)"),
        (lambda: fk.euler_step(x, p, 0.2, torch.ones(4, dtype=torch.int64)), TypeError,
         "s: expected a floating tensor"),
        (lambda: fk.euler_step(x, p, torch.full((4,), 0.2), torch.tensor([0.3, 0.4, 1.2, 0.5])),
         ValueError, r"s: times must lie in \[0, 1\]"),
        (lambda: fk.dpmpp_2m_step(x, p, 0.3, 0.5, d_prev=p, t_prev=torch.full((4,), -0.1)),
         ValueError, r"t_prev: times must lie in \[0, 1\]"),
        (lambda: fk.ei_step(x, p, torch.tensor([0.5, 1.0, 0.2, 0.3]), 0.6, prediction="x1"),
         ValueError, "sigma_t is 0 at some sample"),
        (lambda: fk.em_step(x, p, torch.full((4,), 0.5), torch.tensor([0.6, 0.4, 0.7, 0.8]),
                            seed=1), ValueError, "s >= t"),
        (lambda: fk.euler_step(x, p, torch.full((4,), 0.2, requires_grad=True), 0.5),
         RuntimeError, "argument 't' requires grad"),
        (lambda: fk.ei_step(x, p, 0.2, torch.full((4,), 0.5, requires_grad=True)),
         RuntimeError, "argument 's' requires grad"),
        (lambda: fk.ei_step(x.requires_grad_(), p, 0.2, torch.full((4,), 0.5,
                                                                     requires_grad=True)),
         RuntimeError, "argument 's' requires grad"),
        (lambda: fk.dpmpp_2m_step(x.detach(), p, 0.3, 0.5, d_prev=p,
                                  t_prev=torch.full((4,), 0.2, requires_grad=True)),
         RuntimeError, "argument 't_prev' requires grad"),
    ]
    for k, (fn, exc, pattern) in enumerate(bad):
        with pytest.raises(exc, match=pattern):
            fn()
    # under torch.compile: the same op call, no graph break
    torch._dynamo.reset()
    T, S = torch.rand(4) * 0.5, torch.rand(4) * 0.4 + 0.5
    step = torch.compile(lambda a, b, t, s: fk.dpmpp_2m_step(a, b, t, s, "vp", d_prev=b,
                                                             t_prev=t * 0.5)[0],
                         fullgraph=True)
    torch.testing.assert_close(step(x.detach(), p, T, S),
                               fk.dpmpp_2m_step(x.detach(), p, T, S, "vp", d_prev=p,
                                                t_prev=T * 0.5)[0])
    # g as a tensor: the step table path, same numbers as the float g
    g = fk.em_step(x.detach(), p, 0.3, 0.5, g=torch.full((4,), 0.5), seed=2)
    torch.testing.assert_close(g, fk.em_step(x.detach(), p, 0.3, 0.5, g=0.5, seed=2))


def test_noise_is_the_same_on_every_backend():
    """em_step and churn draw xi = Philox4x32-10(seed, offset + e) in the kernel:
    the 32-bit words are bit-identical on every backend; Box-Muller's log and cos
    come from different libraries (libm, libdevice, numpy in the interpreter) and
    may round differently, so xi agrees to within one ulp of the largest radius
    sqrt(-2 log 1e-7) < 8, i.e. 2^-21, and most values agree exactly."""
    x = torch.zeros(3, 1000, device=DEVICE)
    outs = {b: fk.churn(x, 0.5, 0.3, "linear", seed=2 ** 40 + 3, offset=2 ** 33, backend=b)
            for b in BACKENDS}
    ref = outs["torch"]
    for b, o in outs.items():
        diff = (o - ref).abs()
        assert diff.max().item() <= 2.0 ** -21, (b, diff.max().item())
        assert (diff == 0).float().mean().item() > 0.5, b
    # the reference Philox is the published algorithm: spot-check the first words
    assert torch.isfinite(ref).all() and ref.std() > 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_cpu_noise_blocks_are_the_same_on_every_isa(monkeypatch):
    """The CPU kernels draw noise 64 elements at a time with the widest vector
    ISA (csrc/cpu/noise.cpp): the baseline build of the same code gives the
    same bits, for segment tails and row boundaries that do not fall on a
    block (rows of 1000, 3 rows, offset 2^33 - 5: the counter's high word
    changes inside the tensor), and equals the per-element Philox that the
    CUDA kernel body runs (the grid simulator)."""
    x = torch.zeros(3, 1000)
    draw = lambda: fk.churn(x, 0.5, 0.3, "linear", seed=2 ** 40 + 3, offset=2 ** 33 - 5,  # noqa: E731
                            backend="cpu")
    wide = draw()
    monkeypatch.setenv("FLOWKERN_CPU_ISA", "base")
    base = draw()
    assert torch.equal(wide, base)
    tab = fk.step_table("linear", 0.5, 0.3)
    sim = torch.ops.flowkern_sim._sim_step("churn", [x], tab, 0, 0, False, 1.0, 2 ** 40 + 3, 2 ** 33 - 5,
                                       0, 0)
    assert torch.equal(sim[0][0], wide)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("isa", ["default", "base"])
def test_cpu_noise_of_short_rows_is_the_stream(monkeypatch, isa):
    """Rows shorter than a noise chunk (256 numbers) share chunks: the CPU
    kernels keep the last chunk a thread computed (csrc/cpu/noise.cpp) rather
    than recompute it for every row. The numbers must stay those of the
    stream: churn of (B, n) rows equals churn of the same B*n elements as one
    row, and the reference Philox, for row lengths that split chunks at every
    place, offsets off the 4-aligned counter, and a second call right after
    (which may start inside the kept chunk)."""
    if isa == "base":
        monkeypatch.setenv("FLOWKERN_CPU_ISA", "base")
    for rows, n, offset in [(8, 64, 0), (5, 100, 3), (7, 3, 1001), (3, 257, 2 ** 33 - 5),
                            (40, 7, 6)]:
        x = torch.zeros(rows, n)
        one = fk.churn(x.reshape(1, -1), 0.5, 0.3, "linear", seed=11, offset=offset,
                       backend="cpu")
        for _ in range(2):
            split = fk.churn(x, 0.5, 0.3, "linear", seed=11, offset=offset, backend="cpu")
            assert torch.equal(split.reshape(1, -1), one), (rows, n, offset)
        # churn of zeros from 0.5 back to 0.3 is sqrt(sigma_t^2 - ...) xi: the
        # stream's numbers up to one positive factor
        ref = R.philox_normal(11, offset, (1, rows * n), torch.float64, x.device)
        scale = (one.double() / ref).mean()
        torch.testing.assert_close(one.double(), ref * scale, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_per_sample_seeds(dtype):
    """per_sample_seeds: sample b draws as a batch of one with seed
    per_sample_seeds[b] (bit-identical to that call on the same backend),
    whatever the batch size and its position; the backends agree as the
    batch-seeded noise does; the reference draws the same; seed and
    per_sample_seeds together, bad dtypes, shapes, devices and values raise
    the same errors on every backend."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 33, generator=gen).to(DEVICE, dtype)
    v = torch.randn(5, 3, 33, generator=gen).to(DEVICE, dtype)
    seeds = torch.tensor([2 ** 63 - 1, 7, 2 ** 40 + 3, 7, 0], device=DEVICE)
    outs = {}
    for be in BACKENDS:
        em = fk.em_step(x, v, 0.2, 0.35, g=0.8, offset=2 ** 33 - 50, per_sample_seeds=seeds,
                        backend=be)
        ch = fk.churn(x, 0.6, 0.4, "cosine", offset=9, per_sample_seeds=seeds, backend=be)
        for b in (0, 2, 4):
            alone = fk.em_step(x[b:b + 1], v[b:b + 1], 0.2, 0.35, g=0.8, offset=2 ** 33 - 50,
                               seed=int(seeds[b]), backend=be)
            assert torch.equal(alone[0], em[b]), (be, b)
            assert torch.equal(fk.churn(x[b:b + 1], 0.6, 0.4, "cosine", offset=9,
                                        seed=int(seeds[b]), backend=be)[0], ch[b]), (be, b)
        as_list = seeds.tolist()  # B ints: the same as the tensor on every op
        assert torch.equal(fk.em_step(x, v, 0.2, 0.35, g=0.8, offset=2 ** 33 - 50,
                                      per_sample_seeds=as_list, backend=be), em), be
        assert torch.equal(fk.churn(x, 0.6, 0.4, "cosine", offset=9,
                                    per_sample_seeds=tuple(as_list), backend=be), ch), be
        comb = [fk.lincomb_step(x, [v], [1.0, 0.5], noise_std=0.3, offset=4,
                                per_sample_seeds=ps, backend=be) for ps in (seeds, as_list)]
        assert torch.equal(*comb), be
        perm = torch.tensor([3, 0, 4], device=DEVICE)  # another batch, other positions
        sub = fk.churn(x[perm], 0.6, 0.4, "cosine", offset=9, per_sample_seeds=seeds[perm],
                       backend=be)
        assert torch.equal(sub, ch[perm]), be
        outs[be] = (em, ch)
    tol = 2.0 ** -21 if dtype != torch.float16 else 2.0 ** -8  # test_noise_is_the_same...
    for be, (em, ch) in outs.items():
        for a, b in ((em, outs["torch"][0]), (ch, outs["torch"][1])):
            assert (a.double() - b.double()).abs().max().item() <= tol * 4, be
    z = torch.zeros(5, 1000, device=DEVICE)
    xi = fk.churn(z, 1.0, 0.0, "cosine", per_sample_seeds=seeds, backend=BACKENDS[-1])
    ref = R.philox_normal(seeds, 0, (5, 1000), torch.float32, DEVICE)
    assert (xi - ref).abs().max().item() <= 2.0 ** -21
    assert torch.equal(xi[1], xi[3]) and not torch.equal(xi[0], xi[1])  # seeds 7, 7
    for be in BACKENDS:
        for kw, err, msg in (
                (dict(seed=1, per_sample_seeds=seeds), ValueError, "give seed or per_sample"),
                (dict(per_sample_seeds=seeds.float()), TypeError, "per_sample_seeds: expected "
                 "dtype torch.int64"),
                (dict(per_sample_seeds=seeds[:4]), ValueError, r"per_sample_seeds: expected "
                 r"shape \(5,\)"),
                (dict(per_sample_seeds=seeds.to("meta")), ValueError,
                 "per_sample_seeds: (is )?on meta"),
                (dict(per_sample_seeds=seeds.index_fill(0, torch.tensor([4], device=DEVICE), -8)),
                 ValueError, r"per_sample_seeds: expected ints in \[0, 2\^63\), got -8 at "
                 r"sample 4"),
                (dict(per_sample_seeds=[1, 2, -3, 4, 5]), ValueError,
                 r"per_sample_seeds: expected ints in \[0, 2\^63\), got -3 at sample 2"),
                (dict(per_sample_seeds=[1, 2, 3]), ValueError, r"per_sample_seeds: expected "
                 r"shape \(5,\)"),
                (dict(per_sample_seeds=[1, 2.5, 3, 4, 5]), ValueError,
                 r"per_sample_seeds: expected ints in \[0, 2\^63\), got 2.5 at sample 1")):
            with pytest.raises(err, match=msg):
                fk.churn(x, 0.6, 0.4, **kw, backend=be)
            with pytest.raises(err, match=msg):
                fk.em_step(x, v, 0.2, 0.3, **kw, backend=be)


def test_noise_statistics_and_keys():
    n = 1 << 18
    x = torch.zeros(1, n, device=DEVICE)
    be = KERNEL_BACKENDS[0] if KERNEL_BACKENDS else "torch"
    # churn from t = 1 (sigma 0) to t_hat = 0 (sigma 1, alpha 0 -> 1) on the cosine
    # schedule adds exactly xi: x_hat = (alpha_0/alpha_1) x + sigma_0 xi = xi
    xi = fk.churn(x, 1.0, 0.0, "cosine", seed=5, offset=0, backend=be)
    assert abs(xi.mean().item()) < 0.01 and abs(xi.std().item() - 1) < 0.01
    again = fk.churn(x, 1.0, 0.0, "cosine", seed=5, offset=0, backend=be)
    assert torch.equal(xi, again)
    other = fk.churn(x, 1.0, 0.0, "cosine", seed=6, offset=0, backend=be)
    shifted = fk.churn(x[:, :100], 1.0, 0.0, "cosine", seed=5, offset=7, backend=be)
    assert not torch.equal(xi, other)
    torch.testing.assert_close(shifted[0], xi[0, 7:107])  # offsets index the same stream


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpmpp_final_step_is_finite(backend):
    """At s = 1 (sigma_s = 0, h = inf) DPM-Solver++(2M) falls back to first order,
    which lands on the denoised prediction."""
    x, p, d = _inputs((2, 9), torch.float64 if backend != "cuda" else torch.float32)[:3]
    xs, dt = fk.dpmpp_2m_step(x, p, 0.9, 1.0, "linear", "x1", d_prev=d, t_prev=0.8,
                              backend=backend)
    assert torch.isfinite(xs).all()
    torch.testing.assert_close(xs, p)
    torch.testing.assert_close(dt, p)


GRAD_BACKENDS = [b for b in KERNEL_BACKENDS if b != "cuda"]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("form", ["data", "noise"])
def test_ei_step_gradcheck(backend, prediction, form):
    kw = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    x, p, pu = (torch.randn(3, 4, **kw) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda a, b: fk.ei_step(a, b, t, t + 0.1, "vp", prediction, form, backend=backend), (x, p))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fk.ei_step(a, b, t, t + 0.1, "cosine", prediction, form, pred_uncond=c,
                                   guidance=1.7, backend=backend), (x, p, pu))


def _namespaces():
    return (["flowkern"] if ("cpu" in BACKENDS or "cuda" in BACKENDS) else []) + \
        (["flowkern_triton"] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck(ns):
    ops = getattr(torch.ops, ns)
    x, p, pu, xe, pe, dp = (torch.randn(3, 7, device=DEVICE) for _ in range(6))
    tab = fk.step_table("vp", torch.tensor([0.2, 0.4, 0.5]), torch.tensor([0.3, 0.5, 0.6]),
                        t_prev=torch.tensor([0.1, 0.3, 0.4]), g=0.5, device=DEVICE)
    shared = tab[:1].contiguous()
    o, o2 = torch.empty_like(x), torch.empty_like(x)
    seeds = torch.tensor([3, 2 ** 40, 0], device=DEVICE)  # per-sample seeds
    # the coefficient arguments (table, t, s, t_prev, times, kind, params): a
    # per-sample and a shared table; per-sample times as tensors; on the
    # native ops also float times + a built-in schedule
    ts = torch.tensor([0.2, 0.4, 0.5], device=DEVICE)
    coefs = [(tab, None, None, None, [], -1, []), (shared, None, None, None, [], -1, []),
             (None, ts, ts + 0.1, (ts - 0.1).double(), [0.0, 0.0, 0.0, 0.5], 3, [0.1, 20.0])]
    if ns == "flowkern":
        coefs += [(None, None, None, None, [0.2, 0.3, 0.1, 0.5], 3, [0.1, 20.0]),
                  (None, None, None, None, [0.4, 0.45, float("nan"), 0.0], 1, []),
                  (None, None, ts[:1], None, [0.1, 0.0, float("nan"), 0.0], 5,
                   [0.002, 80.0, 7.0])]
    for c in coefs:
        for ov, c in step_overloads(ns, c):
            _opcheck_steps(ops, ov, c, x, p, pu, xe, pe, dp, o, o2, seeds)


def _opcheck_steps(ops, ov, c, x, p, pu, xe, pe, dp, o, o2, seeds):
    def op(name):
        return getattr(getattr(ops, name), ov)
    for pred in range(4):
        torch.library.opcheck(op("euler_step"), (x, p, pu, *c, pred, 2.0, True, o))
        torch.library.opcheck(op("euler_step"), (x, p, None, *c, pred, 1.0, True, o))
        torch.library.opcheck(op("heun_step"), (x, p, xe, pe, pu, pe, *c, pred, 2.0, True, o))
        torch.library.opcheck(op("ei_step_out"), (x, p, None, *c, pred, 1, 1.0, True, o))
        torch.library.opcheck(op("dpmpp_2m_step"), (x, p, dp, pu, *c, pred, 1.5, True, o, o2))
        torch.library.opcheck(op("dpmpp_2m_step"), (x, p, None, None, *c, pred, 1.0, True, o, o2))
        torch.library.opcheck(op("em_step"), (x, p, pu, *c, pred, 2.0, 3, 5, None, True, o))
        torch.library.opcheck(op("em_step"), (x, p, None, *c, pred, 1.0, 0, 5, seeds, True, o))
        if ov != "default" or len(c) == 7:  # ei_step_backward: the full signature only
            torch.library.opcheck(ops.ei_step_backward.default, (x, *c, pred, 0, 1.5, True))
    xg, pg, pug = (v.clone().requires_grad_() for v in (x, p, pu))
    torch.library.opcheck(op("ei_step"), (xg, pg, pug, *c, 1, 0, 1.5, True))
    torch.library.opcheck(op("ei_step"), (xg, pg, None, *c, 2, 1, 1.0, True))
    if hasattr(ops.ei_step, "nograd"):
        nograd = ops.ei_step.nograd if ov == "default" else ops.ei_step.times_nograd
        torch.library.opcheck(nograd, (x, p, pu, *c, 1, 0, 1.5, True))
    # these coefficients step forward (t < s): churn's direction check
    # (t_hat <= t) would refuse them, so it runs with check=False here
    torch.library.opcheck(op("churn"), (x, *c, 11, 0, None, False, o))
    torch.library.opcheck(op("churn"), (x, *c, 0, 7, seeds, False, o))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_sampling_loop(backend):
    """A fixed-step sampling loop over precomputed tables, with in-place steps,
    compiles with fullgraph=True and matches eager."""
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4).to(DEVICE)
    grid = torch.linspace(0, 1, 5)
    tables = fk.step_table("linear", grid[:-1], grid[1:], device=DEVICE)

    def loop(x):
        for i in range(4):
            v = model(x)
            fk.euler_step(x, v, table=tables[i], out=x, backend=backend)
        return x

    x0 = torch.randn(6, 4, device=DEVICE)
    with torch.no_grad():
        got = torch.compile(loop, fullgraph=True)(x0.clone())
        want = loop(x0.clone())
    torch.testing.assert_close(got, want)


x, p = torch.randn(4, 3), torch.randn(4, 3)
BAD = [
    (lambda: fk.euler_step(x, p[:, :2], 0.1, 0.2), ValueError, "pred"),
    (lambda: fk.euler_step(x, p.double(), 0.1, 0.2), ValueError, "pred"),
    (lambda: fk.euler_step(x, p, 0.1, 0.2, prediction="noise"), ValueError, "prediction"),
    (lambda: fk.euler_step(x, p, 0.1, 0.2, guidance=3.0), ValueError, "guidance"),
    (lambda: fk.euler_step(x, p, 0.1, 0.2, pred_uncond=p), ValueError, "guidance"),
    (lambda: fk.euler_step(x, p, 0.1, 1.5), ValueError, r"\[0, 1\]"),
    (lambda: fk.euler_step(x, p, torch.rand(3), 0.5), ValueError, "t"),
    (lambda: fk.euler_step(x, p), TypeError, "t and s"),
    (lambda: fk.euler_step(x, p, table=torch.zeros(2, 12)), ValueError, "table"),
    (lambda: fk.euler_step(x, p, 0.1, 0.2, out=torch.empty(4, 2)), ValueError, "out"),
    (lambda: fk.euler_step(x, p, 1.0, 1.0, prediction="x1"), ValueError, "sigma_t"),
    (lambda: fk.heun_step(x, p, x, p, 0.1, 0.2, pred_uncond=p, guidance=2.0), ValueError,
     "pred_euler_uncond"),
    (lambda: fk.heun_step(x, p, x, p, 0.5, 1.0, prediction="x1"), ValueError, "sigma_s"),
    (lambda: fk.ei_step(x, p, 0.1, 0.2, form="ode"), ValueError, "form"),
    (lambda: fk.ei_step(x, p, 1.0, 1.0), ValueError, "sigma_t"),
    (lambda: fk.dpmpp_2m_step(x, p, 0.2, 0.3, d_prev=p), ValueError, "t_prev"),
    (lambda: fk.em_step(x, p, 0.1, 0.2, seed=-1), ValueError, "seed"),
    (lambda: fk.em_step(x, p, 0.1, 0.2, offset=1.5), ValueError, "offset"),
    (lambda: fk.churn(x, 0.0, 0.0), ValueError, "alpha_t"),
    (lambda: fk.euler_step(x, p, 0.1, 0.2, backend="cuda"), ValueError, "CUDA"),
]


@pytest.mark.parametrize("fn,exc,pattern", BAD, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD)])
def test_bad_inputs(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, device=DEVICE)
    t = torch.rand(0, device=DEVICE)
    assert fk.step_table("vp", t, t, g=0.5).shape == (0, 12)
    assert fk.euler_step(x, x, t, t, backend=backend).shape == (0, 5)
    assert fk.em_step(x, x, t, t, g=0.5, backend=backend).shape == (0, 5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_noisy_steps_check_their_direction(backend):
    """em_step with s < t took sqrt(h < 0) = NaN; churn with t_hat > t added no
    noise, silently: both are errors naming the argument."""
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="s: em_step integrates forward"):
        fk.em_step(x, torch.randn(3, 8), 0.6, 0.5, schedule="cosine", g=0.3,
                         backend=backend)
    with pytest.raises(ValueError, match="t_hat: churn renoises to an earlier time"):
        fk.churn(x, 0.5, 0.6, schedule="cosine", backend=backend)
    fk.em_step(x, torch.randn(3, 8), 0.5, 0.6, schedule="cosine", g=0.3, backend=backend)
    fk.churn(x, 0.6, 0.5, schedule="cosine", backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cosine_reaches_data_exactly(backend):
    """sigma(1) = 0 exactly on cosine (it was cos(fl(pi/2)) = 6e-17): the score
    target at t = 1 is an error as on linear, and a DPM-Solver++ step ending at
    s = 1 is finite."""
    x0, x1 = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="sigma_t is 0"):
        fk.interpolate(x0, x1, 1.0, schedule="cosine", target="score", backend=backend)
    out, d = fk.dpmpp_2m_step(x0, x1, 0.5, 1.0, schedule="cosine", prediction="x1",
                                    backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(d).all()
    torch.testing.assert_close(out, x1)  # the data-form step lands on the prediction


def test_step_table_checks_its_times():
    """A table the steps then trust: times outside [0, 1] or NaN are errors."""
    for t, s in ((1.5, 0.5), (0.2, 2.0), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="times must lie in"):
            fk.step_table("cosine", t, s)
    with pytest.raises(ValueError, match="t_prev: times must lie in"):
        fk.step_table("cosine", 0.2, 0.4, t_prev=-0.1)


@pytest.mark.parametrize("backend", ["torch", "cpu"] + (["triton"] if fk.available()["triton"]
                                                        else []))
def test_missing_prediction_is_an_error(backend):
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="pred: expected a torch.Tensor"):
        fk.euler_step(x, None, 0.2, 0.4, backend=backend)
    with pytest.raises(TypeError, match="pred_euler: expected a torch.Tensor"):
        fk.heun_step(x, x, x, None, 0.2, 0.4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_dpmpp_nan_in_d_prev_stays_out_of_d_t(backend, cfg):
    """d_t, the x1-prediction at t, does not depend on d_prev: a NaN there
    must not reach it (the engines leave the term out at compile time instead
    of multiplying it by 0: lincomb.h reads(), triton skip_mask). x_s reads
    d_prev and carries the NaN at that element only."""
    g = torch.Generator().manual_seed(11)
    x, p, dp, pu = (torch.randn(4, 6, generator=g).to(DEVICE) for _ in range(4))
    kw = dict(t=0.5, s=0.7, schedule="cosine", prediction="eps", t_prev=0.3, backend=backend)
    if cfg:
        kw.update(pred_uncond=pu, guidance=2.0)
    xs0, d0 = fk.dpmpp_2m_step(x, p, d_prev=dp, **kw)
    bad = dp.clone()
    bad[1, 2] = float("nan")
    xs1, d1 = fk.dpmpp_2m_step(x, p, d_prev=bad, **kw)
    assert torch.equal(d1, d0), "a NaN in d_prev reached d_t"
    assert_nan_only_at(xs1, xs0, (1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpmpp_2m_from_pure_noise_is_its_first_order_limit(backend):
    """alpha_t = 0 (zero terminal SNR, lambda_t = -inf): h is infinite, so the
    step is first order with E = alpha_s: x_s = (sigma_s/sigma_t) x + alpha_s d
    (DDIM from pure noise), with or without d_prev, on every backend. Between
    two pure-noise levels it is undefined: an error naming t."""
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    v = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    # v-prediction rows: (d_alpha, d_sigma) = (-sigma, alpha); x1 = alpha x - sigma v = -v
    row = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.6, 0.8, -0.8, 0.6, 0.5, 0.5 ** 0.5 * 1.5 ** 0.5,
                        0.0, 0.0], dtype=torch.float64, device=DEVICE)
    want = 0.8 * x + 0.6 * (-v)
    for d_prev in (None, torch.randn_like(x)):
        xs, d = fk.dpmpp_2m_step(x, v, prediction="velocity", d_prev=d_prev, table=row,
                                 backend=backend)
        torch.testing.assert_close(xs, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, -v, rtol=1e-12, atol=1e-12)
    both = row.clone()
    both[4], both[5] = 0.0, 1.0
    with pytest.raises(ValueError, match="t: each of alpha_t, alpha_s is 0"):
        fk.dpmpp_2m_step(x, v, prediction="velocity", table=both, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [0.0, 1.0], ids=["alpha=0", "sigma=0"])
def test_steps_and_convert_share_the_conversion_rule(backend, prediction, t):
    """A step refuses a time exactly where flowkern.convert to the step's type
    does (one rule: flowkern._rules.DIVIDES, coef_checks.h kDivides): e.g. a
    score at sigma = 0 converts to a velocity (-sigma times it vanishes) in
    both, an x1 there in neither."""
    x = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)
    p = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)

    def outcome(fn):
        try:
            return torch.isfinite(fn()).all().item()
        except ValueError as e:
            assert "divides by it" in str(e), e
            return "refused"

    conv = outcome(lambda: fk.convert(p, x, t, src=prediction, dst="velocity", backend=backend))
    step = outcome(lambda: fk.euler_step(x, p, t, t, prediction=prediction, backend=backend))
    assert conv == step, (conv, step)
    if conv != "refused":
        assert conv is True
