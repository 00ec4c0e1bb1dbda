"""How many batches? The standard errors precisebn reports, what they cost, and ``tol=``.

- **Cost.** The same run with ``return_info=True`` (which adds the standard-error sums)
  against the default run (which does not), side by side with the floor; the ratio of
  the two is paired per round.
- **Batches to reach tol.** Runs with ``tol=`` on a lazy stream of fresh batches, capped:
  how many batches each used, whether it converged, and its worst channel's relative
  standard error.
- **Reported against actual errors.** A long reference run gives the "truth"; runs of
  ``B`` batches on other fresh batches report their relative standard errors, and their
  actual distance from the reference shows whether those are right (RMS over channels).
- **Effective number of values.** Each layer's ``n_eff`` against ``N``, its values per
  channel (``batch * H * W`` per batch for a 2-D conv, read from the layer's input shape).

Every input is the synthetic Gaussian stream of `bench.models.iter_batches`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import precisebn
from bench.methods import bn_layers, floor, run_precisebn
from bench.models import CNN, MLP, Workload, iter_batches, make_batches, make_model
from bench.timing import interleaved, speed_row

ERRORS_TARGET = 1.01
"""What the standard errors may cost: precisebn with them / without them, per round."""
COST_ROUNDS = 3
"""The full run's cost figure runs this many times the bench's rounds."""
SIZES = (16, 32, 64, 128, 256)
"""Batches per run in the reported-against-actual figure (those above ``long / 4`` dropped)."""
RUNS = 4
"""Disjoint runs per batch count in that figure."""
TOLS = (1e-2, 1e-3)
REFERENCE_SEED = 10_000
"""Seed of the long reference run's batches; the shorter runs draw from other seeds."""


Result = tuple[dict[str, Tensor], precisebn.RunInfo]
"""A run's buffers and its info (``return_info=True``)."""


def with_errors(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """`run_precisebn` with ``return_info=True``: the standard errors are computed."""
    new, _info = precisebn.recompute_bn_buffers(
        model, batches, num_batches=len(batches), return_info=True
    )
    return new


def cost(rows: Sequence[tuple[Workload, int, int]], *, repeats: int) -> list[dict[str, Any]]:
    """Speed rows of the floor, precisebn (no errors) and precisebn with errors, plus
    per-round ratios with errors / precisebn (``errors_ratios``) and their summary."""
    methods = {"floor": floor, "precisebn": run_precisebn, "with errors": with_errors}
    out: list[dict[str, Any]] = []
    for workload, batch, n in rows:
        model = make_model(workload)
        batches = make_batches(workload, [batch] * n)
        timings = interleaved(methods, model, batches, repeats=repeats)
        row: dict[str, Any] = speed_row(f"{workload.name} batch {batch}", n, timings)
        ratios = timings["with errors"].over(timings["precisebn"])
        row["errors_ratios"] = ratios
        row["errors_ratio"] = statistics.median(ratios)
        # The paired ratio's share of a run without errors, per batch: the noise of one
        # method's median does not enter.
        per_batch = timings["precisebn"].median / n
        row["errors_us_per_batch"] = (row["errors_ratio"] - 1) * per_batch * 1e6
        out.append(row)
        print(f"  errors: cost, {row['workload']} done", flush=True)
    return out


def values_per_sample(workload: Workload, model: nn.Module) -> dict[str, int]:
    """Per BN layer, values per sample and channel (``H * W`` for a 2-D conv, 1 for 1-D).

    Read once from each layer's input shape by a forward pre-hook on a batch of two.
    """
    sizes: dict[str, int] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: sizes.__setitem__(
                name, args[0][0, 0].numel() if args[0].dim() > 2 else 1
            )
        )
        for name, layer in bn_layers(model).items()
    ]
    try:
        with torch.no_grad():
            model(next(iter_batches(workload, [2])))
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _layers(info: precisebn.RunInfo) -> list[str]:
    suffix = ".running_mean"
    return [key[: -len(suffix)] for key in info.stderr if key.endswith(suffix)]


