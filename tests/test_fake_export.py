"""FakeTensorMode, meta tracing and torch.export: every public op runs on fake
tensors on every backend (no host read of a value on the way: the value
checks skip fake tensors, as they skip torch.compile's), with the shapes and
dtypes of eager mode; an exported training step matches eager."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flowkern as fk
from conftest import DEVICE, backends_under_test
from helpers import STEP_EXAMPLES

BACKENDS = backends_under_test()
ref = torch.randn(8, 3, device=DEVICE)

CASES = {
    "interpolate": lambda x, v, t: fk.interpolate(x, v, t, "cosine", "eps"),
    "convert": lambda x, v, t: fk.convert(x, v, t, "linear", "x1", "velocity"),
    "flow_matching_loss": lambda x, v, t: fk.flow_matching_loss(x, v, v, t, reduction="none"),
    **{name: (lambda call: lambda x, v, t: call(x, v))(call)
       for name, call in STEP_EXAMPLES.items()},
    "euler_step-tensor-times": lambda x, v, t: fk.euler_step(x, v, t * 0.5, t * 0.5 + 0.1),
    "flowmap_loss": lambda x, v, t: fk.flowmap_loss(x, v, v, 0.2, 0.6),
    "poisson_field": lambda x, v, t: fk.poisson_field(x, t + 0.5, ref),
    "empirical_denoiser": lambda x, v, t: fk.empirical_denoiser(x, 0.5, ref),
    "meanflow.loss": lambda x, v, t: fk.meanflow.loss(x, v, v, t * 0.5, t * 0.5 + 0.2),
    "shortcut.loss": lambda x, v, t: fk.shortcut.loss(x, v, v, x, v, v),
}


def _leaves(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_ops_run_on_fake_tensors(backend, name):
    x, v = torch.randn(4, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    t = torch.rand(4, device=DEVICE) * 0.5 + 0.1
    with fk.use_backend(backend):
        want = _leaves(CASES[name](x, v, t))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fv, ft = (mode.from_tensor(a) for a in (x, v, t))
            got = _leaves(CASES[name](fx, fv, ft))
    assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]


@pytest.mark.skipif(not fk.available()["cpu"], reason="needs flowkern._C")
def test_torch_export_of_a_training_step():
    class Step(torch.nn.Module):
        def forward(self, x0, x1, t):
            xt, y = fk.interpolate(x0, x1, t, "cosine", backend="cpu")
            z = fk.ei_step(xt, y, t * 0.5, t * 0.5 + 0.2, "cosine", backend="cpu")
            return fk.flow_matching_loss(z, x0, x1, t, backend="cpu")

    x0, x1, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    ep = torch.export.export(Step(), (x0, x1, t))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("flowkern.interpolate" in o for o in ops), ops
    torch.testing.assert_close(ep.module()(x0, x1, t), Step()(x0, x1, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n in CASES if n not in  # v unused; fields: test_fields
                                  ("churn", "poisson_field", "empirical_denoiser")])
def test_meta_mixed_with_real_tensors_is_an_error(backend, name):
    """A meta tensor among real ones sends the native op to its fake kernel:
    that must raise naming an argument (as PyTorch's ops raise), not return
    meta outputs."""
    x = torch.randn(4, 3, device=DEVICE)
    v = torch.randn(4, 3, device="meta")
    t = torch.rand(4, device=DEVICE)
    with fk.use_backend(backend):
        with pytest.raises((ValueError, RuntimeError), match=r"([\w\[\]]+: |backend=).*(device|meta)"):
            CASES[name](x, v, t)
