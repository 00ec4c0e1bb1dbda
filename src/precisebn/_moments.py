"""The statistics state: per-layer count, mean and sum of squared deviations, all in float64.

A state is a ``dict[str, Moments]`` keyed by layer name: a pytree whose leaves are
tensors. Every function here returns a new state and mutates nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from precisebn._layers import MEAN, VAR, buffer_key, parse_key
from precisebn._layout import Layout

_NAMED = 5  # layers an error names before summarising the rest

__all__ = [
    "Moments",
    "Stats",
    "finalize",
    "from_batch",
    "init",
    "joined",
    "merge",
    "merge_layer",
    "nonfinite_message",
    "parted",
]


class Moments(NamedTuple):
    """Pooled first and second moments of one layer's input, per channel.

    Attributes:
        count: float64 tensor, the number of values per channel ``N`` (batch times
            spatial or sequence positions, summed over every call): a scalar when every
            channel saw the same values, ``[C]`` when calls covered slices of the
            channels (a slimmable layer's ``running_mean[:c]``).
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
    stats = {}
    for key, tensor in buffers.items():
        parsed = parse_key(key)
        if parsed is not None and parsed[1] == MEAN:
            zeros = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
            stats[parsed[0]] = Moments(zeros.new_zeros(()), zeros, zeros.clone())
    return stats


def joined(stats: Stats, layout: Layout) -> Moments:
    """The state's moments laid end to end (counts per channel), on the first layer's device."""
    parts = [stats[name] for name in layout.names]
    device = parts[0].mean.device if parts else torch.device("cpu")
    if any(m.mean.device != device for m in parts):
        parts = [Moments(*(t.to(device) for t in m)) for m in parts]
    return Moments(
        layout.join([m.count.expand_as(m.mean) for m in parts]),
        layout.join([m.mean for m in parts]),
        layout.join([m.m2 for m in parts]),
    )


def parted(flat: Moments, layout: Layout, *, per_channel: Sequence[bool]) -> Stats:
    """The state of moments laid end to end: a layer's count is a scalar unless
    ``per_channel`` says its channels may have seen different counts."""
    counts, means, m2s = (layout.split(t) for t in flat)
    firsts = flat.count[layout.starts.to(flat.count.device)].unbind(0) if counts else ()
    return {
        name: Moments(n if vector else first, mean, m2)
        for name, n, first, mean, m2, vector in zip(
            layout.names, counts, firsts, means, m2s, per_channel, strict=True
        )
    }


def from_batch(
    count: int, mean: Tensor, var: Tensor, *, span: range | None = None, size: int | None = None
) -> Moments:
    """Moments of ``count`` values per channel with batch ``mean`` and unbiased ``var``.

    With ``span`` (the channels of a layer of ``size`` channels that ``mean`` and ``var``
    cover) not covering every channel, the moments are laid out over all ``size``
    channels, with counts per channel: ``count`` on the span, 0 elsewhere.
    """
    mean64 = mean.detach().to(torch.float64)
    m2 = var.detach().to(torch.float64) * (count - 1)
    full = torch.full((), count, dtype=torch.float64, device=mean.device)
    if span is None or size is None or span == range(size):
        return Moments(full, mean64, m2)
    index = slice(span.start, span.stop, span.step)
    out = torch.zeros(3, size, dtype=torch.float64, device=mean.device)
    out[0, index] = full
    out[1, index] = mean64
    out[2, index] = m2
    return Moments(out[0], out[1], out[2])


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
            device of the buffer it replaces, and a channel that saw fewer than two
            values keeps its current value (with a warning naming the layer).
            Without it, results are float64, a layer no channel of which saw two values is
            left out, and such channels of other layers are NaN (with a warning).

    Returns:
        A new dict keyed ``"<layer>.running_mean"`` and ``"<layer>.running_var"``,
        sharing no storage with ``stats`` or ``like``.

    Raises:
        ValueError: a layer's moments hold NaN or infinity (named in the message).

    Example:
        >>> import torch, precisebn
        >>> m = precisebn.Moments(torch.tensor(4.0, dtype=torch.float64),
        ...                       torch.tensor([1.0], dtype=torch.float64),
        ...                       torch.tensor([6.0], dtype=torch.float64))
        >>> new = precisebn.finalize({"bn": m})
        >>> new["bn.running_mean"].item(), new["bn.running_var"].item()
        (1.0, 2.0)
    """
    layers = list(stats.items())
    reached, partly, finite = _coverage(stats)
    bad = [name for (name, _), ok in zip(layers, finite, strict=True) if not ok]
    if bad:
        raise ValueError(nonfinite_message(bad))
    out: dict[str, Tensor] = {}
    missing, partial = [], []
    for (layer, m), all_seen, some_seen in zip(layers, reached, partly, strict=True):
        mean_key, var_key = buffer_key(layer, MEAN), buffer_key(layer, VAR)
        if not some_seen:
            missing.append(layer)
            if like is None:
                continue
            values = (like[mean_key], like[var_key])
        else:
            values = (m.mean, m.m2 / (m.count - 1))
            if not all_seen:
                partial.append(layer)
                seen = m.count >= 2
                olds = (like[mean_key], like[var_key]) if like is not None else (None, None)
                values = (
                    torch.where(seen, values[0], _old(olds[0], values[0])),
                    torch.where(seen, values[1], _old(olds[1], values[1])),
                )
        for key, value in zip((mean_key, var_key), values, strict=True):
            ref = like[key] if like is not None else value
            out[key] = value.detach().to(device=ref.device, dtype=ref.dtype, copy=True)
    _warn_unreached(missing, partial, kept=like is not None)
    return out


def _coverage(stats: Stats) -> tuple[list[bool], list[bool], list[bool]]:
    """Per layer, with one transfer to the host: whether every channel and whether some
    channel saw two values or more, and whether the moments are finite."""
    if not stats:
        return [], [], []
    layout = Layout.of({name: m.mean for name, m in stats.items()})
    flat = joined(stats, layout)
    seen, finite = layout.count_per_layer(
        torch.stack([flat.count >= 2, (flat.mean + flat.m2).isfinite()])
    )
    return (
        [n == size for n, size in zip(seen, layout.sizes, strict=True)],
        [n > 0 for n in seen],
        [n == size for n, size in zip(finite, layout.sizes, strict=True)],
    )


def _old(old: Tensor | None, new: Tensor) -> Tensor:
    if old is None:
        return torch.full_like(new, float("nan"))
    return old.detach().to(device=new.device, dtype=new.dtype)


def _warn_unreached(missing: list[str], partial: list[str], *, kept: bool) -> None:
    if missing:
        what = "keep their current buffers" if kept else "are left out of the result"
        warnings.warn(
            f"{len(missing)} BatchNorm layer(s) saw no batch and {what}: "
            + ", ".join(repr(name) for name in missing),
            UserWarning,
            stacklevel=3,
        )
    if partial:
        what = "keep their current values" if kept else "are NaN"
        warnings.warn(
            f"{len(partial)} BatchNorm layer(s) had channels that no call covered (their "
            f"buffers were only ever sliced), and those channels {what}: "
            + ", ".join(repr(name) for name in partial),
            UserWarning,
            stacklevel=3,
        )


def nonfinite_message(layers: list[str], *, where: str | None = None) -> str:
    """The error for NaN or infinity reaching recomputed layers.

    Args:
        layers: the layers reached, in module order.
        where: in which batches the values were first seen, if known.
    """
    named = ", ".join(f"'{name or '<model>'}'" for name in layers[:_NAMED])
    if len(layers) > _NAMED:
        named += f" and {len(layers) - _NAMED} more"
    seen = f", first in {where}" if where else ""
    return (
        f"non-finite values (NaN or infinity) reached BatchNorm layer(s) {named}{seen}; "
        "no statistics were returned and the model is unchanged. In a float16 model or "
        "under float16 autocast this is usually an overflow (float16 tops out at 65504): "
        "run the recomputation in float32 or bfloat16, or scale the inputs down; "
        "otherwise look for NaN or infinity in the data"
    )
