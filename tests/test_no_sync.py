"""No host synchronisation in the sampling loops, proved on CPU.

On a GPU every read of device memory from the host (``.item()``,
``.tolist()``, ``bool(t)``, ``nonzero``, ``.cpu()``, ...) blocks the host
until the device catches up, and cannot be captured in a CUDA graph. flowkern
promises that its sampling loops make none: value checks run on CPU tensors,
or on GPU only with FLOWKERN_DEBUG=1 (``flowkern._validate.values_checked``).

There is no GPU here, so the loops run on CPU in the mode a GPU uses
(``values_checked`` patched to return False, FLOWKERN_DEBUG unset) with every
device->host read trapped (:class:`HostReadTrap`): a read raises an
AssertionError naming the method, with the stack of the line that made it.
The trap covers

- Python-level reads: Tensor.item/tolist/__bool__/__int__/__float__/
  __complex__/__index__/__format__/__repr__/__array__/numpy/cpu/to("cpu"),
  nonzero/argwhere/equal/allclose/is_nonzero/masked_select/unique (method and
  torch.* function), one-argument torch.where, indexing with a boolean mask or
  a 0-dim integer tensor (both read the index on the host), and
  torch.cuda.synchronize;
- reads made inside ATen, below Python (e.g. an ``item()`` in C++): a
  TorchDispatchMode on ``aten::_local_scalar_dense``, ``aten::nonzero``, ...

A second trap, ``uploads=True``, flags the host->device direction: tensors
built inside the loop from Python data (``torch.tensor(...)``,
``as_tensor``) or by a factory without ``device=`` (``torch.arange(n)``), which
on a GPU must then be copied to the device with a blocking copy (a sync under
``torch.cuda.set_sync_debug_mode``, and not capturable).

What runs under the trap (the issue: "A test runs every sampler loop, and each
adapter's loop after its first step, with every device->host read trapped"):

- every ``flowkern.sample`` method (euler, heun, ei in both forms, dpmpp_2m,
  em) with churn, guidance, callback/trajectory, several schedules, grids,
  predictions and dtypes: the trap is armed when the plan (grid, step table,
  fallbacks: host work by design) is done, and stays armed to the return;
- the k-diffusion samplers (sample_euler, sample_heun, sample_dpmpp_2m,
  sample_euler_ancestral, the DPM-Solver-2 and DPM-Solver++ SDE samplers,
  sample_lms, sample_dpm_fast, with churn and with a noise_sampler), from
  the denoiser's second call to the return (not sample_dpm_adaptive, whose
  step control reads its error norm on the host: sync_cases.K_SYNCING);
- the diffusers schedulers' ``step()`` after set_timesteps and the first step
  (which looks its index up with ``nonzero``, as diffusers' own do);
- the flow_matching ``ODESolver.sample`` (euler, midpoint, heun2), from the
  velocity model's second call (its time grid is read once, up front).

Each case runs on the ``cpu`` and ``torch`` backends; one sample case per
kernel also runs the GPU backends' Python glue on CPU tensors, trapped, with
the kernel itself paused (a kernel reads its tensors, on the device):
``triton`` under TRITON_INTERPRET=1 (the interpreted kernel paused), and
``cuda`` as the C++ CUDA glue on the grid simulator (flowkern_sim::). The sampled result must equal an untrapped run's,
bit for bit. The trap is tested itself (every read kind raises, a read in a
model, a loop or a GPU backend's glue is caught, all patches are undone).
``bench/gpu_sync_check.py`` is the same check on a real GPU
(``torch.cuda.set_sync_debug_mode("error")``, and CUDA-graph capture).

With ``uploads=True`` the torch backend's em and churn steps are held to the
same rule: the reference draws its Philox noise on the state's device.
"""
from __future__ import annotations

import contextlib
import functools
import traceback
import types

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import flowkern
from flowkern import _validate
from flowkern.sampling import plan as S
from flowkern.backend import triton_interpreted
from flowkern.integrations import diffusers as fk_diffusers
from flowkern.integrations import flow_matching as fk_fm
from flowkern.integrations import k_diffusion as fk_k

from sync_cases import D_CASES, K_CASES, K_SYNCING

