"""flowkern._fastcall's entries (csrc/fastcall/entries.cpp): each public
function's usual call made in C. An entry must take every usual call (a miss
there is a host-time regression nobody would see), give exactly what the
Python path gives (results, in-place writes, errors), and leave every other
call to the Python: overrides of the backend, gradients, transforms, modes,
subclasses and whatever the Python converts or rejects.
"""
import pytest
import torch

import flowkern as fk
from flowkern.ops import _entries
from flowkern.ops import flowmap as ops_flowmap
from flowkern.ops import steps as ops_steps
from flowkern.ops import training as ops_training

ENTRIES = _entries.ENTRIES
pytestmark = pytest.mark.skipif(ENTRIES is None,
                                reason="flowkern._fastcall does not serve this torch")


def _taken():
    return sum(ENTRIES.taken().values())


@pytest.fixture
def python_path(monkeypatch):
    """A context in which the public functions skip their entries."""
    class Off:
        def __enter__(self):
            for module in (ops_steps, ops_training, ops_flowmap):
                monkeypatch.setattr(module, "ENTRIES", None)

        def __exit__(self, *exc):
            for module in (ops_steps, ops_training, ops_flowmap):
                monkeypatch.setattr(module, "ENTRIES", ENTRIES)
    return Off()


def _data(shape=(5, 7)):
    g = torch.Generator().manual_seed(0)
    x, p, pu, x1, h = (torch.randn(*shape, generator=g) for _ in range(5))
    t = torch.rand(shape[0], generator=g) * 0.8 + 0.1
    return x, p, pu, x1, h, t


def _usual_calls():
    """(name, call(state) -> result) for the usual calls of every public op;
    the state is fresh per call, so in-place steps start alike."""
    tab = fk.step_table("linear", 0.3, 0.4)
    vp = fk.step_table("vp", 0.3, 0.4, t_prev=0.25, g=0.5)
    return [
        ("interpolate", lambda d: fk.interpolate(d.x, d.x1, d.t)),
        ("interpolate float t", lambda d: fk.interpolate(d.x, d.x1, 0.5, schedule="cosine",
                                                         target="eps")),
        ("interpolate out=", lambda d: fk.interpolate(d.x, d.x1, d.t, out=(d.o1, d.o2))),
        ("interpolate out=list", lambda d: fk.interpolate(d.x, d.x1, d.t, out=[d.o1, d.o2])),
        ("loss", lambda d: fk.flow_matching_loss(d.p, d.x, d.x1, d.t)),
        ("loss weighted", lambda d: fk.flow_matching_loss(d.p, d.x, d.x1, d.t, weight=d.t,
                                                          reduction="none", schedule="vp")),
        ("convert", lambda d: fk.convert(d.p, d.x, d.t, src="x1", dst="velocity")),
        # a Parameter is a plain tensor to torch's binding (THPVariable_CheckExact)
        ("convert parameter", lambda d: fk.convert(torch.nn.Parameter(d.p, requires_grad=False),
                                                   d.x, d.t)),
        ("euler table", lambda d: fk.euler_step(d.x, d.p, table=tab, out=d.x)),
        ("euler floats", lambda d: fk.euler_step(d.x, d.p, 0.3, 0.4)),
        ("euler int times", lambda d: fk.euler_step(d.x, d.p, 0, 1, schedule="cosine",
                                                    prediction="x1")),
        ("euler cfg", lambda d: fk.euler_step(d.x, d.p, 0.3, 0.4, pred_uncond=d.pu,
                                              guidance=2, out=d.o1)),
        ("heun", lambda d: fk.heun_step(d.x, d.p, d.x1, d.pu, 0.3, 0.4)),
        ("heun cfg table", lambda d: fk.heun_step(d.x, d.p, d.x1, d.pu, table=tab,
                                                  pred_uncond=d.h, pred_euler_uncond=d.h,
                                                  guidance=1.5, out=d.o1)),
        ("ei", lambda d: fk.ei_step(d.x, d.p, 0.3, 0.4)),
        ("ei noise out=", lambda d: fk.ei_step(d.x, d.p, table=vp, prediction="eps",
                                               form="noise", out=d.o1)),
        ("dpmpp first", lambda d: fk.dpmpp_2m_step(d.x, d.p, 0.3, 0.4)),
        ("dpmpp", lambda d: fk.dpmpp_2m_step(d.x, d.p, 0.35, 0.4, d_prev=d.pu, t_prev=0.3,
                                             out=d.o1, d_out=d.o2)),
        ("dpmpp table", lambda d: fk.dpmpp_2m_step(d.x, d.p, table=vp, d_prev=d.pu)),
        ("em", lambda d: fk.em_step(d.x, d.p, 0.3, 0.4, g=0.5, seed=3, offset=10)),
        ("em seeds", lambda d: fk.em_step(d.x, d.p, 0.3, 0.4, per_sample_seeds=torch.arange(5),
                                          out=d.x)),
        ("em table", lambda d: fk.em_step(d.x, d.p, table=vp, seed=2 ** 62)),
        ("churn", lambda d: fk.churn(d.x, 0.5, 0.4, seed=1)),
        ("churn table", lambda d: fk.churn(d.x, table=fk.step_table("linear", 0.5, 0.4),
                                           offset=7, out=d.x)),
        ("lms", lambda d: fk.lms_step(d.x, d.p, [0.1, 0.05], history=[d.pu], t=0.3)),
        ("lms full", lambda d: fk.lms_step(d.x, d.p, (0.1, -0.05, 0.02, 1), (d.pu, d.h, d.x1),
                                           table=tab, prediction="eps", out=d.o1, u_out=d.o2)),
        # per-sample times as tensors (mixed with floats; a () tensor; a float64 one)
        ("euler tensor times", lambda d: fk.euler_step(d.x, d.p, d.t / 2, d.t, "cosine",
                                                       out=d.x)),
        ("heun tensor s", lambda d: fk.heun_step(d.x, d.p, d.x1, d.pu, 0.05, d.t, "vp", "eps")),
        ("ei tensor t", lambda d: fk.ei_step(d.x, d.p, d.t / 2, 0.95, "edm")),
        ("dpmpp tensor times", lambda d: fk.dpmpp_2m_step(d.x, d.p, d.t / 2, d.t.double(),
                                                          d_prev=d.pu, t_prev=d.t / 4)),
        ("em tensor times", lambda d: fk.em_step(d.x, d.p, torch.tensor(0.2), d.t + 0.1, g=0.5,
                                                 seed=3)),
        ("churn tensor times", lambda d: fk.churn(d.x, d.t, d.t / 2, seed=1, out=d.o1)),
        ("lms tensor t", lambda d: fk.lms_step(d.x, d.p, [0.1, 0.05], history=[d.pu], t=d.t)),
        ("lincomb", lambda d: fk.lincomb_step(d.x, [d.p, d.pu], [1.0, 0.5, -0.25])),
        ("lincomb noise", lambda d: fk.lincomb_step(d.x, (d.p,), [1, 0.5], noise_std=0.1,
                                                    seed=2, out=d.x)),
        ("flowmap", lambda d: fk.flowmap_loss(d.x, d.p, d.x1, d.t / 2, 0.9)),
        ("flowmap floats", lambda d: fk.flowmap_loss(d.x, d.p, d.x1, 0.2, 1, "vp", "eps",
                                                     "noise", reduction="sum")),
        ("flowmap table", lambda d: fk.flowmap_loss(d.x, d.p, d.x1[:1], table=vp, weight=d.t,
                                                    reduction="none", prediction="velocity")),
    ]


