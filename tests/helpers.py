"""Comparison helpers in the spirit of flash-attention's tests: a kernel's
error against a float64 reference must be within a small multiple of what
PyTorch itself makes when it evaluates the same formula eagerly in the
input dtype."""
import contextlib

import torch

import flowkern as fk

EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23,
       torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(out, ref64, naive, what="", factor=3.0, ulps=4.0, scale=None, atol=0.0):
    """|out - ref64| <= factor * |naive - ref64| + ulps * eps(dtype) * scale.

    naive: the same formula evaluated by PyTorch in out's dtype (its own error);
    the ulps term covers a final rounding to a 16-bit dtype and exact naive
    results. scale defaults to max|ref64|; a result computed through
    cancellation passes the magnitude of its terms instead; atol covers a term
    computed at a fixed precision whatever the dtype (the fp32 noise of em_step).
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN in output"
    if scale is None:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
    tol = factor * max_err(naive, ref64) + ulps * EPS[out.dtype] * max(scale, 1e-30) + atol
    err = max_err(out, ref64)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} (naive {max_err(naive, ref64):.3g})"


def assert_nan_only_at(out, clean, idx):
    """`out` is NaN exactly at index `idx` and equals `clean` everywhere else
    (a NaN planted in one input element reached that element only)."""
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[idx] = True
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], clean[~nan])


# One call of each public sampler step, (x, p, out=None, backend=None) ->
# its result: the tests that hold every step to a property (one dispatcher
# call, out= under autograd, fake tensors, the simulated CUDA glue) read this
# table; a new step adds its line here. The key is the public function's name.
STEP_EXAMPLES = {
    "euler_step": lambda x, p, out=None, backend=None: fk.euler_step(
        x, p, 0.2, 0.4, out=out, backend=backend),
    "heun_step": lambda x, p, out=None, backend=None: fk.heun_step(
        x, p, x, p, 0.2, 0.4, out=out, backend=backend),
    "ei_step": lambda x, p, out=None, backend=None: fk.ei_step(
        x, p, 0.2, 0.4, "cosine", out=out, backend=backend),
    "dpmpp_2m_step": lambda x, p, out=None, backend=None: fk.dpmpp_2m_step(
        x, p, 0.2, 0.4, prediction="x1", out=out, backend=backend),
    "em_step": lambda x, p, out=None, backend=None: fk.em_step(
        x, p, 0.2, 0.4, seed=1, out=out, backend=backend),
    "churn": lambda x, p, out=None, backend=None: fk.churn(
        x, 0.4, 0.2, "edm", seed=1, out=out, backend=backend),
    "lms_step": lambda x, p, out=None, backend=None: fk.lms_step(
        x, p, [0.1, 0.2], [p * 2], 0.2, "cosine", out=out, backend=backend),
    "lincomb_step": lambda x, p, out=None, backend=None: fk.lincomb_step(
        x, [p, p * 2], [0.9, 0.1, 0.05], noise_std=0.2, seed=4, out=out, backend=backend),
}


def public_calls():
    """The usual calls of every public op (tests/test_fastcall.py on the native
    backends, tests/test_triton_direct.py under use_backend("triton")): tables
    and float times, guidance, noise, the outputs given or not, no gradient
    anywhere."""
    g = torch.Generator().manual_seed(0)
    x, p, pu, x1 = (torch.randn(5, 7, generator=g) for _ in range(4))
    t = torch.rand(5, generator=g) * 0.8 + 0.1
    tab = fk.step_table("linear", 0.3, 0.4)
    out = torch.empty_like(x)
    yield lambda: fk.interpolate(x, x1, t)
    yield lambda: fk.interpolate(x, x1, 0.5, schedule="cosine")
    yield lambda: fk.interpolate(x, x1, t, out=(torch.empty_like(x), torch.empty_like(x)))
    yield lambda: fk.flow_matching_loss(p, x, x1, t)
    yield lambda: fk.flow_matching_loss(p, x, x1, t, weight=t, reduction="none")
    yield lambda: fk.convert(p, x, t, src="x1", dst="velocity")
    yield lambda: fk.flowmap_loss(x, p, x1, t / 2, 0.9, "cosine", "velocity")
    yield lambda: fk.flowmap_loss(x, p, x1, table=fk.step_table("vp", t / 2, 0.8), weight=t,
                                  reduction="none")
    yield lambda: fk.euler_step(x, p, table=tab, out=out)
    yield lambda: fk.euler_step(x, p, 0.3, 0.4, pred_uncond=pu, guidance=2.0)
    yield lambda: fk.heun_step(x, p, x1, pu, 0.3, 0.4)
    yield lambda: fk.ei_step(x, p, 0.3, 0.4)
    yield lambda: fk.ei_step(x, p, table=fk.step_table("vp", 0.3, 0.4), out=out)
    yield lambda: fk.dpmpp_2m_step(x, p, 0.3, 0.4)
    yield lambda: fk.dpmpp_2m_step(x, p, 0.35, 0.4, d_prev=pu, t_prev=0.3)
    yield lambda: fk.em_step(x, p, 0.3, 0.4, g=0.5, seed=3, offset=10)
    yield lambda: fk.em_step(x, p, 0.3, 0.4, per_sample_seeds=torch.arange(5))
    yield lambda: fk.churn(x, 0.5, 0.4, seed=1)
    yield lambda: fk.lms_step(x, p, [0.1, 0.05], history=[pu], t=0.3)
    yield lambda: fk.lincomb_step(x, [p, pu], [1.0, 0.5, -0.25], noise_std=0.1, seed=2)
    # per-sample times as tensors (the op evaluates the schedule at each row)
    yield lambda: fk.euler_step(x, p, t / 2, t / 2 + 0.3, "cosine", out=out)
    yield lambda: fk.heun_step(x, p, x1, pu, t / 2, 0.95, "vp")
    yield lambda: fk.ei_step(x, p, t / 2, t)
    yield lambda: fk.dpmpp_2m_step(x, p, t / 2, t, "edm", d_prev=pu, t_prev=t / 4)
    yield lambda: fk.em_step(x, p, t / 2, t, g=0.5, seed=3)
    yield lambda: fk.churn(x, t, t / 2, seed=1)
    yield lambda: fk.lms_step(x, p, [0.1, 0.05], history=[pu], t=t)
    yield lambda: fk.sample(lambda x, t: -x, x, steps=3, progress=False)
    yield lambda: fk.sample(lambda x, t: -x, x, steps=3, method="heun", progress=False)
    yield lambda: fk.sample(lambda x, t: -x, x, steps=3, method="dpmpp_2m", progress=False)
    yield lambda: fk.sample(lambda x, t: -x, x, steps=3, method="em", g=0.5,
                            progress=False, seed=1)


def step_overloads(ns, c):
    """(overload name, coefficient args) pairs that run a step's coefficients
    c = (table, t, s, t_prev, times, kind, params): flowkern_triton:: has one
    op of this full signature; a native step has its `.times` overload (every
    form) and its default one without the time tensors (schemas.inc), which
    the public calls use when no time is a tensor."""
    if ns != "flowkern":
        return [("default", c)]
    pairs = [("times", c)]
    if c[1] is None and c[2] is None and c[3] is None:
        pairs.append(("default", (c[0], *c[4:])))
    return pairs


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype set to `dtype` inside the block (k-diffusion's
    DPMSolver builds its times in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