BACKENDS = [b for b in ("cpu", "torch") if flowkern.available()[b]]
# The GPU backends' Python glue, trapped, with their kernels run on CPU
# tensors and paused (a kernel reads its tensors' memory, on the device):
# - triton under TRITON_INTERPRET=1 (tests/conftest.py): the launchers
#   (flowkern/triton/*.py) trapped, the interpreted kernel paused;
# - cuda: the C++ CUDA glue (csrc/cuda/glue.h) on the grid simulator's
#   launchers, the flowkern_sim:: ops (fixture cuda_glue_on_cpu).
# One case per kernel, for time; the adapters' code is the same on every backend.
TRITON = flowkern.available()["triton"] and triton_interpreted()
try:
    from triton.runtime.interpreter import GridExecutor as _GridExecutor
except ImportError:  # pragma: no cover
    _GridExecutor = None
KERNEL_CASES = ("heun-guidance",       # the euler and heun kernels, with guidance
                "ei-noise",            # ei, noise form
                "dpmpp_2m",            # ei (data form: the first step), dpm 1st and 2nd order
                "em-guidance-churn")   # em and churn

# ---------------------------------------------------------------------------
# the trap

# torch.Tensor methods that read values on the host
_TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__complex__",
                 "__index__", "__format__", "__repr__", "__array__", "numpy", "cpu",
                 "nonzero", "argwhere", "equal", "allclose", "is_nonzero", "masked_select",
                 "unique", "unique_consecutive")
# torch.* functions that do
_TORCH_READS = ("nonzero", "argwhere", "equal", "allclose", "is_nonzero", "masked_select",
                "unique", "unique_consecutive")
# ATen ops that read values on the host (what the above end in, and what C++ calls)
_ATEN_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
               "aten::nonzero", "aten::nonzero_numpy", "aten::argwhere", "aten::masked_select",
               "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
               "aten::unique_dim_consecutive"}
# factories that allocate on the host unless given device=
_HOST_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand,
                   torch.randn, torch.randint, torch.randperm, torch.linspace, torch.logspace,
                   torch.eye, torch.empty_strided, torch.scalar_tensor}
# tensors from Python data: always a host->device copy on a GPU, device= or not
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


def _is_cpu_name(d):
    return isinstance(d, str) and d.split(":")[0] == "cpu"


def _host_index(idx) -> bool:
    """Whether indexing with idx reads the index on the host: a boolean (or
    uint8) mask becomes nonzero(); a 0-dim integer tensor becomes item()."""
    for i in (idx if isinstance(idx, tuple) else (idx,)):
        if isinstance(i, torch.Tensor) and (i.dtype in (torch.bool, torch.uint8)
                                            or (i.dim() == 0 and not i.is_floating_point())):
            return True
    return False


class _AtenReads(TorchDispatchMode):
    def __init__(self, trap):
        super().__init__()
        self.trap = trap

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _ATEN_READS:
            self.trap.hit(func._schema.name)
        return func(*args, **(kwargs or {}))


class _HostUploads(TorchFunctionMode):
    def __init__(self, trap):
        super().__init__()
        self.trap = trap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA and not (args and isinstance(args[0], torch.Tensor)):
            self.trap.hit(f"torch.{func.__name__} (a tensor from Python data: a blocking "
                          f"host->device copy on a GPU)", kind="host upload")
        elif func in _HOST_FACTORIES and kwargs.get("device") is None:
            self.trap.hit(f"torch.{func.__name__} without device= (a host tensor, copied to "
                          f"the device later)", kind="host upload")
        return func(*args, **kwargs)