class _State:
    def __init__(self):
        self.x, self.p, self.pu, self.x1, self.h, self.t = _data()
        self.o1, self.o2 = torch.full_like(self.x, 7.0), torch.full_like(self.x, 7.0)


def _flat(r):
    return list(r) if isinstance(r, (tuple, list)) else [r]


@pytest.mark.parametrize("name,call", _usual_calls(), ids=[n for n, _ in _usual_calls()])
def test_usual_calls_take_their_entry_and_equal_the_python(name, call, python_path):
    """One op call made by the entry; the same tensors, bit for bit, and the
    same buffers returned as the Python path (which calls the same op)."""
    a = _State()
    before, by_op = _taken(), ENTRIES.taken()
    got = call(a)
    assert _taken() == before + 1, name
    # a step given a time tensor calls its `.times` overload, any other its
    # default one (or .nograd), whose schema lacks the time tensors (schemas.inc)
    (op,) = [k for k, n in ENTRIES.taken().items() if n != by_op[k]]
    assert op.endswith((".times", ".times_nograd")) == ("tensor" in name), (name, op)
    b = _State()
    with python_path:
        want = call(b)
    assert _taken() == before + 1
    assert type(got) is type(want)
    for g, w in zip(_flat(got), _flat(want)):
        assert torch.equal(g, w), name
    # the returned buffers are the caller's (out=, out=x) exactly where the Python's are
    ids_a = {id(v): k for k, v in vars(a).items() if isinstance(v, torch.Tensor)}
    ids_b = {id(v): k for k, v in vars(b).items() if isinstance(v, torch.Tensor)}
    assert [ids_a.get(id(g)) for g in _flat(got)] == [ids_b.get(id(w)) for w in _flat(want)]
    for k in vars(a):  # in-place writes alike
        if isinstance(getattr(a, k), torch.Tensor):
            assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_samplers_take_the_entries():
    x = _data()[0]
    before = _taken()
    fk.sample(lambda x, t: -x, x, steps=3, progress=False)
    assert _taken() >= before + 3


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def _unusual(monkeypatch):
    """(name, call) that an entry must leave to the Python."""
    x, p, pu, x1, h, t = _data()
    tab = fk.step_table("linear", 0.3, 0.4)
    xg = x.clone().requires_grad_(True)

    def under(ctx, f):
        def run():
            with ctx():
                return f()
        return run

    def env(f):
        def run():
            monkeypatch.setenv("FLOWKERN_BACKEND", "cpu")
            try:
                return f()
            finally:
                monkeypatch.delenv("FLOWKERN_BACKEND")
        return run

    def dual(f):
        def run():
            import torch.autograd.forward_ad as fwad
            with fwad.dual_level():
                return f()
        return run

    return [
        ("use_backend", under(lambda: fk.use_backend("torch"),
                              lambda: fk.euler_step(x, p, table=tab))),
        ("use_backend cpu", under(lambda: fk.use_backend("cpu"),
                                  lambda: fk.interpolate(x, x1, t))),
        ("FLOWKERN_BACKEND", env(lambda: fk.euler_step(x, p, table=tab))),
        ("backend=torch", lambda: fk.interpolate(x, x1, t, backend="torch")),
        ("schedule object", lambda: fk.interpolate(x, x1, t, schedule=fk.schedules.Cosine())),
        ("tensor times, schedule object", lambda: fk.euler_step(x, p, t, t + 0.05,
                                                                fk.schedules.Cosine())),
        ("tensor g", lambda: fk.em_step(x, p, 0.3, 0.4, g=torch.full((5,), 0.5))),
        ("bool time", lambda: fk.euler_step(x, p, False, 0.5)),
        ("subclass", lambda: fk.euler_step(x.as_subclass(_Sub), p, table=tab)),
        ("requires grad", lambda: fk.interpolate(xg, x1, t)),
        ("requires grad loss weight", lambda: fk.flow_matching_loss(
            p, x, x1, t, weight=t.clone().requires_grad_(True))),
        ("requires grad ei", lambda: fk.ei_step(xg, p, 0.3, 0.4)),
        ("dual level", dual(lambda: fk.convert(p, x, t))),
        ("function mode", under(_Mode, lambda: fk.euler_step(x, p, table=tab))),
        ("vmap", lambda: torch.vmap(lambda a, b: fk.interpolate(a, b, 0.3))(x, x1)),
        ("weight not a tensor", lambda: fk.flow_matching_loss(p, x, x1, t, weight=2.0)),
        ("flowmap schedule object", lambda: fk.flowmap_loss(x, p, x1, t / 2, 0.9,
                                                            fk.schedules.Cosine())),
        ("flowmap requires grad", lambda: fk.flowmap_loss(x, p.clone().requires_grad_(), x1,
                                                          0.2, 0.4)),
        ("flowmap s requires grad", lambda: fk.flowmap_loss(
            x, p, x1, 0.2, torch.full((5,), 0.4, requires_grad=True), backend="torch")),
        ("flowmap bool time", lambda: fk.flowmap_loss(x, p, x1, False, 0.4)),
        ("huge fresh output", lambda: fk.euler_step(torch.zeros(1, 2 ** 21), torch.zeros(1, 2 ** 21),
                                                    table=tab)),
    ]


