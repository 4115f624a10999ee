"""Smoke test of an *installed* flowkern wheel in another torch.

Run from a directory outside the repository by
- tools/check_cpu_torch.sh (`make test-cpu-torch`): a wheel built against a
  CPU-only torch (torch==2.13.0+cpu), installed there;
- tools/check_compat.sh (`make test-compat`): the one abi3 wheel built against
  the main .venv's torch (CUDA 13, with the CUDA kernels), installed into
  fresh venvs with other torch versions (docs/build.md).
It lives outside tests/ so that `make test` (pytest tests) never collects it:
several checks below only hold for an installed wheel.

Environment (set by the scripts):
  FLOWKERN_COMPAT_REPO        the repository root: flowkern must NOT be imported
                              from under it (the wheel, not the in-place build).
  FLOWKERN_COMPAT_EXPECT_CPU  "1": torch must be a CPU-only build.
  FLOWKERN_COMPAT_CUDA_KERNELS "1": the wheel holds the CUDA kernels (built
                              against a CUDA torch), so every op has a kernel
                              for the CUDA key; else none has.

Checks: flowkern and flowkern._C import, the flowkern:: ops exist; every public
op on backend='cpu' (the C++ kernels) matches backend='torch' (the pure-PyTorch
reference) on small fp32/fp64 inputs, forward and, where differentiable,
backward; flowkern.sample runs on cpu with a trivial model for every method;
the CUDA kernels are registered for the CUDA key exactly when the wheel holds
them; the no-derivative ops refuse a gradient (either Autograd-key kernel).
"""
import glob
import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

import flowkern as fk

REPO = os.environ.get("FLOWKERN_COMPAT_REPO")
EXPECT_CPU = os.environ.get("FLOWKERN_COMPAT_EXPECT_CPU") == "1"
CUDA_KERNELS = os.environ.get("FLOWKERN_COMPAT_CUDA_KERNELS") == "1"

DTYPES = [torch.float32, torch.float64]
# cpu vs torch backend: both evaluate the same formulas, the reference in the
# accumulation dtype (fp32 for fp32, fp64 for fp64) with different operation order.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}
# em_step/churn: the Philox noise is drawn in fp32 on every backend (Box-Muller's
# log/cos may differ by an ulp between libm and torch), whatever the state dtype.
NOISE_ATOL = 1e-5
PREDICTIONS = ["velocity", "x1", "eps", "score"]
SHAPE = (4, 3, 5)


