"""Folding a whole run's batches into the state, with next to no work per batch.

`recompute_bn_buffers` hands the intercepted BN calls a `BlockFold` as their sink. The
recomputed layers' channels are laid end to end, and the BN kernels write each batch's
``[mean; unbiased var]`` straight into row ``k`` of a ``[K, 2, C]`` block: no allocation,
copy or merge per batch. Every ``K`` batches the block is added, in float64 and with a few
vectorised reductions, to the run's sums per channel: the count, and the count-weighted
deviations of the batch means and the sums of squared deviations, all taken about a fixed
shift (the first rows' mean). The pooled mean and sum of squared deviations follow from
them as from Chan et al.'s combination, up to float64 rounding. Counts are kept per
channel, so a call over a slice of a layer's channels adds to those channels only. Calls
that cannot use the block (a layer's second call in one batch, another dtype or device)
are kept as records and merged per layer, exactly as `precisebn.update` does.

A direct batch (see `precisebn._direct`) arrives as the run's live ``[2, C]`` buffers,
which hold each layer's update factor times its moments: they are copied into the batch's
row, and the pooling divides that row by the factors in float64.

Pooling also adds the sums behind the standard errors (`precisebn._stderr`): seven more
float64 sums per channel, from the same rows, so the errors cost no work per batch. A
batch in which a layer ran more than once counts as one draw of that layer: its calls are
pooled before they enter those sums.

Pooling also notes whether the sums are still finite, so that NaN or infinity is
reported with the layers it reached and the block of batches where it first appeared, at
the cost of three operations per block and one transfer at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from precisebn._capture import Record, collect
from precisebn._layers import STAT_NAMES, buffer_key
from precisebn._moments import Moments, Stats, from_batch, merge, merge_layer, nonfinite_message
from precisebn._stderr import Spread, Spreads, accumulate, terms
from precisebn._tags import Call, Entry

ERRORS = True
"""Whether pooling adds the standard-error sums; ``False`` only to measure what they cost
(``bench/errors.py``): the results then carry no standard errors and ``tol=`` never stops."""

BLOCK = 16
"""Batches held before pooling. The block holds ``BLOCK * 2 * C`` values in the statistics
dtype (128 bytes per float32 channel), and pooling it briefly needs two float64 arrays of
``BLOCK * C``; neither depends on the number of batches. Pooling costs about fifteen small
operations whatever the number of rows, so the block makes them rare."""


class Observed(NamedTuple):
    """What one intercepted batch showed, to decide whether its shapes may run directly."""

    entries: tuple[Entry, ...]
    """Per layer: values per channel, and the channels covered when not all."""
    factors: tuple[float, ...]
    """Per layer: the factor its call would update running buffers with (0: not reached)."""
    calls: tuple[int, ...]
    """Per layer: intercepted batch-norm calls."""
    uniform: bool
    """Every call was in training mode, in the block's dtype, one per layer at most."""


