"""The native host path (docs/design.md §8): on the cpu backend one
public call is one flowkern:: op. Under torch.profiler a call records that
op, its output allocations and views, and no other aten op: no coefficient
table built with torch ops, no `contiguous` copies of contiguous inputs, no
reduction ops after the loss kernel."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import flowkern as fk
from helpers import STEP_EXAMPLES

pytestmark = pytest.mark.skipif(not fk.available()["cpu"], reason="needs flowkern._C")

# What a call may record besides its one flowkern op: allocations of its
# outputs (Python or C++) and views.
ALLOWED = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view",
           "aten::select", "aten::as_strided", "aten::alias", "flowkern::empty_output"}


def recorded(fn):
    """The names of the operators one call of fn records, in order."""
    fn()  # warm: first calls resolve and cache
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith(("aten::", "flowkern::"))]


def assert_one_op(fn, op):
    names = recorded(fn)
    ours = [n for n in names if n.startswith("flowkern::") and n != "flowkern::empty_output"]
    assert ours == [op], names
    extra = [n for n in names if not n.startswith("flowkern::") and n not in ALLOWED]
    assert not extra, f"{op}: other operators recorded: {extra} (all: {names})"


B, D = 8, 64
x0, x1, pred = (torch.randn(B, D) for _ in range(3))
t = torch.rand(B)
w = torch.rand(B)


@pytest.mark.parametrize("schedule", ["linear", "cosine", fk.schedules.VP(0.1, 15.0), "edm"],
                         ids=str)
@pytest.mark.parametrize("time", ["tensor", "float", "one"])
def test_training_ops_are_one_call(schedule, time):
    tt = {"tensor": t, "float": 0.37, "one": t[:1]}[time]
    assert_one_op(lambda: fk.interpolate(x0, x1, tt, schedule, "eps"),
                  "flowkern::interpolate")
    out = (torch.empty(B, D), torch.empty(B, D))
    assert_one_op(lambda: fk.interpolate(x0, x1, tt, schedule, out=out),
                  "flowkern::interpolate_out")
    for reduction in ("mean", "sum", "none"):
        assert_one_op(lambda: fk.flow_matching_loss(pred, x0, x1, tt, schedule, "x1", weight=w,
                                                    reduction=reduction),
                      "flowkern::fm_loss")
    assert_one_op(lambda: fk.convert(pred, x0, tt, schedule, "x1", "velocity"),
                  "flowkern::convert")
    ss = {"tensor": (t + 1) / 2, "float": 0.81, "one": (t[:1] + 1) / 2}[time]
    for reduction in ("mean", "sum", "none"):
        assert_one_op(lambda: fk.flowmap_loss(x0, pred, x1, tt, ss, schedule, "velocity",
                                              weight=w, reduction=reduction),
                      "flowkern::flowmap_loss")
    tab = fk.step_table(schedule, tt, ss)
    assert_one_op(lambda: fk.flowmap_loss(x0, pred, x1, table=tab), "flowkern::flowmap_loss")


def test_differentiable_calls_are_one_call():
    """With inputs that need a gradient: the default overload (one autograd
    node), still one op forward and one op backward."""
    p = pred.clone().requires_grad_()
    # pred alone needs a gradient (training): the forward's pass also writes
    # d loss / d pred, the backward scales it in place (one aten::mul_; none
    # for a loss gradient of 1 on CPU, which reads it)
    assert_one_op(lambda: fk.flow_matching_loss(p, x0, x1, t), "flowkern::fm_loss_with_grad")
    loss = fk.flow_matching_loss(p, x0, x1, t)
    for go, muls in ((None, 0), (torch.tensor(2.0), 1)):
        names = recorded(lambda: torch.autograd.grad(fk.flow_matching_loss(p, x0, x1, t), p, go))
        assert [n for n in names if n.startswith("flowkern::")] == ["flowkern::fm_loss_with_grad"]
        assert names.count("aten::mul_") == muls, names
    assert loss.grad_fn is not None
    a = x0.clone().requires_grad_()
    # x0 too: fm_loss's own node, whose backward is one fused op
    assert_one_op(lambda: fk.flow_matching_loss(p, a, x1, t), "flowkern::fm_loss")
    names = recorded(lambda: torch.autograd.grad(fk.flow_matching_loss(p, a, x1, t), (p, a)))
    assert names.count("flowkern::fm_loss_backward") == 1, names
    assert_one_op(lambda: fk.interpolate(a, x1, t), "flowkern::interpolate")
    assert_one_op(lambda: fk.ei_step(a, pred, 0.3, 0.5, "cosine"), "flowkern::ei_step")
    # the flow map's loss: one node, its backward one fused op
    half = t / 2
    assert_one_op(lambda: fk.flowmap_loss(a, p, x1, half, 0.8, "cosine"), "flowkern::flowmap_loss")
    names = recorded(lambda: torch.autograd.grad(
        fk.flowmap_loss(a, p, x1, half, 0.8, "cosine"), (a, p)))
    assert [n for n in names if n.startswith("flowkern::")] == [
        "flowkern::flowmap_loss", "flowkern::flowmap_loss_backward"], names


def test_nograd_overloads_refuse_inputs_that_need_a_gradient():
    """The `.nograd` overloads skip autograd: given an input that needs a
    gradient they raise instead of returning a detached result."""
    a = x0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="argument 'x0' requires grad"):
        torch.ops.flowkern.interpolate.nograd(a, x1, t, 0.0, 0, [], 0, True)
    with torch.no_grad():
        torch.ops.flowkern.interpolate.nograd(a, x1, t, 0.0, 0, [], 0, True)


@pytest.mark.parametrize("times", ["float", "table", "tensor"])
def test_steps_are_one_call(times):
    """float times, a step table, or per-sample times as tensors (which the
    op evaluates at each row: no table built)."""
    grid = torch.linspace(0.1, 0.9, 5)
    tables = fk.step_table("cosine", grid[:-1], grid[1:], t_prev=grid[:-1] - 0.05, g=0.3)
    row = tables[1]  # the caller's view, made before the call
    ts = 0.2 + 0.3 * torch.rand(B)
    ss, ps, hats = ts + 0.2, ts - 0.1, (ts - 0.1).double()
    kw = {"float": dict(t=0.3, s=0.5, schedule="cosine"), "table": dict(table=row),
          "tensor": dict(t=ts, s=ss, schedule="cosine")}[times]
    x = torch.randn(B, D)
    out, d_out = torch.empty(B, D), torch.empty(B, D)
    assert_one_op(lambda: fk.euler_step(x, pred, out=out, **kw), "flowkern::euler_step")
    assert_one_op(lambda: fk.euler_step(x, pred, **kw), "flowkern::euler_step")
    assert_one_op(lambda: fk.euler_step(x, pred, pred_uncond=x1, guidance=2.0, out=out, **kw),
                  "flowkern::euler_step")
    assert_one_op(lambda: fk.heun_step(x, pred, x1, x0, out=out, **kw), "flowkern::heun_step")
    assert_one_op(lambda: fk.ei_step(x, pred, **kw), "flowkern::ei_step")
    assert_one_op(lambda: fk.ei_step(x, pred, out=out, **kw), "flowkern::ei_step_out")
    prev = {"float": dict(t_prev=0.25), "table": {}, "tensor": dict(t_prev=ps)}[times]
    assert_one_op(lambda: fk.dpmpp_2m_step(x, pred, d_prev=x1, out=out, d_out=d_out, **kw,
                                           **prev),
                  "flowkern::dpmpp_2m_step")
    g = dict(g=0.3) if times == "float" else {}
    assert_one_op(lambda: fk.em_step(x, pred, seed=3, offset=8, out=out, **kw, **g),
                  "flowkern::em_step")
    lms = {"float": dict(t=0.3, schedule="cosine"), "table": dict(table=row),
           "tensor": dict(t=ts, schedule="cosine")}[times]
    assert_one_op(lambda: fk.lms_step(x, pred, [0.1, 0.2, 0.3], [x1, x0], out=out, u_out=d_out,
                                      **lms), "flowkern::lms_step")
    assert_one_op(lambda: fk.lincomb_step(x, [pred, x1, x0], [0.9, 0.1, 0.2, -0.05],
                                          noise_std=0.3, seed=2, out=out),
                  "flowkern::lincomb_step")
    back = fk.step_table("cosine", grid[2:3], grid[1:2])[0]  # churn goes back: t_hat <= t
    ch = {"float": dict(t=0.5, t_hat=0.3, schedule="cosine"), "table": dict(table=back),
          "tensor": dict(t=ts, t_hat=hats, schedule="cosine")}[times]
    assert_one_op(lambda: fk.churn(x, seed=1, out=out, **ch), "flowkern::churn")


def test_native_and_python_tables_agree():
    """A step's row built in C++ from float times equals flowkern.step_table's
    (computed in float64, rounded once), so both paths give the same result."""
    x = torch.randn(4, 33, dtype=torch.float64)
    p = torch.randn(4, 33, dtype=torch.float64)
    for sched in ("linear", "cosine", "vp", "ve", "edm", fk.schedules.Polynomial(2.5)):
        a = fk.dpmpp_2m_step(x, p, 0.3, 0.6, sched, d_prev=p * 0.5, t_prev=0.1)[0]
        tab = fk.step_table(sched, 0.3, 0.6, t_prev=0.1, dtype=torch.float64)
        b = fk.dpmpp_2m_step(x, p, d_prev=p * 0.5, table=tab)[0]
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


# ------------------------------------------------ ops without a derivative

def test_every_public_step_has_an_example():
    """helpers.STEP_EXAMPLES (read by the tests below, the fuzzer's out= test
    and the fake-tensor test) has one call of every public step op."""
    from flowkern.ops import steps
    from flowkern.ops._registry import SCHEMAS

    assert set(STEP_EXAMPLES) == {n for n in SCHEMAS if n in steps.__all__}


# The native op a step with out= calls (its error messages name it).
_OUT_OP = {"ei_step": "ei_step_out"}


@pytest.mark.parametrize("op", list(STEP_EXAMPLES))
def test_in_place_steps_refuse_inputs_that_need_a_gradient(op):
    """An in-place step has no derivative: an input or buffer that needs a
    gradient is a clear error naming it, not a silently detached result."""
    call = STEP_EXAMPLES[op]
    x = torch.randn(4, 5)
    name = {"churn": "x", "lincomb_step": "terms"}.get(op, "pred")
    native = _OUT_OP.get(op, op)
    with pytest.raises(RuntimeError, match=f"flowkern::{native}: argument '{name}' requires grad"):
        call(x.requires_grad_() if op == "churn" else x, torch.randn(4, 5, requires_grad=True),
             torch.empty(4, 5))
    leaf = torch.zeros(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'out' requires grad"):
        call(torch.randn(4, 5), torch.randn(4, 5), leaf)
    with torch.no_grad():  # fine without grad mode: the result is a plain tensor
        call(torch.randn(4, 5), torch.randn(4, 5, requires_grad=True), None)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("op", list(STEP_EXAMPLES))
def test_in_place_writes_bump_the_version_counter(op, mode):
    """A buffer autograd saved and a step overwrote makes backward raise (the
    version counter, bumped once per call), as PyTorch's own in-place ops do:
    under no_grad, and in inference mode too, where the Autograd key is
    skipped (the ADInplaceOrView kernel bumps then)."""
    a = torch.randn(4, 5, requires_grad=True)
    b = a * 1.0
    y = (b * b).sum()  # saves b
    v0 = b._version
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        STEP_EXAMPLES[op](torch.randn(4, 5), torch.randn(4, 5), b)
    assert b._version == v0 + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_interpolate_out_refuses_inputs_that_need_a_gradient():
    out = (torch.empty(4, 5), torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="argument 'x0' requires grad"):
        fk.interpolate(torch.randn(4, 5, requires_grad=True), torch.randn(4, 5), 0.3, out=out)
    v = out[0]._version
    with torch.no_grad():
        fk.interpolate(torch.randn(4, 5, requires_grad=True), torch.randn(4, 5), 0.3, out=out)
    assert out[0]._version == v + 1 and out[1]._version > 0
    with torch.inference_mode():
        fk.interpolate(torch.randn(4, 5), torch.randn(4, 5), 0.3, out=out)
    assert out[0]._version == v + 2


def test_forward_mode_ad_takes_the_differentiable_call():
    """A dual input (forward_ad, torch.func.jvp) goes to the op's
    autograd.Function, whose jvp runs the op on the tangents; a dual reaching
    a `.nograd` kernel directly is an error (tests/test_transforms.py has the
    rest)."""
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    tt = torch.rand(4)
    _, tan = torch.func.jvp(lambda a: fk.interpolate(a, v, tt)[0], (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tan, (1 - tt)[:, None].expand(4, 3))
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        d = fwad.make_dual(v, torch.ones_like(v))
        out = fk.convert(d, x, tt, "linear", "x1", "velocity")
        assert fwad.unpack_dual(out).tangent is not None
        with pytest.raises(RuntimeError, match="argument 'pred' carries a forward-mode tangent"):
            torch.ops.flowkern.convert.nograd(d, x, tt, 0.0, 0, [], 1, 0, True)
        # a view's tangent lives on its base (the kernel's pointer test must
        # not take a view without one of its own for a plain tensor): a view
        # of a dual, a view of a view, and a view taken before its base
        # became dual by an in-place copy
        base = fwad.make_dual(torch.randn(8, 3), torch.ones(8, 3))
        early = torch.randn(8, 3)
        early_view = early[:4]
        early.copy_(base)
        for view in (base[:4], base[:6][2:], early_view):
            assert fwad.unpack_dual(view).tangent is not None
            with pytest.raises(RuntimeError, match="'pred' carries a forward-mode tangent"):
                torch.ops.flowkern.convert.nograd(view, x, tt, 0.0, 0, [], 1, 0, True)


def test_the_no_derivative_kernel_in_use():
    """flowkern._nograd (C++) where it was built for this torch, the Python
    twin (flowkern/ops/_nograd.py) with FLOWKERN_NOGRAD=python or another
    torch (docs/build.md)."""
    import os

    from flowkern.backend import nograd_native
    assert nograd_native() is (os.environ.get("FLOWKERN_NOGRAD") != "python")


def _pytest_in_a_process(env, *args, timeout):
    """pytest on `args` in a fresh process with environment `env`, from the
    repository root; the finished process, which must have passed."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                         env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return res


