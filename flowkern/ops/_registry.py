"""One registration path for every op family.

Kernel-level ops live in two torch.library namespaces with identical schemas:
- ``flowkern::`` defined in C++ (csrc/cpu, STABLE_TORCH_LIBRARY) with its CPU kernels
  and, when built against a CUDA torch, its CUDA kernels (csrc/cuda/register.cpp);
- ``flowkern_triton::`` defined here with ``torch.library.custom_op``; its
  implementation launches the Triton kernel on whatever device the tensors
  are on (CPU tensors only under TRITON_INTERPRET=1).
Each family registers its fake (meta) functions and autograd formulas once,
for both namespaces, through :func:`for_each_namespace`.
"""
from __future__ import annotations

import importlib
import os
import re
import types

import torch
import torch._library.triton as _torch_triton
import torch.autograd.forward_ad as _fwad
from torch.autograd.function import once_differentiable

from .._validate import _PRECHECKED  # check_flag's ContextVar (now_checked)
from ..backend import cpu_built, fastcall, nograd_native, triton_ops_traced

TRITON_NS = "flowkern_triton"
NATIVE_NS = "flowkern"
TORCH = "torch"  # the reference backend: each op's torch formula (TorchOp)


def _read_schemas() -> list[tuple[str, str]]:
    """(op or op.overload, "(args) -> returns") of each FK_SCHEMA line of
    schemas.inc, in order: the one list of schemas (C++ compiles it in:
    csrc/cpu/schemas.h)."""
    lines = []
    with open(os.path.join(os.path.dirname(__file__), "schemas.inc")) as f:
        for line in f:
            if line.startswith("//") or not line.strip():
                continue
            m = re.fullmatch(r'FK_SCHEMA\("([\w.]+)(\(.*)"\)\s*', line)
            if m is None:
                raise RuntimeError(f"flowkern/ops/schemas.inc: cannot read {line!r}")
            lines.append((m.group(1), m.group(2)))
    return lines


SCHEMA_LINES = _read_schemas()
if cpu_built() and not nograd_native():
    from . import _nograd
    _nograd.register(SCHEMA_LINES)
# {op name: schema} of the ops flowkern_triton:: defines: each op once, with
# its `.times` schema where it has one (a step's per-sample time tensors: the
# Python backends take every coefficient form through one op); the other
# overloads are native only.
SCHEMAS = {name: schema for name, schema in SCHEMA_LINES if "." not in name}
SCHEMAS.update({name.partition(".")[0]: schema for name, schema in SCHEMA_LINES
                if name.endswith(".times")})
TIMES = "times"  # the steps' overload with per-sample time tensors (schemas.inc)


# The C++ ops' argument errors carry their Python type as a message prefix
# (csrc/cpu/errors.h): no exception type crosses torch's stable ABI, and torch
# 2.14 raises them as ValueError, torch 2.15 as RuntimeError.
ERROR_PREFIXES = (("ValueError: ", ValueError), ("TypeError: ", TypeError))


def retyped(e: Exception) -> Exception:
    """The exception a public function raises for the C++ op's exception `e`
    (a ValueError or RuntimeError): the type its message's prefix names, with
    the message after the prefix; `e` itself when it has none. Public
    functions call it in `except (ValueError, RuntimeError)` around their
    native branch, which costs nothing until something raises."""
    msg = str(e)
    for prefix, kind in ERROR_PREFIXES:
        if msg.startswith(prefix):
            return kind(msg[len(prefix):])
    return e


# The Python function of each flowkern_triton:: op (the Triton launch), by
# qualified name: what direct() lets an eager call run without the custom
# op's dispatcher wrappers.
TRITON_IMPLS: dict = {}


