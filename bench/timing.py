"""Interleaved side-by-side timing: A B C A B C ..., paired ratios to the floor."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.methods import Method


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one method, and its per-round ratio to the floor."""

    seconds: list[float]
    ratios: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ratio(self) -> float:
        """Median over rounds of (this method's time / the floor's time in the same round)."""
        return statistics.median(self.ratios)

    def over(self, other: Timing) -> list[float]:
        """Per round, this method's time over ``other``'s in the same round."""
        return [a / b for a, b in zip(self.seconds, other.seconds, strict=True)]

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "median_s": self.median,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "ratio_to_floor": self.ratio,
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "seconds": self.seconds,
        }


def speed_row(workload: str, num_batches: int, timings: Mapping[str, Timing]) -> dict[str, object]:
    """One row of a speed table, as ``bench/report.py`` reads it from the results."""
    return {
        "workload": workload,
        "num_batches": num_batches,
        "methods": {name: t.as_dict() for name, t in timings.items()},
    }


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(
    method: Method,
    model: nn.Module,
    batches: Sequence[Tensor],
    device: torch.device,
    prepare: Callable[[nn.Module], nn.Module] = copy.deepcopy,
) -> float:
    """Seconds one call takes on a fresh deep copy of ``model`` (the copy is not timed)."""
    fresh = prepare(model)
    synchronize(device)
    start = time.perf_counter()
    method(fresh, batches)
    synchronize(device)
    return time.perf_counter() - start


def same(model: nn.Module) -> nn.Module:
    """``prepare`` that hands every call the model itself."""
    return model


def interleaved(
    methods: Mapping[str, Method],
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
    baseline: str = "floor",
    prepare: Callable[[nn.Module], nn.Module] = copy.deepcopy,
) -> dict[str, Timing]:
    """Time every method ``repeats`` times, in rotating order within each round.

    Each round runs every method once (A B C, then B C A, ...), so slow drifts of a
    shared machine hit all methods alike; the ratio to ``baseline`` is taken within
    each round and its median reported. Each call gets ``prepare(model)`` (untimed): a
    fresh deep copy by default; methods that hold models of their own (compiled ones,
    which a copy would compile anew) pass ``prepare=same``.
    """
    device = device or torch.device("cpu")
    names = list(methods)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        times = {name: time_once(methods[name], model, batches, device, prepare) for name in order}
        if round_ >= warmup:
            for name in names:
                samples[name].append(times[name])
    base = samples[baseline]
    return {
        name: Timing(secs, [s / b for s, b in zip(secs, base, strict=True)])
        for name, secs in samples.items()
    }
