"""Where precisebn's time goes: the recorder against the bare forward, and why.

- **Speed.** ``recompute`` (`precisebn.recompute_bn_buffers`) and the functional
  ``update loop`` (``rec = precisebn.recorder(model)`` once, then
  ``state = rec.update(state, batch)`` per batch and ``rec.finalize(state)``, all timed)
  against the floor (the bare training-mode forward under ``torch.no_grad()``), side by
  side in one interleaved loop (`bench.timing.interleaved`), on the bench CNN and on
  torchvision's ResNet-18 and ResNet-50 (`bench.models.ResNet`) at 64 x 64.
- **Per call.** Stacks of ``D`` BatchNorm1d layers of 8 channels and nothing else, on
  batches of 4 samples, where the kernels cost next to nothing: the overhead per batch
  over the floor, fitted against ``D`` (least squares), is a cost per intercepted call
  (the slope) plus a cost per batch (the intercept); for the update loop, a cost per
  layer plus one per update.
- **Why.** Per speed workload, the parts of its overhead, each measured on its own: the
  stacks' cost per call times the workload's BN calls; the same calls in situ
  (`in_situ`: the bound forward against a bare copy's, batch by batch, inside a real run);
  a run's fixed cost and an update's cost besides its calls (`fixed_costs`: a forward that
  runs nothing); put together (`predicted`) next to the measured overhead.
- **Block.** ``recompute`` with the fold's block of `precisebn._fold.BLOCK` rows (batch
  moments written by the kernels, pooled every ``BLOCK`` batches) against the same run
  with a block of one row (pooled after every batch), side by side with the floor.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import precisebn
import precisebn._recompute as recompute_module
from bench.methods import Method, bn_layers, floor, run_precisebn
from bench.models import (
    CNN,
    MLP,
    RESNET18,
    RESNET50,
    Workload,
    bn_stack,
    make_batches,
    make_model,
)
from bench.scaling import intercept, slope
from bench.timing import Timing, interleaved, speed_row
from precisebn._fold import BLOCK

ROOT = Path(__file__).resolve().parent.parent
RECOMPUTE_TARGET = 1.03
"""``recompute`` / floor, at most (issue 17)."""
UPDATE_TARGET = 1.05
"""``update loop`` / floor, at most (issue 17)."""
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}
"""glibc settings under which large activations stay mapped between batches: blocks of
up to 64 MiB come from the heap, which keeps up to 256 MiB of freed memory (`speed_tuned`)."""
FIXED_REPEATS = 15
"""Calls per workload behind `fixed_costs` (the median is kept)."""
STACK_WIDTH = 8
STACK_BATCH = 4


def run_update_loop(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """The functional loop: one recorder, ``update`` per batch, ``finalize``."""
    rec = precisebn.recorder(model)
    state = rec.init()
    for batch in batches:
        state = rec.update(state, batch)
    return rec.finalize(state)


SPEED_METHODS: dict[str, Method] = {
    "floor": floor,
    "recompute": run_precisebn,
    "update loop": run_update_loop,
}


def speed(
    rows: Sequence[tuple[Workload, int, int]],
    *,
    repeats: int,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Speed rows of the floor, ``recompute`` and the ``update loop``, with the BN calls
    per batch of each workload."""
    device = device or torch.device("cpu")
    out = []
    for workload, batch, n in rows:
        model = make_model(workload).to(device)
        batches = make_batches(workload, [batch] * n, device=device.type)
        timings = interleaved(SPEED_METHODS, model, batches, repeats=repeats, device=device)
        row: dict[str, Any] = speed_row(f"{workload.name} batch {batch}", n, timings)
        row["bn_calls"] = len(bn_layers(model))
        out.append(row)
        print(f"  overhead: speed, {row['workload']} done", flush=True)
    return out