class HostReadTrap:
    """While active, every device->host read raises an AssertionError that
    names the method and shows the stack of the line that made it. Hits are
    also recorded, so a read whose exception the code under test swallows
    still fails the test (:meth:`check`). uploads=True also flags tensors
    built on the host inside the trapped region (see the module docstring)."""

    def __init__(self, uploads: bool = False):
        self.uploads = uploads
        self.hits: list[str] = []
        self.paused = False
        self._mp = None
        self._modes = []

    # -- recording -----------------------------------------------------------

    def hit(self, what, kind="device->host read"):
        """Record and raise, unless paused (then the caller goes on)."""
        if self.paused:
            return
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        msg = f"{kind} while trapped: {what}\n{stack}"
        self.hits.append(msg)
        raise AssertionError(msg)

    def check(self):
        if self.hits:
            raise AssertionError(f"{len(self.hits)} host access(es) in the trapped region; "
                                 f"the first:\n{self.hits[0]}")

    # -- the patches -----------------------------------------------------------

    def _trapped(self, orig, name):
        @functools.wraps(orig)
        def trapped(*args, **kwargs):
            self.hit(name)
            return orig(*args, **kwargs)
        return trapped

    @contextlib.contextmanager
    def pause(self):
        """What runs "on the device" (an interpreted Triton kernel, the CUDA
        simulator) may read."""
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused

    def _wrap(self, orig, name, reads):
        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if reads(*args, **kwargs):
                self.hit(name)
            return orig(*args, **kwargs)
        return wrapper

    @property
    def active(self):
        return self._mp is not None

    def activate(self):
        if self.active:
            return
        _ACTIVE.append(self)
        mp = self._mp = pytest.MonkeyPatch()
        for name in _TENSOR_READS:
            mp.setattr(torch.Tensor, name, self._trapped(getattr(torch.Tensor, name),
                                                         f"Tensor.{name}"))
        for name in _TORCH_READS:
            mp.setattr(torch, name, self._trapped(getattr(torch, name), f"torch.{name}"))
        mp.setattr(torch.Tensor, "to", self._wrap(
            torch.Tensor.to, 'Tensor.to("cpu")',
            lambda self_, *a, **k: any(_is_cpu_name(d) for d in a[:1] + (k.get("device"),))))
        mp.setattr(torch.Tensor, "__getitem__", self._wrap(
            torch.Tensor.__getitem__, "Tensor.__getitem__ with a mask or 0-dim index",
            lambda self_, idx: _host_index(idx)))
        mp.setattr(torch.Tensor, "__setitem__", self._wrap(
            torch.Tensor.__setitem__, "Tensor.__setitem__ with a mask or 0-dim index",
            lambda self_, idx, value: _host_index(idx)))
        mp.setattr(torch, "where", self._wrap(
            torch.where, "torch.where(cond) (= nonzero)",
            lambda *a, **k: len(a) + len(k) == 1))
        mp.setattr(torch.cuda, "synchronize", self._trapped(torch.cuda.synchronize,
                                                            "torch.cuda.synchronize"))
        if _GridExecutor is not None:       # the interpreted Triton kernel itself
            call = _GridExecutor.__call__

            def run_kernel(*args, **kwargs):
                with self.pause():
                    return call(*args, **kwargs)
            mp.setattr(_GridExecutor, "__call__", run_kernel)
        self._modes = [_AtenReads(self)] + ([_HostUploads(self)] if self.uploads else [])
        for m in self._modes:
            m.__enter__()

    def deactivate(self):
        if not self.active:
            return
        for m in reversed(self._modes):
            m.__exit__(None, None, None)
        self._modes = []
        self._mp.undo()
        self._mp = None
        _ACTIVE.remove(self)


_ACTIVE: list[HostReadTrap] = []


@contextlib.contextmanager
def _on_the_device():
    """Pause the active traps: for code that stands in for a device kernel."""
    with contextlib.ExitStack() as stack:
        for trap in list(_ACTIVE):
            stack.enter_context(trap.pause())
        yield


@contextlib.contextmanager
def trap_host_reads(uploads: bool = False, armed: bool = True):
    """``with trap_host_reads() as trap:`` every device->host read in the body
    raises (and fails the block on exit even if swallowed). armed=False: the
    trap is made but not active; the body arms it with ``trap.activate()``
    (e.g. from a wrapped model on its second call), and it is disarmed at the
    end of the block either way."""
    trap = HostReadTrap(uploads)
    if armed:
        trap.activate()
    try:
        yield trap
    finally:
        trap.deactivate()
    trap.check()


@contextlib.contextmanager
def armed_after_planning(uploads: bool = False):
    """trap_host_reads for flowkern.sample calls in the block: armed when the
    plan is made (grid, tables and fallbacks are host work by design), to the
    end of the block."""
    with trap_host_reads(uploads=uploads, armed=False) as trap, \
            pytest.MonkeyPatch.context() as mp:
        plan_init = S.Plan.__init__

        def init(self, *args, **kwargs):
            plan_init(self, *args, **kwargs)
            trap.activate()
        mp.setattr(S.Plan, "__init__", init)
        yield trap


