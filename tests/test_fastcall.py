"""flowkern._fastcall (csrc/fastcall): the public functions' caller of the
flowkern:: overloads. It must give what the overload's own binding (`_op`)
gives — results, in-place writes, errors — and serve every public call's
usual path itself (a fallback there is a host-time regression nobody would
see); anything unusual goes to `_op`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowkern as fk
from flowkern import backend as B
from flowkern.ops import steps as ops_steps
from flowkern.ops import training as ops_training
from helpers import public_calls

ROOT = Path(__file__).resolve().parents[1]
FAST = B.fastcall()
pytestmark = pytest.mark.skipif(FAST is None, reason="flowkern._fastcall does not serve this torch")


def _fast_ops():
    """Every FastOp the public functions call (NativeOps.direct, DiffOp.eager's run)."""
    ops = {}
    for family in (ops_steps._NATIVE, ops_training._NATIVE):
        for name, op in vars(family.direct).items():
            if hasattr(op, "timed"):  # a step's TimedOp: its two overloads' callers
                ops[name], ops[name + "_times"] = op.plain, op.timed
            else:
                ops[name] = op
    return ops


def test_the_build_serves_this_torch():
    """make build builds _fastcall for this torch: every native call the public
    functions make goes through it, not through torch's binding."""
    assert FAST.TORCH_VERSION == torch.__version__
    for name, op in _fast_ops().items():
        assert type(op).__name__ == "FastOp", (name, op)


def test_public_calls_take_the_fast_path():
    """No public call's usual path falls back to torch's binding (an int
    where the schema has a float, a tuple of ints as params, ... would)."""
    before = {n: op.fallbacks for n, op in _fast_ops().items()}
    calls = 0
    for call in public_calls():
        call()
        calls += 1
    after = {n: op.fallbacks for n, op in _fast_ops().items()}
    assert after == before, {n: after[n] - before[n] for n in after if after[n] != before[n]}
    assert calls > 20


def test_the_differentiable_call_takes_the_fast_path():
    """DiffOp's eager forward runs the .nograd kernel, and its eager backward
    the backward op, through fast callers; neither falls back."""
    from flowkern.ops._registry import CALLS, NATIVE_NS
    diff = getattr(CALLS[NATIVE_NS], "fm_loss")
    back = diff.backward_ops.fm_loss_backward  # what that backward calls
    assert type(diff.run).__name__ == "FastOp", diff.run
    assert type(back).__name__ == "FastOp", back
    before = diff.run.fallbacks, back.fallbacks  # other tests' fake tensors count too
    x0 = torch.randn(4, 6, requires_grad=True)
    pred = torch.randn(4, 6, requires_grad=True)
    loss = fk.flow_matching_loss(pred, x0, torch.randn(4, 6), torch.rand(4))
    loss.backward()
    assert (diff.run.fallbacks, back.fallbacks) == before
    assert torch.isfinite(x0.grad).all() and torch.isfinite(pred.grad).all()


def _euler_args(x, p, tab, out):
    return (x, p, None, tab, [], -1, [], 0, 1.0, True, out)


def _ops(name):
    fast = _fast_ops()[name]
    return fast, fast.fallback


def test_results_equal_torchs_binding():
    """Every return kind: None (in place), one tensor, a pair, a list."""
    g = torch.Generator().manual_seed(1)
    x, p, x1 = (torch.randn(3, 5, generator=g) for _ in range(3))
    tab = fk.step_table("linear", 0.2, 0.5)
    fast, slow = _ops("euler_step")
    a, b = torch.empty_like(x), torch.empty_like(x)
    assert fast(*_euler_args(x, p, tab, a)) is None
    slow(*_euler_args(x, p, tab, b))
    assert torch.equal(a, b)
    # a step's `.times` overload: per-sample time tensors
    fast, slow = _ops("euler_step_times")
    ts = torch.tensor([0.1, 0.2, 0.3])
    args = (x, p, None, None, ts, ts + 0.25, None, [0.0, 0.0, float("nan"), 0.0], 0, [], 0, 1.0,
            True)
    fast(*args, a)
    slow(*args, b)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, x + 0.25 * p)
    fast, slow = _ops("interpolate")
    args = (x, x1, torch.rand(3, generator=g), 0.0, 0, [], 0, True)
    ra, rb = fast(*args), slow(*args)
    assert isinstance(ra, tuple) and len(ra) == 2
    assert all(torch.equal(u, v) for u, v in zip(ra, rb))
    fast, slow = _ops("convert")
    args = (p, x, None, 0.3, 0, [], 1, 0, True)
    assert torch.equal(fast(*args), slow(*args))
    # a Tensor[] return: fm_loss_backward (no public caller needs it fast, so
    # it is made here)
    back = torch.ops.flowkern.fm_loss_backward.default
    fast = FAST.op("flowkern::fm_loss_backward", "", back._op)
    args = (torch.tensor(1.0), p, x, x1, None, 0.4, 0, [], 0, None, 0, 3)
    ra, rb = fast(*args), back(*args)
    assert isinstance(ra, list) and len(ra) == len(rb) == 3
    assert all(torch.equal(u, v) for u, v in zip(ra, rb))
    assert fast.fallbacks == 0