def triton_op(name: str):
    """Decorator: the flowkern_triton:: op `name`, with its schema from
    schemas.inc and the decorated function (the Triton launch, or the
    interpreter on CPU tensors) as its implementation. The arguments it
    writes are the schema's Tensor(a!) ones."""
    schema = SCHEMAS[name]
    writes = tuple(re.findall(r"Tensor\(\w!\) (\w+)", schema))
    qual = f"{TRITON_NS}::{name}"
    if not triton_ops_traced():
        # an opaque op: torch.compile calls it and does not see its kernel
        def opaque(fn):
            TRITON_IMPLS[qual] = fn
            return torch.library.custom_op(qual, mutates_args=writes, schema=schema)(fn)
        return opaque

    def define(fn):
        # as triton_op's own backend kernel runs it: the launches inside go
        # straight to Triton, not through the wrap_triton HOP
        no_hop = getattr(_torch_triton, "set_wrap_triton_enabled", None)

        def eager(*args):
            with no_hop(False):
                return fn(*args)
        TRITON_IMPLS[qual] = fn if no_hop is None else eager
        # torch.library.triton_op (FLOWKERN_TRITON_OP=1): torch.compile traces
        # into the body, where each launch goes through wrap_triton, and
        # Inductor schedules the kernels themselves. Its scan of the body's
        # source for kernels (kept for AOTInductor) is skipped: it would
        # import triton and Inductor at `import flowkern` (~1.2 s here) and
        # finds none, since the bodies reach the kernels through `lazy`.
        scan = getattr(_torch_triton, "get_inner_triton_kernels", None)
        if scan is not None:
            _torch_triton.get_inner_triton_kernels = lambda fn: []
        try:
            return torch.library.triton_op(qual, mutates_args=writes, schema=schema)(fn)
        finally:
            if scan is not None:
                _torch_triton.get_inner_triton_kernels = scan
    return define


def namespaces() -> list[str]:
    """Namespaces whose schemas exist in this process."""
    return [NATIVE_NS, TRITON_NS] if cpu_built() else [TRITON_NS]


def ops_for(backend: str):
    """The kernel-level ops that run `backend`: a torch.ops namespace (cpu and
    cuda share flowkern::), or for `torch` the ops' torch formulas (TorchOp).
    For triton outside torch.compile: the ops through direct() (_TRITON_DIRECT)."""
    if backend == TORCH:
        return CALLS[TORCH]
    if backend == "triton":
        return torch.ops.flowkern_triton if torch.compiler.is_compiling() else _TRITON_DIRECT
    return torch.ops.flowkern


def direct(op):
    """The C++ function an OpOverload's __call__ runs, where that is all it
    runs: the same dispatcher call without the Python frame. torch < 2.14 has
    no _pyobj_dispatcher and its __call__ is `_op` alone; with a Python
    dispatcher object __call__ does more: keep the overload then.

    Where flowkern._fastcall serves this torch, `_op` is wrapped in its fast
    caller: the same dispatcher call for positional arguments of the schema's
    exact types and plain tensors (what the public functions pass), `_op`
    itself for anything else (docs/build.md "flowkern._fastcall"). A
    flowkern_triton:: op (a custom op whose kernel is a Python function) gets
    its direct caller: the function itself, for the calls the custom op's
    dispatcher wrappers would only pass on."""
    fast = fastcall()
    schema = op._schema
    impl = TRITON_IMPLS.get(schema.name) if fast is not None else None
    if impl is not None:
        # a flowkern_triton:: op: its Python function itself where the custom
        # op's dispatcher wrappers would only pass the call on (_fastcall
        # ImplOp), else the OpOverload
        return fast.impl(schema.name, schema.overload_name, op, impl)
    if getattr(op, "_pyobj_dispatcher", None) is not None:
        return op
    if fast is None:
        return op._op
    return fast.op(schema.name, schema.overload_name, op._op)


class NativeOps:
    """The flowkern:: overloads a family's public functions call, looked up
    once, as two namespaces with the same names: `traced` holds the
    OpOverloads, `direct` the C++ function each one's __call__ runs. An
    OpOverload without a Python kernel calls its `_op` and nothing else, so a
    direct call is the same dispatcher call without OpOverload.__call__'s
    Python frame (~0.6 us on 8x64 tensors here); `now()`, which gives
    `traced` while torch.compile traces (Dynamo traces OpOverloads, not
    `_op`), takes back about half of it: a public call is at most ~0.3 us
    cheaper, within this machine's run-to-run noise for the steps."""

    def __init__(self, **overloads):
        self.traced = types.SimpleNamespace(**overloads)
        self.direct = types.SimpleNamespace(**{
            name: op.direct() if isinstance(op, TimedOp) else direct(op)
            for name, op in overloads.items()})

    def now(self) -> types.SimpleNamespace:
        return self.traced if torch.compiler.is_compiling() else self.direct

    def now_checked(self) -> tuple[types.SimpleNamespace, bool]:
        """(now(), _validate.check_flag()) for one is_compiling() (~0.1 us)."""
        if torch.compiler.is_compiling():
            return self.traced, True
        return self.direct, not _PRECHECKED.get()


