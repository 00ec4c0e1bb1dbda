"""Composing with ``torch.func.vmap``: one call for a stack of weight sets.

With ``params, buffers = torch.func.stack_module_state(models)``, a vmapped call receives
each weight as a batched tensor standing for ``K`` members. BatchNorm in training mode
has no batching rule that keeps running statistics, and precisebn's private statistics
are not batched, so a call that receives transformed tensors runs through an
``autograd.Function`` whose ``vmap`` rule sees the stacked tensors themselves: it splits
them into the ``K`` members (sharing the tensors that are not batched), runs the members
as plain tensors, and returns their results stacked along a new first dimension. Outside
``vmap`` (and under other transforms) the same function runs the one member it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_unbatched", "is_transformed", "per_member", "split_weights", "weights"]

Members = Callable[[list[dict[str, Tensor]]], list[list[Tensor]]]
"""``many(members) -> outputs``: each member's tensors by name in, its flat outputs out."""


def is_transformed(*mappings: Mapping[str, Tensor] | None) -> bool:
    """Whether a tensor of ``mappings`` is batched by ``torch.func.vmap``.

    Other transforms' wrappers (``torch.func.grad`` of a loss through `precisebn.capture`)
    run as plain tensors do, differentiably.
    """
    return any(
        torch._C._functorch.is_batchedtensor(t)
        for mapping in mappings
        if mapping is not None
        for t in mapping.values()
        if isinstance(t, Tensor)
    )


def check_unbatched(leaves: Sequence[Any]) -> None:
    """Raise if a batch holds tensors batched by ``torch.func.vmap``.

    Raises:
        ValueError: the data is batched, which the statistics cannot follow.
    """
    if any(isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t) for t in leaves):
        raise ValueError(
            "the batches are batched by torch.func.vmap: precisebn pools every value of a "
            "layer over the whole loader, so vmap over the weights (params=, buffers= "
            "from torch.func.stack_module_state), not over the data"
        )


def weights(
    params: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Parameters and buffers under one set of names, for `per_member`."""
    return {
        **{f"p:{k}": v for k, v in (params or {}).items()},
        **{f"b:{k}": v for k, v in (buffers or {}).items()},
    }


def split_weights(member: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A member's parameters and buffers, from the names `weights` gave them."""
    params = {k[2:]: v for k, v in member.items() if k.startswith("p:")}
    buffers = {k[2:]: v for k, v in member.items() if k.startswith("b:")}
    return params, buffers


def per_member(many: Members, tensors: Mapping[str, Tensor]) -> list[Tensor]:
    """Run ``many`` on the members that ``tensors`` stand for; return the flat outputs.

    Outside ``vmap`` there is one member, ``tensors`` themselves. Under ``vmap`` the
    outputs are batched like the members, and every output of every member must have the
    same shape.
    """
    keys = list(tensors)
    call = _Call(keys, many)
    return list(_PerMember.apply(call, *tensors.values()))  # type: ignore[no-untyped-call]


class _Call:
    """The non-tensor argument of `_PerMember`: the names of its tensors and the work."""

    def __init__(self, keys: list[str], many: Members) -> None:
        self.keys = keys
        self.many = many

    def member(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.keys, tensors, strict=True))


class _PerMember(torch.autograd.Function):
    """``forward`` runs one member; the ``vmap`` rule runs every member of the stack."""

    generate_vmap_rule = False

    @staticmethod
    def forward(call: _Call, *tensors: Tensor) -> tuple[Tensor, ...]:
        (out,) = call.many([call.member(tensors)])
        return tuple(out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output)  # statistics, not a function of the weights

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], call: _Call, *tensors: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        dims = in_dims[1:]
        members = [
            call.member(
                [t if d is None else t.select(d, i) for t, d in zip(tensors, dims, strict=True)]
            )
            for i in range(info.batch_size)
        ]
        if any(is_transformed(member) for member in members):
            raise ValueError(
                "torch.func.vmap nested over precisebn: stack every member along one "
                "dimension instead (reshape the stacked weights to [K1 * K2, ...])"
            )
        outs = call.many(members)
        stacked = tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
        return stacked, (0,) * len(stacked)