def test_unusual_calls_are_left_to_the_python(monkeypatch):
    for name, call in _unusual(monkeypatch):
        before = _taken()
        call()
        assert _taken() == before, name


def _bad_calls():
    x, p, pu, x1, h, t = _data()
    tab = fk.step_table("linear", 0.3, 0.4)
    return [
        lambda: fk.euler_step(x, torch.randn(5, 6), table=tab),                  # shape: the op
        lambda: fk.euler_step(x, p, table=tab, out=torch.empty(5, 7, dtype=torch.float64)),
        lambda: fk.euler_step(x, p, 0.3, 1.5),                                   # s > 1: the op
        lambda: fk.euler_step(x, p, table=tab, prediction="nope"),
        lambda: fk.euler_step(x, p, table=tab, guidance=2.0),                    # no pred_uncond
        lambda: fk.euler_step(x, p, table=tab, out=x[:, 1:]),
        lambda: fk.euler_step(x, p, table=tab, out=p[:, :1].expand(5, 7)),
        lambda: fk.heun_step(x, p, x1, pu, 0.3, 0.4, pred_uncond=pu),
        lambda: fk.dpmpp_2m_step(x, p, 0.3, 0.4, d_prev=pu),                     # t_prev missing
        lambda: fk.em_step(x, p, 0.4, 0.3),                                      # backwards: the op
        lambda: fk.em_step(x, p, 0.3, 0.4, seed=-1),
        lambda: fk.em_step(x, p, 0.3, 0.4, seed=1, per_sample_seeds=torch.arange(5)),
        lambda: fk.churn(x, 0.4, 0.5, seed=1),                                   # t_hat > t
        lambda: fk.lms_step(x, p, [0.1, 0.2, 0.3], history=[pu], t=0.3),         # weights count
        lambda: fk.lms_step(x, p, [0.1] * 5, history=[pu] * 4, t=0.3),
        lambda: fk.lms_step(x, p, [0.1, 0.2], history=[[1.0]], t=0.3),
        lambda: fk.lms_step(x, p, [0.1, 0.2], history=[None], t=0.3),
        lambda: fk.lincomb_step(x, [p] * 5, [1.0] * 6),
        lambda: fk.lincomb_step(x, [p], [1.0, float("inf")]),
        lambda: fk.interpolate(x, x1, 1.5),                                      # t out of range
        lambda: fk.interpolate(x, x1, t, target="nope"),
        lambda: fk.interpolate(x, x1, t, out=(torch.empty(5, 7),                  # overlap
                                              x.view(-1)[1:36].view(5, 7))),
        lambda: fk.flow_matching_loss(p, x, x1, t, reduction="max"),
        lambda: fk.flow_matching_loss(p[:, :3], x, x1, t),
        lambda: fk.convert(p, x, t, src="x1", dst="nope"),
        lambda: fk.convert(p, x, torch.rand(3), src="x1"),
        lambda: fk.flowmap_loss(x, p, x1, 0.2, 1.5),                             # s > 1: the op
        lambda: fk.flowmap_loss(x, p, x1, 1.0, 1.0),                             # sigma_t = 0
        lambda: fk.flowmap_loss(x, p, x1[:, :3], 0.2, 0.5),
        lambda: fk.flowmap_loss(x, p, x1, torch.rand(3), 0.5),
        lambda: fk.flowmap_loss(x, p, x1, 0.2, 0.5, form="ode"),
        lambda: fk.flowmap_loss(x, p, x1, table=torch.zeros(3, 12)),
        lambda: fk.flowmap_loss(x, p, x1, 0.2, 0.5, weight=torch.ones(3)),
    ]