def _close(a, b, dtype, what, atol=None):
    assert a.dtype == b.dtype == dtype, f"{what}: dtypes {a.dtype} / {b.dtype}, expected {dtype}"
    tol = dict(TOL[dtype])
    if atol is not None:
        tol["atol"] = max(tol["atol"], atol)
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: cpu vs torch backend\n{m}", **tol)


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _times(dtype, seed=3):
    # away from 0 and 1: the conversions divide by alpha_t and sigma_t
    g = torch.Generator().manual_seed(seed)
    return (0.25 + 0.5 * torch.rand(SHAPE[0], generator=g, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------------------
# the installed package


def test_imports_installed_wheel_not_the_repo():
    path = os.path.realpath(fk.__file__)
    print(f"flowkern.__file__ = {path}; torch {torch.__version__}")
    if REPO:  # (the venv itself may lie inside the repository: .venv-cputorch)
        src = os.path.join(os.path.realpath(REPO), "flowkern") + os.sep
        assert not path.startswith(src), \
            f"flowkern imported from the repository's source tree ({path}), not from the wheel"
    site = os.path.realpath(sysconfig.get_paths()["platlib"]) + os.sep
    assert path.startswith(site), f"flowkern not imported from this environment's {site}: {path}"


def test_torch_is_cpu_only():
    if not EXPECT_CPU:
        pytest.skip("FLOWKERN_COMPAT_EXPECT_CPU is not set")
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
    assert not torch.cuda.is_available()


def test_native_module_loads_and_registers_ops():
    import flowkern._C  # noqa: F401

    from flowkern.backend import cuda_built

    assert fk.available()["cpu"], fk.available()
    # the CUDA kernels are usable where the wheel has them and torch has CUDA
    assert cuda_built() is (CUDA_KERNELS and torch.version.cuda is not None)
    assert fk.available()["cuda"] is (cuda_built() and torch.cuda.is_available())
    for name in ("interpolate", "interpolate_out", "fm_loss", "convert", "euler_step",
                 "heun_step", "ei_step", "ei_step_out", "dpmpp_2m_step", "em_step", "churn",
                 "lms_step", "lincomb_step"):
        assert hasattr(torch.ops.flowkern, name), f"torch.ops.flowkern.{name} missing"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flowkern::interpolate", "CPU")


def _native_so():
    """flowkern/_C*.so of the installed package, located without importing it."""
    spec = importlib.util.find_spec("flowkern")
    (pkg_dir,) = spec.submodule_search_locations
    found = glob.glob(os.path.join(pkg_dir, "_C*.so"))
    assert len(found) == 1, f"expected one flowkern/_C*.so in {pkg_dir}, found {found}"
    return found[0]


# Every flowkern:: operator (overloads included) with a kernel for `key`.
_WITH_KERNEL = ("import torch; h = torch._C._dispatch_has_kernel_for_dispatch_key; "
                "ops = sorted(n for n in torch._C._dispatch_get_all_op_names() "
                "if n.startswith('flowkern::')); "
                "print(len(ops), [n for n in ops if h(n, '{key}')])")


def test_native_module_registers_cuda_kernels_iff_built():
    """flowkern._C alone (the C++ library code, loaded in a fresh process
    without the Python package) registers CUDA kernels for every flowkern::
    op exactly when the wheel holds them."""
    code = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
            + _WITH_KERNEL.format(key="CUDA"))
    res = subprocess.run([sys.executable, "-c", code, _native_so()], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    count, _, cuda = res.stdout.strip().partition(" ")
    assert int(count) > 10, f"flowkern._C defined only {count} flowkern:: ops: {res.stdout}"
    if CUDA_KERNELS:
        for name in ("flowkern::interpolate", "flowkern::euler_step", "flowkern::field_mean"):
            assert name in cuda, f"{name} has no CUDA kernel: {cuda}"
    else:
        assert cuda == "[]", f"flowkern._C registers CUDA kernels: {cuda}"


def test_cuda_kernels_after_import():
    """The Python package registers no CUDA kernel of its own (e.g. a lazy glue)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key("flowkern::interpolate", "CUDA")
    assert has is CUDA_KERNELS


def test_no_derivative_ops_refuse_a_gradient():
    """The Autograd-key kernel of the no-derivative ops: flowkern._nograd where
    it was built for this torch, its Python twin elsewhere; the same rules."""
    import flowkern.backend as backend

    print(f"Autograd-key kernel of the no-derivative ops: "
          f"{'C++' if backend.nograd_native() else 'Python'}")
    x = torch.randn(SHAPE, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'x0' requires grad"):
        torch.ops.flowkern.interpolate.nograd(x, x.detach(), None, 0.5, 0, [], 0, True)
    out = torch.zeros(SHAPE)
    version = out._version
    fk.euler_step(out, torch.ones(SHAPE), t=0.25, s=0.5, out=out, backend="cpu")
    assert out._version > version, "the written buffer's version counter was not bumped"
    torch.testing.assert_close(out, torch.full(SHAPE, 0.25))


def test_fast_caller_only_where_built():
    """flowkern._fastcall serves exactly the torch (and the CPython, by its file
    name) the wheel was built for; elsewhere the ops' own binding serves the
    public calls (docs/build.md)."""
    import flowkern._C as native
    import flowkern.backend as backend

    expected = (native.TORCH_VERSION == torch.__version__
                and importlib.util.find_spec("flowkern._fastcall") is not None)
    print(f"public functions' op caller: "
          f"{'flowkern._fastcall' if backend.fastcall() else 'OpOverload._op'}")
    assert (backend.fastcall() is not None) is expected
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(fk.euler_step(x, v, t=0.25, s=0.5, backend="cpu"), x + 0.25 * v)


def test_type_errors_stay_type_errors():
    """No TypeError crosses the stable ABI: the public functions re-raise the
    op's marked ValueError as one (flowkern/ops/_registry.py retyped)."""
    x = torch.randn(SHAPE)
    with pytest.raises(TypeError, match="x1: dtype torch.int64 is not supported"):
        fk.interpolate(x, x.long(), 0.5, backend="cpu")
    with pytest.raises(ValueError, match="times must lie in"):
        fk.interpolate(x, x, 1.5, backend="cpu")


# ---------------------------------------------------------------------------
# training ops: cpu kernels vs the torch reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("target", ["velocity", "x1", "eps", "score"])
def test_interpolate(dtype, schedule, target):
    x0, x1 = _randn(*SHAPE, dtype=dtype, seed=0), _randn(*SHAPE, dtype=dtype, seed=1)
    t = _times(dtype)
    got = fk.interpolate(x0, x1, t, schedule=schedule, target=target, backend="cpu")
    ref = fk.interpolate(x0, x1, t, schedule=schedule, target=target, backend="torch")
    _close(got[0], ref[0], dtype, f"interpolate x_t {schedule} {target}")
    _close(got[1], ref[1], dtype, f"interpolate y {schedule} {target}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpolate_backward_and_out(dtype):
    grads = {}
    for be in ("cpu", "torch"):
        x0 = _randn(*SHAPE, dtype=dtype, seed=0).requires_grad_()
        x1 = _randn(*SHAPE, dtype=dtype, seed=1).requires_grad_()
        xt, y = fk.interpolate(x0, x1, _times(dtype), schedule="cosine", backend=be)
        (xt * _randn(*SHAPE, dtype=dtype, seed=5) + y.square()).sum().backward()
        grads[be] = (x0.grad, x1.grad)
    for name, a, b in zip(("x0", "x1"), grads["cpu"], grads["torch"]):
        _close(a, b, dtype, f"interpolate grad {name}")
    x0, x1 = _randn(*SHAPE, dtype=dtype, seed=0), _randn(*SHAPE, dtype=dtype, seed=1)
    out = (torch.empty(SHAPE, dtype=dtype), torch.empty(SHAPE, dtype=dtype))
    # 0.375 is exact in fp32: the torch backend turns a float t into a float32
    # tensor (flowkern/_validate.py time()), the cpu op keeps it in float64
    fk.interpolate(x0, x1, 0.375, out=out, backend="cpu")
    ref = fk.interpolate(x0, x1, 0.375, backend="torch")
    _close(out[0], ref[0], dtype, "interpolate out= x_t")
    _close(out[1], ref[1], dtype, "interpolate out= y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["velocity", "x1", "eps"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inputs", ["all", "pred"])  # pred alone: its gradient from the forward
def test_flow_matching_loss_fwd_bwd(dtype, reduction, target, weighted, inputs):
    res = {}
    for be in ("cpu", "torch"):
        pred = _randn(*SHAPE, dtype=dtype, seed=2).requires_grad_()
        x0 = _randn(*SHAPE, dtype=dtype, seed=0).requires_grad_(inputs == "all")
        x1 = _randn(*SHAPE, dtype=dtype, seed=1).requires_grad_(inputs == "all")
        w = (0.5 + _times(dtype, seed=9)) if weighted else None
        loss = fk.flow_matching_loss(pred, x0, x1, _times(dtype), schedule="cosine",
                                     target=target, weight=w, reduction=reduction, backend=be)
        gout = _randn(*loss.shape, dtype=dtype, seed=4) if loss.dim() else torch.ones((), dtype=dtype)
        loss.backward(gout)
        res[be] = (loss.detach(), pred.grad, x0.grad, x1.grad)
    for name, a, b in zip(("loss", "grad pred", "grad x0", "grad x1"), res["cpu"], res["torch"]):
        if a is None and b is None and inputs == "pred" and name != "grad pred":
            continue
        _close(a, b, dtype, f"flow_matching_loss {name} {target} {reduction} w={weighted}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src", PREDICTIONS)
@pytest.mark.parametrize("dst", PREDICTIONS)
def test_convert_fwd_bwd(dtype, src, dst):
    res = {}
    for be in ("cpu", "torch"):
        pred = _randn(*SHAPE, dtype=dtype, seed=2).requires_grad_()
        xt = _randn(*SHAPE, dtype=dtype, seed=3).requires_grad_()
        out = fk.convert(pred, xt, _times(dtype), schedule="vp", src=src, dst=dst, backend=be)
        out.backward(_randn(*SHAPE, dtype=dtype, seed=4))
        res[be] = (out.detach(), pred.grad, xt.grad)
    for name, a, b in zip(("out", "grad pred", "grad x_t"), res["cpu"], res["torch"]):
        # the reference leaves a grad it does not reach (score <-> eps: x_t) as None
        a = torch.zeros_like(res["cpu"][0]) if a is None else a
        b = torch.zeros_like(res["cpu"][0]) if b is None else b
        _close(a, b, dtype, f"convert {src}->{dst} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("times", ["tensors", "floats", "table"])
def test_flowmap_loss_fwd_bwd(dtype, prediction, times):
    form = "data" if prediction in ("velocity", "x1") else "noise"
    t = _times(dtype) * 0.8
    s = t + 0.15
    coef = {"tensors": dict(t=t, s=s), "floats": dict(t=0.3, s=0.55),
            "table": dict(table=fk.step_table("cosine", t, s, dtype=dtype))}[times]
    res = {}
    for be in ("cpu", "torch"):
        x = _randn(*SHAPE, dtype=dtype, seed=0).requires_grad_()
        pred = _randn(*SHAPE, dtype=dtype, seed=2).requires_grad_()
        target = _randn(*SHAPE, dtype=dtype, seed=1).requires_grad_()
        loss = fk.flowmap_loss(x, pred, target, schedule="cosine", prediction=prediction,
                               form=form, weight=0.5 + _times(dtype, seed=9), backend=be,
                               **coef)
        loss.backward()
        res[be] = (loss.detach(), x.grad, pred.grad, target.grad)
    for name, a, b in zip(("loss", "grad x", "grad pred", "grad target"), res["cpu"],
                          res["torch"]):
        _close(a, b, dtype, f"flowmap_loss {name} {prediction} {form} {times}")


# ---------------------------------------------------------------------------
# sampler steps: cpu kernels vs the torch reference


def _step_inputs(dtype):
    return [_randn(*SHAPE, dtype=dtype, seed=10 + k) for k in range(6)]


def _run_step(step, backend, dtype, prediction, cfg, per_sample):
    x, p, xe, pe, pu, peu = _step_inputs(dtype)
    if per_sample:  # tensor times: the step builds a per-sample table
        t = _times(dtype)
        s, tp = t + 0.1, t - 0.08
    else:  # float times: the C++ op evaluates the built-in schedule itself
        t, s, tp = 0.42, 0.55, 0.3
    kw = dict(schedule="vp", prediction=prediction, backend=backend)
    if cfg:
        kw.update(pred_uncond=pu, guidance=2.5)
    if step == "euler":
        return fk.euler_step(x, p, t, s, **kw)
    if step == "heun":
        if cfg:
            kw["pred_euler_uncond"] = peu
        return fk.heun_step(x, p, xe, pe, t, s, **kw)
    if step.startswith("ei_"):
        return fk.ei_step(x, p, t, s, form=step[3:], **kw)
    if step == "dpmpp_2m":
        return torch.cat(fk.dpmpp_2m_step(x, p, t, s, d_prev=xe, t_prev=tp, **kw))
    if step == "dpmpp_2m_first":
        return torch.cat(fk.dpmpp_2m_step(x, p, t, s, **kw))
    if step == "em":
        return fk.em_step(x, p, t, s, g=0.8, seed=7, offset=123, **kw)
    if step == "lms":
        return torch.cat(fk.lms_step(x, p, [0.1, -0.05, 0.02], [xe, pe], t, **kw))
    if step == "lincomb":  # the caller's weights: no schedule or prediction
        return fk.lincomb_step(x, [p, xe, pe], [0.9, 0.3, -0.2, 0.05], noise_std=0.4, seed=7,
                               offset=123, backend=backend)
    raise AssertionError(step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", ["euler", "heun", "ei_data", "ei_noise", "dpmpp_2m",
                                  "dpmpp_2m_first", "em", "lms", "lincomb"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cfg,per_sample", [(False, False), (True, True)])
def test_step_matches_reference(dtype, step, prediction, cfg, per_sample):
    got = _run_step(step, "cpu", dtype, prediction, cfg, per_sample)
    ref = _run_step(step, "torch", dtype, prediction, cfg, per_sample)
    _close(got, ref, dtype, f"{step} {prediction} cfg={cfg}",
           atol=NOISE_ATOL if step in ("em", "lincomb") else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_with_table_and_in_place(dtype):
    x, p = _step_inputs(dtype)[:2]
    table = fk.step_table("cosine", torch.tensor([0.3, 0.6]), torch.tensor([0.6, 0.9]),
                          dtype=dtype)
    ref = fk.euler_step(x, p, table=table[0], backend="torch")
    y = x.clone()
    fk.euler_step(y, p, table=table[0], out=y, backend="cpu")
    _close(y, ref, dtype, "euler_step table= out=x")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ei_step_backward(dtype):
    res = {}
    for be in ("cpu", "torch"):
        x = _randn(*SHAPE, dtype=dtype, seed=1).requires_grad_()
        p = _randn(*SHAPE, dtype=dtype, seed=2).requires_grad_()
        out = fk.ei_step(x, p, 0.3, 0.7, schedule="cosine", prediction="x1", backend=be)
        out.backward(_randn(*SHAPE, dtype=dtype, seed=4))
        res[be] = (out.detach(), x.grad, p.grad)
    for name, a, b in zip(("out", "grad x", "grad pred"), res["cpu"], res["torch"]):
        _close(a, b, dtype, f"ei_step {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", ["linear", "vp", "edm"])
def test_churn(dtype, schedule):
    x = _randn(*SHAPE, dtype=dtype, seed=1)
    got = fk.churn(x, 0.6, 0.5, schedule=schedule, seed=11, offset=5, backend="cpu")
    ref = fk.churn(x, 0.6, 0.5, schedule=schedule, seed=11, offset=5, backend="torch")
    _close(got, ref, dtype, f"churn {schedule}", atol=NOISE_ATOL)


# ---------------------------------------------------------------------------
# flowkern.sample with a trivial model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,prediction,churn", [
    ("euler", "velocity", 0.0), ("heun", "velocity", 0.0), ("ei", "x1", 0.0),
    ("dpmpp_2m", "x1", 0.0), ("em", "velocity", 0.0), ("euler", "velocity", 0.5),
])
def test_sample(dtype, method, prediction, churn):
    # The exact velocity / denoiser of the linear path from N(0, 1) to the point 0.5.
    def model(x, t):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        if prediction == "velocity":  # u = x1 - x0, x = t x1 + (1 - t) x0
            return (0.5 - x) / (1 - t).clamp_min(1e-3)
        return torch.full_like(x, 0.5)

    x_init = _randn(8, 2, dtype=dtype, seed=0)
    kw = dict(method=method, steps=6, prediction=prediction, churn=churn, seed=3,
              progress=False, t_end=0.95 if prediction == "velocity" else 1.0)
    got = fk.sample(model, x_init, backend="cpu", **kw)
    ref = fk.sample(model, x_init, backend="torch", **kw)
    assert got.shape == x_init.shape and torch.isfinite(got).all()
    _close(got, ref, dtype, f"sample {method} churn={churn}",
           atol=NOISE_ATOL if method == "em" or churn else None)
