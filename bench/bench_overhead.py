"""Host overhead per call: every public op on tiny tensors, where the kernel's
arithmetic is negligible and what is timed is the Python wrapper, validation,
the coefficient table, dispatch and allocation.

Shape (8, 64) fp32 on CPU, torch.set_num_threads(1) for this module (restored
afterwards). flowkern runs with backend="cpu" (the C++ kernels); the eager
candidate is the same computation written the way the peers write it
(flow_matching's AffineProbPath / torchcfm / diffusers / k-diffusion: plain
torch ops with t of shape (8, 1) broadcast), kept in this file.

Groups (one row each in the report's "Host overhead" table; the report
divides every time by the torch.add row):

  overhead-floor      torch.add(a, b) | flowkern::interpolate.nograd (the bare C++ op
                      as a public call makes it, through the same caller: no Python
                      around it) | the triton ops' custom-op layer (euler_step's
                      schema, no-op body) through the dispatcher and through
                      flowkern._fastcall's direct caller
  overhead · <op>     flowkern vs eager, per call:
      interpolate             fresh outputs | eager xt = t*x1 + (1-t)*x0, u = x1 - x0
      interpolate out=        into (x_t, y) buffers | the same eager (the peers allocate)
      flow_matching_loss fwd  | ((pred - (x1 - x0))**2).mean()
      flow_matching_loss fwd+bwd   pred.grad = None; loss.backward() (both candidates)
      convert x1->velocity    | (pred - x_t) / (1 - t)
      euler_step (table)      table=step_table(...)[i], out=x | x.add_(v, alpha=dt)
      euler_step (float t, s) t=, s= floats, out=x | x.add_(v, alpha=dt)
      euler_step (per-sample t, s)  t=, s= (B,) tensors, out=x |
                              x.addcmul_((s - t)[:, None], v)
      heun_step               table, out= buffer | x + dt/2 (v + v_e)
      ei_step                 table, x1 prediction, data form | its formula in floats
      dpmpp_2m_step           table with t_prev, x1 prediction | k-diffusion's formula
      em_step                 table with g, out=x | x + h v + g sqrt(h) randn_like(x)
      churn                   table (t -> t_hat), out=x | eager renoise with randn_like
      lms_step                table, x1 prediction, 3 earlier velocities, out=, u_out= |
                              k-diffusion's sample_lms step (to_d, then the weighted sum)
      lincomb_step            3 terms + in-kernel noise, out= | the same combination
                              eager, noise from randn_like (k-diffusion's 3M SDE update)
  overhead · sample euler (per step)   20 steps, trivial model (x * 0):
      flowkern.sample(method="euler", grid="karras") (repeated calls reuse the
      plan; a second row rebuilds it every call) | the k-diffusion adapter
      flowkern.integrations.k_diffusion.sample_euler | k-diffusion's own
      sample_euler on the same denoiser and get_sigmas_karras(20, 0.002, 80);
      the whole loop is timed, extra_info["per_step_us"] = median / 20.

Each benchmark stores in extra_info: overhead_op (the report's row),
overhead_role (flowkern | eager | floor | raw op | adapter | peer), kind
(training | step | sampler | floor), shape, dtype, threads, steps (1, or 20
for the loops), per_call_us / per_call_min_us (median / min; per_step_us /
per_step_min_us for the loops) and, from the `measure` fixture, other_load.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flowkern as fk
from flowkern.backend import cpu_built

ROWS, COLS = 8, 64
SHAPE_TXT = f"{ROWS}x{COLS}"
THREADS = 1
STEPS = 20
T, S, TP = 0.4, 0.45, 0.35      # step from t to s; t_prev for DPM-Solver++(2M)
G = 0.5                         # em_step's diffusion coefficient
T_HAT = 0.4                     # churn from S back to T_HAT
BACKEND = "cpu"
DEVICE = "cpu"                  # bench/gpu_overhead.py runs these cases on "cuda"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch.set_num_threads(1) while this module runs; the previous count after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(prev)


def need_cpu_kernels():
    if not cpu_built():
        pytest.skip("flowkern._C (the cpu backend) is not built or not importable")


def data():
    """Fresh inputs per benchmark (the in-place steps update their state)."""
    g = torch.Generator().manual_seed(0)
    mk = lambda: torch.randn(ROWS, COLS, generator=g).to(DEVICE)  # noqa: E731
    t = (torch.rand(ROWS, generator=g) * 0.8 + 0.1).to(DEVICE)
    return SimpleNamespace(x0=mk(), x1=mk(), pred=mk(), x=mk(), v=mk(), xe=mk(), ve=mk(),
                           dp=mk(), out=mk(), out2=mk(), t=t, t_col=t.reshape(-1, 1).clone())


def label(benchmark, op, role, kind, order, name, note="", steps=1):
    benchmark.group = "overhead-floor" if kind == "floor" else f"overhead · {op}"
    benchmark.name = name
    benchmark.extra_info.update(overhead_op=op, overhead_role=role, kind=kind, order=order,
                                shape=SHAPE_TXT, dtype="float32", threads=THREADS,
                                device="cpu", note=note, steps=steps)


def per_call(benchmark):
    """extra_info per_call_us (median, min) and, for the loops, per_step_us."""
    st = getattr(benchmark, "stats", None)
    st = getattr(st, "stats", st)
    med, low = getattr(st, "median", None), getattr(st, "min", None)
    if med is None:  # --benchmark-disable
        return
    steps = benchmark.extra_info.get("steps", 1)
    benchmark.extra_info.update(per_call_us=med * 1e6, per_call_min_us=low * 1e6)
    if steps > 1:
        benchmark.extra_info.update(per_step_us=med * 1e6 / steps,
                                    per_step_min_us=low * 1e6 / steps)


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# the floor: one native op, and the bare flowkern C++ op


def test_floor_torch_add(benchmark, measure):
    label(benchmark, "torch.add", "floor", "floor", 0, "torch.add(a, b)")
    d = data()
    a, b = d.x0, d.x1
    measure(lambda: torch.add(a, b))
    per_call(benchmark)


def test_floor_raw_op(benchmark, measure):
    need_cpu_kernels()
    from flowkern.backend import fastcall
    from flowkern.ops.training import _NATIVE
    # the caller the public functions use: flowkern._fastcall's where it
    # serves this torch, else the overload's _op (docs/build.md)
    via = "flowkern._fastcall" if fastcall() is not None else "OpOverload._op"
    label(benchmark, "flowkern::interpolate.nograd", "raw op", "floor", 1,
          f"flowkern::interpolate.nograd via {via} (t, linear schedule)",
          note="the C++ op alone, as the public call makes it: checks, coefficients, "
               "kernel and allocation in C++; no Python wrapper, no autograd kernel")
    d = data()
    op = _NATIVE.direct.interpolate
    fn = lambda: op(d.x0, d.x1, d.t, 0.0, 0, [], 0, True)  # noqa: E731
    close(fn()[0], d.t_col * d.x1 + (1 - d.t_col) * d.x0)
    measure(fn)
    per_call(benchmark)


# The triton backend's op layer: each flowkern_triton:: op is a torch.library
# custom op whose kernel is a Python function (the Triton launch). A custom op
# of euler_step's schema with a body that does nothing times that layer alone
# (the Triton launch needs a GPU): through the dispatcher, and through
# flowkern._fastcall's direct caller, which eager triton calls take where the
# custom op's wrappers would only pass the call on (docs/build.md).

def _noop(*args):
    return None


def _layer_probe():
    ops = getattr(torch.ops, "flowkern_bench", None)
    if ops is None or not hasattr(ops, "layer_probe"):
        from flowkern.ops._registry import SCHEMAS
        torch.library.custom_op("flowkern_bench::layer_probe", mutates_args=("out",),
                                schema=SCHEMAS["euler_step"])(_noop)
    return torch.ops.flowkern_bench.layer_probe.default


@pytest.mark.parametrize("via", ["dispatcher", "direct"])
def test_floor_triton_layer(benchmark, measure, via):
    from flowkern.backend import fastcall
    op = _layer_probe()
    if via == "direct":
        if fastcall() is None:
            pytest.skip("flowkern._fastcall does not serve this torch")
        op = fastcall().impl(op._schema.name, "", op, _noop)
    label(benchmark, "custom op layer", f"layer {via}", "floor", 2 if via == "dispatcher" else 3,
          f"custom op of euler_step's schema, no-op body, via {via}",
          note="the layer every triton call crosses, without the Triton launch")
    d = data()
    args = (d.x, d.v, None, None, None, None, None, [T, S, 0.0, 0.0], 0, [], 0, 1.0, False, d.out)
    measure(lambda: op(*args))
    if via == "direct":
        assert op.fallbacks == 0 and op.taken > 0
    per_call(benchmark)


# ---------------------------------------------------------------------------
# eager formulas (linear schedule, t of shape (B, 1) broadcast)


def eager_interpolate(x0, x1, t):
    return t * x1 + (1 - t) * x0, x1 - x0


def eager_loss(pred, x0, x1, t):
    return ((pred - (x1 - x0)) ** 2).mean()


def eager_convert_x1_to_velocity(pred, xt, t):
    return (pred - xt) / (1 - t)


# linear schedule: alpha = t, sigma = 1 - t
A_T, S_T, A_S, S_S, A_P, S_P = T, 1 - T, S, 1 - S, TP, 1 - TP


def eager_heun(x, v, ve):
    return x + 0.5 * (S - T) * (v + ve)


def eager_ei(x, d):
    return (S_S / S_T) * x + (A_S - S_S * A_T / S_T) * d


def eager_dpmpp(x, d, d_prev):
    lt, ls, lp = math.log(A_T / S_T), math.log(A_S / S_S), math.log(A_P / S_P)
    h, r = ls - lt, (lt - lp) / (ls - lt)
    D = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
    return (S_S / S_T) * x - A_S * math.expm1(-h) * D, d


def eager_em(x, v):
    h = S - T
    return x + h * v + G * h ** 0.5 * torch.randn_like(x)


LMS_W = [0.11, -0.07, 0.04, -0.01]  # an order-4 step's weights (they carry the step size)


def eager_lms(x, d, hist):
    # k-diffusion's sample_lms step (linear schedule: u = (d - x) / sigma_t)
    ds = [*reversed(hist), (d - x) / S_T]
    return x + sum(c * u for c, u in zip(LMS_W, reversed(ds))), ds[-1]


LINCOMB_W, LINCOMB_STD = [0.82, 0.45, -0.33, 0.06], 0.3  # a 3M SDE step's weights


def eager_lincomb(x, d, d1, d2):
    w = LINCOMB_W
    return w[0] * x + w[1] * d + w[2] * d1 + w[3] * d2 + LINCOMB_STD * torch.randn_like(x)


def eager_churn(x):
    # renoise from S back to T_HAT: (a_h/a_s) x + sqrt(s_h^2 - (a_h s_s/a_s)^2) xi
    a_s, s_s, a_h, s_h = S, 1 - S, T_HAT, 1 - T_HAT
    return (a_h / a_s) * x + math.sqrt(s_h ** 2 - (a_h * s_s / a_s) ** 2) * torch.randn_like(x)


# ---------------------------------------------------------------------------
# per-op cases: (op, kind, note, flowkern factory, eager factory); a factory
# takes the data and returns (fn, check) where check() runs once before timing


def _interp_fk(d):
    fn = lambda: fk.interpolate(d.x0, d.x1, d.t, backend=BACKEND)  # noqa: E731
    return fn, lambda: [close(g, w) for g, w in zip(fn(), eager_interpolate(d.x0, d.x1, d.t_col))]


def _interp_fk_out(d):
    out = (d.out, d.out2)
    fn = lambda: fk.interpolate(d.x0, d.x1, d.t, out=out, backend=BACKEND)  # noqa: E731
    return fn, lambda: [close(g, w) for g, w in zip(fn(), eager_interpolate(d.x0, d.x1, d.t_col))]


def _interp_eager(d):
    return (lambda: eager_interpolate(d.x0, d.x1, d.t_col)), None


def _loss_fk(d):
    fn = lambda: fk.flow_matching_loss(d.pred, d.x0, d.x1, d.t, backend=BACKEND)  # noqa: E731
    return fn, lambda: close(fn(), eager_loss(d.pred, d.x0, d.x1, d.t_col), 1e-4)


def _loss_eager(d):
    return (lambda: eager_loss(d.pred, d.x0, d.x1, d.t_col)), None


def _fwd_bwd(loss_fn, t_of):
    def make(d):
        pred = d.pred.detach().clone().requires_grad_(True)
        t = t_of(d)

        def fn():
            pred.grad = None  # optimizer.zero_grad(set_to_none=True)
            loss_fn(pred, d.x0, d.x1, t).backward()
            return pred.grad

        def check():
            g = fn().clone()
            pred.grad = None
            eager_loss(pred, d.x0, d.x1, d.t_col).backward()
            close(g, pred.grad, 1e-4)
        return fn, check
    return make


_loss_fk_bwd = _fwd_bwd(lambda p, x0, x1, t: fk.flow_matching_loss(p, x0, x1, t, backend=BACKEND),
                        lambda d: d.t)
_loss_eager_bwd = _fwd_bwd(eager_loss, lambda d: d.t_col)


def eager_flowmap_loss(x, d, y, t_col):
    # the one-step flow map of the linear schedule (data form, x1 prediction)
    # from each row's t to S, against y: g = (s_s/s_t) x + (a_s - s_s a_t/s_t) d
    q = (1 - S) / (1 - t_col)
    return ((q * x + (S - q * t_col) * d - y) ** 2).mean()


def _flowmap_fk(d):
    fn = lambda: fk.flowmap_loss(d.x, d.pred, d.x1, d.t, S, backend=BACKEND)  # noqa: E731
    return fn, lambda: close(fn(), eager_flowmap_loss(d.x, d.pred, d.x1, d.t_col), 1e-4)


def _flowmap_eager(d):
    return (lambda: eager_flowmap_loss(d.x, d.pred, d.x1, d.t_col)), None


def _convert_fk(d):
    fn = lambda: fk.convert(d.pred, d.x, d.t, src="x1", dst="velocity",  # noqa: E731
                            backend=BACKEND)
    return fn, lambda: close(fn(), eager_convert_x1_to_velocity(d.pred, d.x, d.t_col), 1e-4)


def _convert_eager(d):
    return (lambda: eager_convert_x1_to_velocity(d.pred, d.x, d.t_col)), None


def _tables():
    """Step tables precomputed the way a sampler does: one table for the grid,
    row i per step (on DEVICE, where the sampler keeps them)."""
    def v(*xs):
        return torch.tensor(xs, device=DEVICE)
    return SimpleNamespace(
        plain=fk.step_table("linear", v(T, S), v(S, 0.5))[0],
        prev=fk.step_table("linear", v(T, S), v(S, 0.5), t_prev=v(TP, T))[0],
        em=fk.step_table("linear", v(T, S), v(S, 0.5), g=v(G, G))[0],
        churn=fk.step_table("linear", v(S, 0.5), v(T_HAT, S))[0])


def _euler_fk_table(d):
    tab = _tables().plain
    x, v = d.x, d.v

    def check():
        close(fk.euler_step(x, v, table=tab, out=d.out, backend=BACKEND), x + (S - T) * v)
    return (lambda: fk.euler_step(x, v, table=tab, out=x, backend=BACKEND)), check


def _euler_fk_float(d):
    x, v = d.x, d.v

    def check():
        close(fk.euler_step(x, v, t=T, s=S, out=d.out, backend=BACKEND), x + (S - T) * v)
    return (lambda: fk.euler_step(x, v, t=T, s=S, out=x, backend=BACKEND)), check


def _euler_eager(d):
    x, v, dt = d.x, d.v, S - T
    return (lambda: x.add_(v, alpha=dt)), None


def _per_sample_times(d):
    """Per-sample times: row b steps from t_b to t_b + (S - T)."""
    return d.t * 0.5, d.t * 0.5 + (S - T)


def _euler_fk_tensor(d):
    x, v = d.x, d.v
    ts, ss = _per_sample_times(d)

    def check():
        close(fk.euler_step(x, v, t=ts, s=ss, out=d.out, backend=BACKEND),
              x + (ss - ts)[:, None] * v)
    return (lambda: fk.euler_step(x, v, t=ts, s=ss, out=x, backend=BACKEND)), check


def _euler_eager_tensor(d):
    x, v = d.x, d.v
    ts, ss = _per_sample_times(d)
    return (lambda: x.addcmul_((ss - ts)[:, None], v)), None


def _heun_fk(d):
    tab = _tables().plain
    fn = lambda: fk.heun_step(d.x, d.v, d.xe, d.ve, table=tab, out=d.out,  # noqa: E731
                              backend=BACKEND)
    return fn, lambda: close(fn(), eager_heun(d.x, d.v, d.ve))


def _heun_eager(d):
    return (lambda: eager_heun(d.x, d.v, d.ve)), None


def _ei_fk(d):
    tab = _tables().plain
    fn = lambda: fk.ei_step(d.x, d.pred, table=tab, prediction="x1", form="data",  # noqa: E731
                            out=d.out, backend=BACKEND)
    return fn, lambda: close(fn(), eager_ei(d.x, d.pred))


def _ei_eager(d):
    return (lambda: eager_ei(d.x, d.pred)), None


def _dpmpp_fk(d):
    tab = _tables().prev
    fn = lambda: fk.dpmpp_2m_step(d.x, d.pred, table=tab, prediction="x1",  # noqa: E731
                                  d_prev=d.dp, out=d.out, d_out=d.out2, backend=BACKEND)
    return fn, lambda: close(fn()[0], eager_dpmpp(d.x, d.pred, d.dp)[0], 1e-4)


def _dpmpp_eager(d):
    return (lambda: eager_dpmpp(d.x, d.pred, d.dp)), None


def _em_fk(d):
    tab = _tables().em
    x, v = d.x, d.v
    return (lambda: fk.em_step(x, v, table=tab, seed=1, out=x, backend=BACKEND)), None


def _em_eager(d):
    return (lambda: eager_em(d.x, d.v)), None


def _churn_fk(d):
    tab = _tables().churn
    x = d.x
    return (lambda: fk.churn(x, table=tab, seed=1, out=x, backend=BACKEND)), None


def _churn_eager(d):
    return (lambda: eager_churn(d.x)), None


def _lms_fk(d):
    tab, hist = _tables().plain, [d.v, d.ve, d.dp]
    fn = lambda: fk.lms_step(d.x, d.pred, LMS_W, hist, table=tab, prediction="x1",  # noqa: E731
                             out=d.out, u_out=d.out2, backend=BACKEND)
    return fn, lambda: [close(g, w, 1e-4) for g, w in zip(fn(), eager_lms(d.x, d.pred, hist))]


def _lms_eager(d):
    return (lambda: eager_lms(d.x, d.pred, [d.v, d.ve, d.dp])), None


def _lincomb_fk(d):
    return (lambda: fk.lincomb_step(d.x, [d.pred, d.v, d.ve], LINCOMB_W,  # noqa: E731
                                    noise_std=LINCOMB_STD, seed=1, out=d.out,
                                    backend=BACKEND)), None


def _lincomb_eager(d):
    return (lambda: eager_lincomb(d.x, d.pred, d.v, d.ve)), None


OPS = [  # (op, kind, note, flowkern candidate, eager candidate)
    ("interpolate", "training", "", ("fk.interpolate", _interp_fk),
     ("eager t*x1 + (1-t)*x0, x1 - x0", _interp_eager)),
    ("interpolate out=", "training", "the eager row allocates (the peers have no out=)",
     ("fk.interpolate(out=)", _interp_fk_out), ("eager t*x1 + (1-t)*x0, x1 - x0", _interp_eager)),
    ("flow_matching_loss fwd", "training", "",
     ("fk.flow_matching_loss", _loss_fk), ("eager ((pred - (x1-x0))**2).mean()", _loss_eager)),
    ("flow_matching_loss fwd+bwd", "training",
     "pred.grad = None; loss.backward(), graph rebuilt every call",
     ("fk.flow_matching_loss + backward", _loss_fk_bwd),
     ("eager ((pred - (x1-x0))**2).mean().backward()", _loss_eager_bwd)),
    ("flowmap_loss fwd", "training", "per-sample t, float s, linear schedule, x1 prediction",
     ("fk.flowmap_loss", _flowmap_fk), ("eager ((q x + (s - q t) d - y)**2).mean()",
                                        _flowmap_eager)),
    ("convert x1->velocity", "training", "",
     ("fk.convert", _convert_fk), ("eager (pred - x_t) / (1 - t)", _convert_eager)),
    ("euler_step (table)", "step", "fk: table=step_table(...)[i], out=x",
     ("fk.euler_step(table=, out=x)", _euler_fk_table), ("x.add_(v, alpha=dt)", _euler_eager)),
    ("euler_step (float t, s)", "step", "fk: t=, s= floats (the op evaluates the row), out=x",
     ("fk.euler_step(t=, s=, out=x)", _euler_fk_float), ("x.add_(v, alpha=dt)", _euler_eager)),
    ("euler_step (per-sample t, s)", "step",
     "fk: t=, s= (B,) tensors (the op evaluates each row), out=x",
     ("fk.euler_step(t=tensor, s=tensor, out=x)", _euler_fk_tensor),
     ("x.addcmul_((s - t)[:, None], v)", _euler_eager_tensor)),
    ("heun_step", "step", "second stage only",
     ("fk.heun_step(table=, out=)", _heun_fk), ("eager x + dt/2 (v + v_e)", _heun_eager)),
    ("ei_step", "step", "x1 prediction, data form",
     ("fk.ei_step(table=, out=)", _ei_fk), ("eager DDIM formula", _ei_eager)),
    ("dpmpp_2m_step", "step", "x1 prediction, second order",
     ("fk.dpmpp_2m_step(table=, out=, d_out=)", _dpmpp_fk),
     ("eager DPM-Solver++(2M)", _dpmpp_eager)),
    ("em_step", "step", "",
     ("fk.em_step(table=, out=x)", _em_fk), ("eager x + h v + g sqrt(h) randn_like", _em_eager)),
    ("churn", "step", "",
     ("fk.churn(table=, out=x)", _churn_fk), ("eager renoise with randn_like", _churn_eager)),
    ("lms_step", "step", "x1 prediction, 3 earlier velocities (order 4)",
     ("fk.lms_step(table=, out=, u_out=)", _lms_fk),
     ("eager k-diffusion LMS step", _lms_eager)),
    ("lincomb_step", "step", "3 terms and in-kernel noise (a 3M SDE step)",
     ("fk.lincomb_step(out=)", _lincomb_fk),
     ("eager weighted sum + randn_like", _lincomb_eager)),
]
CASES = [(i, role) for i in range(len(OPS)) for role in ("flowkern", "eager")]


@pytest.mark.parametrize("i,role", CASES,
                         ids=[f"{OPS[i][0].replace(' ', '_')}-{r}" for i, r in CASES])
def test_op(benchmark, measure, i, role):
    op, kind, note, fk_case, eager_case = OPS[i]
    name, factory = fk_case if role == "flowkern" else eager_case
    label(benchmark, op, role, kind, 0 if role == "flowkern" else 1, name, note)
    if role == "flowkern":
        need_cpu_kernels()
    d = data()
    fn, check = factory(d)
    if check is not None:
        check()
    measure(fn)
    per_call(benchmark)


# ---------------------------------------------------------------------------
# whole sampling loops, reported per step


def _kdiff():
    """k_diffusion.sampling; without its package's heavy imports (skimage,
    ...) when those are missing: sampling.py only needs utils.append_dims."""
    try:
        import k_diffusion.sampling as kd
        return kd
    except Exception:
        pass
    import importlib.util
    import os
    import types
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion not installed")
    path = os.path.join(os.path.dirname(spec.origin), "sampling.py")
    try:
        with open(path) as f:
            src = f.read()
        utils = types.SimpleNamespace(append_dims=lambda x, n: x[(...,) + (None,) * (n - x.ndim)])
        mod = types.ModuleType("k_diffusion_sampling_overhead")
        mod.__dict__.update(__file__=path, _kd_utils=utils)
        exec(compile(src.replace("from . import utils", "utils = _kd_utils"), path, "exec"),
             mod.__dict__)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"k-diffusion sampling not importable: {exc}")
    return mod


def _zero_model(x, t):
    return x * 0


def _loop_fk(d):
    need_cpu_kernels()
    x = d.x
    return lambda: fk.sample(_zero_model, x, "linear", "euler", steps=STEPS, grid="karras",
                             progress=False, backend=BACKEND)


def _loop_fk_cold(d):
    """fk.sample with its plan (grid, step tables) rebuilt: the first call
    with these arguments; repeated calls reuse the plan (_loop_fk)."""
    from flowkern.sampling import clear_plan_cache
    warm = _loop_fk(d)

    def fn():
        clear_plan_cache()
        return warm()
    return fn


def _loop_adapter(d):
    need_cpu_kernels()
    from flowkern.integrations import k_diffusion as adapter
    sigmas = _kdiff().get_sigmas_karras(STEPS, 0.002, 80.0, device=DEVICE)
    x = d.x * 80
    return lambda: adapter.sample_euler(_zero_model, x, sigmas, disable=True, backend=BACKEND)


def _loop_kd(d):
    kd = _kdiff()
    sigmas = kd.get_sigmas_karras(STEPS, 0.002, 80.0, device=DEVICE)
    x = d.x * 80
    return lambda: kd.sample_euler(_zero_model, x, sigmas, disable=True)


SAMPLE_OP = "sample euler (per step)"
LOOPS = [  # (role, name, factory): one group, k-diffusion's loop timed once
    ("flowkern", 'fk.sample(model, x, "linear", "euler", steps=20, grid="karras")', _loop_fk),
    ("plan rebuilt", 'the same, after flowkern.sampling.clear_plan_cache()', _loop_fk_cold),
    ("adapter", "flowkern.integrations.k_diffusion.sample_euler", _loop_adapter),
    ("peer", "k-diffusion sample_euler", _loop_kd),
]


@pytest.mark.parametrize("j", range(len(LOOPS)), ids=[c[0] for c in LOOPS])
def test_sample_per_step(benchmark, measure, j):
    role, name, factory = LOOPS[j]
    label(benchmark, SAMPLE_OP, role, "sampler", j, name,
          note=f"{STEPS}-step loop, model x * 0 (one torch op per step); time / {STEPS}",
          steps=STEPS)
    d = data()
    fn = factory(d)
    out = fn()
    assert out.shape == d.x.shape and torch.isfinite(out).all()
    measure(fn)
    per_call(benchmark)