def test_errors_equal_torchs_binding():
    """The op's own errors come out as torch's binding raises them: type and
    message (the public functions re-type them by their prefix)."""
    x, p = torch.randn(3, 5), torch.randn(3, 5)
    tab = fk.step_table("linear", 0.2, 0.5)
    fast, slow = _ops("euler_step")
    before = fast.fallbacks  # other tests' unusual calls (fake tensors, ...) count too
    bad = [
        _euler_args(x, torch.randn(3, 4), tab, torch.empty_like(x)),       # shape
        _euler_args(x, p, tab, torch.empty(3, 5, dtype=torch.float64)),    # out dtype
        # a prediction code out of range
        (x, p, None, tab, [], -1, [], 9, 1.0, True, torch.empty_like(x)),
        (x, p, None, None, [0.3, 1.5, float("nan"), 0.0], 0, [], 0, 1.0, True, x.clone()),
    ]
    for args in bad:
        with pytest.raises(Exception) as a:
            fast(*args)
        with pytest.raises(Exception) as b:
            slow(*args)
        assert type(a.value) is type(b.value) and str(a.value) == str(b.value), args
    # the Autograd-key kernel's own error (nograd.cpp): an argument that needs grad
    xg = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'x' requires grad"):
        fast(*_euler_args(xg, p, tab, torch.empty_like(x)))
    assert fast.fallbacks == before


class _Sub(torch.Tensor):
    pass


class _Mode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_anything_unusual_goes_to_torchs_binding():
    """Keywords, subclasses, a TorchFunctionMode, an int for a float, a
    missing argument: the fallback takes the call (and gives its result)."""
    x, p = torch.randn(3, 5), torch.randn(3, 5)
    tab = fk.step_table("linear", 0.2, 0.5)
    fast, slow = _ops("euler_step")
    expected = torch.empty_like(x)
    slow(*_euler_args(x, p, tab, expected))

    def run(args=None, kwargs=None):
        before = fast.fallbacks
        out = torch.empty_like(x)
        a = list(args or _euler_args(x, p, tab, out))
        if args is None:
            a[-1] = out
        fast(*a, **(kwargs or {}))
        assert fast.fallbacks == before + 1
        return a[-1]

    out = torch.empty_like(x)
    args = list(_euler_args(x, p, tab, out))
    args[8] = 1  # int guidance: the fallback converts it
    assert torch.equal(run(args), expected)
    out = torch.empty_like(x)
    assert torch.equal(run(_euler_args(x.as_subclass(_Sub), p, tab, out)), expected)
    mode, out = _Mode(), torch.empty_like(x)
    before = fast.fallbacks
    with mode:
        fast(*_euler_args(x, p, tab, out))
    assert fast.fallbacks == before + 1 and torch.equal(out, expected)
    assert any("euler_step" in str(f) for f in mode.seen), mode.seen  # the mode saw the op
    out = torch.empty_like(x)
    kwargs = dict(zip(["check", "out"], [True, out]))
    run(_euler_args(x, p, tab, out)[:-2], kwargs)
    assert torch.equal(out, expected)
    with pytest.raises(Exception) as a:
        fast(x, p)
    with pytest.raises(Exception) as b:
        slow(x, p)
    assert type(a.value) is type(b.value) and str(a.value) == str(b.value)


def test_unsupported_schema_gives_the_fallback():
    """A schema with a kind the caller does not convert (a string, a
    ScalarType) is served by the fallback itself."""
    sentinel = object()
    assert FAST.op("aten::to", "dtype", sentinel) is sentinel


def test_profiler_sees_one_op():
    x, p = torch.randn(3, 5), torch.randn(3, 5)
    tab = fk.step_table("linear", 0.2, 0.5)
    with torch.profiler.profile() as prof:
        fk.euler_step(x, p, table=tab, out=x)
    names = [e.name for e in prof.events()]
    assert names.count("flowkern::euler_step") == 1, names


def test_calls_from_threads():
    """The caller releases the GIL around the op, as torch's binding does:
    calls from several threads give each its own result."""
    import threading
    x = torch.randn(64, 257)
    preds = [torch.randn(64, 257) for _ in range(4)]
    tab = fk.step_table("linear", 0.2, 0.5)
    outs = [torch.empty_like(x) for _ in preds]
    expected = [fk.euler_step(x, p, table=tab) for p in preds]

    def work(i):
        for _ in range(50):
            fk.euler_step(x, preds[i], table=tab, out=outs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))


def test_turned_off_by_environment():
    """FLOWKERN_FASTCALL=0: the ops' own binding serves every call."""
    code = ("import flowkern, flowkern.backend as B, flowkern.ops.steps as S\n"
            "assert B.fastcall() is None\n"
            "assert type(S._NATIVE.direct.euler_step).__name__ != 'FastOp'\n"
            "print('ok')")
    env = dict(os.environ, FLOWKERN_FASTCALL="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
