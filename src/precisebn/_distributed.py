"""Exact reduction of a statistics state across the ranks of a ``torch.distributed`` group.

Three all-reduces (sums) of float64 tensors per run, whatever the number of layers,
batches or ranks:

1. a header of ``world + 5`` numbers: a failure flag per rank, the batch and sample
   counts, the ranks still reading batches (for ``tol=``), and a fingerprint of the
   state's layout (layer names and channel counts).
   It has the same size on every rank, so a rank whose loader raised, or a state laid
   out differently, is reported on every rank before any variable-sized message is sent;
2. ``[count, count * mean]`` per channel of every layer, and a flag per layer saying
   whether some rank keeps counts per channel (a layer whose buffers were sliced):
   summed, the global count ``N`` and mean ``mu``;
3. ``m2 + count * (mean - mu)**2`` of every layer: summed, the global sum of squared
   deviations from ``mu`` (the parallel-axis theorem; every term is non-negative, so
   the sum does not cancel); in a run of `precisebn.recompute_bn_buffers`, followed by the
   seven standard-error sums per channel (`precisebn._stderr`), moved to ``mu`` first.

With ``L`` layers and ``C`` channels in all, each rank contributes
``8 * (world + 5 + L + 10 * C)`` bytes (``3 * C`` instead of ``10 * C`` without the
standard errors); a ring all-reduce sends and receives about twice that per rank. Every
rank then derives its result from the same reduced tensors with the
same operations, so the results are identical on every rank as long as the backend hands
every rank the same reduced tensor (gloo's and NCCL's algorithms reduce each element once
and then distribute it).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from precisebn._layout import Layout
from precisebn._moments import Moments, Stats, joined, parted
from precisebn._stderr import Spread, Spreads, recenter

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "GroupError",
    "LayoutMismatchError",
    "ModelPart",
    "RankFailedError",
    "Reduced",
    "abandon",
    "all_reduce_stats",
    "reduce_models",
    "reduce_run",
    "reduction_group",
    "tagged",
    "untagged",
]

logger = logging.getLogger("precisebn")

_F64 = torch.float64
_HASH_BITS = 16  # fingerprint**2 * world stays an exact float64 integer up to 2**21 ranks


class GroupError(Exception):
    """Raised on every rank of a group at once, from the same reduced header: no rank needs
    telling (see `abandon`)."""


class RankFailedError(GroupError, RuntimeError):
    """Another rank of the group called `abandon`."""


class LayoutMismatchError(GroupError, ValueError):
    """The ranks' states hold different layers or channel counts."""


def reduction_group(process_group: ProcessGroup | None = None) -> ProcessGroup | None:
    """The group to reduce over, or ``None`` when there is nothing to reduce.

    ``None`` when ``torch.distributed`` is unavailable or not initialised, or the group
    has a single rank.

    Raises:
        ValueError: ``process_group`` is given and this rank is not one of its members.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"rank {dist.get_rank()} is not a member of process_group; call with the group "
            "this rank belongs to, or with distributed=False"
        )
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_stats(stats: Stats, *, process_group: ProcessGroup | None = None) -> Stats:
    """Combine the statistics states of every rank exactly; every rank gets the same result.

    A collective: every rank of the group must call it, with a state holding the same
    layers in the same order with the same channel counts (a state built with
    `precisebn.init` from the same model is). A layer that a rank never reached
    (count 0) adds nothing. Three all-reduces of float64 tensors, whatever the number
    of layers (the "Distributed" page of the docs says how many bytes move).

    Without an initialised process group, or with a group of one rank, the state is
    returned as it is (in a new dict), so the same code runs on one process.

    Args:
        stats: this rank's state.
        process_group: the group to reduce over (default: the default group).

    Returns:
        A new state: per layer the count, mean and sum of squared deviations of the
        values seen on all ranks together, on the devices of ``stats``.

    Raises:
        ValueError: the ranks' states hold different layers or channel counts (raised on
            every rank), or this rank is not a member of ``process_group``.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> stats = precisebn.init(precisebn.bn_buffers(model))
        >>> stats = precisebn.update(stats, model, torch.randn(8, 3))
        >>> reduced = precisebn.all_reduce_stats(stats)  # no process group: the identity
        >>> reduced["1"].count.item(), torch.equal(reduced["1"].m2, stats["1"].m2)
        (8.0, True)
    """
    group = reduction_group(process_group)
    if group is None:
        return dict(stats)
    return reduce_run(stats, batches=0, samples=0, group=group).stats


class Reduced(NamedTuple):
    """A run reduced over the ranks of a group."""

    stats: Stats
    spreads: Spreads
    """The standard-error sums, about each layer's global mean (empty if none were given)."""
    batches: int
    samples: int
    running: int
    """How many ranks said they are still reading batches."""
    models: list[tuple[int, int]]
    """Per model of the run, its batches and samples summed over the ranks (if given)."""


