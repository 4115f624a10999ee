"""The Triton backend as torch.compile sees it with FLOWKERN_TRITON_OP=1: every
flowkern_triton:: op is a torch.library.triton_op whose launches go through
wrap_triton, so AOTAutograd (what torch.compile runs before Inductor) traces
into the op and records each Triton kernel as a
`triton_kernel_wrapper_functional` node, instead of an opaque custom-op call
(docs/design.md §5).

These tests need compiled (not interpreted) Triton kernels and the flag, so
they skip in the test suite's own process (TRITON_INTERPRET=1 without a
GPU); test_host_path.test_triton_ops_trace_into_their_kernels runs this file
in a process with both. Without a GPU the tensors are fake CUDA tensors, and a
stand-in driver names sm_90 as the target: torch's analysis of which kernel
arguments a launch writes compiles each kernel to TTIR for that target, as
it does on a GPU (no launch happens).
"""
import contextlib

import pytest
import torch

from flowkern.backend import triton_ops_traced

pytestmark = pytest.mark.skipif(not triton_ops_traced(),
                                reason="traces the triton_op registration: run with "
                                       "FLOWKERN_TRITON_OP=1 and without TRITON_INTERPRET "
                                       "(test_host_path does)")

if triton_ops_traced():
    import triton
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget

    if not torch.cuda.is_available():
        class _Sm90Target:
            """The one driver method tracing uses: the target TTIR is made for."""

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(_Sm90Target())

import flowkern as fk  # noqa: E402
from helpers import STEP_EXAMPLES  # noqa: E402

HOP = "triton_kernel_wrapper_functional"
SHAPE = (8, 3, 5)


def _trace(fn, *shapes):
    """The forward graph of fn on CUDA tensors of `shapes` as AOTAutograd
    traces it (fake tensors unless a GPU is here)."""
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    traced = aot_function(fn, fw_compiler=keep)
    mode = FakeTensorMode() if not torch.cuda.is_available() else contextlib.nullcontext()
    with mode:
        args = [torch.empty(s, device="cuda") for s in shapes]
        traced(*args)
    return graphs[0]


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _kernels(gm):
    """The Triton launches of a graph: [(kernel name, written argument names)]."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    out = []
    for n in _calls(gm):
        if HOP in str(n.target):
            kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            out.append((kernel.fn.__name__, sorted(n.kwargs["tensors_to_clone"])))
    return out


def _assert_traced_into(gm):
    opaque = [str(n.target) for n in _calls(gm) if "flowkern_triton" in str(n.target)]
    assert not opaque, f"flowkern_triton ops left opaque in the graph: {opaque}"
    assert _kernels(gm), gm.code



@pytest.mark.parametrize("name,fn,writes", [
    ("interpolate", lambda x0, x1, t: fk.interpolate(x0, x1, t, "cosine"),
     [("lincomb_kernel", ["o0", "o1"])]),
    ("convert", lambda p, x, t: fk.convert(p, x, t, "linear", "x1", "velocity"),
     [("lincomb_kernel", ["o0"])]),
    ("flow_matching_loss", lambda p, x1, t: fk.flow_matching_loss(p, p * 0.5, x1, t),
     [("rowsum_kernel", ["partial"])]),
])
def test_training_ops_trace_into_their_kernels(name, fn, writes):
    with fk.use_backend("triton"):
        fw = _trace(fn, SHAPE, SHAPE, SHAPE[:1])
    _assert_traced_into(fw)
    assert _kernels(fw) == writes


def test_the_loss_backward_traces_into_its_kernel():
    """The backward op as the backward graph calls it (AOTAutograd cannot
    run the autograd engine on fake CUDA tensors without a device, so the op
    is traced on its own): g_pred alone when x0, x1 need no gradient."""
    spec = fk.schedules.native_spec("linear")

    def backward(g, p, x1, t):
        return torch.ops.flowkern_triton.fm_loss_backward(g, p, p * 0.5, x1, t, 0.0, spec[0],
                                                          spec[1], 0, None, 0, 1)
    with fk.use_backend("triton"):
        fw = _trace(backward, (), SHAPE, SHAPE, SHAPE[:1])
    _assert_traced_into(fw)
    assert _kernels(fw) == [("lincomb_kernel", ["o0"])]


@pytest.mark.parametrize("name", STEP_EXAMPLES)
def test_steps_in_place_write_only_their_outputs(name):
    """out=x: the one tensor the kernel writes is its output (the analysis
    of the compiled kernel, not an assumption that every argument is written);
    x's new value is what the graph returns."""
    def step(x, p):
        x = x.clone()
        STEP_EXAMPLES[name](x, p, out=x)
        return x

    with fk.use_backend("triton"):
        fw = _trace(step, SHAPE, SHAPE)
    _assert_traced_into(fw)
    for kernel, written in _kernels(fw):
        assert kernel == "lincomb_kernel"
        assert written and set(written) <= {"o0", "o1", "o2"}, written


@pytest.mark.parametrize("name,fn", [
    ("poisson_field", lambda x, r, ref: fk.poisson_field(x, r + 0.5, ref)),
    ("empirical_denoiser", lambda x, r, ref: fk.empirical_denoiser(x, r * 0.5, ref)),
])
def test_fields_trace_into_their_kernel(name, fn):
    with fk.use_backend("triton"):
        fw = _trace(fn, (8, 3), (8,), (16, 3))
    _assert_traced_into(fw)
    assert [k for k, _ in _kernels(fw)] == ["field_kernel"]


def test_flowmap_loss_traces_into_its_kernel():
    with fk.use_backend("triton"):
        # tensor times: a float becomes torch.tensor(...) on the device, which
        # a fake CUDA tensor cannot stand in for without a driver
        fw = _trace(lambda x, p, t: fk.flowmap_loss(x, p, p * 0.5, t * 0.2, t * 0.6),
                       SHAPE, SHAPE, SHAPE[:1])
    _assert_traced_into(fw)
    assert [k for k, _ in _kernels(fw)] == ["rowsum_kernel"]


def test_eager_calls_launch_without_the_wrap_triton_hop(monkeypatch):
    """An eager call's direct caller (flowkern._fastcall ImplOp) runs the op's
    function as triton_op's own backend kernel does: with wrap_triton off, so
    its launches go straight to Triton, not through the tracing HOP."""
    import importlib

    from torch._library.triton import is_wrap_triton_enabled

    from flowkern.ops import _registry as R
    seen = []
    launcher = importlib.import_module("flowkern.triton.steps")
    monkeypatch.setattr(launcher, "euler_step", lambda *a: seen.append(is_wrap_triton_enabled()))
    x = torch.randn(2, 3)
    R.TRITON_IMPLS["flowkern_triton::euler_step"](x, x, None, None, None, None, None,
                                                    [0.2, 0.3, 0.0, 0.0], 0, [], 0, 1.0, False,
                                                    torch.empty(2, 3))
    assert seen == [False] and is_wrap_triton_enabled()
