"""Reading BN buffers out of a model as a pytree, writing recomputed ones back, and what a
recompute says about its result (`RunInfo`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor, nn

from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers, tracks_stats

# How many offending keys an error message names before summarising the rest.
_KEYS_SHOWN = 5


class RunInfo(NamedTuple):
    """What a recompute used and how precise its result is (``return_info=True``).

    Attributes:
        num_batches: batches run through the model (summed over the ranks when pooled).
        num_samples: sum of the leading dimension of each batch's first tensor.
        converged: with ``tol=``, whether every recomputed channel reached it; ``None``
            when no tolerance was asked for.
        stderr: the estimated standard error of each value, keyed and shaped like the
            buffers (float64, on the buffers' devices), from the spread of the batches'
            moments: see *How many batches?* in the docs.
        n_eff: per layer, the effective number of independent values behind its
            ``running_mean`` (the median over its channels of ``var / stderr(mean)**2``):
            about the number of values when they are independent, below it when
            neighbouring positions of one image are correlated, and above it when the
            values of one batch are negatively correlated (a layer behind another BN layer,
            which normalises every batch to the same mean). It is an estimate from the
            batches' spread, with the noise of ``B - 1`` degrees of freedom.
        trace: per layer, ``(batches, error)`` at every pooling point of this process's
            run (every 16 batches, and at the end): the batches folded so far and the
            largest relative standard error of the layer's channels then, the figure
            ``tol=`` compares (see *How many batches?*).
    """

    num_batches: int
    num_samples: int
    converged: bool | None
    stderr: dict[str, Tensor]
    n_eff: dict[str, float]
    trace: Mapping[str, tuple[tuple[int, float], ...]] = MappingProxyType({})


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
        ValueError: a shape differs from the buffer's, or a value holds NaN or infinity.

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
    nonfinite = _nonfinite_keys(buffers)
    if nonfinite:
        shown = ", ".join(nonfinite[:_KEYS_SHOWN])
        more = len(nonfinite) - _KEYS_SHOWN
        raise ValueError(
            f"non-finite (NaN or infinite) values in {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; non-finite statistics usually come from fp16/bf16 overflow or NaN inputs. "
            "Nothing was written to the model."
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


def _nonfinite_keys(buffers: Mapping[str, Tensor]) -> list[str]:
    """Keys whose value holds a NaN or infinity, with one host sync per device."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in buffers.items():
        by_device.setdefault(value.device, []).append(key)
    bad: set[str] = set()
    for keys in by_device.values():
        finite = torch.stack([torch.isfinite(buffers[k]).all() for k in keys]).tolist()
        bad.update(k for k, ok in zip(keys, finite, strict=True) if not ok)
    return [key for key in buffers if key in bad]