def reduce_run(
    stats: Stats,
    *,
    batches: int,
    samples: int,
    group: ProcessGroup,
    spreads: Spreads | None = None,
    running: bool = False,
    models: Sequence[tuple[int, int]] = (),
) -> Reduced:
    """Reduce a run over ``group``: the global state, standard-error sums, batch and sample
    counts (also per model, for ``models`` of ``(batches, samples)``). Every rank must pass
    ``spreads`` or none does, and the same number of ``models``.

    Raises:
        RuntimeError: another rank called `abandon` (its loader or forward raised).
        ValueError: the ranks' states are laid out differently.
    """
    header = _header(
        stats, batches=batches, samples=samples, failed=False, group=group, running=running
    )
    _check_header(header, stats, group=group)
    world = dist.get_world_size(group)
    batches, samples = int(header[world].item()), int(header[world + 1].item())
    ranks_running = int(header[world + 2].item())
    if not stats:  # the same on every rank: the layouts were checked
        return Reduced({}, {}, batches, samples, ranks_running, [])
    device = _comm_device(stats, group)
    layout = Layout.of({layer: m.mean for layer, m in stats.items()})
    local = joined(
        {layer: Moments(*(t.to(device, _F64) for t in m)) for layer, m in stats.items()}, layout
    )
    # Counts per channel, and per layer a flag: whether some rank kept them per channel.
    vector = torch.tensor(
        [float(m.count.dim() > 0) for m in stats.values()], dtype=_F64, device=device
    )
    counts_per_model = torch.tensor(
        [float(x) for pair in models for x in pair], dtype=_F64, device=device
    )
    first = torch.cat([local.count, local.count * local.mean, vector, counts_per_model])
    dist.all_reduce(first, group=group)
    channels = layout.channels
    count, total = first[:channels], first[channels : 2 * channels]
    per_channel = (first[2 * channels : 2 * channels + len(stats)] > 0).tolist()
    model_counts = first[2 * channels + len(stats) :].long().tolist()
    mean = total / count.clamp_min(1.0)
    parts = [local.m2 + local.count * (local.mean - mean).square()]
    if spreads is not None:  # each rank's sums about the global mean, then summed
        local_spread = Spread(
            *(layout.join(spreads[layer][i].to(device, _F64) for layer in stats) for i in range(8))
        )
        parts.append(torch.stack(recenter(local_spread, mean)[1:]).reshape(-1))
    second = torch.cat(parts)
    dist.all_reduce(second, group=group)
    reduced = parted(Moments(count, mean, second[:channels]), layout, per_channel=per_channel)
    out: Stats = {
        layer: Moments(*(t.to(m.mean.device) for t in reduced[layer])) for layer, m in stats.items()
    }
    spread_out: Spreads = {}
    if spreads is not None:
        sums = second[channels:].reshape(7, -1)
        per_layer = [layout.split(row) for row in (mean, *sums)]
        for i, (layer, m) in enumerate(stats.items()):
            where = m.mean.device
            spread_out[layer] = Spread(*(rows[i].to(where) for rows in per_layer))
    pairs = list(zip(model_counts[::2], model_counts[1::2], strict=True))
    return Reduced(out, spread_out, batches, samples, ranks_running, pairs)


class ModelPart(NamedTuple):
    """One model's part of a pass: its statistics, standard-error sums (``None``: the run
    keeps none), batches and samples."""

    stats: Stats
    spreads: Spreads | None
    batches: int
    samples: int