def worst_relative_error(result: Result) -> tuple[float, str]:
    """The largest ``max(stderr(mean) / std, stderr(var) / var)`` over channels, and its
    layer (channels without values are skipped)."""
    new, info = result
    worst, where = -math.inf, ""
    for layer in _layers(info):
        var = new[f"{layer}.running_var"].double()
        rel = torch.maximum(
            info.stderr[f"{layer}.running_mean"] / var.sqrt(),
            info.stderr[f"{layer}.running_var"] / var,
        )
        rel = rel[~rel.isnan()]
        if rel.numel() and rel.max().item() > worst:
            worst, where = rel.max().item(), layer
    return worst, where


def _quiet_run(
    model: nn.Module, batches: Any, *, num_batches: int, tol: float | None = None
) -> Result:
    """A recompute run with its info; not reaching ``tol`` warns, which a bench expects
    and ignores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return precisebn.recompute_bn_buffers(
            model, batches, num_batches=num_batches, tol=tol, return_info=True
        )


def n_eff_rows(
    n_eff: dict[str, float], per_sample: dict[str, int], samples: int
) -> list[dict[str, Any]]:
    """Per layer: ``n_eff`` against ``N``, its values per channel in a run of ``samples``."""
    return [
        {
            "layer": layer,
            "values": samples * per_sample[layer],
            "n_eff": value,
            "n_eff_over_values": value / (samples * per_sample[layer]),
        }
        for layer, value in n_eff.items()
    ]


def batches_to_tol(
    workload: Workload, batch: int, tol: float, cap: int, *, seed: int = 3
) -> dict[str, Any]:
    """One ``tol=`` run on a lazy stream of at most ``cap`` fresh batches."""
    model = make_model(workload)
    start = time.perf_counter()
    result = _quiet_run(
        model, iter_batches(workload, [batch] * cap, seed=seed), num_batches=cap, tol=tol
    )
    wall = time.perf_counter() - start
    worst, layer = worst_relative_error(result)
    info = result[1]
    # Errors shrink as 1/sqrt(B): the batches a run that missed tol would have needed.
    needed = info.num_batches * (worst / tol) ** 2
    return {
        "workload": f"{workload.name} batch {batch}",
        "tol": tol,
        "cap": cap,
        "num_batches": info.num_batches,
        "converged": info.converged,
        "worst": worst,
        "worst_layer": layer,
        "needed": needed if not info.converged else None,
        "wall_s": wall,
        "n_eff": n_eff_rows(info.n_eff, values_per_sample(workload, model), info.num_samples),
    }


def _relative(result: Result, ref: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per statistic, (reported, actual) relative errors of every channel of every layer,
    both on the reference's scale: ``/ std_ref`` for the mean, ``/ var_ref`` for the var."""
    new, info = result
    parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {"mean": ([], []), "var": ([], [])}
    for layer in _layers(info):
        mean_key, var_key = f"{layer}.running_mean", f"{layer}.running_var"
        var_ref = ref[var_key].double()
        std_ref = var_ref.sqrt()
        reported, actual = parts["mean"]
        reported.append(info.stderr[mean_key] / std_ref)
        actual.append((new[mean_key].double() - ref[mean_key].double()).abs() / std_ref)
        reported, actual = parts["var"]
        reported.append(info.stderr[var_key] / var_ref)
        actual.append((new[var_key].double() - var_ref).abs() / var_ref)
    return {stat: (torch.cat(r), torch.cat(a)) for stat, (r, a) in parts.items()}


def _rms(values: Sequence[Tensor]) -> float:
    x = torch.cat(list(values))
    x = x[x.isfinite()]
    return math.sqrt(x.square().mean().item()) if x.numel() else math.nan