def lazy(module: str, name: str):
    """A function that imports flowkern.<module> on first call (the triton launchers)."""
    def call(*args):
        return getattr(importlib.import_module(module, "flowkern"), name)(*args)
    call.__name__ = name
    return call


class TorchOp:
    """The torch backend's implementation of one op: the op's torch formula
    with the op's signature, which torch itself differentiates (in the times
    too). Called like the kernel-level op (``ops_for("torch").name(...)``) and
    like its differentiable call (``calls_for("torch").name.call(...)``), so a
    public function runs every backend through one call and has no branch
    for the reference."""

    def __init__(self, formula):
        self.call = formula

    def __call__(self, *args):
        return self.call(*args)


# The differentiable calls of each backend, CALLS[ns].<op name>: DiffOp (made
# by register(..., jvp=...)) for the kernel namespaces, TorchOp (made by
# register(..., reference=...)) for the torch backend.
CALLS = {NATIVE_NS: types.SimpleNamespace(), TRITON_NS: types.SimpleNamespace(),
         TORCH: types.SimpleNamespace()}


def calls_for(backend: str) -> types.SimpleNamespace:
    """The differentiable calls that run `backend` (cpu and cuda share flowkern::)."""
    if backend == TORCH:
        return CALLS[TORCH]
    return CALLS[TRITON_NS if backend == "triton" else NATIVE_NS]


class _Direct:
    """A torch.ops namespace as the eager calls make them (DiffOp's backward,
    the triton ops of ops_for): each op's default overload through direct(),
    looked up once per name. What torch.compile traces keeps the torch.ops
    namespace (the backward registered with register_autograd, ops_for while
    compiling)."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        fn = direct(getattr(self._ops, name).default)
        setattr(self, name, fn)  # __getattr__ runs once per name
        return fn


_TRITON_DIRECT = _Direct(torch.ops.flowkern_triton)


def register(name: str, fake, backward=None, setup_context=None, nograd=False, jvp=None,
             reference=None, diff=(), saved_at=None):
    """Fake + autograd for `name` in every namespace.
    nograd: flowkern::name also has the `.nograd` overload (same kernel, no
    autograd kernel), which the public functions call when no input needs a
    gradient: the Python autograd kernel costs ~10 us a call even then.
    jvp: builder of the forward-mode formula (given the namespace's CALLS);
    with it, CALLS[ns].name is the op's DiffOp. reference, diff, saved_at: the
    op's torch formula with the op's signature, the positions of its
    differentiable tensors, and where the tensors setup_context saves go (None:
    the op is linear in them): DiffOp's differentiable backward and the torch
    backend's implementation of the op (TorchOp).

    Every formula takes the op's fullest signature: a step's `.times` one
    (schemas.inc), which flowkern_triton:: and the torch backend use. A native
    step's default overloads, without t, s, t_prev, get them widened
    (Widened); its DiffOp takes the full signature and calls the overload the
    times need (TimedOp)."""
    if reference is not None:
        setattr(CALLS[TORCH], name, TorchOp(reference))
    for ns in namespaces():
        packet = getattr(getattr(torch.ops, ns), name)
        timed = ns == NATIVE_NS and TIMES in packet.overloads()
        full = getattr(packet, TIMES) if timed else packet.default
        for overload in packet.overloads():
            op = getattr(packet, overload)
            widen = Widened.of(op, full)
            qual = f"{ns}::{name}" + ("" if overload == "default" else f".{overload}")
            torch.library.register_fake(qual)(_one_device(qual, op, widen.call(fake)))
            if backward is not None and not overload.endswith("nograd"):
                torch.library.register_autograd(
                    qual, widen.backward(backward(getattr(torch.ops, ns))),
                    setup_context=widen.setup(setup_context))
        if jvp is not None:
            ops = getattr(torch.ops, ns)
            op = packet.nograd if (nograd and ns == NATIVE_NS) else packet.default
            if timed:
                op = TimedOp(op, getattr(packet, TIMES + "_nograd" if nograd else TIMES))
            eager_ops = _Direct(ops)
            diff_op = DiffOp(f"{ns}::{name}", op, full, setup_context,
                             backward(eager_ops), jvp(CALLS[ns]), reference, diff, saved_at)
            diff_op.backward_ops = eager_ops  # what its eager backward calls (tests read it)
            setattr(CALLS[ns], name, diff_op)


class Widened:
    """A formula written for an op's full signature (a step's `.times`
    overload), adapted to an overload without the per-sample times t, s,
    t_prev: None is inserted for them after `table` on the way in, and
    their gradient slots are dropped on the way out."""

    def __init__(self, at: int):
        self.at = at  # the position of t in the full signature

    @staticmethod
    def of(op, full) -> "Widened | _Same":
        names = [a.name for a in op._schema.arguments]
        full_names = [a.name for a in full._schema.arguments]
        if names == full_names:
            return _SAME
        at = full_names.index("t")
        assert full_names[at:at + 3] == ["t", "s", "t_prev"] and \
            names == full_names[:at] + full_names[at + 3:], (names, full_names)
        return Widened(at)

    def args(self, args):
        at = self.at
        return (*args[:at], None, None, None, *args[at:])

    def call(self, fn):
        return lambda *args, **kw: fn(*self.args(args), **kw)

    def setup(self, fn):
        if fn is None:
            return None
        return lambda ctx, inputs, output: fn(ctx, self.args(inputs), output)

    def backward(self, fn):
        at = self.at

        def backward(ctx, *grads):
            g = fn(ctx, *grads)
            return (*g[:at], *g[at + 3:])
        return backward


class _Same:
    """Widened.of for an overload with the full signature: formulas as they are."""

    @staticmethod
    def call(fn):
        return fn

    setup = backward = call


_SAME = _Same()


class TimedOp:
    """A native step op's call with the full signature (`.times`: table, t, s,
    t_prev, ...): its `.times` overload when a time is a tensor, else its
    default (or `.nograd`) overload without them, whose boxed call is ~0.15
    us cheaper (schemas.inc). What DiffOp runs for a native step."""

    def __init__(self, plain, timed):
        self.plain, self.timed = plain, timed
        names = [a.name for a in timed._schema.arguments]
        self.at = names.index("t")
        self._schema = timed._schema  # DiffOp and direct() read the op's schema

    def __call__(self, *args):
        op, args = _pick_overload(self.plain, self.timed, self.at, args)
        return op(*args)

    def direct(self):
        """The same choice between the two overloads' direct() callers."""
        plain, timed, at = direct(self.plain), direct(self.timed), self.at

        def call(*args):
            op, args = _pick_overload(plain, timed, at, args)
            return op(*args)
        call.plain, call.timed = plain, timed  # the two callers (tests read them)
        return call