def speed_tuned(
    rows: Sequence[tuple[Workload, int, int]], *, repeats: int, threads: int
) -> list[dict[str, Any]]:
    """`speed` in a child process with glibc's malloc set by ``TUNED_MALLOC``: by default,
    activations above its mmap threshold are unmapped when freed and page-fault anew on
    every batch."""
    spec = [(w.name, batch, n) for w, batch, n in rows]
    code = (
        "import json, sys, torch; from bench.overhead import speed, workload_named; "
        "torch.set_num_threads(int(sys.argv[3])); "
        "rows = [(workload_named(w), b, n) for w, b, n in json.loads(sys.argv[1])]; "
        "print(json.dumps(speed(rows, repeats=int(sys.argv[2]))))"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **TUNED_MALLOC, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), str(repeats), str(threads)],
        capture_output=True, text=True, check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    print("  overhead: speed with tuned malloc done", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def workload_named(name: str) -> Workload:
    """The speed workloads by name (for the child process of `speed_tuned`)."""
    return {w.name: w for w in (CNN, MLP, RESNET18, RESNET50)}[name]


def stack_workload(depth: int) -> Workload:
    """``depth`` BatchNorm1d layers of ``STACK_WIDTH`` channels (`bench.models.bn_stack`)."""
    name = f"{depth} x BatchNorm1d({STACK_WIDTH})"
    return Workload(name, lambda: bn_stack(depth, STACK_WIDTH), (STACK_WIDTH,))


def per_call(depths: Sequence[int], *, num_batches: int, repeats: int) -> dict[str, Any]:
    """Overhead per batch over the floor of ``recompute`` and the ``update loop`` on BN
    stacks of each depth; fitted: µs per call (slope) and per batch (intercept)."""
    rows = []
    for depth in depths:
        workload = stack_workload(depth)
        model = make_model(workload)
        batches = make_batches(workload, [STACK_BATCH] * num_batches)
        timings = interleaved(SPEED_METHODS, model, batches, repeats=repeats)
        floor_us = timings["floor"].median / num_batches * 1e6
        rows.append(
            {
                "depth": depth,
                "floor_us_per_batch": floor_us,
                **{
                    f"{key}_us_per_batch": _overhead_us(timings[name], floor_us)
                    for key, name in (("recompute", "recompute"), ("update", "update loop"))
                },
            }
        )
    xs = [float(r["depth"]) for r in rows]
    fits = {}
    for key in ("recompute", "update"):
        ys = [r[f"{key}_us_per_batch"] for r in rows]
        fits[key] = {"per_call_us": slope(xs, ys), "per_batch_us": intercept(xs, ys)}
    floor_fit = [r["floor_us_per_batch"] for r in rows]
    print("  overhead: per call done", flush=True)
    return {
        "what": f"BatchNorm1d({STACK_WIDTH}) stacks, batch {STACK_BATCH}, {num_batches} batches",
        "num_batches": num_batches,
        "rows": rows,
        "floor_per_call_us": slope(xs, floor_fit),
        "fits": fits,
    }


def _overhead_us(timing: Timing, floor_us: float) -> float:
    """A method's overhead per batch over the floor: (paired ratio - 1) x floor time."""
    return (timing.ratio - 1.0) * floor_us


class _PairedForward:
    """A ``forward=`` that runs each batch through the bound model and a bare deep copy of
    it (training mode, the same no-grad context), in alternating order, timing both."""

    def __init__(self, model: nn.Module) -> None:
        self.twin = copy.deepcopy(model)
        self.bound: list[float] = []
        self.bare: list[float] = []

    def __call__(self, stateless: Any, x: Tensor) -> Any:
        bound_first = len(self.bound) % 2 == 1
        first, second = (stateless, self.twin) if bound_first else (self.twin, stateless)
        start = time.perf_counter()
        out_first = first(x)
        middle = time.perf_counter()
        out_second = second(x)
        end = time.perf_counter()
        (self.bound if bound_first else self.bare).append(middle - start)
        (self.bare if bound_first else self.bound).append(end - middle)
        return out_first if bound_first else out_second

    def difference_us(self) -> float:
        """Median over batches of bound - bare (µs)."""
        return statistics.median(a - b for a, b in zip(self.bound, self.bare, strict=True)) * 1e6


def in_situ(workload: Workload, batch: int, num_batches: int) -> dict[str, float]:
    """What the intercepted calls and the updates cost inside real runs (µs per batch).

    A `recompute_bn_buffers` run and an update loop, each with a `_PairedForward`:
    ``bound_minus_bare_us`` and ``update_bound_minus_bare_us`` are the medians over batches
    of the bound forward's time minus the bare copy's (the intercepted calls' cost in the
    run), ``update_outside_us`` the median time of an update outside both forwards (its
    cost besides the calls, after a real forward), ``bare_us`` the bare forward's time.
    """
    model = make_model(workload)
    batches = make_batches(workload, [batch] * num_batches)
    paired = _PairedForward(model)
    with torch.no_grad():
        paired.twin(batches[0])  # warm-up of the copy's kernels
    precisebn.recompute_bn_buffers(model, batches, num_batches=num_batches, forward=paired)
    looped = _PairedForward(model)
    rec = precisebn.recorder(model, forward=looped)
    state = rec.init()
    outside = []
    for x in batches:
        start = time.perf_counter()
        state = rec.update(state, x)
        outside.append(time.perf_counter() - start - looped.bound[-1] - looped.bare[-1])
    return {
        "bound_minus_bare_us": paired.difference_us(),
        "bare_us": statistics.median(paired.bare) * 1e6,
        "update_bound_minus_bare_us": looped.difference_us(),
        "update_outside_us": statistics.median(outside) * 1e6,
    }


def _no_forward(_model: Any, _batch: Any) -> None:
    """A forward that runs nothing: what is left of a run is its cost outside the BN calls."""


def fixed_costs(workload: Workload, batch: int, *, repeats: int) -> dict[str, float]:
    """A workload's costs outside its batches' forwards, in µs (median of ``repeats``):

    - ``run_us``: one `precisebn.recompute_bn_buffers` call over one batch with a forward
      that runs nothing (the recorder, the binding's session, the fold and its final
      pooling, the finite check and the new buffers; a run pays it once);
    - ``update_us``: one ``rec.update(state, batch)`` with that forward (the binding
      per call: resolving the weights, a fold, a session, pooling; every update pays it).
    """
    model = make_model(workload)
    x = make_batches(workload, [batch])[0]
    rec = precisebn.recorder(model, forward=_no_forward)
    state = rec.init()
    runs, updates = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no layer is reached: each keeps its buffers
        for i in range(repeats + 1):
            start = time.perf_counter()
            precisebn.recompute_bn_buffers(model, [x], num_batches=1, forward=_no_forward)
            middle = time.perf_counter()
            rec.update(state, x)
            end = time.perf_counter()
            if i:  # the first call of each is a warm-up
                runs.append(middle - start)
                updates.append(end - middle)
    return {"run_us": statistics.median(runs) * 1e6, "update_us": statistics.median(updates) * 1e6}


def predicted(
    speed_rows: list[dict[str, Any]],
    calls: dict[str, Any],
    fixed: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    """Per speed row: the overhead per batch that the parts predict, and the measured one.

    ``recompute``: ``in situ + per batch`` (the BN stacks' fit) ``+ run / n``;
    ``update loop``: its calls in situ + an update's cost outside the forwards in situ
    (``fixed``: `fixed_costs` and `in_situ` of the workload). Measured: (paired ratio to
    the floor - 1) x the floor's median time per batch. ``calls_us`` is what the stacks'
    cost per call predicts for the calls alone.
    """
    out = []
    fit = calls["fits"]["recompute"]
    for row in speed_rows:
        n, ms, bn = row["num_batches"], row["methods"], row["bn_calls"]
        floor_us = ms["floor"]["median_s"] / n * 1e6
        costs = fixed[row["workload"]]
        intercepted = fit["per_call_us"] * bn
        situ = costs["bound_minus_bare_us"]
        out.append(
            {
                "workload": row["workload"],
                "num_batches": n,
                "bn_calls": bn,
                "floor_us": floor_us,
                "calls_us": intercepted,
                "in_situ_us": situ,
                "in_situ_per_call_us": situ / bn,
                "per_batch_us": fit["per_batch_us"],
                "run_us": costs["run_us"],
                "update_us": costs["update_us"],
                "update_per_layer_us": costs["update_us"] / bn,
                "update_in_situ_us": costs["update_outside_us"],
                "update_calls_in_situ_us": costs["update_bound_minus_bare_us"],
                "recompute_predicted_us": situ + fit["per_batch_us"] + costs["run_us"] / n,
                "recompute_measured_us": (ms["recompute"]["ratio_to_floor"] - 1.0) * floor_us,
                "update_predicted_us": costs["update_bound_minus_bare_us"]
                + costs["update_outside_us"],
                "update_measured_us": (ms["update loop"]["ratio_to_floor"] - 1.0) * floor_us,
            }
        )
    return out


@contextmanager
def block_rows(rows: int) -> Iterator[None]:
    """Runs of `precisebn.recompute_bn_buffers` inside pool their fold every ``rows``
    batches (a private hook: `precisebn._recompute._ModelPass` is swapped for a subclass
    whose fold has ``rows`` rows)."""
    base = recompute_module._ModelPass

    class Rows(base):  # type: ignore[misc, valid-type]
        def __init__(self, recorder: Any, weights: Any, *, errors: bool, **options: Any) -> None:
            super().__init__(recorder, weights, errors=errors, **options)
            self.fold = recorder.fold(
                self.resolved, rows=rows, errors=errors, start=None, check=True
            )

    setattr(recompute_module, "_ModelPass", Rows)  # noqa: B010  (mypy: a class attribute)
    try:
        yield
    finally:
        setattr(recompute_module, "_ModelPass", base)  # noqa: B010


def one_row(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """`run_precisebn` with a block of one row: the fold pools after every batch."""
    with block_rows(1):
        return run_precisebn(model, batches)


def block(rows: Sequence[tuple[Workload, int, int]], *, repeats: int) -> list[dict[str, Any]]:
    """Speed rows: floor, ``recompute`` (block of ``BLOCK`` rows) and a block of 1 row;
    ``one_row_ratio``: the paired per-round ratio of the two recomputes."""
    methods = {"floor": floor, f"block of {BLOCK}": run_precisebn, "block of 1": one_row}
    out = []
    for workload, batch, n in rows:
        model = make_model(workload)
        batches = make_batches(workload, [batch] * n)
        timings = interleaved(methods, model, batches, repeats=repeats)
        row: dict[str, Any] = speed_row(f"{workload.name} batch {batch}", n, timings)
        ratios = timings["block of 1"].over(timings[f"block of {BLOCK}"])
        row["one_row_ratios"] = ratios
        row["one_row_ratio"] = statistics.median(ratios)
        out.append(row)
        print(f"  overhead: block, {row['workload']} done", flush=True)
    return out


def run(
    *, quick: bool, repeats: int, threads: int = 1, tuned: bool | None = None
) -> dict[str, Any]:
    """Every figure of this module, as JSON-serialisable results. ``tuned`` (default: the
    full run only) repeats the speed rows in a child process with ``TUNED_MALLOC``."""
    depths: tuple[int, ...]
    if quick:
        speed_rows = [(CNN, 32, 6), (RESNET18, 16, 3), (RESNET50, 8, 3), (MLP, 128, 50)]
        depths, stack_batches = (8, 32), 100
        block_rows_ = [(MLP, 128, 64), (CNN, 32, 8)]
        situ_batches = {CNN.name: 16, RESNET18.name: 4, RESNET50.name: 4, MLP.name: 100}
    else:
        speed_rows = [(CNN, 32, 32), (RESNET18, 16, 16), (RESNET50, 8, 16), (MLP, 128, 200)]
        depths, stack_batches = (8, 16, 32, 64), 200
        block_rows_ = [(MLP, 128, 200), (CNN, 32, 32)]
        situ_batches = {CNN.name: 64, RESNET18.name: 24, RESNET50.name: 16, MLP.name: 400}
    tuned = not quick if tuned is None else tuned
    out: dict[str, Any] = {
        "recompute_target": RECOMPUTE_TARGET,
        "update_target": UPDATE_TARGET,
        "block": BLOCK,
        "speed": speed(speed_rows, repeats=repeats),
    }
    out["per_call"] = per_call(depths, num_batches=stack_batches, repeats=repeats)
    fixed = {
        f"{w.name} batch {batch}": {
            **fixed_costs(w, batch, repeats=FIXED_REPEATS),
            **in_situ(w, batch, situ_batches[w.name]),
        }
        for w, batch, _ in speed_rows
    }
    out["predicted"] = predicted(out["speed"], out["per_call"], fixed)
    print("  overhead: fixed costs done", flush=True)
    if tuned:
        out["speed_tuned"] = speed_tuned(speed_rows, repeats=repeats, threads=threads)
        out["tuned_malloc"] = TUNED_MALLOC
    out["blocks"] = block(block_rows_, repeats=repeats)
    return out
