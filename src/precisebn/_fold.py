"""Folding batches' moments into float64 sums per channel, a block of batches at a time.

A `Fold` is the sink of a run's intercepted BN calls. The recomputed layers' channels are
laid end to end (`precisebn._layout.Layout`), and each call's kernel writes the batch's
``[mean; unbiased var]`` straight into row ``k`` of a ``[K, 2, C]`` block: no allocation,
copy or merge per batch. When the block is full (and at the end) it is added, in float64
and with a few vectorised reductions, to the run's sums per channel: the count, and the
count-weighted deviations of the batch means and the sums of squared deviations, all
taken about a fixed shift per channel. The pooled mean and sum of squared deviations follow
from them as from Chan et al.'s pairwise combination, up to float64 rounding. Counts are
kept per channel, so a call over a slice of a layer's channels adds to those channels only.
Calls that cannot use the block (a layer's second call in one batch, another dtype or
device) are kept as their own moments and merged per layer with Chan's formulas.

With ``errors=True`` pooling also adds the sums behind the standard errors
(`precisebn._stderr`): seven more float64 sums per channel, from the same rows, so the
errors cost no work per batch. A batch in which a layer ran more than once counts as one
draw of that layer: its calls are pooled before they enter those sums.

Pooling also notes whether the sums are still finite, so that NaN or infinity is
reported with the layers it reached and the block of batches where it first appeared, at
the cost of one operation per block and one transfer at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeAlias

import torch
from torch import Tensor

from precisebn._layout import Layout
from precisebn._moments import (
    Moments,
    Stats,
    from_batch,
    merge,
    merge_layer,
    nonfinite_message,
    parted,
)
from precisebn._stderr import Spread, Spreads, accumulate, evaluate, relative_errors, terms
from precisebn._tags import Call

__all__ = ["BLOCK", "Fold", "LayerCount"]

BLOCK = 16
"""Batches held before pooling. The block holds ``BLOCK * 2 * C`` values in the statistics
dtype (128 bytes per float32 channel), and pooling it briefly needs a few float64 arrays
of ``BLOCK * C``; neither depends on the number of batches."""

LayerCount: TypeAlias = int | tuple[int, range]
"""What one batch gave one layer's first call: values per channel (0: no call), with the
channels covered when the call covered only some."""


class Fold:
    """The sink of one run: batch moments land in a block of ``rows`` rows, pooled when full.

    Args:
        layout: the recomputed layers.
        dtype: the statistics dtype of the block (the kernels write it).
        device: where the block and the sums live.
        rows: batches held before pooling.
        errors: also add the sums behind the standard errors.
        start: a state to fold onto (its moments start the sums); none: empty sums.
        check: note whether the sums stay finite, for `result` to raise on NaN.
        cache: per-channel weights of the counts seen, kept across folds of one model.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        dtype: torch.dtype,
        device: torch.device,
        rows: int = BLOCK,
        errors: bool = True,
        start: Stats | None = None,
        check: bool = True,
        cache: dict[tuple[LayerCount, ...], _Weights] | None = None,
    ) -> None:
        self.layout = layout
        self.dtype, self.device, self.errors, self.check = dtype, device, errors, check
        channels = layout.channels
        self.block = torch.zeros(rows, 2, channels, dtype=dtype, device=device)
        self._rows = list(self.block.unbind(0))
        # Per block row, per layer: the (mean, var) views the kernels write into.
        self._slots: list[list[tuple[Tensor, Tensor]] | None] = [None] * rows
        # The shifted sums per channel (see _pool): shift d, count N, S and Q, and the
        # standard-error sums about the shift.
        self._sums = torch.zeros(11 if errors else 4, channels, dtype=torch.float64, device=device)
        self._shift, self._n, self._s1, self._q, *spread = self._sums.unbind(0)
        self._spread = Spread(self._shift, *spread) if errors else None
        self._weights: dict[tuple[LayerCount, ...], _Weights] = {} if cache is None else cache
        self._owners: Tensor | None = None
        self.reset(start)

    def reset(self, start: Stats | None = None) -> None:
        """Start afresh from ``start`` (empty sums without): nothing of earlier batches
        remains, so one fold can serve call after call."""
        self.block.zero_()  # rows a batch leaves unwritten must hold no earlier values
        if start is None:
            self._sums.zero_()
            self._sliced = [False] * len(self.layout.names)
        else:  # the state's moments as sums about its means: S = 0, Q = m2
            parts = [start[name] for name in self.layout.names]
            device = self._sums.device
            if any(m.mean.device != device for m in parts):
                parts = [Moments(*(t.to(device) for t in m)) for m in parts]
            torch.cat([m.mean for m in parts], out=self._shift)
            torch.cat([m.count.expand_as(m.mean) for m in parts], out=self._n)
            torch.cat([m.m2 for m in parts], out=self._q)
            self._s1.zero_()
            if self._spread is not None:
                self._sums[4:].zero_()
            self._sliced = [m.count.dim() > 0 for m in parts]
        self._residual: Stats = {}
        self._clusters: list[tuple[int, Moments | None, Moments]] = []
        self._finite: list[Tensor] = []
        self._pools: list[tuple[int, int]] = []
        self._residual_finite: list[tuple[int, Tensor]] = []
        self._held: list[tuple[LayerCount, ...]] = []
        self._held_index: list[int] = []
        self._trace: list[tuple[int, Tensor]] = []
        self.batches = 0  # pooled so far
        self.k = 0
        self.recorded: set[str] = set()
        """Layers that at least one call reached."""
        self.degenerate_call: tuple[Call, tuple[int, ...]] | None = None
        self._start_batch()

    def _start_batch(self) -> None:
        self._counts: list[LayerCount] = [0] * len(self.layout.names)
        self._extra: list[_Pending | _Done] = []

    # -------------------------------------------------------------- the sink protocol

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        i = self.layout.index[call.layer]
        self.recorded.add(call.layer)
        if self._counts[i] or dtype != self.dtype or device != self.device:
            mean, var = torch.zeros(2, len(call.span), dtype=dtype, device=device).unbind(0)
            self._extra.append(_Pending(call, mean, var, self.layout.sizes[i]))
            return mean, var
        slots = self._slots[self.k]
        if slots is None:
            parts = (self.layout.split(part) for part in self.block[self.k])
            slots = self._slots[self.k] = list(zip(*parts, strict=True))
        mean, var = slots[i]
        if call.full:
            self._counts[i] = call.count
            return mean, var
        self._counts[i] = (call.count, call.span)
        self._sliced[i] = True
        index = slice(call.span.start, call.span.stop, call.span.step)
        return mean[index], var[index]

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        if self.degenerate_call is None:
            self.degenerate_call = (call, shape)

    def output(
        self, call: Call, out: Tensor, input: Tensor, weight: Any, bias: Any, eps: float
    ) -> Tensor:
        return out

    # ------------------------------------------------------------------- batches

    def discard_batch(self) -> None:
        """Drop the current batch: nothing of it is pooled."""
        self._rows[self.k].zero_()  # partial rows must not leave stale values behind
        self.degenerate_call = None
        self._start_batch()

    def end_batch(self, index: int) -> None:
        """Close the current batch (loader index ``index``); pool a full block."""
        self._held.append(tuple(self._counts))
        self._held_index.append(index)
        if self._extra:
            extra: Stats = {}
            for pending in self._extra:
                layer, moments = pending.layer, pending.moments()
                extra[layer] = merge_layer(extra[layer], moments) if layer in extra else moments
            self._residual = merge(self._residual, extra)
            if self.check:
                self._residual_finite.append((index, _finite(self._residual.values()).all()))
            if self.errors:
                for layer, more in extra.items():
                    i = self.layout.index[layer]
                    first = self._row_moments(i)
                    cluster = more if first is None else merge_layer(first, more)
                    self._clusters.append((i, first, cluster))
        self._start_batch()
        self.k += 1
        if self.k == len(self._rows):
            self._pool()

    def add_row(
        self, row: Tensor, counts: tuple[int, ...], extras: list[tuple[int, Moments]], index: int
    ) -> None:
        """Close a batch that came whole, from a compiled graph: ``row`` holds each layer's
        first call's ``[mean; unbiased var]`` laid end to end, ``counts`` their values per
        channel (0: not reached), ``extras`` the moments of later calls of reused layers."""
        self._rows[self.k].copy_(row)
        self._counts = list(counts)
        for i, count in enumerate(counts):
            if count:
                self.recorded.add(self.layout.names[i])
        self._extra = [_Done(self.layout.names[i], moments) for i, moments in extras]
        self.end_batch(index)

    def _row_moments(self, i: int) -> Moments | None:
        """The moments the current row holds for layer ``i`` (its first call), if any."""
        count = self._counts[i]
        if count == 0:
            return None
        count, span = count if isinstance(count, tuple) else (count, None)
        a, b = self.layout.spans[i]
        mean, var = self.block[self.k, :, a:b].to(torch.float64, copy=True)
        if span is not None:
            index = slice(span.start, span.stop, span.step)
            mean, var = mean[index], var[index]
        return from_batch(count, mean, var, span=span, size=self.layout.sizes[i])

    # -------------------------------------------------------------------- result

    def result(self) -> Stats:
        """Per-layer moments of every batch closed so far (layers no call reached: count 0).

        Raises:
            ValueError: a fold with ``check``: NaN or infinity reached a layer; the message
                names the layers and the batches where it first appeared.
        """
        self._pool()
        if self.check:
            self._check_finite()
        flat = self._pooled()._replace(count=self._n.clone())
        return merge(parted(flat, self.layout, per_channel=self._sliced), self._residual)

    def _pooled(self) -> Moments:
        """The sums' moments laid end to end: ``d + S / N`` and ``Q - S^2 / N`` (their count
        is the fold's own ``N``, which later pools go on adding to)."""
        total = self._n.clamp_min(1.0)
        mean = self._s1 / total
        m2 = (self._q - self._s1 * mean).clamp_min_(0.0)
        return Moments(self._n, mean.add_(self._shift), m2)

    def spreads(self) -> Spreads:
        """Per layer, the standard-error sums of every batch closed so far (empty without
        ``errors``)."""
        self._pool()
        if self._spread is None:
            return {}
        parts = [self.layout.split(x) for x in self._spread]
        return {name: Spread(*(p[i] for p in parts)) for i, name in enumerate(self.layout.names)}

    def _check_finite(self) -> None:
        """Raise if NaN or infinity reached a layer, naming the layers and the first batches.

        Sums stay non-finite once they are, so the first pool (or batch with extra calls)
        whose flag is down is where it first appeared.
        """
        per_channel = (self._s1 + self._q).isfinite()
        (finite_channels,) = self.layout.count_per_layer(per_channel[None])
        ok = dict(
            zip(
                self.layout.names,
                (n == size for n, size in zip(finite_channels, self.layout.sizes, strict=True)),
                strict=True,
            )
        )
        heads = [*self._finite, *(flag for _, flag in self._residual_finite)]
        flags = torch.stack(heads).tolist() if heads else []
        if self._residual:
            for layer, fine in zip(
                self._residual, _finite(self._residual.values()).tolist(), strict=True
            ):
                ok[layer] = ok[layer] and fine
        bad = [layer for layer, fine in ok.items() if not fine]
        if not bad:
            return
        pools, extras = flags[: len(self._finite)], flags[len(self._finite) :]
        if False in pools:  # the block of batches where the pooled sums first went bad
            start, stop = self._pools[pools.index(False)]
        else:  # only extra calls of reused layers went bad: their batches are known
            start = stop = self._residual_finite[extras.index(False)][0]
        where = f"batch {start}" if start == stop else f"batches {start}-{stop}"
        raise ValueError(nonfinite_message(bad, where=where))

    # ------------------------------------------------------------------- pooling

    def _pool(self) -> None:
        """Add the block's rows to the sums and start the block afresh.

        The sums are shifted by a reference ``d`` per channel (the first rows' mean), which
        keeps them well conditioned in float64: ``N = Σ n_k``, ``S = Σ n_k (mean_k - d)``
        and ``Q = Σ (n_k - 1) var_k + n_k (mean_k - d)^2``, so that the pooled mean is
        ``d + S / N`` and the sum of squared deviations ``Q - S^2 / N``. Rows of equal
        counts are added as one group.
        """
        if self.k == 0:
            return
        groups: dict[tuple[LayerCount, ...], list[int]] = {}
        for i, key in enumerate(self._held):
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            first, last = members[0], members[-1]
            if last - first + 1 == len(members):
                part = self.block[first : last + 1]
            else:
                part = self.block[torch.tensor(members, device=self.device)]
            weights = self._weights_of(key)
            means = part[:, 0].to(torch.float64, copy=True)  # worked on in place
            self._set_shift(weights.mask, means.mean(0), slice(None))
            deviations = means.sub_(self._shift)
            squares = deviations.square()
            # t_k: each row's sum of squared deviations about the shift, per channel.
            t = part[:, 1].to(torch.float64).mul_(weights.var).addcmul_(squares, weights.n)
            sum_e, sum_t = deviations.sum(0), t.sum(0)
            self._s1.addcmul_(weights.n, sum_e)
            self._q.add_(sum_t)
            self._n.add_(weights.n, alpha=len(members))
            sp = self._spread
            if sp is None:
                continue
            sp.batches.add_(weights.reached, alpha=len(members))
            sp.n2.add_(weights.n2, alpha=len(members))
            sp.n2e.addcmul_(weights.n2, sum_e)
            sp.n2e2.addcmul_(weights.n2, squares.sum(0))
            sp.t2.add_(t.square().sum(0))
            sp.tne.addcmul_(weights.n, t.mul_(deviations).sum(0))
            sp.tn.addcmul_(weights.n, sum_t)
        self._pool_clusters()
        if self.check:  # one flag per pool, read at the end: non-finite sums stay so
            self._finite.append((self._s1 + self._q).isfinite().all())
            self._pools.append((self._held_index[0], self._held_index[-1]))
        self.batches += self.k
        if self._spread is not None:
            self._trace.append((self.batches, self._worst_per_layer()))
        self.k, self._held, self._held_index = 0, [], []

    def _worst_per_layer(self) -> Tensor:
        """Per layer, its channels' largest relative standard error (no host sync)."""
        assert self._spread is not None
        moments = self._pooled()
        relative = relative_errors(moments, evaluate(moments, self._spread))
        relative = torch.where(relative.isnan(), math.inf, relative)  # NaN moments count as worst
        relative = torch.where(self._n >= 2, relative, -math.inf)  # unreached channels: none
        if self._owners is None:
            self._owners = self.layout.owners(self.device)
        worst = torch.full(
            (len(self.layout.names),), -math.inf, dtype=torch.float64, device=self.device
        )
        return worst.scatter_reduce_(0, self._owners, relative, "amax")

    def trace(self) -> dict[str, tuple[tuple[int, float], ...]]:
        """Per layer, ``(batches, largest relative standard error)`` at every pooling point
        (one transfer to the host); empty without ``errors``."""
        self._pool()
        if not self._trace:
            return {}
        table = torch.stack([worst for _, worst in self._trace]).cpu().tolist()
        points = [batches for batches, _ in self._trace]
        return {
            name: tuple(
                (b, row[i]) for b, row in zip(points, table, strict=True) if row[i] > -math.inf
            )
            for i, name in enumerate(self.layout.names)
        }

    def _pool_clusters(self) -> None:
        """Replace, in the standard-error sums, the first call of each batch in which a layer
        ran more than once by all its calls pooled: one draw per batch."""
        sp = self._spread
        if sp is None:
            return
        for layer, first_call, all_calls in self._clusters:
            a, b = self.layout.spans[layer]
            reached = all_calls.count.expand_as(all_calls.mean) > 0
            self._set_shift(reached, all_calls.mean, slice(a, b))
            sums = Spread(*(x[a:b] for x in sp))
            sums = accumulate(sums, terms(all_calls, sums.center))
            if first_call is not None:
                sums = accumulate(sums, terms(first_call, sums.center), sign=-1.0)
            for x, y in zip(sp[1:], sums[1:], strict=True):
                x[a:b] = y
        self._clusters = []

    def _set_shift(self, reached: Tensor, mean: Tensor, where: slice) -> None:
        """Shift the channels ``where`` that ``reached`` and whose sums are still empty to
        ``mean``, without a host sync (their sums are all 0, so this changes nothing)."""
        fresh = reached & (self._n[where] == 0)
        if self._spread is not None:
            fresh &= self._spread.batches[where] == 0
        shift = self._shift[where]
        shift.copy_(torch.where(fresh, mean, shift))

    def _weights_of(self, key: tuple[LayerCount, ...]) -> _Weights:
        """Per channel: ``n``, the weight ``n - 1`` of the rows' variances in ``Q``, ``n**2``
        and whether the channel was reached, for rows of counts ``key``."""
        weights = self._weights.get(key)
        if weights is None:
            if len(self._weights) >= 4 * BLOCK:  # many ragged counts: stay bounded
                self._weights.clear()
            n = self._per_channel(key)
            mask = n > 0
            weights = self._weights[key] = _Weights(
                n, (n - 1).clamp_min(0.0), n.square(), mask.to(torch.float64), mask
            )
        return weights

    def _per_channel(self, key: tuple[LayerCount, ...]) -> Tensor:
        plain = [0 if isinstance(c, tuple) else c for c in key]
        out = self.layout.per_channel(plain, torch.device("cpu"))
        for (a, _), count in zip(self.layout.spans, key, strict=True):
            if isinstance(count, tuple):
                n, span = count
                out[a + span.start : a + span.stop : span.step] = n
        return out.to(self.device)


class _Pending:
    """An extra call's rows, turned into moments once the kernel has written them."""

    __slots__ = ("call", "layer", "mean", "size", "var")

    def __init__(self, call: Call, mean: Tensor, var: Tensor, size: int) -> None:
        self.call, self.mean, self.var, self.size = call, mean, var, size
        self.layer = call.layer

    def moments(self) -> Moments:
        c = self.call
        return from_batch(c.count, self.mean, self.var, span=c.span, size=self.size)


class _Done(NamedTuple):
    """An extra call whose moments are known already (from a compiled graph)."""

    layer: str
    done: Moments

    def moments(self) -> Moments:
        return self.done


class _Weights(NamedTuple):
    n: Tensor
    var: Tensor
    n2: Tensor
    reached: Tensor
    mask: Tensor


def _finite(moments: Iterable[Moments]) -> Tensor:
    """Per state entry, whether its mean and sum of squared deviations are finite."""
    return torch.stack([(m.mean + m.m2).isfinite().all() for m in moments])
