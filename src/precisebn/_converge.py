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
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from precisebn._distributed import ModelPart, reduce_models
from precisebn._moments import Stats
from precisebn._stderr import MIN_BATCHES, Spreads, evaluate, relative_errors

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from precisebn._fold import Fold

__all__ = [
    "Progress",
    "Stopper",
    "Worst",
    "check_tol",
    "reached",
    "warn_not_converged",
    "worst",
]


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
        rel = torch.where(reached, torch.where(rel.isnan(), math.inf, rel), -1.0)
        top, channel = rel.max(0)
        per_layer.append(torch.stack([top, channel.to(top.dtype)]))
    table = torch.stack(per_layer).cpu().tolist()
    (error, channel), layer = max(zip(table, stats, strict=True), key=lambda x: x[0][0])
    if error < 0:
        return None
    return Worst(layer, int(channel), error)


def reached(found: Worst | None, *, used: int, tol: float) -> bool:
    """Whether a model with least precise channel ``found`` after ``used`` batches has
    converged: at least `MIN_BATCHES` batches, and every recomputed channel within ``tol``."""
    return used >= MIN_BATCHES and found is not None and found.error <= tol


Progress = tuple["Fold", int, int]
"""One model of a pass: its fold, and the batches and samples it folded so far."""


class Stopper:
    """Asks, at pooling points, whether a run with ``tol`` may stop: when every model of
    the pass has reached it."""

    def __init__(self, tol: float, *, group: ProcessGroup | None) -> None:
        self.tol = tol
        self.group = group

    def at_pool(self, models: Sequence[Progress]) -> bool:
        """Whether to stop after the batches folded so far."""
        if self.group is None and min((used for _, used, _ in models), default=0) < MIN_BATCHES:
            return False
        return self._ask(models, running=True)

    def finish(self, models: Sequence[Progress]) -> None:
        """This rank has no more batches: answer the other ranks until every one stops."""
        if self.group is None:
            return
        while not self._ask(models, running=False):
            pass

    def _ask(self, models: Sequence[Progress], *, running: bool) -> bool:
        parts = [ModelPart(fold.result(), fold.spreads(), used, samples)
                 for fold, used, samples in models]  # fmt: skip
        if self.group is not None:  # asked of the statistics of every rank
            parts, still = reduce_models(parts, group=self.group, running=running)
            if still == 0:
                return True
        return all(
            reached(worst(p.stats, p.spreads or {}), used=p.batches, tol=self.tol) for p in parts
        )


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