def _arm_on_call(trap, fn, at=2):
    """fn, arming the trap at its at-th call (the adapters' loops after their
    first step)."""
    calls = [0]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            trap.activate()
        return fn(*args, **kwargs)
    wrapped.calls = calls
    return wrapped


@pytest.fixture(autouse=True)
def gpu_mode(monkeypatch):
    """Value checks as on a GPU without FLOWKERN_DEBUG: off. values_checked
    is the one place that decides it (the ops call it as _validate's module
    attribute; nothing imports a copy), and the samplers' per-step NaN checks
    follow FLOWKERN_DEBUG."""
    monkeypatch.setattr(_validate, "values_checked", lambda x: False)
    monkeypatch.delenv("FLOWKERN_DEBUG", raising=False)


@pytest.fixture(params=["reads", "uploads"])
def mode(request):
    return request.param


_STEP_OPS = ("euler_step", "heun_step", "ei_step", "ei_step_out", "dpmpp_2m_step", "em_step",
             "churn")


@pytest.fixture
def cuda_glue_on_cpu(monkeypatch):
    """backend="cuda" on CPU tensors: the steps' one native call goes to
    flowkern_sim::, the C++ CUDA glue (csrc/cuda/glue.h) on the grid
    simulator's launchers; on a GPU the same glue is the flowkern:: ops'
    CUDA-key kernel. Its host code is C++: a device->host read there is an
    aten op (_local_scalar_dense, a copy to the CPU), which the dispatch-mode
    trap sees. Returns the list of the glue ops called."""
    from flowkern import backend as B
    from flowkern.ops import steps as ops_steps
    from flowkern.ops._registry import TimedOp
    resolve, resolve_for = ops_steps.resolve, ops_steps.resolve_for
    calls = []

    def resolve_cuda(backend, device):
        name = backend if backend is not None else B._current.get()
        return "cuda" if name == "cuda" else resolve(backend, device)

    def resolve_for_cuda(backend, x):
        name = backend if backend is not None else B._current.get()
        return "cuda" if name == "cuda" else resolve_for(backend, x)

    def counted(name):
        # the full signature the public steps pass, as ops/steps.py _NATIVE's
        packet = getattr(torch.ops.flowkern_sim, name)
        op = TimedOp(packet.default, packet.times) if "times" in packet.overloads() \
            else packet.default

        def call(*args):
            calls.append(name)
            return op(*args)
        return call
    sim = types.SimpleNamespace(**{n: counted(n) for n in _STEP_OPS})
    monkeypatch.setattr(ops_steps, "resolve", resolve_cuda)
    monkeypatch.setattr(ops_steps, "resolve_for", resolve_for_cuda)
    monkeypatch.setattr(S, "resolve", resolve_cuda)
    # ops/_registry.py NativeOps: the public steps call _NATIVE.now_checked()
    monkeypatch.setattr(ops_steps, "_NATIVE", types.SimpleNamespace(
        now=lambda: sim, now_checked=lambda: (sim, _validate.check_flag()), direct=sim))
    return calls


# ---------------------------------------------------------------------------
# trivial models (they read nothing themselves)

W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3


def _x(dtype=torch.float32, seed=1):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _model(x, t):
    return torch.tanh(x @ W.to(x.dtype)) * (1 + t[:, None].to(x.dtype)) - 0.5 * x


def _pair(x, t):
    c = _model(x, t)
    return c, 0.5 * c + 0.1 * x


# ---------------------------------------------------------------------------
# flowkern.sample: every method