def _pick_overload(plain, timed, at, args):
    """(callee, its args): `plain` without the three time arguments at `at`
    (t, s, t_prev) when all are None, else `timed` with every argument. The
    one place TimedOp's two forms decide between the overloads."""
    if args[at] is None and args[at + 1] is None and args[at + 2] is None:
        return plain, (*args[:at], *args[at + 3:])
    return timed, args


def _one_device(qual: str, overload, fake):
    """The fake kernel behind a device check: the dispatcher sends a call with
    any meta tensor here (not to the kernels, whose C++ checks name the
    argument), so a meta tensor mixed with real ones would otherwise return
    meta outputs without a word. 0-dim CPU tensors may join any device, as in
    PyTorch's own ops."""
    names = [a.name for a in overload._schema.arguments]

    def checked(*args, **kwargs):
        first = None
        for n, a in zip(names, args):
            for x in (a if isinstance(a, (list, tuple)) else (a,)):
                if not isinstance(x, torch.Tensor) or (x.dim() == 0 and x.device.type == "cpu"):
                    continue
                if first is None:
                    first = (n, x.device)
                elif x.device != first[1]:
                    raise ValueError(f"{n}: is on {x.device}, but {first[0]} is on {first[1]}; "
                                     f"{qual} needs every tensor on one device")
        return fake(*args, **kwargs)
    return checked


_functorch_active = torch._C._are_functorch_transforms_active


def transforms_active() -> bool:
    """Whether a forward-mode dual level (torch.autograd.forward_ad) or a
    torch.func transform (jvp, grad, vmap, ...) is active. Tensors may then
    carry tangents or batch dimensions that a kernel without autograd would
    drop, so the public functions take their op's differentiable call.
    False under torch.compile (Dynamo traces the default overloads)."""
    if torch.compiler.is_compiling():
        return False
    return _fwad._current_level >= 0 or _functorch_active()


def _jvp_transform_active() -> bool:
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


_WRITES = ("this op writes into a buffer and has no forward-mode derivative; ei_step "
           "without out= is the differentiable step")


