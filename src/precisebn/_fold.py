"""Folding a whole run's batches into the state, with next to no work per batch.

`recompute_bn_buffers` hands the intercepted BN calls a `BlockFold` as their sink. The
recomputed layers' channels are laid end to end, and the BN kernels write each batch's
``[mean; unbiased var]`` straight into row ``k`` of a ``[K, 2, C]`` block: no allocation,
copy or merge per batch. Every ``K`` batches the block is added, in float64 and with a few
vectorised reductions, to the run's sums per channel: the count, and the count-weighted
deviations of the batch means and the sums of squared deviations, all taken about a fixed
shift (the first rows' mean). The pooled mean and sum of squared deviations follow from
them as from Chan et al.'s combination, up to float64 rounding. Calls that cannot use the
block (a layer's second call in one batch, another dtype or device) are kept as
records and merged per layer, exactly as `precisebn.update` does.

A direct batch (see `precisebn._direct`) arrives as the run's live ``[2, C]`` buffers,
which hold each layer's momentum times its moments: they are copied into the batch's row,
and the pooling divides that row by the momenta in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from precisebn._capture import Record, collect
from precisebn._layers import STAT_NAMES, buffer_key
from precisebn._moments import Moments, Stats, merge

BLOCK = 16
"""Batches held before pooling. The block holds ``BLOCK * 2 * C`` values in the statistics
dtype (128 bytes per float32 channel), and pooling it briefly needs two float64 arrays of
``BLOCK * C``; neither depends on the number of batches. Pooling costs about fifteen small
operations whatever the number of rows, so the block makes them rare."""


class BlockFold:
    """A sink for one run of at most ``max_batches`` batches.

    Batch moments land in a block of ``BLOCK`` rows (fewer for a shorter run), pooled
    when full.
    """

    def __init__(
        self,
        layers: list[str],
        bn_buffers: Mapping[str, Tensor],
        *,
        max_batches: int,
        momenta: list[float] | None = None,
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
        # Per batch row, per layer: the (mean, var) views the kernel writes into, made on
        # a row's first intercepted batch (direct batches copy whole rows).
        self.slots: list[list[tuple[Tensor, Tensor]] | None] = [None] * rows
        self._rows = list(self.block.unbind(0))
        # The run's shifted sums per channel (see _pool); the shift is set by the first pool.
        channels = offsets[-1]
        self._n, self._s1, self._q = (
            torch.zeros(channels, dtype=torch.float64, device=self.device) for _ in range(3)
        )
        self._shift: Tensor | None = None
        self.residual: Stats = {}
        self.k = 0
        self.counts = [0] * len(layers)
        self.batch_counts: list[tuple[int, ...]] = []
        self.direct: list[bool] = []
        self.extra: list[Record] = []
        self._count_vectors: dict[tuple[int, ...], Tensor] = {}
        self._weight_cache: dict[tuple[tuple[int, ...], bool], tuple[Tensor, Tensor]] = {}
        self._unscale = _per_channel([1.0 / m for m in momenta or ()], self.sizes, self.device)

    def rows(
        self, layer: str, count: int, channels: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        i = self.index[layer]
        if self.counts[i] or dtype != self.dtype or device != self.device:
            mean, var = torch.zeros(2, channels, dtype=dtype, device=device).unbind(0)
            self.extra.append(Record(layer, count, mean, var))
            return mean, var
        self.counts[i] = count
        slots = self.slots[self.k]
        if slots is None:
            mean_rows, var_rows = (torch.split(part, self.sizes) for part in self.block[self.k])
            slots = self.slots[self.k] = list(zip(mean_rows, var_rows, strict=True))
        return slots[i]

    def end_direct(self, live: Tensor, counts: tuple[int, ...]) -> None:
        """Close a direct batch: ``live`` holds ``momentum *`` its moments, ``counts`` its sizes."""
        self._rows[self.k].copy_(live)
        self.direct.append(True)
        self.batch_counts.append(counts)
        self.k += 1
        if self.k == len(self._rows):
            self._pool()

    def end_batch(self) -> None:
        """Close the current (intercepted) batch; pool the block when it is full."""
        self.direct.append(False)
        self.batch_counts.append(tuple(self.counts))
        self.counts = [0] * len(self.layers)
        if self.extra:
            self.residual = merge(self.residual, collect(self.extra))
            self.extra = []
        self.k += 1
        if self.k == len(self._rows):
            self._pool()

    def result(self) -> Stats:
        """Per-layer moments of every batch closed so far."""
        self._pool()
        total = self._n.clamp_min(1.0)
        mean = self._s1 / total
        m2 = (self._q - self._s1 * mean).clamp_min_(0.0)
        if self._shift is not None:
            mean += self._shift
        stats = {
            layer: Moments(self._n[a].clone(), mean[a:b], m2[a:b])
            for layer, (a, b) in zip(self.layers, self.spans, strict=True)
        }
        return merge(stats, self.residual)

    def _pool(self) -> None:
        """Add the block's rows to the run's sums and start the block afresh.

        The sums are shifted by a reference ``d`` per channel (the first rows' mean), which
        keeps them well conditioned in float64: ``N = Σ n_k``, ``S = Σ n_k (mean_k - d)``
        and ``Q = Σ (n_k - 1) var_k + n_k (mean_k - d)^2``, so that the pooled mean is
        ``d + S / N`` and the sum of squared deviations ``Q - S^2 / N``. Rows of equal
        counts and kind (intercepted or direct) form a group, normally one or two per
        block, which adds with a few vectorised operations; direct rows are divided by the
        momenta first. Rows are overwritten, not zeroed, by the next block (a weight of 0
        meets only finite values there).
        """
        if self.k == 0:
            return
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for i, key in enumerate(zip(self.batch_counts, self.direct, strict=True)):
            groups.setdefault(key, []).append(i)
        for (counts, direct), members in groups.items():
            first, last = members[0], members[-1]
            if last - first + 1 == len(members):
                part = self.block[first : last + 1]
            else:
                part = self.block[torch.tensor(members, device=self.device)]
            n, var_weight = self._weights(counts, direct)
            means = part[:, 0].to(torch.float64, copy=True)  # worked on in place
            if direct:
                means.mul_(self._unscale)
            if self._shift is None:
                self._shift = means.mean(0)
            deviations = means.sub_(self._shift)
            self._s1.addcmul_(n, deviations.sum(0))
            self._q.addcmul_(var_weight, part[:, 1].sum(0, dtype=torch.float64))
            self._q.addcmul_(n, deviations.square_().sum(0))
            self._n.add_(n, alpha=len(members))
        self.k, self.batch_counts, self.direct = 0, [], []

    def _weights(self, counts: tuple[int, ...], direct: bool) -> tuple[Tensor, Tensor]:
        """Per channel: ``n``, and the weight of the summed row variances in ``Q``
        (``n - 1``, over the momentum for direct rows)."""
        key = (counts, direct)
        weights = self._weight_cache.get(key)
        if weights is None:
            n = self._count_vector(counts)
            var_weight = (n - 1).clamp_min(0.0)
            if direct:
                var_weight = var_weight * self._unscale
            weights = self._weight_cache[key] = (n, var_weight)
        return weights

    def _count_vector(self, counts: tuple[int, ...]) -> Tensor:
        vector = self._count_vectors.get(counts)
        if vector is None:
            if len(self._count_vectors) >= 4 * BLOCK:  # many ragged shapes: stay bounded
                self._count_vectors.clear()
                self._weight_cache.clear()
            vector = _per_channel(counts, self.sizes, self.device)
            self._count_vectors[counts] = vector
        return vector


def _per_channel(values: Sequence[float], sizes: list[int], device: torch.device) -> Tensor:
    """A float64 vector holding each layer's value on each of its channels."""
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    parts = [
        torch.full((n,), v, dtype=torch.float64, device=device)
        for n, v in zip(sizes, values, strict=True)
    ]
    return torch.cat(parts)