@pytest.mark.parametrize("k", range(len(_bad_calls())))
def test_errors_equal_the_python(k, python_path):
    """Bad input raises the same exception type and message either way (the
    entry's op errors pass through the Python's retyped)."""
    call = _bad_calls()[k]
    with pytest.raises(Exception) as a:
        call()
    with python_path:
        with pytest.raises(Exception) as b:
            call()
    assert type(a.value) is type(b.value), (a.value, b.value)
    assert str(a.value) == str(b.value)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_grad_modes_take_the_entries(mode):
    """no_grad, inference_mode and grad mode with nothing requiring grad are
    usual calls (inference mode changes the thread's keys, not the included
    ones); the results equal the Python path's."""
    x, p, pu, x1, h, t = _data()
    with mode():
        before = _taken()
        xt, y = fk.interpolate(x, x1, t)
        out = fk.euler_step(x, p, 0.3, 0.4)
        buf = torch.randn(5, 7)
        fk.euler_step(buf, p, table=fk.step_table("linear", 0.3, 0.4), out=buf)
        assert _taken() == before + 3
    torch.testing.assert_close(out, x + 0.1 * p, rtol=0, atol=1e-6)
    torch.testing.assert_close(xt, t[:, None] * x1 + (1 - t[:, None]) * x, rtol=0, atol=1e-6)


def test_each_function_passes_its_own_parameters_in_order():
    """An entry reads its arguments by position (entries.cpp lists each
    signature): every public function hands over exactly its parameters, in
    signature order, so a new or reordered parameter cannot be misread."""
    import ast
    import inspect
    import textwrap
    names = ["interpolate", "flow_matching_loss", "convert", "euler_step", "heun_step", "ei_step",
             "dpmpp_2m_step", "em_step", "churn", "lms_step", "lincomb_step", "flowmap_loss"]
    for name in names:
        fn = getattr(fk, name)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == name
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "ENTRIES"]
        assert len(calls) == 1, name
        passed = [a.id for a in calls[0].args]
        assert passed == list(inspect.signature(fn).parameters), name
        assert not calls[0].keywords, name