def error_vs_batches(
    workload: Workload,
    batch: int,
    *,
    long: int,
    sizes: Sequence[int] = SIZES,
    runs: int = RUNS,
) -> dict[str, Any]:
    """Reported and actual relative errors (RMS over channels and runs) per batch count.

    The reference is one run over ``long`` fresh batches; its own error is about
    ``sqrt(B / long)`` of a ``B``-batch run's, so the actual error seen against it is about
    ``sqrt(1 + B / long)`` times the true one (``expected_ratio``).
    """
    model = make_model(workload)
    per_sample = values_per_sample(workload, model)
    start = time.perf_counter()
    ref = _quiet_run(
        model,
        iter_batches(workload, [batch] * long, seed=REFERENCE_SEED),
        num_batches=long,
    )
    ref_reported = _relative(ref, ref[0])
    rows = []
    n_eff: list[dict[str, Any]] = []
    kept = [b for b in sizes if b <= long // 4]
    for i, b in enumerate(kept):
        samples: dict[str, tuple[list[Tensor], list[Tensor]]] = {
            "mean": ([], []),
            "var": ([], []),
        }
        by_layer: dict[str, list[float]] = {}
        for r in range(runs):
            seed = REFERENCE_SEED + 1 + i * runs + r
            new = _quiet_run(model, iter_batches(workload, [batch] * b, seed=seed), num_batches=b)
            for stat, (reported, actual) in _relative(new, ref[0]).items():
                samples[stat][0].append(reported)
                samples[stat][1].append(actual)
            for layer, value in new[1].n_eff.items():
                by_layer.setdefault(layer, []).append(value)
        # Kept from the last (longest) batch count: per layer the median over its runs.
        medians = {layer: statistics.median(values) for layer, values in by_layer.items()}
        n_eff = n_eff_rows(medians, per_sample, batch * b)
        row: dict[str, Any] = {
            "batches": b,
            "runs": runs,
            "expected_ratio": math.sqrt(1 + b / long),
        }
        for stat, (reported_runs, actual_runs) in samples.items():
            row[f"reported_{stat}"] = _rms(reported_runs)
            row[f"actual_{stat}"] = _rms(actual_runs)
            row[f"ratio_{stat}"] = row[f"actual_{stat}"] / row[f"reported_{stat}"]
        rows.append(row)
    print(f"  errors: {workload.name} against batches done", flush=True)
    return {
        "workload": f"{workload.name} batch {batch}",
        "long": long,
        "reference_reported_mean": _rms([ref_reported["mean"][0]]),
        "reference_reported_var": _rms([ref_reported["var"][0]]),
        "rows": rows,
        "n_eff": n_eff,
        "wall_s": time.perf_counter() - start,
    }


def run(*, quick: bool, repeats: int) -> dict[str, Any]:
    """Every figure of this module, as JSON-serialisable results."""
    cost_rows = [(CNN, 32, 8), (MLP, 128, 100)] if quick else [(CNN, 32, 32), (MLP, 128, 200)]
    caps = {CNN.name: 64, MLP.name: 1024} if quick else {CNN.name: 1024, MLP.name: 4096}
    curves = [(MLP, 128, 1024)] if quick else [(CNN, 32, 1024), (MLP, 128, 2048)]
    # A 1% difference is within one round's noise on a shared machine: triple the rounds
    # (not in the quick run, which only has to show that the figure works).
    rounds = repeats if quick else COST_ROUNDS * repeats
    out: dict[str, Any] = {"cost": cost(cost_rows, repeats=rounds)}
    tol_rows = []
    for workload, batch in ((CNN, 32), (MLP, 128)):
        for tol in TOLS:
            tol_rows.append(batches_to_tol(workload, batch, tol, caps[workload.name]))
    print("  errors: batches to tol done", flush=True)
    out["tol"] = tol_rows
    out["curves"] = [
        error_vs_batches(workload, batch, long=long) for workload, batch, long in curves
    ]
    # n_eff per layer: from the longest runs of each curve, and for a workload without a
    # curve, from its longest tol= run.
    n_eff = [
        {"workload": c["workload"], "batches": c["rows"][-1]["batches"], "rows": c["n_eff"]}
        for c in out["curves"]
    ]
    for workload in sorted({r["workload"] for r in tol_rows} - {c["workload"] for c in n_eff}):
        longest = max(
            (r for r in tol_rows if r["workload"] == workload), key=lambda r: r["num_batches"]
        )
        n_eff.append(
            {"workload": workload, "batches": longest["num_batches"], "rows": longest["n_eff"]}
        )
    out["n_eff"] = n_eff
    return out
