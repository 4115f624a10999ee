"""The Autograd-key kernel of the no-derivative ops, in Python.

The same rules as csrc/autograd/nograd.cpp, for a torch that flowkern._nograd
was not built against (flowkern._C itself loads into every torch from the
stable-ABI target up; _nograd is bound to one torch: docs/build.md). It
covers every ``.nograd`` overload and every op that writes a caller's buffer
(``Tensor(a!)``):

- an argument that requires grad (grad mode on) is a RuntimeError naming it;
- an argument that carries a forward-mode tangent is a RuntimeError naming it;
- every written buffer gets its version counter bumped (in inference mode,
  where the Autograd key is skipped, at the ADInplaceOrView key);
- then the call goes on below autograd (the backend kernel).

It costs a Python call (~10 us) where the C++ kernel costs well under 1 us;
the results are the same.
"""
from __future__ import annotations

import torch

# Dual levels checked for a tangent, as nograd.cpp does.
_LEVELS = range(8)
# below autograd and ADInplaceOrView: the kernels here bump the written
# buffers themselves (for an op that writes none ADInplaceOrView is a no-op)
_AFTER_INPLACE = torch._C._after_ADInplaceOrView_keyset


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(t for t in v if isinstance(t, torch.Tensor))
    return ()


def _has_tangent(t: torch.Tensor) -> bool:
    for level in _LEVELS:
        try:
            if torch._unpack_dual(t, level).tangent is not None:
                return True
        except RuntimeError:  # a level that does not exist
            return False
    return False


def _kernel(op: torch._ops.OpOverload):
    schema = op._schema
    qualified = schema.name
    nograd = schema.overload_name.endswith("nograd")  # .nograd, .times_nograd
    suffix = "." + schema.overload_name if nograd else ""
    args = list(schema.arguments)
    written = _written(args)

    def kernel(keyset, *call_args, **call_kwargs):
        values = _values(args, call_args, call_kwargs)
        if torch.is_grad_enabled():
            for a, v in zip(args, values):
                if not any(t.requires_grad for t in _tensors(v)):
                    continue
                if a.name in ("t", "s", "t_prev", "table"):
                    raise RuntimeError(
                        f"{qualified}: argument '{a.name}' requires grad, and the fused ops do "
                        "not differentiate in the times; detach it, or use backend='torch' for "
                        "derivatives in t")
                raise RuntimeError(
                    f"{qualified}{suffix}: argument '{a.name}' requires grad, and " +
                    ("this overload does not differentiate; call the one without 'nograd' "
                     "(ei_step: default or .times), which does" if nograd else
                     "this op writes into a buffer and has no derivative; call it under "
                     "torch.no_grad() or on detached tensors (ei_step without out= is the "
                     "differentiable step)"))
        for a, v in zip(args, values):
            if any(_has_tangent(t) for t in _tensors(v)):
                raise RuntimeError(
                    f"{qualified}{suffix}: argument '{a.name}' carries a forward-mode tangent "
                    "(torch.func.jvp / forward_ad), and " +
                    ("this overload has no forward-mode formula; call the public function "
                     "(flowkern.interpolate, convert, flow_matching_loss, ei_step), which has one"
                     if nograd else
                     "this op writes into a buffer and has no forward-mode derivative; ei_step "
                     "without out= is the differentiable step"))
        _bump(written, values)
        # past ADInplaceOrView too: its kernel (_inplace_kernel) would bump again
        return op.redispatch(keyset & _AFTER_INPLACE, *call_args, **call_kwargs)

    return kernel


def _written(args):
    """The positions of the schema arguments the op writes (Tensor(a!))."""
    return [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]


def _values(args, call_args, call_kwargs):
    """The call's argument values in schema order."""
    return list(call_args) + [call_kwargs[a.name] for a in args[len(call_args):]
                              if a.name in call_kwargs]


def _bump(written, values):
    """The version bump of every written buffer (once per call)."""
    for i in written:
        if i < len(values) and isinstance(values[i], torch.Tensor) \
                and not values[i].is_inference():
            torch.autograd.graph.increment_version(values[i])


def _inplace_kernel(op: torch._ops.OpOverload):
    """nograd.cpp's ADInplaceOrView kernel: the bump in inference mode, where
    the Autograd key (and so the kernel above) is skipped but a normal tensor
    still carries ADInplaceOrView, as for PyTorch's own in-place ops."""
    args = list(op._schema.arguments)
    written = _written(args)

    def kernel(keyset, *call_args, **call_kwargs):
        _bump(written, _values(args, call_args, call_kwargs))
        return op.redispatch(keyset & _AFTER_INPLACE, *call_args, **call_kwargs)

    return kernel


_LIB = None


def register(schema_lines) -> None:
    """Registers the kernel for every op of `schema_lines` (_registry.SCHEMA_LINES)
    without a derivative: each ``.nograd`` (``.times_nograd``) overload and each op with a written
    argument."""
    global _LIB
    _LIB = torch.library.Library("flowkern", "IMPL")
    for name, schema in schema_lines:
        if name.endswith("nograd") or "!)" in schema:
            base, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.flowkern, base), overload or "default")
            _LIB.impl(name, _kernel(op), "Autograd", with_keyset=True)
            if "!)" in schema:
                _LIB.impl(name, _inplace_kernel(op), "ADInplaceOrView", with_keyset=True)
