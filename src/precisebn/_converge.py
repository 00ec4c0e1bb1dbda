"""Stopping a run once every recomputed channel is known to ``tol``.

A run with ``tol=`` asks at each pooling point (every `precisebn._fold.BLOCK` batches, from
`precisebn._stderr.MIN_BATCHES` on) whether every channel's relative standard error is at
most ``tol``: one host sync per pooling point, none per batch. Under ``torch.distributed``
the question is asked of the statistics reduced over every rank, so every rank gets the
same answer at the same pooling point; a rank whose loader ran out keeps answering (with
its final statistics) until every rank has stopped.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch

from precisebn._distributed import reduce_run
from precisebn._moments import Stats
from precisebn._stderr import MIN_BATCHES, Spreads, evaluate, relative_errors

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from precisebn._fold import BlockFold

__all__ = ["Stopper", "Worst", "check_tol", "warn_not_converged", "worst"]


class Worst(NamedTuple):
    """The least precise recomputed channel."""

    layer: str
    channel: int
    error: float
    """Its relative standard error (infinite when fewer than two batches reached it)."""


def check_tol(tol: float | None) -> float | None:
    """``tol`` itself if it is ``None`` or a positive finite number.

    Raises:
        ValueError: anything else.
    """
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a positive number (e.g. 1e-2) or None, got {tol!r}")
    return float(tol)


def worst(stats: Stats, spreads: Spreads) -> Worst | None:
    """The channel with the largest relative standard error (one transfer to the host).

    Channels that saw fewer than two values are not recomputed and take no part; NaN
    (non-finite moments) counts as infinite. ``None`` when no channel was recomputed.
    """
    if not stats:
        return None
    per_layer = []
    stats = {layer: m for layer, m in stats.items() if layer in spreads}
    if not stats:
        return None
    for layer, m in stats.items():
        rel = relative_errors(m, evaluate(m, spreads[layer]))
        reached = m.count.expand_as(m.mean) >= 2
        rel = torch.where(reached, torch.nan_to_num(rel, nan=math.inf), -1.0)
        top, channel = rel.max(0)
        per_layer.append(torch.stack([top, channel.to(top.dtype)]))
    table = torch.stack(per_layer).cpu().tolist()
    (error, channel), layer = max(zip(table, stats, strict=True), key=lambda x: x[0][0])
    if error < 0:
        return None
    return Worst(layer, int(channel), error)


class Stopper:
    """Asks, at pooling points, whether a run with ``tol`` may stop."""

    def __init__(self, tol: float, *, group: ProcessGroup | None) -> None:
        self.tol = tol
        self.group = group

    def converged(self, found: Worst | None) -> bool:
        return found is not None and found.error <= self.tol

    def at_pool(self, fold: BlockFold, *, batches: int, samples: int) -> bool:
        """Whether to stop after the batches folded so far (``batches`` of them here)."""
        if batches < MIN_BATCHES and self.group is None:
            return False
        return self._ask(fold, batches=batches, samples=samples, running=True)

    def finish(self, fold: BlockFold, *, batches: int, samples: int) -> None:
        """This rank has no more batches: answer the other ranks until every one stops."""
        if self.group is None:
            return
        while not self._ask(fold, batches=batches, samples=samples, running=False):
            pass

    def _ask(self, fold: BlockFold, *, batches: int, samples: int, running: bool) -> bool:
        stats, spreads = fold.result(), fold.spreads()
        if self.group is None:
            return self.converged(worst(stats, spreads))
        reduced = reduce_run(
            stats,
            batches=batches,
            samples=samples,
            group=self.group,
            spreads=spreads,
            running=running,
        )
        if reduced.running == 0:
            return True
        if reduced.batches < MIN_BATCHES:
            return False
        return self.converged(worst(reduced.stats, reduced.spreads))


def warn_not_converged(found: Worst | None, *, tol: float, batches: int) -> None:
    """Warn that a ``tol=`` run ended before reaching ``tol``, naming the worst layer."""
    if found is None:
        why = "no channel was recomputed"
    elif batches < MIN_BATCHES:
        why = (
            f"it used {batches} batch(es), fewer than the {MIN_BATCHES} a standard error "
            "needs to be trusted"
        )
    else:
        need = math.ceil(batches * (found.error / tol) ** 2) if math.isfinite(found.error) else 0
        hint = f" (about {need} batches would reach it at this rate)" if need else ""
        why = (
            f"after {batches} batches the least precise channel, {found.channel} of layer "
            f"'{found.layer or '<model>'}', has a relative standard error of "
            f"{found.error:.3g}{hint}"
        )
    warnings.warn(
        f"tol={tol:g} was not reached: {why}; the buffers are returned all the same, with "
        "converged=False. Raise num_batches, pass a longer loader, or loosen tol",
        UserWarning,
        stacklevel=3,
    )
