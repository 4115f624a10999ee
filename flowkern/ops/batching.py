"""Batching rules (torch.func.vmap) of the differentiable kernel-level ops and
their backward ops, in both namespaces (docs/design.md §10).

Every one of these ops is row-wise: row b of each output reads row b of its
tensor arguments (or their one broadcast row) with row b's coefficients. A
vmap over N therefore runs as ONE call of the same op on N*B rows: each
batched argument is expanded to (N, B, ...) and flattened, an unbatched one
broadcasts as it is (one row, or a scalar time) or is expanded too (B rows),
and each output of N*B rows is viewed as (N, B, ...). The losses reduce over
the whole batch, so they run per row (reduction "none") and reduce per
vmapped sample. Arguments of unequal rank (which the row view cannot pair)
take the per-sample loop: correct, slower.
"""
from __future__ import annotations

import torch

from ._registry import namespaces

# Row-indexed arguments that are not states: shape (B, ...), (1, ...) or ().
_ROW_ARGS = {"t", "s", "t_prev", "table", "coef", "weight", "grad_rows"}
_NONE = 2  # REDUCTION_CODE["none"] (ops/training.py)


def _layout(names, in_dims, args, row_args):
    """(B, per-sample ranks agree) over the state arguments."""
    rows, ranks = 1, set()
    for name, d, a in zip(names, in_dims, args):
        if not isinstance(a, torch.Tensor) or name in row_args:
            continue
        shape = a.shape if d is None else a.shape[:d] + a.shape[d + 1:]
        ranks.add(len(shape))
        if len(shape) and shape[0] != 1:
            rows = shape[0]
    for name, d, a in zip(names, in_dims, args):
        if isinstance(a, torch.Tensor) and name in row_args:
            shape = a.shape if d is None else a.shape[:d] + a.shape[d + 1:]
            if len(shape) and shape[0] != 1:
                rows = max(rows, shape[0])
    return rows, len(ranks) <= 1


def _flat(a, d, n, rows, row_arg):
    """One argument as rows N*B (or broadcastable to them)."""
    if d is None:
        if a.dim() == 0 or a.shape[0] == 1:
            return a
        return a.unsqueeze(0).expand(n, *a.shape).reshape(n * a.shape[0], *a.shape[1:])
    a = a.movedim(d, 0)
    if row_arg and a.dim() == 1:  # one value per vmapped sample
        return a[:, None].expand(n, rows).reshape(n * rows)
    return a.expand(n, rows, *a.shape[2:]).reshape(n * rows, *a.shape[2:])


def _loop(op, n, in_dims, args):
    outs = [op(*(a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
                 for a, d in zip(args, in_dims))) for i in range(n)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return _pack(outs[0], [torch.stack(o) for o in zip(*outs)])


def _pack(like, outs):
    """outs and their out_dims (0) in the structure of the op's output `like`."""
    kind = tuple if isinstance(like, tuple) else list
    return kind(outs), kind([0] * len(outs))


def _rule(op, row_args=_ROW_ARGS):
    names = [a.name for a in op._schema.arguments]

    def rule(info, in_dims, *args):
        n = info.batch_size
        rows, same_rank = _layout(names, in_dims, args, row_args)
        if not same_rank:
            return _loop(op, n, in_dims, args)
        flat = [_flat(a, d, n, rows, name in row_args) if isinstance(a, torch.Tensor) else a
                for name, d, a in zip(names, in_dims, args)]
        out = op(*flat)
        if isinstance(out, torch.Tensor):
            return out.reshape(n, rows, *out.shape[1:]), 0
        return _pack(out, [o.reshape(n, rows, *o.shape[1:]) for o in out])
    return rule


def _loss_rule(op):
    """fm_loss, flowmap_loss: per-row losses ("none") of the N*B rows, reduced
    per sample."""
    rows_rule = _rule(op)
    red_at = [a.name for a in op._schema.arguments].index("reduction")

    def rule(info, in_dims, *args):
        reduction = args[red_at]
        args = list(args)
        args[red_at] = _NONE
        per_row, _ = rows_rule(info, in_dims, *args)  # (N, B): w_b |e_b|^2 / inner
        if reduction == _NONE:
            return per_row, 0
        acc = per_row.float() if per_row.dtype in (torch.float16, torch.bfloat16) else per_row
        pred, x0, x1 = (a if d is None else a.movedim(d, 0)[0]
                        for a, d in zip(args[:3], in_dims[:3]))
        shape = torch.broadcast_shapes(pred.shape, x0.shape, x1.shape)
        inner = shape[1:].numel()
        out = acc.mean(1) if reduction == 0 else acc.sum(1) * inner
        return out.to(per_row.dtype), 0
    return rule


def _loss_backward_rule(op):
    """fm_loss_backward, flowmap_loss_backward: the reduced loss's gradient as
    per-row ("none") ones."""
    rows_rule = _rule(op, _ROW_ARGS | {"grad"})
    names = [a.name for a in op._schema.arguments]
    red_at = names.index("reduction")

    def rule(info, in_dims, grad, *rest):
        reduction = rest[red_at - 1]
        if reduction != _NONE:
            pred, x0, x1 = (a if d is None else a.movedim(d, 0)[0]
                            for a, d in zip(rest[:3], in_dims[1:4]))
            shape = torch.broadcast_shapes(pred.shape, x0.shape, x1.shape)
            rows, inner = shape[0], shape[1:].numel()
            # mean = mean_b of the per-row losses; sum = inner * their sum
            grad = grad / rows if reduction == 0 else grad * inner
            if in_dims[0] is None:
                grad = grad.expand(rows)
            else:
                grad = grad.movedim(in_dims[0], 0).reshape(-1, 1).expand(-1, rows)
            in_dims = (None if in_dims[0] is None else 0,) + tuple(in_dims[1:])
            rest = list(rest)
            rest[red_at - 1] = _NONE
        return rows_rule(info, in_dims, grad, *rest)
    return rule


_ROW_OPS = ("interpolate", "convert", "ei_step", "interpolate_backward", "convert_backward",
            "ei_step_backward")
_SPECIAL = {"fm_loss": _loss_rule, "fm_loss_backward": _loss_backward_rule,
            "flowmap_loss": _loss_rule, "flowmap_loss_backward": _loss_backward_rule}


def _register():
    for ns in namespaces():
        ops = getattr(torch.ops, ns)
        for name in _ROW_OPS + tuple(_SPECIAL):
            packet = getattr(ops, name)
            # every overload (native: .nograd, a step's .times and .times_nograd)
            for overload in packet.overloads():
                op = getattr(packet, overload)
                torch.library.register_vmap(op, _SPECIAL.get(name, _rule)(op))


_register()

