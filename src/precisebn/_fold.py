"""Folding a whole run's batches into the state, with next to no work per batch.

`recompute_bn_buffers` hands the intercepted BN calls a `BlockFold` as their sink. The
recomputed layers' channels are laid end to end, and the BN kernels write each batch's
``[mean; unbiased var]`` straight into row ``k`` of a ``[K, 2, C]`` block: no allocation,
copy or merge per batch. Every ``K`` batches the block is pooled in float64 in one
vectorised step (the K-part form of Chan et al.'s combination: counts add, the mean is
count-weighted, and the sum of squared deviations adds each part's own and its
``n_k (mean_k - mean)^2``), then merged into the running flat moments. Calls that cannot
use the block (a layer's second call in one batch, another dtype or device) are kept as
records and merged per layer, exactly as `precisebn.update` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor

from precisebn._capture import Record, collect
from precisebn._layers import STAT_NAMES, buffer_key
from precisebn._moments import Moments, Stats, merge, merge_layer

BLOCK = 8
"""Batches held before pooling. The block holds ``BLOCK * 2 * C`` values in the statistics
dtype, and pooling it briefly needs a few float64 arrays of ``BLOCK * C``; neither grows
with the number of batches."""


class BlockFold:
    """A sink for one run of at most ``max_batches`` batches.

    Batch moments land in a block of ``min(BLOCK, max_batches)`` rows, pooled when full.
    """

    def __init__(
        self, layers: list[str], bn_buffers: Mapping[str, Tensor], *, max_batches: int
    ) -> None:
        means = [bn_buffers[buffer_key(name, STAT_NAMES[0])] for name in layers]
        self.layers = layers
        self.index = {name: i for i, name in enumerate(layers)}
        self.sizes = [m.numel() for m in means]
        offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.spans = list(itertools.pairwise(offsets))
        self.device = means[0].device if means else torch.device("cpu")
        wide = any(m.dtype == torch.float64 for m in means)
        self.dtype = torch.float64 if wide else torch.float32
        rows = min(BLOCK, max_batches)  # a short run needs no more rows than batches
        self.block = torch.zeros(rows, 2, offsets[-1], dtype=self.dtype, device=self.device)
        # Per batch row, per layer: the (mean, var) views the kernel writes into.
        self.slots: list[list[tuple[Tensor, Tensor]]] = []
        for row in self.block.unbind(0):
            mean_rows, var_rows = (torch.split(part, self.sizes) for part in row.unbind(0))
            self.slots.append(list(zip(mean_rows, var_rows, strict=True)))
        self.acc = _empty(offsets[-1], self.device)
        self.residual: Stats = {}
        self.k = 0
        self.counts = [0] * len(layers)
        self.batch_counts: list[tuple[int, ...]] = []
        self.extra: list[Record] = []
        self._count_vectors: dict[tuple[int, ...], Tensor] = {}

    def rows(
        self, layer: str, count: int, channels: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        i = self.index[layer]
        if self.counts[i] or dtype != self.dtype or device != self.device:
            mean, var = torch.zeros(2, channels, dtype=dtype, device=device).unbind(0)
            self.extra.append(Record(layer, count, mean, var))
            return mean, var
        self.counts[i] = count
        return self.slots[self.k][i]

    def end_batch(self) -> None:
        """Close the current batch; pool the block when it is full."""
        self.batch_counts.append(tuple(self.counts))
        self.counts = [0] * len(self.layers)
        if self.extra:
            self.residual = merge(self.residual, collect(self.extra))
            self.extra = []
        self.k += 1
        if self.k == len(self.slots):
            self._pool()

    def result(self) -> Stats:
        """Per-layer moments of every batch closed so far."""
        self._pool()
        flat = self.acc
        stats = {
            layer: Moments(flat.count[a].clone(), flat.mean[a:b], flat.m2[a:b])
            for layer, (a, b) in zip(self.layers, self.spans, strict=True)
        }
        return merge(stats, self.residual)

    def _pool(self) -> None:
        if self.k == 0:
            return
        rows = self.block[: self.k].to(torch.float64)
        n = torch.stack([self._count_vector(c) for c in self.batch_counts])
        total = n.sum(0)
        mean = (n * rows[:, 0]).sum(0) / total.clamp_min(1.0)
        m2 = (rows[:, 1] * (n - 1).clamp_min(0.0)).sum(0)
        m2 = m2 + (n * (rows[:, 0] - mean).square()).sum(0)
        self.acc = merge_layer(self.acc, Moments(total, mean, m2))
        self.block[: self.k].zero_()
        self.k, self.batch_counts = 0, []

    def _count_vector(self, counts: tuple[int, ...]) -> Tensor:
        vector = self._count_vectors.get(counts)
        if vector is None:
            if len(self._count_vectors) >= 4 * BLOCK:  # many ragged shapes: stay bounded
                self._count_vectors.clear()
            parts = [
                torch.full((n,), c, dtype=torch.float64, device=self.device)
                for n, c in zip(self.sizes, counts, strict=True)
            ]
            vector = torch.cat(parts)
            self._count_vectors[counts] = vector
        return vector


def _empty(channels: int, device: torch.device) -> Moments:
    zeros = torch.zeros(channels, dtype=torch.float64, device=device)
    return Moments(zeros, zeros.clone(), zeros.clone())
