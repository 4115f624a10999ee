"""The eager call of a flowkern_triton:: op without the custom op's dispatcher
wrappers (flowkern._fastcall ImplOp, docs/build.md "flowkern._fastcall").

A triton op is a torch.library custom op whose kernel is a Python function
(the Triton launch). Through the dispatcher every call runs the custom op's
Autograd, ADInplaceOrView and backend wrappers around that function (~9 us
of host time here, on a call whose kernel takes 2-20 us on a GPU); for the
calls in which they only pass the call on, the ImplOp runs the function
itself, after the one thing they do: bump the version of every written
tensor. Here: the decision, call by call, on a probe op of a step's schema;
every public triton call's usual path takes it; results, writes and the
autograd version check are the custom op's.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import flowkern as fk
from flowkern import backend as B
from flowkern.ops import _registry as R
from helpers import public_calls

FAST = B.fastcall()
pytestmark = pytest.mark.skipif(FAST is None, reason="flowkern._fastcall does not serve this torch")

# probe ops with the schemas of euler_step (tensors, optional tensors, float
# lists, ints, a float, a bool, a written tensor) and lincomb_step (a tensor
# list): their function records each call; the ImplOp's counters say which
# path it took
CALLED = []


def _record(*args):
    CALLED.append(args)


for _name in ("euler_step", "lincomb_step"):
    torch.library.custom_op(f"flowkern_test::probe_{_name}", mutates_args=("out",),
                            schema=R.SCHEMAS[_name])(_record)
torch.library.custom_op("flowkern_test::probe_buf", mutates_args=("buf",),
                        schema="(Tensor x, float w, Tensor(a!) buf) -> ()")(_record)


def _probe(name="euler_step"):
    op = getattr(torch.ops.flowkern_test, f"probe_{name}").default
    return FAST.impl(op._schema.name, "", op, _record)


def _args(**kw):
    x, p, out = torch.randn(3, 5), torch.randn(3, 5), torch.empty(3, 5)
    a = dict(x=x, pred=p, pred_uncond=None, table=None, t=None, s=None, t_prev=None,
             times=[0.2, 0.3, 0.0, 0.0], kind=0,
             params=[], prediction=0, guidance=1.0, check=False, out=out)
    a.update(kw)
    return a


def _taken(op, args, kwargs=None):
    """Call op; True when it ran the function itself, False when it fell back."""
    taken, fallbacks = op.taken, op.fallbacks
    CALLED.clear()
    op(*args, **(kwargs or {}))
    assert (op.taken - taken) + (op.fallbacks - fallbacks) == 1
    if op.taken > taken:
        assert len(CALLED) == 1 and all(a is b for a, b in zip(CALLED[0], args))
        return True
    return False


def test_a_plain_call_runs_the_function_and_bumps_the_written_tensor():
    op = _probe()
    a = _args()
    versions = {k: v._version for k, v in a.items() if isinstance(v, torch.Tensor)}
    assert _taken(op, list(a.values()))
    assert CALLED[0][0] is a["x"] and CALLED[0][-1] is a["out"]
    # the ADInplaceOrView wrapper's bump: out (written) only
    assert a["out"]._version == versions["out"] + 1
    assert a["x"]._version == versions["x"] and a["pred"]._version == versions["pred"]
    # the custom op's own path bumps the same
    op.fallback(*a.values())
    assert a["out"]._version == versions["out"] + 2


class _Sub(torch.Tensor):
    pass


class _FnMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _DispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_anything_the_wrappers_act_on_goes_through_the_dispatcher():
    """Each case below is one the custom op's wrappers (or a mode, a
    transform, the profiler) must see: the call falls back, unchanged."""
    op = _probe()
    plain = list(_args().values())
    assert _taken(op, plain)
    # the call's form: keywords, a missing argument, an int for a float
    kop = _probe("buf")
    assert _taken(kop, [torch.randn(2), 0.5, torch.empty(2)])
    assert not _taken(kop, [torch.randn(2), 0.5], {"buf": torch.empty(2)})
    assert not _taken(op, list(_args(guidance=1).values()))
    before = op.fallbacks
    with pytest.raises(RuntimeError, match="argument 'kind'"):  # beyond int64: torch's error
        op(*_args(kind=2 ** 70).values())
    assert op.fallbacks == before + 1
    before = op.fallbacks
    with pytest.raises(RuntimeError, match="missing value for argument 'out'"):
        op(*plain[:-1])  # torch's binding's error
    assert op.fallbacks == before + 1
    # tensors the wrappers handle: a subclass, meta, a negative view, sparse
    assert not _taken(op, list(_args(pred=torch.randn(3, 5).as_subclass(_Sub)).values()))
    assert not _taken(op, list(_args(x=torch.empty(3, 5, device="meta"),
                                     pred=torch.empty(3, 5, device="meta"),
                                     out=torch.empty(3, 5, device="meta")).values()))
    assert not _taken(op, list(_args(pred=torch._neg_view(torch.randn(3, 5))).values()))
    assert not _taken(op, list(_args(pred_uncond=torch.randn(3, 5).to_sparse()).values()))
    # gradients: requires_grad with grad mode on; a forward-mode tangent
    w = torch.randn(3, 5, requires_grad=True)
    assert not _taken(op, list(_args(pred=w).values()))
    with torch.no_grad():
        assert _taken(op, list(_args(pred=w).values()))
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        dual = fwad.make_dual(torch.randn(3, 5), torch.randn(3, 5))
        assert not _taken(op, list(_args(pred=dual).values()))
    # a written inference tensor: only inside inference mode
    with torch.inference_mode():
        inf_out = torch.empty(3, 5)
        assert _taken(op, list(_args(out=inf_out).values()))
    assert not _taken(op, list(_args(out=inf_out).values()))
    # modes, transforms and observers
    with _FnMode():
        assert not _taken(op, plain)
    with _DispatchMode():
        assert not _taken(op, plain)
    with torch.profiler.profile():
        assert not _taken(op, plain)
    assert not _taken(op, list(_args(pred=torch.randn(3, 5).requires_grad_()).values()))
    # a tensor list: each element is checked
    lop = _probe("lincomb_step")
    x = torch.randn(3, 5)
    lin = [x, [torch.randn(3, 5), torch.randn(3, 5)], [1.0, 0.5, 0.5], 0.0, 0, 0, None, False,
           torch.empty(3, 5)]
    assert _taken(lop, lin)
    lin[1] = [torch.randn(3, 5), torch.randn(3, 5).as_subclass(_Sub)]
    assert not _taken(lop, lin)
    assert _taken(op, plain)  # and back


def test_an_unsupported_schema_gives_the_fallback():
    torch.library.custom_op("flowkern_test::probe_str", mutates_args=(),
                            schema="(Tensor x, str mode) -> Tensor")(lambda x, mode: x.clone())
    op = torch.ops.flowkern_test.probe_str.default
    assert FAST.impl(op._schema.name, "", op, lambda *a: None) is op


def _impl_ops():
    """Every ImplOp the public triton calls reach: ops_for("triton")'s cached
    callers, each differentiable call's run and its backward's callers."""
    found = {}

    def add(prefix, ns):
        for name, op in vars(ns).items():
            if type(op).__name__ == "ImplOp":
                found[f"{prefix}.{name}"] = op
    add("ops", R._TRITON_DIRECT)
    for name, diff in vars(R.CALLS[R.TRITON_NS]).items():
        found[f"run.{name}"] = diff.run
        add(f"backward.{name}", diff.backward_ops)
    return found


def test_every_triton_op_has_its_direct_caller():
    for name in R.TRITON_IMPLS:
        op = getattr(torch.ops.flowkern_triton, name.split("::")[1]).default
        assert type(R.direct(op)).__name__ == "ImplOp", name
    for name, diff in vars(R.CALLS[R.TRITON_NS]).items():
        assert type(diff.run).__name__ == "ImplOp", name


@pytest.mark.skipif(not fk.available()["triton"], reason="triton is not available")
def test_public_triton_calls_take_the_direct_path():
    """The usual call of every public triton op (and a training step's
    backward) runs the op's function itself: no fallback anywhere."""
    def run():
        with fk.use_backend("triton"):
            for call in public_calls():
                call()
            p = torch.randn(5, 7, requires_grad=True)
            fk.flow_matching_loss(p, torch.randn(5, 7), torch.randn(5, 7),
                                  torch.rand(5)).backward()
    run()  # the callers are looked up on first use
    ops = _impl_ops()
    taken = {n: op.taken for n, op in ops.items()}
    fallbacks = {n: op.fallbacks for n, op in ops.items()}
    run()
    ran = sum(op.taken - taken[n] for n, op in ops.items())
    assert ran >= 15, ran
    # the loss whose input requires grad goes through the dispatcher once
    # (its autograd.Function's forward runs the op with grad mode off: taken)
    assert {n: op.fallbacks for n, op in ops.items()} == fallbacks


