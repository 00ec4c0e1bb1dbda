"""Scaling: time against the number of batches and against the channel count."""

from __future__ import annotations

from collections.abc import Sequence

from bench.methods import METHODS, bn_layers
from bench.models import Workload, bn_mlp, make_batches, make_model
from bench.timing import interleaved

SCALED = ("floor", "precisebn", "fvcore")
"""The methods timed in the scaling figures (the floor, precisebn and its fastest peer)."""


def mlp_workload(width: int) -> Workload:
    """The BN-heavy MLP (6 BN layers) at a given width: small layers expose fixed costs."""
    return Workload(f"mlp width {width}", lambda: bn_mlp(64, width, 6), (64,))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def intercept(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares intercept of ``ys`` against ``xs``: the cost of a call of no batches."""
    return sum(ys) / len(ys) - slope(xs, ys) * sum(xs) / len(xs)


def vs_batches(counts: Sequence[int], *, batch: int, repeats: int) -> dict[str, object]:
    """Median seconds per call for each number of batches; per-batch cost from the slope."""
    workload = mlp_workload(256)
    model = make_model(workload)
    layers = len(bn_layers(model))
    medians: dict[str, list[float]] = {name: [] for name in SCALED}
    for n in counts:
        batches = make_batches(workload, [batch] * n)
        timings = interleaved({k: METHODS[k] for k in SCALED}, model, batches, repeats=repeats)
        for name in SCALED:
            medians[name].append(timings[name].median)
    per_batch = {name: slope(counts, medians[name]) * 1e6 for name in SCALED}
    fixed = {name: intercept(counts, medians[name]) * 1e3 for name in SCALED}
    overhead = per_batch["precisebn"] - per_batch["floor"]
    return {
        "workload": f"{workload.name}, batch {batch}, {layers} BN layers",
        "num_batches": list(counts),
        "median_s": medians,
        "per_batch_us": per_batch,
        "fixed_ms": fixed,
        "overhead_per_batch_us": overhead,
        "overhead_per_layer_us": overhead / layers,
    }


def vs_channels(
    widths: Sequence[int], *, batch: int, num_batches: int, repeats: int
) -> dict[str, object]:
    """Ratio to the floor and per-batch overhead of precisebn for each layer width."""
    rows = []
    for width in widths:
        workload = mlp_workload(width)
        model = make_model(workload)
        batches = make_batches(workload, [batch] * num_batches)
        timings = interleaved({k: METHODS[k] for k in SCALED}, model, batches, repeats=repeats)
        floor_s, pbn_s = timings["floor"].median, timings["precisebn"].median
        rows.append(
            {
                "width": width,
                "floor_ms_per_batch": floor_s / num_batches * 1e3,
                "precisebn_ratio": timings["precisebn"].ratio,
                "fvcore_ratio": timings["fvcore"].ratio,
                "overhead_per_batch_us": (pbn_s - floor_s) / num_batches * 1e6,
            }
        )
    return {"workload": f"mlp (6 BN layers), batch {batch}, {num_batches} batches", "rows": rows}
