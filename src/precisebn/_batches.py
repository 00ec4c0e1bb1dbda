"""Default input handling, and moving a batch pytree to the model's device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import optree
import torch
from torch import Tensor

Forward: TypeAlias = Callable[[Callable[..., Any], Any], Any]
"""``forward(stateless_model, batch) -> output``: how one batch is fed to the model."""


class BatchLayoutError(TypeError):
    """The default input handling found no model input in a batch."""


def default_forward(model: Callable[..., Any], batch: Any) -> Any:
    """Feed ``batch`` the way ``torch.optim.swa_utils.update_bn`` does.

    A tensor is the input; a tuple or list gives its first element (a list of
    tensors in that place is passed as one argument, as multi-pathway models expect).

    Raises:
        BatchLayoutError: the batch is neither (a dict, say): the message shows how to
            pass ``forward=``.
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        raise BatchLayoutError(_mapping_message(batch))
    raise BatchLayoutError(
        f"cannot find the model input in a batch of type {type(batch).__name__}: the default "
        "handling takes a tensor, or the first element of a tuple or list; pass "
        "forward=lambda model, batch: model(...) for other layouts"
    )


def _mapping_message(batch: Mapping[Any, Any]) -> str:
    keys = list(batch)
    inputs = [k for k in keys if isinstance(k, str) and k not in _TARGET_KEYS]
    example = (
        f"forward=lambda model, batch: model(batch[{inputs[0]!r}])"
        if len(inputs) == 1
        else "forward=lambda model, batch: model(**{k: v for k, v in batch.items() "
        f"if k not in {sorted(set(map(str, keys)) & _TARGET_KEYS)!r}}})"
    )
    return (
        f"the batch is a {type(batch).__name__} (a mapping with keys {keys[:8]}), and "
        "the default input handling takes a tensor or the first element of a tuple or list: "
        f"pass forward= to say how the model takes it, e.g. {example}"
    )


_TARGET_KEYS = frozenset({"labels", "label", "target", "targets", "y"})
_LEAF = optree.treespec_leaf(none_is_leaf=True)


class Placed(NamedTuple):
    """A batch on the model's device, with its flattened pytree."""

    batch: Any
    leaves: list[Any]
    spec: optree.PyTreeSpec


def place(batch: Any, device: torch.device) -> Placed:
    """Move every tensor in the batch pytree to ``device`` without blocking the host.

    The batch is flattened once; a batch already on ``device`` is returned as it is.
    """
    if isinstance(batch, Tensor):  # the common case, without a walk over the pytree
        if batch.device != device:
            batch = batch.to(device, non_blocking=True)
        return Placed(batch, [batch], _LEAF)
    leaves, spec = optree.tree_flatten(batch, none_is_leaf=True)
    if any(isinstance(leaf, Tensor) and leaf.device != device for leaf in leaves):
        leaves = [
            leaf.to(device, non_blocking=True) if isinstance(leaf, Tensor) else leaf
            for leaf in leaves
        ]
        batch = optree.tree_unflatten(spec, leaves)
    return Placed(batch, leaves, spec)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in the batch pytree to ``device`` without blocking the host."""
    return place(batch, device).batch


def leading_size(leaves: list[Any]) -> int:
    """The leading dimension of the first tensor among a batch's leaves (0 if none has one)."""
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 0


def integer_leaves(batch: Any) -> list[torch.dtype]:
    """The dtypes of the non-floating tensors in the batch pytree."""
    return [
        leaf.dtype
        for leaf in optree.tree_leaves(batch, none_is_leaf=True)
        if isinstance(leaf, Tensor) and not (leaf.is_floating_point() or leaf.is_complex())
    ]
