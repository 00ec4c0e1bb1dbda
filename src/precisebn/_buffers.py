"""Reading BN buffers out of a model as a pytree, and writing recomputed ones back."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers, tracks_stats


class BNBuffers(dict[str, Tensor]):
    """Recomputed buffers, keyed like ``model.named_buffers()``, plus what produced them.

    A plain ``dict`` to every consumer (``load_state_dict``, ``functional_call``, optree);
    the attributes say how much data the statistics pool.

    Attributes:
        num_batches: batches run through the model.
        num_samples: sum of the leading dimension of each batch's first tensor.
    """

    num_batches: int
    num_samples: int

    def __init__(
        self, buffers: Mapping[str, Tensor], *, num_batches: int, num_samples: int
    ) -> None:
        super().__init__(buffers)
        self.num_batches = num_batches
        self.num_samples = num_samples

    def __repr__(self) -> str:
        return (
            f"BNBuffers({len(self) // 2} layers, num_batches={self.num_batches}, "
            f"num_samples={self.num_samples})"
        )


def bn_buffers(model: nn.Module, *, layers: LayerSelector = None) -> dict[str, Tensor]:
    """The running statistics of the model's BatchNorm layers, as a flat dict pytree.

    Args:
        model: any module.
        layers: which BN layers (default: all that track running statistics); see
            `precisebn.recompute_bn_buffers`.

    Returns:
        ``{"<layer>.running_mean": tensor, "<layer>.running_var": tensor, ...}``: the
        model's own tensors (not copies), keyed like ``model.named_buffers()``.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> sorted(precisebn.bn_buffers(model))
        ['1.running_mean', '1.running_var']
    """
    chosen = find_bn_layers(model, layers)
    named = dict(model.named_buffers())
    return {buffer_key(name, s): named[buffer_key(name, s)] for name in chosen for s in STAT_NAMES}


def apply_bn_buffers(model: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    """Copy recomputed buffers into ``model`` in place, after checking every one first.

    Each key must name the ``running_mean`` or ``running_var`` of a BatchNorm layer
    that tracks statistics, with the buffer's shape. Values are cast to the buffer's
    dtype and device. Nothing is written unless every entry is valid.

    Raises:
        KeyError: a key names no BN running-statistics buffer of ``model``.
        ValueError: a shape differs from the buffer's.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> new = precisebn.recompute_bn_buffers(model, [torch.randn(16, 3)])
        >>> precisebn.apply_bn_buffers(model, new)
        >>> torch.equal(model[1].running_var, new["1.running_var"])
        True
    """
    targets = _bn_stat_buffers(model)
    unknown = sorted(set(buffers) - set(targets))
    if unknown:
        raise KeyError(f"not BatchNorm running-statistics buffers of the model: {unknown}")
    for key, value in buffers.items():
        if value.shape != targets[key].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not match the buffer's "
                f"{tuple(targets[key].shape)}"
            )
    with torch.no_grad():
        for key, value in buffers.items():
            targets[key].copy_(value)


def _bn_stat_buffers(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, module in model.named_modules():
        if tracks_stats(module):
            for stat in STAT_NAMES:
                out[buffer_key(name, stat)] = getattr(module, stat)
    return out
