"""Folding each batch into the running state with a fixed number of tensor operations.

The recomputed layers' channels are laid end to end, so one batch's moments of every layer
form a single `Moments` whose ``count`` is per channel; `merge_layer` (Chan's
combination, elementwise) then folds a whole batch at once, whatever the number of layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor

from precisebn._capture import Record, collect
from precisebn._layers import STAT_NAMES, buffer_key
from precisebn._moments import Moments, Stats, merge_layer

_COUNT_CACHE_SIZE = 64


class FlatLayout:
    """Where each recomputed layer's channels sit in the flat per-channel vectors."""

    def __init__(self, layers: list[str], bn_buffers: Mapping[str, Tensor]) -> None:
        means = [bn_buffers[buffer_key(name, STAT_NAMES[0])] for name in layers]
        self.layers = layers
        self.sizes = [m.numel() for m in means]
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.device = means[0].device if means else torch.device("cpu")
        self._empty = [torch.zeros(2, n, device=self.device) for n in self.sizes]
        self._counts: dict[tuple[int, ...], Tensor] = {}

    def init(self) -> Moments:
        """Flat moments of no values."""
        zeros = torch.zeros(self.offsets[-1], dtype=torch.float64, device=self.device)
        return Moments(zeros, zeros.clone(), zeros.clone())

    def batch(self, records: list[Record]) -> Moments:
        """One batch's flat moments: each layer's single call, pooled calls, or nothing."""
        by_layer: dict[str, list[Record]] = {}
        for r in records:
            by_layer.setdefault(r.layer, []).append(r)
        rows, counts = [], []
        for layer, empty in zip(self.layers, self._empty, strict=True):
            calls = by_layer.get(layer, [])
            if len(calls) == 1:
                rows.append(calls[0].stats)
                counts.append(calls[0].count)
            elif calls:
                rows.append(_pooled_rows(calls))
                counts.append(sum(r.count for r in calls))
            else:
                rows.append(empty)
                counts.append(0)
        count = self._count_vector(tuple(counts))
        mean_var = torch.cat(rows, dim=1).to(torch.float64)
        return Moments(count, mean_var[0], mean_var[1] * (count - 1).clamp_min(0.0))

    def split(self, flat: Moments) -> Stats:
        """Per-layer moments of a flat state."""
        return {
            layer: Moments(flat.count[start].clone(), flat.mean[start:end], flat.m2[start:end])
            for layer, start, end in zip(
                self.layers, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }

    def _count_vector(self, counts: tuple[int, ...]) -> Tensor:
        vector = self._counts.get(counts)
        if vector is None:
            if len(self._counts) >= _COUNT_CACHE_SIZE:  # many ragged shapes: stay bounded
                self._counts.clear()
            vector = torch.cat(
                [
                    torch.full((n,), c, dtype=torch.float64, device=self.device)
                    for n, c in zip(self.sizes, counts, strict=True)
                ]
            )
            self._counts[counts] = vector
        return vector


def _pooled_rows(calls: list[Record]) -> Tensor:
    """``[mean; unbiased var]`` rows of a layer's calls in one batch, pooled exactly."""
    pooled = collect(calls)[calls[0].layer]
    return torch.stack([pooled.mean, pooled.m2 / (pooled.count - 1)])


def fold_records(layout: FlatLayout, flat: Moments, records: list[Record]) -> Moments:
    """``flat`` with one batch's records folded in (a new state)."""
    return merge_layer(flat, layout.batch(records))