def no_forward_mode(op: str, *tensors, reason: str = _WRITES) -> None:
    """An op that writes into a buffer (the steps, ei_step and interpolate with
    out=) has no forward-mode formula: a tangent reaching it is an error, not
    a dropped one. The native ops raise this from C++ (csrc/autograd/nograd.cpp);
    this is the check of the triton path. Under torch.func.jvp, whose wrapped
    tensors do not say whether they carry a tangent, every call raises."""
    if not transforms_active():
        return
    dual = _fwad._current_level >= 0 and any(
        isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None
        for t in tensors)
    if dual or (_functorch_active() and _jvp_transform_active()):
        raise RuntimeError(
            f"{op}: an input carries a forward-mode tangent (torch.func.jvp / forward_ad), "
            f"and {reason} (docs/design.md §10)")


def refuse_grad(op: str, why: str, **tensors) -> None:
    """csrc/autograd/nograd.cpp's rule for the Python backends: with grad mode on,
    a tensor argument that requires grad where the op has no derivative is a
    RuntimeError naming it ("{op}: argument '{name}' requires grad, and
    {why}"), not a silently detached result."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"{op}: argument '{name}' requires grad, and {why}")


def no_derivative(op: str, **tensors) -> None:
    """The field kernels (poisson_field, empirical_denoiser) have no derivative:
    an input that requires grad or carries a tangent is an error naming it,
    not a gradient through the torch ops around the kernel alone (wrong)."""
    why = "the fused field kernels do not differentiate; detach it, or use backend='torch'"
    refuse_grad(op, f"{why} (docs/design.md §10)", **tensors)
    no_forward_mode(op, *tensors.values(), reason=why)


def no_time_tangent(op: str, name: str, tangent) -> None:
    """The kernels differentiate in their tensors, not in the times: a tangent
    on `t` (or the step table) is an error, not a silently dropped term."""
    if tangent is not None:
        raise RuntimeError(
            f"{op}: argument '{name}' carries a forward-mode tangent, and the fused op "
            f"does not differentiate in the times; use backend='torch' for derivatives "
            f"in t (docs/design.md §10)")


def _reference_backward(ctx, grads, reference, diff, saved_at):
    """The gradients of an op's inputs as a differentiable function of the
    output gradients (and of the saved inputs, for the ops that are not linear
    in them): torch.autograd.grad of the op's torch formula with create_graph.
    A linear op's Jacobian does not depend on its inputs, so zeros of their
    shape (ctx.meta) stand in for them."""
    args = list(ctx.static)
    if saved_at is not None:
        for pos, t in zip(saved_at, ctx.saved_tensors):
            args[pos] = t
    wrt = []
    with torch.enable_grad():
        for i in diff:
            if i in ctx.meta and args[i] is None:
                shape, dtype, device = ctx.meta[i]
                args[i] = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
            if ctx.needs_input_grad[i]:
                wrt.append(i)
        outs = reference(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wrt],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None] * ctx.n_inputs
    for i, g in zip(wrt, got):
        result[i] = g
    return tuple(result)


class DiffOp:
    """The differentiable call of one kernel-level op: `op` (the kernel with no
    autograd on the way: a flowkern:: `.nograd` overload or a flowkern_triton::
    op) inside a torch.autograd.Function with the family's reverse-mode
    (`backward`) and forward-mode (`jvp`) formulas.

    Two Function classes share the formulas. Plain eager calls use one whose
    forward takes ctx (apply() with a separate setup_context binds default
    arguments through inspect.signature, ~40 us a call); under torch.func
    transforms, which need setup_context, the other, with
    generate_vmap_rule (its forward is vmapped through the op's batching rule,
    flowkern/ops/batching.py). Under torch.compile the op's default overload
    (same formulas, registered by `register`) is traced instead.

    backward: the fused backward kernel (once-differentiable) in a plain
    backward; when the backward is itself differentiated (create_graph=True,
    torch.func.grad), the gradient of the op's torch formula (`reference`),
    so double backward is correct rather than silently zero.

    jvp(ctx, *tangents) receives one tangent per input (None where there is
    none) and calls DiffOp.call of the ops it needs: differentiable itself, so
    jvp nested in grad (the MeanFlow pattern) differentiates the tangent."""

    def __init__(self, name: str, op, default, setup_context, backward, jvp, reference=None,
                 diff=(), saved_at=None):
        self.op, self.default = op, default
        self.name = name.split("::")[-1]
        names = [a.name for a in default._schema.arguments]
        # the time arguments (a table, a custom schedule's coef, the times),
        # which the fused kernels do not differentiate in
        self.times_at = tuple((i, n) for i, n in enumerate(names)
                              if n in ("table", "coef", "t", "s", "t_prev"))
        diff = tuple(diff)

        # For the differentiable backward, which re-runs `reference` on the
        # arguments: ctx keeps the arguments without the differentiable
        # tensors (no input stays alive for it) and, for those setup_context
        # does not save (the linear ops), each one's (shape, dtype, device).
        unsaved = tuple(i for i in diff if saved_at is None or i not in saved_at)
        no_meta = {}

        def setup(ctx, inputs, output):
            # A missing tangent (of t, say) or output gradient stays None,
            # not zeros: jvp then tells "no tangent" from a zero one.
            ctx.set_materialize_grads(False)
            ctx.n_inputs = len(inputs)
            static = list(inputs)
            for i in diff:
                static[i] = None
            meta = no_meta
            if unsaved:
                meta = {}
                for i in unsaved:
                    x = inputs[i]
                    if isinstance(x, torch.Tensor):
                        meta[i] = (x.shape, x.dtype, x.device)
            ctx.static, ctx.meta = static, meta
            setup_context(ctx, inputs, output)

        fused = once_differentiable(backward)

        def backward_or_none(ctx, *grads):
            plain = not torch.is_grad_enabled()  # a plain backward: nothing to guard
            if plain and grads[0] is not None:  # the usual case, decided first
                return backward(ctx, *grads)
            if all(g is None for g in grads):
                return (None,) * ctx.n_inputs
            if plain:
                return backward(ctx, *grads)
            if reference is not None:
                # create_graph=True (or torch.func.grad): the backward must be
                # differentiable itself, which the fused backward kernels are
                # not; differentiate the op's torch formula instead.
                return _reference_backward(ctx, grads, reference, diff, saved_at)
            return fused(ctx, *grads)  # raises if its result is differentiated
        bwd = staticmethod(backward_or_none)
        # for an autograd node of the op's own (training.py _LossAndGrad): the
        # same saved state and backward
        self.setup, self.backward_or_none = setup, backward_or_none

        run = self.run = op.direct() if isinstance(op, TimedOp) else direct(op)  # eager forward

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = run(*args)
                setup(ctx, args, out)
                return out

        class Transformable(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(*args):
                return op(*args)

        for cls, kind in ((Eager, "eager"), (Transformable, "transformable")):
            cls.backward, cls.jvp = bwd, staticmethod(jvp)
            cls.__name__ = cls.__qualname__ = f"{name.replace('::', '_')}_{kind}"
        Transformable.setup_context = staticmethod(setup)
        self.eager, self.transformable = Eager, Transformable

    def __call__(self, *args):
        """The differentiable call."""
        if torch.compiler.is_compiling():
            return self.default(*args)
        if torch.is_grad_enabled():
            for i, name in self.times_at:
                times = args[i]
                if isinstance(times, torch.Tensor) and times.requires_grad:
                    name = "t" if name in ("table", "coef") else name
                    raise RuntimeError(
                        f"{self.name}: argument '{name}' requires grad, and the fused op does "
                        f"not differentiate in the times; detach {name}, or use "
                        f"backend='torch' for derivatives in t (docs/design.md §10)")
        return (self.transformable if _functorch_active() else self.eager).apply(*args)

    def call(self, *args):
        """The differentiable call when an argument needs a gradient or a
        transform is active, the bare op otherwise (what jvp formulas use):
        its overload while torch.compile traces, else its eager caller (run)."""
        if transforms_active() or (torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self(*args)
        return self.op(*args) if torch.compiler.is_compiling() else self.run(*args)


# Fresh outputs of at least this many bytes come from flowkern::empty_output
# (csrc/cpu/dispatch.h): on huge pages, so their first touch faults 512x less.
# Equal to dispatch.h's kHugeOutputBytes, the size below which that op would
# return a plain tensor anyway: smaller ones skip the op call.
HUGE_OUTPUT_BYTES = 8 << 20

if cpu_built():
    torch.library.register_fake(f"{NATIVE_NS}::empty_output")(
        lambda like: torch.empty_like(like, memory_format=torch.contiguous_format))


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous tensor like x (uninitialised): on huge pages when it
    is a large CPU tensor and flowkern._C is built."""
    if (x.device.type == "cpu" and x.numel() * x.element_size() >= HUGE_OUTPUT_BYTES
            and cpu_built() and not torch.compiler.is_compiling()):
        return torch.ops.flowkern.empty_output(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