SAMPLE_CASES = {
    "euler": dict(method="euler"),
    "euler-x1-cosine": dict(method="euler", schedule="cosine", prediction="x1", t_end=0.95),
    "euler-eps-vp-float64": dict(method="euler", schedule="vp", prediction="eps", t_end=0.95,
                                 dtype=torch.float64),
    "euler-tensor-grid-callback-trajectory": dict(
        method="euler", grid=torch.tensor([0.0, 0.3, 0.7, 1.0]), steps=None,
        callback=lambda i, t, x: None, return_trajectory=True),
    "heun": dict(method="heun"),
    "heun-x1-falls-back-to-euler-at-sigma-0": dict(method="heun", prediction="x1",
                                                   t_start=0.02),
    "heun-score-vp-bfloat16": dict(method="heun", schedule="vp", prediction="score",
                                   t_end=0.95, dtype=torch.bfloat16),
    "ei-data": dict(method="ei", prediction="x1", schedule="cosine"),
    "ei-noise": dict(method="ei", prediction="eps", schedule="vp", t_end=0.95),
    "dpmpp_2m": dict(method="dpmpp_2m", prediction="x1", steps=5),
    "dpmpp_2m-velocity-karras": dict(method="dpmpp_2m", schedule="vp", grid="karras",
                                     t_end=0.95, steps=5),
    "em": dict(method="em", seed=3, g=0.5),
    "em-score-vp-g-tensor": dict(method="em", schedule="vp", prediction="score", seed=4,
                                 t_end=0.95, g=torch.tensor([0.2, 0.4, 0.6, 0.8])),
    "euler-churn": dict(method="euler", churn=2.0, seed=5),
    "heun-churn-x1-vp-logsnr": dict(method="heun", schedule="vp", prediction="x1", churn=1.0,
                                  grid="logsnr", t_end=0.95, seed=6),
    "euler-guidance": dict(method="euler", guidance=2.5),
    "heun-guidance": dict(method="heun", guidance=2.5),
    "ei-guidance": dict(method="ei", prediction="x1", guidance=2.5),
    "dpmpp_2m-guidance": dict(method="dpmpp_2m", prediction="x1", guidance=2.5),
    "em-guidance-churn": dict(method="em", guidance=2.5, churn=1.0, seed=7),
}


def _sample(case, backend, **extra):
    kw = dict(SAMPLE_CASES[case])
    dtype = kw.pop("dtype", torch.float32)
    kw.setdefault("steps", 4)
    model = _pair if kw.get("guidance") is not None else _model
    out = flowkern.sample(model, _x(dtype), backend=backend, progress=False, **kw, **extra)
    return out[0] if kw.get("return_trajectory") else out


def test_every_method_is_covered():
    assert {c["method"] for c in SAMPLE_CASES.values()} == set(S.METHODS)


SAMPLE_PARAMS = [(b, c) for b in BACKENDS for c in SAMPLE_CASES] + \
    [("triton", c) for c in KERNEL_CASES if TRITON and _GridExecutor is not None] + \
    [("cuda", c) for c in KERNEL_CASES]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")   # triton: log(sigma = 0)
@pytest.mark.parametrize("backend,case", SAMPLE_PARAMS)
def test_sample_loop(case, backend, mode, request):
    if backend == "cuda":
        sim = request.getfixturevalue("cuda_glue_on_cpu")
    kw = SAMPLE_CASES[case]
    expected = _sample(case, backend)
    with armed_after_planning(uploads=mode == "uploads") as trap:
        out = _sample(case, backend)
        assert trap.active              # armed until sample() returned
    assert torch.equal(out, expected)
    if backend == "cuda":
        assert sim                      # the glue ran


# ---------------------------------------------------------------------------
# k-diffusion adapter

SIGMAS = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])


def _denoiser(x, sigma, **extra):
    return torch.tanh(x @ W) / (1 + sigma[:, None]) * extra.get("scale", 1.0)




def _k_run(case, backend, model):
    name = case.split("-")[0]
    kw, x = dict(K_CASES[case]), _x()
    if kw.pop("noise_sampler", False):
        g = torch.Generator(x.device).manual_seed(9)
        kw["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=g,
                                                                    device=x.device)
    grid = () if "sigma_max" in kw else (SIGMAS,)  # sample_dpm_fast: its own grid
    return getattr(fk_k, name)(model, x, *grid, extra_args={"scale": 2.0}, disable=True,
                               backend=backend, **kw)


def test_every_k_diffusion_sampler_is_covered():
    assert {c.split("-")[0] for c in K_CASES} | K_SYNCING == {n for n in fk_k.__all__
                                                              if n.startswith("sample_")}