@pytest.mark.skipif(not fk.available()["triton"], reason="triton is not available")
def test_a_saved_tensor_overwritten_by_a_triton_step_fails_backward():
    """The version bump autograd relies on: a step that overwrites a tensor a
    graph saved makes backward raise, as with the custom op's own path."""
    w = torch.randn(4, 6, requires_grad=True)
    x, v = torch.randn(4, 6), torch.randn(4, 6)
    y = (w * x).sum()  # saves x
    fk.euler_step(x, v, 0.2, 0.3, out=x, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # in inference mode too (the custom op's ADInplaceOrView wrapper bumps a
    # normal tensor there, so the direct call does)
    y = (w * x).sum()
    v0 = x._version
    with torch.inference_mode():
        fk.euler_step(x, v, 0.2, 0.3, out=x, backend="triton")
    assert x._version == v0 + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.skipif(not fk.available()["triton"], reason="triton is not available")
def test_results_equal_the_dispatcher_path():
    """The same step through the ImplOp and through the custom op: equal."""
    x, v, pu = torch.randn(6, 9), torch.randn(6, 9), torch.randn(6, 9)
    op = R.ops_for("triton").euler_step
    args = lambda out: (x, v, pu, None, None, None, None, [0.2, 0.3, 0.0, 0.0], 0, [], 1,  # noqa: E731
                        1.5, False, out)
    a, b = torch.empty_like(x), torch.empty_like(x)
    taken = op.taken
    op(*args(a))
    assert op.taken == taken + 1
    torch.ops.flowkern_triton.euler_step.default(*args(b))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
