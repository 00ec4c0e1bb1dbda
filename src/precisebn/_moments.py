"""The statistics state: per-layer count, mean and sum of squared deviations, all in float64.

A state is a ``dict[str, Moments]`` keyed by layer name: an optree pytree whose leaves are
tensors. Every function here returns a new state and mutates nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from precisebn._layers import STAT_NAMES, buffer_key

__all__ = ["Moments", "Stats", "finalize", "from_batch", "init", "merge", "merge_layer"]


class Moments(NamedTuple):
    """Pooled first and second moments of one layer's input, per channel.

    Attributes:
        count: scalar float64 tensor, the number of values per channel ``N`` (batch
            times spatial or sequence positions, summed over every call).
        mean: float64 tensor ``[C]``, the mean of those values.
        m2: float64 tensor ``[C]``, the sum of squared deviations from ``mean``;
            the unbiased variance is ``m2 / (count - 1)``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as the maths names it
    mean: Tensor
    m2: Tensor


Stats = dict[str, Moments]
"""A statistics state: `Moments` per layer name."""


def init(buffers: Mapping[str, Tensor]) -> Stats:
    """An empty state (count 0) for every layer whose ``running_mean`` is in ``buffers``.

    Args:
        buffers: BN buffers keyed like ``model.named_buffers()``, as returned by
            `precisebn.bn_buffers`.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> stats = precisebn.init(precisebn.bn_buffers(model))
        >>> list(stats), stats["1"].count.item()
        (['1'], 0.0)
    """
    suffix = "." + STAT_NAMES[0]
    stats = {}
    for key, tensor in buffers.items():
        if key == STAT_NAMES[0] or key.endswith(suffix):
            layer = key[: -len(suffix)] if key != STAT_NAMES[0] else ""
            zeros = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
            stats[layer] = Moments(zeros.new_zeros(()), zeros, zeros.clone())
    return stats


def from_batch(count: int, mean: Tensor, var: Tensor) -> Moments:
    """Moments of ``count`` values per channel with batch ``mean`` and unbiased ``var``."""
    mean64 = mean.detach().to(torch.float64)
    return Moments(
        torch.full((), count, dtype=torch.float64, device=mean.device),
        mean64,
        var.detach().to(torch.float64) * (count - 1),
    )


def merge_layer(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise combination of two sets of moments of one layer."""
    count = a.count + b.count
    delta = b.mean - a.mean
    share = b.count / count.clamp_min(1.0)
    mean = a.mean + delta * share
    m2 = a.m2 + b.m2 + delta.square() * (a.count * share)
    return Moments(count, mean, m2)


def merge(a: Stats, b: Stats) -> Stats:
    """Combine two states as if their values had been seen in one batch.

    Associative and commutative (up to float64 rounding). A layer present in only
    one state keeps its moments.

    Example:
        >>> import torch, precisebn
        >>> x = torch.arange(6.0, dtype=torch.float64).reshape(6, 1)
        >>> def moments(v):
        ...     return {"bn": precisebn.Moments(torch.tensor(float(len(v)), dtype=torch.float64),
        ...             v.mean(0), ((v - v.mean(0)) ** 2).sum(0))}
        >>> both = precisebn.merge(moments(x[:2]), moments(x[2:]))
        >>> both["bn"].mean.item(), (both["bn"].m2 / (both["bn"].count - 1)).item()
        (2.5, 3.5)
    """
    out = dict(a)
    for layer, moments in b.items():
        out[layer] = merge_layer(out[layer], moments) if layer in out else moments
    return out


def finalize(stats: Stats, *, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Turn a state into BN buffers: the pooled mean and the unbiased variance ``m2 / (N - 1)``.

    Args:
        stats: the state to finalize.
        like: the current BN buffers. When given, each result takes the dtype and
            device of the buffer it replaces, and a layer that saw fewer than two
            values keeps a copy of its current buffers (with a warning naming it).
            Without it, results are float64 and such layers are left out (with a warning).

    Returns:
        A new dict keyed ``"<layer>.running_mean"`` and ``"<layer>.running_var"``,
        sharing no storage with ``stats`` or ``like``.

    Example:
        >>> import torch, precisebn
        >>> m = precisebn.Moments(torch.tensor(4.0, dtype=torch.float64),
        ...                       torch.tensor([1.0], dtype=torch.float64),
        ...                       torch.tensor([6.0], dtype=torch.float64))
        >>> new = precisebn.finalize({"bn": m})
        >>> new["bn.running_mean"].item(), new["bn.running_var"].item()
        (1.0, 2.0)
    """
    counts = [m.count.detach().to("cpu", torch.float64) for m in stats.values()]
    reached = (torch.stack(counts) >= 2).tolist() if counts else []
    out: dict[str, Tensor] = {}
    missing = []
    for (layer, m), ok in zip(stats.items(), reached, strict=True):
        mean_key, var_key = (buffer_key(layer, s) for s in STAT_NAMES)
        if ok:
            values = (m.mean, m.m2 / (m.count - 1))
        elif like is not None:
            missing.append(layer)
            values = (like[mean_key], like[var_key])
        else:
            missing.append(layer)
            continue
        for key, value in zip((mean_key, var_key), values, strict=True):
            ref = like[key] if like is not None else value
            out[key] = value.detach().to(device=ref.device, dtype=ref.dtype, copy=True)
    if missing:
        kept = "keep their current buffers" if like is not None else "are left out of the result"
        warnings.warn(
            f"{len(missing)} BatchNorm layer(s) saw no batch and {kept}: "
            + ", ".join(repr(name) for name in missing),
            UserWarning,
            stacklevel=2,
        )
    return out