@pytest.mark.parametrize("case", list(K_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_diffusion_loop(case, backend, mode, request):
    kw = K_CASES[case]
    expected = _k_run(case, backend, _denoiser)
    with trap_host_reads(uploads=mode == "uploads", armed=False) as trap:
        model = _arm_on_call(trap, _denoiser)
        out = _k_run(case, backend, model)
        assert trap.active and model.calls[0] >= 3
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------
# diffusers adapter: step() in the user's loop




def _d_model(x, t):
    return torch.tanh(x @ W) * (1 + t[:, None].float() / 1000)


def _d_run(case, backend, trap=None, steps=5):
    sched = getattr(fk_diffusers, case.split("-")[0])(**D_CASES[case])
    sched.set_timesteps(steps)
    x = _x()
    torch.manual_seed(0)  # the SDE scheduler draws from the global generator (no generator=)
    with flowkern.use_backend(backend):
        for k, t in enumerate(sched.timesteps):
            if k == 1 and trap is not None:
                trap.activate()           # after set_timesteps and the first step
            x = sched.step(_d_model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_every_diffusers_scheduler_is_covered():
    assert {c.split("-")[0] for c in D_CASES} == {n for n in fk_diffusers.__all__
                                                  if n.endswith("Scheduler")}


@pytest.mark.parametrize("case", list(D_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusers_step_loop(case, backend, mode):
    expected = _d_run(case, backend)
    with trap_host_reads(uploads=mode == "uploads", armed=False) as trap:
        out = _d_run(case, backend, trap)
        assert trap.active
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------
# flow_matching adapter: ODESolver.sample


FM_CASES = {
    "euler": dict(method="euler", step_size=0.25),
    "midpoint": dict(method="midpoint", step_size=0.25),
    "heun2": dict(method="heun2", step_size=0.25),
    "heun2-time_grid-intermediates": dict(method="heun2", step_size=None,
                                          time_grid=torch.tensor([0.0, 0.2, 0.5, 1.0]),
                                          return_intermediates=True),
    "euler-reversed-intermediates": dict(method="euler", step_size=0.3,
                                         time_grid=torch.tensor([1.0, 0.4, 0.0]),
                                         return_intermediates=True),
}


def _velocity(x, t, **extras):
    return torch.tanh(x @ W) * (1 + t) + extras.get("bias", 0.0)


def _fm_run(case, backend, model):
    kw = dict(FM_CASES[case])
    return fk_fm.ODESolver(model, backend=backend).sample(_x(), kw.pop("step_size"), bias=0.1,
                                                          **kw)


def test_every_ode_method_is_covered():
    assert {c["method"] for c in FM_CASES.values()} == set(fk_fm._METHODS)


@pytest.mark.parametrize("case", list(FM_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_ode_loop(case, backend, mode):
    expected = _fm_run(case, backend, _velocity)
    with trap_host_reads(uploads=mode == "uploads", armed=False) as trap:
        model = _arm_on_call(trap, _velocity)
        out = _fm_run(case, backend, model)
        assert trap.active and model.calls[0] >= 3
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------
# the trap itself: each read raises, the wiring reaches the loops, all is undone


_T = torch.tensor([1.0, 0.0, 2.0])
READS = {
    "item": lambda: _T[0].item(),
    "tolist": lambda: _T.tolist(),
    "bool": lambda: bool(_T.any()),
    "if": lambda: 1 if (_T > 0).all() else 0,
    "int": lambda: int(_T[0]),
    "float": lambda: float(_T[0]),
    "index": lambda: [0, 1][torch.tensor(1)],
    "format": lambda: f"{_T[0]:g}",
    "repr": lambda: repr(_T),
    "numpy": lambda: _T.numpy(),
    "np.asarray": lambda: np.asarray(_T),
    "cpu": lambda: _T.cpu(),
    "to-cpu": lambda: _T.to("cpu", torch.float64),
    "nonzero": lambda: _T.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(_T),
    "torch.where-1-arg": lambda: torch.where(_T > 0),
    "mask-index": lambda: _T[_T > 0],
    "mask-assign": lambda: _T.clone().__setitem__(_T > 0, 0.0),
    "0-dim-index": lambda: _T[torch.tensor(1)],
    "torch.equal": lambda: torch.equal(_T, _T),
    "allclose": lambda: _T.allclose(_T),
    "unique": lambda: torch.unique(_T),
    "aten-item-below-python": lambda: torch.ops.aten._local_scalar_dense(_T[0]),
}


@pytest.mark.parametrize("read", list(READS))
def test_trap_catches(read):
    with pytest.raises(AssertionError, match=r"device->host read while trapped: .*\n.*File"):
        with trap_host_reads():
            READS[read]()


@pytest.mark.parametrize("make", [lambda: torch.tensor([1.0]), lambda: torch.arange(3),
                                  lambda: torch.zeros(2)])
def test_upload_trap_catches(make):
    with pytest.raises(AssertionError, match="host upload while trapped"):
        with trap_host_reads(uploads=True):
            make()


def test_trap_allows_device_side_work():
    with trap_host_reads(uploads=True):
        y = torch.where(_T > 0, _T, -_T) * _T.new_ones(3) + torch.zeros(3, device=_T.device)
        y[1] = y[2]                                   # a Python int index
        y = y[torch.arange(0, 3, 2, device=y.device)].sum() + len(y)   # a gather; len: metadata
    assert y.item() == 6.0


def test_swallowed_read_still_fails():
    with pytest.raises(AssertionError, match="host access"):
        with trap_host_reads():
            try:
                _T.sum().item()
            except AssertionError:
                pass


def test_trap_is_undone():
    before = {n: torch.Tensor.__dict__.get(n) for n in _TENSOR_READS + ("to", "__getitem__")}
    with pytest.raises(AssertionError):
        with trap_host_reads(uploads=True):
            _T.item()
    assert {n: torch.Tensor.__dict__.get(n) for n in before} == before
    assert _T[0].item() == 1.0 and bool(_T.any()) and torch.tensor([1.0]).shape == (1,)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_read_in_a_gpu_backends_glue_is_caught(backend, request, monkeypatch):
    """The (stand-in) kernels run paused, the glue around them does not (for
    cuda the glue is C++: the read is put at its call)."""
    if backend == "triton":
        if not (TRITON and _GridExecutor is not None):
            pytest.skip("needs triton, interpreted")
        from flowkern.triton import steps as glue
    else:
        request.getfixturevalue("cuda_glue_on_cpu")
        from flowkern.ops import steps as ops_steps
        glue = ops_steps._NATIVE.direct
    expected = _sample("euler", backend)
    with armed_after_planning():
        out = _sample("euler", backend)             # the kernels read: allowed
    assert torch.equal(out, expected)
    launch = glue.euler_step

    def reading(x, pred, pred_uncond, coef, *rest):
        table = coef[0] if isinstance(coef, tuple) else coef  # triton: (table, times, kind, params)
        table[..., 10].sum().item()
        return launch(x, pred, pred_uncond, coef, *rest)
    monkeypatch.setattr(glue, "euler_step", reading)          # looked up per call
    with pytest.raises(AssertionError, match="Tensor.item"):
        with armed_after_planning():
            _sample("euler", backend)


@pytest.mark.parametrize("where", ["sample", "k_diffusion", "ode"])
def test_a_read_in_the_loop_is_caught(where):
    """A model that reads a value on its third call fails every harness above:
    the trap is armed where the loops run."""
    calls = [0]

    def reading(fn):
        def m(*args, **kwargs):
            calls[0] += 1
            out = fn(*args, **kwargs)
            if calls[0] == 3:
                out.sum().item()
            return out
        return m

    with pytest.raises(AssertionError, match="Tensor.item"):
        if where == "sample":
            with armed_after_planning():
                flowkern.sample(reading(_model), _x(), steps=4, progress=False)
        elif where == "k_diffusion":
            with trap_host_reads(armed=False) as trap:
                fk_k.sample_euler(_arm_on_call(trap, reading(_denoiser)), _x(), SIGMAS,
                                  disable=True)
        else:
            with trap_host_reads(armed=False) as trap:
                fk_fm.ODESolver(_arm_on_call(trap, reading(_velocity))).sample(_x(), 0.25)


def test_gpu_sync_check_script_passes_its_cpu_dry_run():
    """bench/gpu_sync_check.py (what `make gpu-check` runs on the first GPU)
    stays runnable: its CPU dry run of every case passes here."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_sync_check.py"),
                        "--cpu-dry-run", "--backends", "cpu"], cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "gpu_sync_check: PASS" in r.stdout, r.stdout[-3000:] + r.stderr