class BlockFold:
    """A sink for one run of at most ``max_batches`` batches.

    Batch moments land in a block of ``BLOCK`` rows (fewer for a shorter run), pooled
    when full.
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
        # Per batch row, per layer: the (mean, var) views the kernel writes into, made on
        # a row's first intercepted batch (direct batches copy whole rows).
        self.slots: list[list[tuple[Tensor, Tensor]] | None] = [None] * rows
        self._rows = list(self.block.unbind(0))
        # The run's shifted sums per channel (see _pool).
        channels = offsets[-1]
        self._n, self._s1, self._q = (
            torch.zeros(channels, dtype=torch.float64, device=self.device) for _ in range(3)
        )
        # Per channel, set from the first rows that reach it (its sums are all 0 until then,
        # so setting it changes nothing): the sums stay well conditioned even for channels
        # of a sliced layer that the first batches did not cover.
        self._shift = torch.zeros(channels, dtype=torch.float64, device=self.device)
        # The standard-error sums (see precisebn._stderr) of all channels, about the shift.
        self._spread = Spread(
            self._shift, *torch.zeros(7, channels, dtype=torch.float64, device=self.device)
        )
        # Batches since the last pool in which a layer ran more than once: the layer, its
        # first call's moments (the row's) and the moments of all its calls.
        self._clusters: list[tuple[int, Moments | None, Moments]] = []
        self._finite: list[Tensor] = []
        self._pools: list[tuple[int, int]] = []
        self.residual: Stats = {}
        # Per batch with extra calls: its index, and whether the residual is still finite.
        self._residual_finite: list[tuple[int, Tensor]] = []
        self.k = 0
        self._start_batch()
        self.batch_entries: list[tuple[Entry, ...]] = []
        self.batch_factors: list[tuple[float, ...] | None] = []
        self.batch_index: list[int] = []
        self.degenerate_call: tuple[Call, tuple[int, ...]] | None = None
        self._sliced = [False] * len(layers)
        self.recorded: set[str] = set()
        """Layers that at least one intercepted call reached."""
        self._weight_cache: dict[tuple[tuple[Entry, ...], tuple[float, ...] | None], _Weights] = {}

    def _start_batch(self) -> None:
        self.entries: list[Entry] = [0] * len(self.layers)
        self.factors = [0.0] * len(self.layers)
        self.ncalls = [0] * len(self.layers)
        self.uniform = True
        self.extra: list[Record] = []

    # -------------------------------------------------------------- the sink protocol

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        i = self.index[call.layer]
        self.recorded.add(call.layer)
        self.ncalls[i] += 1
        if not call.training:
            self.uniform = False
        if self.ncalls[i] > 1 or dtype != self.dtype or device != self.device:
            self.uniform = False
            mean, var = torch.zeros(2, len(call.span), dtype=dtype, device=device).unbind(0)
            self.extra.append(Record(call, mean, var))
            return mean, var
        self.entries[i] = call.entry
        self.factors[i] = call.factor
        if not call.full:
            self._sliced[i] = True
        slots = self.slots[self.k]
        if slots is None:
            mean_rows, var_rows = (torch.split(part, self.sizes) for part in self.block[self.k])
            slots = self.slots[self.k] = list(zip(mean_rows, var_rows, strict=True))
        mean, var = slots[i]
        if call.full:
            return mean, var
        index = slice(call.span.start, call.span.stop, call.span.step)
        return mean[index], var[index]

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        if self.degenerate_call is None:
            self.degenerate_call = (call, shape)

    # ------------------------------------------------------------------- batches

    def discard_batch(self) -> None:
        """Drop the current intercepted batch: nothing of it is pooled."""
        self._rows[self.k].zero_()  # partial rows must not leave stale values behind
        self.degenerate_call = None
        self._start_batch()

    def end_batch(self, index: int) -> Observed:
        """Close the current intercepted batch (loader index ``index``); pool a full block."""
        observed = Observed(
            tuple(self.entries), tuple(self.factors), tuple(self.ncalls), self.uniform
        )
        self.batch_entries.append(observed.entries)
        self.batch_factors.append(None)
        self.batch_index.append(index)
        if self.extra:
            extra = collect(self.extra)
            self.residual = merge(self.residual, extra)
            self._residual_finite.append((index, _finite(self.residual.values()).all()))
            for layer, more in extra.items():
                i = self.index[layer]
                first = self._row_moments(i)
                cluster = more if first is None else merge_layer(first, more)
                self._clusters.append((i, first, cluster))
        self._start_batch()
        self._advance()
        return observed

    def end_direct(
        self, live: Tensor, entries: tuple[Entry, ...], factors: tuple[float, ...], index: int
    ) -> None:
        """Close a direct batch: ``live`` holds ``factor *`` its moments, ``entries`` its sizes."""
        self._rows[self.k].copy_(live)
        self.batch_entries.append(entries)
        self.batch_factors.append(factors)
        self.batch_index.append(index)
        self._advance()

    def _row_moments(self, i: int) -> Moments | None:
        """The moments the current row holds for layer ``i`` (its first call), if any."""
        entry = self.entries[i]
        if entry == 0:
            return None
        count, span = entry if isinstance(entry, tuple) else (entry, None)
        a, b = self.spans[i]
        mean, var = self.block[self.k, :, a:b].to(torch.float64, copy=True)
        if span is not None:
            index = slice(span.start, span.stop, span.step)
            mean, var = mean[index], var[index]
        return from_batch(count, mean, var, span=span, size=self.sizes[i])

    def _advance(self) -> None:
        self.k += 1
        if self.k == len(self._rows):
            self._pool()

    # -------------------------------------------------------------------- result

    def result(self) -> Stats:
        """Per-layer moments of every batch closed so far.

        Raises:
            ValueError: NaN or infinity reached a layer; the message names the layers and
                the batches where it first appeared.
        """
        self._pool()
        self._check_finite()
        total = self._n.clamp_min(1.0)
        mean = self._s1 / total
        m2 = (self._q - self._s1 * mean).clamp_min_(0.0)
        mean += self._shift
        stats = {
            layer: Moments(
                self._n[a:b].clone() if self._sliced[i] else self._n[a].clone(),
                mean[a:b],
                m2[a:b],
            )
            for i, (layer, (a, b)) in enumerate(zip(self.layers, self.spans, strict=True))
        }
        return merge(stats, self.residual)

    def spreads(self) -> Spreads:
        """Per layer, the standard-error sums of every batch closed so far (after `result`)."""
        self._pool()
        if not ERRORS:
            return {}
        return {
            layer: Spread(*(x[a:b] for x in self._spread))
            for layer, (a, b) in zip(self.layers, self.spans, strict=True)
        }

    def _check_finite(self) -> None:
        """Raise if NaN or infinity reached a layer, naming the layers and the first batches.

        Sums stay non-finite once they are, so the first pool (or batch with extra calls)
        whose flag is down is where it first appeared.
        """
        pooled = (self._s1 + self._q).isfinite()
        per_layer = [pooled[a:b].all() for a, b in self.spans]
        heads = [*self._finite, *(flag for _, flag in self._residual_finite), *per_layer]
        parts = [torch.stack(heads)]
        if self.residual:
            parts.append(_finite(self.residual.values()))
        flags = torch.cat(parts).cpu().tolist()
        pools, flags = flags[: len(self._finite)], flags[len(self._finite) :]
        extras, flags = flags[: len(self._residual_finite)], flags[len(self._residual_finite) :]
        layers_ok = dict(zip(self.layers, flags[: len(self.layers)], strict=True))
        for layer, ok in zip(self.residual, flags[len(self.layers) :], strict=True):
            layers_ok[layer] = layers_ok[layer] and ok
        bad = [layer for layer, ok in layers_ok.items() if not ok]
        if not bad:
            return
        if False in pools:  # the block of batches where the pooled sums first went bad
            start, stop = self._pools[pools.index(False)]
        else:  # only extra calls of reused layers went bad: their batches are known
            start = stop = self._residual_finite[extras.index(False)][0]
        where = f"batch {start}" if start == stop else f"batches {start}-{stop}"
        raise ValueError(nonfinite_message(bad, where=where))

    # ------------------------------------------------------------------- pooling

    def _pool(self) -> None:
        """Add the block's rows to the run's sums and start the block afresh.

        The sums are shifted by a reference ``d`` per channel (the first rows' mean), which
        keeps them well conditioned in float64: ``N = Σ n_k``, ``S = Σ n_k (mean_k - d)``
        and ``Q = Σ (n_k - 1) var_k + n_k (mean_k - d)^2``, so that the pooled mean is
        ``d + S / N`` and the sum of squared deviations ``Q - S^2 / N``. Rows of equal
        counts and factors are added as one group.
        """
        if self.k == 0:
            return
        groups: dict[tuple[tuple[Entry, ...], tuple[float, ...] | None], list[int]] = {}
        for i, key in enumerate(zip(self.batch_entries, self.batch_factors, strict=True)):
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            first, last = members[0], members[-1]
            if last - first + 1 == len(members):
                part = self.block[first : last + 1]
            else:
                part = self.block[torch.tensor(members, device=self.device)]
            weights = self._weights(key)
            means = part[:, 0].to(torch.float64, copy=True)  # worked on in place
            if weights.unscale is not None:
                means.mul_(weights.unscale)
            self._set_shift(weights.n > 0, means.mean(0), slice(None))
            deviations = means.sub_(self._shift)
            squares = deviations.square()
            # t_k: each row's sum of squared deviations about the shift, per channel.
            t = part[:, 1].to(torch.float64).mul_(weights.var).addcmul_(squares, weights.n)
            sum_e, sum_e2, sum_t = deviations.sum(0), squares.sum(0), t.sum(0)
            self._s1.addcmul_(weights.n, sum_e)
            self._q.add_(sum_t)
            self._n.add_(weights.n, alpha=len(members))
            if not ERRORS:
                continue
            sp = self._spread
            sp.batches.add_(weights.reached, alpha=len(members))
            sp.n2.add_(weights.n2, alpha=len(members))
            sp.n2e.addcmul_(weights.n2, sum_e)
            sp.n2e2.addcmul_(weights.n2, sum_e2)
            sp.t2.add_(t.square().sum(0))
            sp.tne.addcmul_(weights.n, t.mul_(deviations).sum(0))
            sp.tn.addcmul_(weights.n, sum_t)
        for layer, first_call, all_calls in self._clusters:
            a, b = self.spans[layer]
            self._set_shift(
                all_calls.count.expand_as(all_calls.mean) > 0, all_calls.mean, slice(a, b)
            )
            sums = Spread(*(x[a:b] for x in self._spread))
            sums = accumulate(sums, terms(all_calls, sums.center))
            if first_call is not None:
                sums = accumulate(sums, terms(first_call, sums.center), sign=-1.0)
            for x, y in zip(self._spread[1:], sums[1:], strict=True):
                x[a:b] = y
        self._clusters = []
        # One flag per pool, read at the end: the sums stay non-finite once they are.
        self._finite.append((self._s1 + self._q).isfinite().all())
        self._pools.append((self.batch_index[0], self.batch_index[-1]))
        self.k, self.batch_entries, self.batch_factors, self.batch_index = 0, [], [], []

    def _set_shift(self, reached: Tensor, mean: Tensor, where: slice) -> None:
        """Shift the channels ``where`` that ``reached`` and whose sums are still empty to
        ``mean``, without a host sync."""
        fresh = reached & (self._n[where] == 0) & (self._spread.batches[where] == 0)
        shift = self._shift[where]
        shift.copy_(torch.where(fresh, mean, shift))

    def _weights(self, key: tuple[tuple[Entry, ...], tuple[float, ...] | None]) -> _Weights:
        """Per channel: ``n``; the weight of the summed row variances in ``Q`` (``n - 1``,
        over the factor for direct rows); and, for direct rows, ``1 / factor``."""
        weights = self._weight_cache.get(key)
        if weights is None:
            if len(self._weight_cache) >= 4 * BLOCK:  # many ragged shapes: stay bounded
                self._weight_cache.clear()
            entries, factors = key
            n = _per_channel(entries, self.sizes, self.device)
            var = (n - 1).clamp_min(0.0)
            unscale = None
            if factors is not None:
                unscale = _per_channel(
                    [1.0 / f if f else 1.0 for f in factors], self.sizes, self.device
                )
                var = var * unscale
            weights = self._weight_cache[key] = _Weights(
                n, var, unscale, n.square(), (n > 0).to(torch.float64)
            )
        return weights


def _finite(moments: Iterable[Moments]) -> Tensor:
    """Per state entry, whether its mean and sum of squared deviations are finite."""
    return torch.stack([(m.mean + m.m2).isfinite().all() for m in moments])


class _Weights(NamedTuple):
    n: Tensor
    var: Tensor
    unscale: Tensor | None
    n2: Tensor
    reached: Tensor


def _per_channel(values: Sequence[Entry | float], sizes: list[int], device: torch.device) -> Tensor:
    """A float64 vector holding each layer's value on each of its channels (on a sliced
    entry's channels only, 0 on the others)."""
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    plain = [0.0 if isinstance(v, tuple) else float(v) for v in values]
    out = torch.repeat_interleave(torch.tensor(plain, dtype=torch.float64), torch.tensor(sizes))
    offset = 0
    for size, value in zip(sizes, values, strict=True):
        if isinstance(value, tuple):
            count, span = value
            out[offset + span.start : offset + span.stop : span.step] = count
        offset += size
    return out.to(device)