_NOGRAD_RULES = ("test_in_place_steps_refuse_inputs_that_need_a_gradient or "
                 "test_in_place_writes_bump_the_version_counter or "
                 "test_interpolate_out_refuses_inputs_that_need_a_gradient or "
                 "test_forward_mode_ad_takes_the_differentiable_call or "
                 "test_the_no_derivative_kernel_in_use")


@pytest.mark.skipif(__import__("os").environ.get("FLOWKERN_NOGRAD") == "python",
                    reason="this is the run it starts")
def test_the_python_no_derivative_kernel_keeps_the_rules():
    """The tests above, in a process whose no-derivative ops run the Python
    twin of csrc/autograd/nograd.cpp, as under a torch the wheel was not
    built for: the same errors, messages and version bumps."""
    import os

    res = _pytest_in_a_process(dict(os.environ, FLOWKERN_NOGRAD="python"), __file__,
                               "-k", _NOGRAD_RULES, timeout=600)
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout


def test_triton_ops_trace_into_their_kernels():
    """tests/test_triton_traced.py in a process with FLOWKERN_TRITON_OP=1 and
    compiled Triton kernels: torch.compile's AOTAutograd sees each Triton
    launch of every op, and only the outputs written (docs/design.md §5)."""
    import os

    pytest.importorskip("triton")
    env = dict(os.environ, FLOWKERN_TRITON_OP="1", TRITON_INTERPRET="0")
    res = _pytest_in_a_process(env, os.path.join(os.path.dirname(__file__),
                                                 "test_triton_traced.py"), timeout=900)
    last = res.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, last