def reduce_models(
    parts: Sequence[ModelPart], *, group: ProcessGroup, running: bool = False
) -> tuple[list[ModelPart], int]:
    """`reduce_run` for the models of one pass, in one reduction: each model's part
    reduced over the ranks, and how many ranks are still reading batches."""
    errors = bool(parts) and parts[0].spreads is not None
    reduced = reduce_run(
        tagged([p.stats for p in parts]),
        batches=sum(p.batches for p in parts),
        samples=sum(p.samples for p in parts),
        group=group,
        spreads=tagged([p.spreads or {} for p in parts]) if errors else None,
        running=running,
        models=[(p.batches, p.samples) for p in parts],
    )
    count = len(parts)
    spreads: list[Spreads | None] = (
        list(untagged(reduced.spreads, count)) if errors else [None] * count
    )
    out = [
        ModelPart(stats, sp, batches, samples)
        for stats, sp, (batches, samples) in zip(
            untagged(reduced.stats, count), spreads, reduced.models, strict=True
        )
    ]
    return out, reduced.running


V = TypeVar("V")


def tagged(per_model: Sequence[dict[str, V]]) -> dict[str, V]:
    """One dict for several models' per-layer values: ``"<model index>/<layer>"`` keys."""
    return {
        f"{i}/{layer}": value
        for i, values in enumerate(per_model)
        for layer, value in values.items()
    }


def untagged(values: dict[str, V], count: int) -> list[dict[str, V]]:
    """The per-model dicts of `tagged` values."""
    out: list[dict[str, V]] = [{} for _ in range(count)]
    for key, value in values.items():
        index, layer = key.split("/", 1)
        out[int(index)][layer] = value
    return out


def abandon(stats: Stats, *, group: ProcessGroup) -> None:
    """Tell the other ranks of ``group`` that this rank's run failed, then return.

    Joins the first collective of `reduce_run` with this rank's failure flag set,
    so the other ranks raise instead of waiting for data that will not come. Errors of
    the collective itself are logged, not raised: the caller re-raises its own error.
    """
    try:
        _header(stats, batches=0, samples=0, failed=True, group=group)
    except (RuntimeError, ValueError) as error:  # the original error matters more
        logger.warning("could not tell the other ranks that this rank failed: %s", error)


def _header(
    stats: Stats,
    *,
    batches: int,
    samples: int,
    failed: bool,
    group: ProcessGroup,
    running: bool = False,
) -> Tensor:
    """All-reduce ``[failure flag per rank, batches, samples, running, h, h**2]``; return
    the sums."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    h = float(_fingerprint(stats))
    values = [0.0] * world + [float(batches), float(samples), float(running), h, h * h]
    values[rank] = float(failed)
    header = torch.tensor(values, dtype=_F64).to(_comm_device(stats, group))
    dist.all_reduce(header, group=group)
    return header


def _check_header(header: Tensor, stats: Stats, *, group: ProcessGroup) -> None:
    world = dist.get_world_size(group)
    values = header.tolist()
    failed = [rank for rank, flag in enumerate(values[:world]) if flag]
    if failed:
        raise RankFailedError(
            f"precise BN stopped: rank(s) {failed} of the process group raised while running "
            "their batches (see their tracebacks); no statistics were reduced and the model "
            "is unchanged"
        )
    # sum(h_r) == world * h and sum(h_r**2) == world * h**2 hold only if every h_r == h.
    h = float(_fingerprint(stats))
    if values[-2] != world * h or values[-1] != world * h * h:
        raise LayoutMismatchError(
            "the ranks' statistics states hold different layers or channel counts; every rank "
            "must recompute the same layers of the same model (same layers= selection)"
        )


def _fingerprint(stats: Stats) -> int:
    layout = ";".join(f"{layer}:{m.mean.numel()}" for layer, m in stats.items())
    return zlib.crc32(layout.encode()) & ((1 << _HASH_BITS) - 1)


def _comm_device(stats: Stats, group: ProcessGroup) -> torch.device:
    """The device of the first layer's moments, or the current GPU for a pure NCCL group."""
    device = next(iter(stats.values())).mean.device if stats else torch.device("cpu")
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device