# -- aliasing: exact in-place writes work, partial overlaps are errors ------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_exact_in_place_is_allowed(backend):
    x, pred = torch.randn(4, 33), torch.randn(4, 33)
    want = fk.euler_step(x, pred, 0.2, 0.3, backend="torch")
    got = fk.euler_step(x, pred, 0.2, 0.3, out=x, backend=backend)
    assert got is x
    torch.testing.assert_close(x, want)
    x0, x1 = torch.randn(4, 33), torch.randn(4, 33)
    want = fk.interpolate(x0, x1, 0.3, backend="torch")
    fk.interpolate(x0, x1, 0.3, out=(x1, x0), backend=backend)  # each output is an input
    torch.testing.assert_close(x1, want[0])
    torch.testing.assert_close(x0, want[1])


@pytest.mark.parametrize("backend", ["cpu", "torch"] + (["triton"] if fk.available()["triton"]
                                                        else []))
def test_partial_overlaps_are_errors(backend):
    """Every backend: the C++ rule (csrc/cpu/args.h) or its Python twin (_validate)."""
    buf = torch.randn(5 * 33)
    x, pred = buf[:132].view(4, 33), torch.randn(4, 33)
    shifted = buf[1:133].view(4, 33)
    with pytest.raises(ValueError, match="out: overlaps x without being it"):
        fk.euler_step(x, pred, 0.2, 0.3, out=shifted, backend=backend)
    with pytest.raises(ValueError, match="out: overlaps pred without being it"):
        fk.euler_step(pred, shifted, 0.2, 0.3, out=x, backend=backend)
    o = torch.empty(4, 33)
    with pytest.raises(ValueError, match=r"out\[1\]: shares memory with out\[0\]"):
        fk.interpolate(torch.randn(4, 33), torch.randn(4, 33), 0.3, out=(o, o), backend=backend)
    with pytest.raises(ValueError, match="d_out: shares memory with out"):
        fk.dpmpp_2m_step(x.clone(), pred, 0.3, 0.5, schedule="cosine", prediction="x1",
                         out=o, d_out=o, backend=backend)
    snapshot = buf.clone()
    with pytest.raises(ValueError):
        fk.euler_step(x, pred, 0.2, 0.3, out=shifted, backend=backend)
    assert torch.equal(buf, snapshot)  # nothing written before the error


def test_gpu_overhead_script_runs_its_cpu_dry_run():
    """bench/gpu_overhead.py (what `make gpu-check` times on a GPU) stays
    runnable: on CPU tensors with the cpu backend every case runs, passes its
    check against the eager formulation, and is reported; so does --profile."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import bench_overhead as bo
    finally:
        sys.path.pop(0)
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_overhead.py"),
                        "--device", "cpu", "--backend", "cpu", "--n", "3", "--reps", "1",
                        "--shape", "5x37", "--profile", "euler_step (table)"],
                       cwd=root, capture_output=True, text=True, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    cases = 2 + 2 * len(bo.OPS) + len(bo.LOOPS)  # torch.add, the bare op, every pair, the loops
    assert f"gpu_overhead: {cases} cases, 0 failed" in out, out[-3000:]
    assert "cProfile of 3 calls of fk.euler_step" in out
    assert "FAIL" not in out and "SKIP" not in out, out[-3000:]
