"""Compiled runs: precisebn's compiled recompute against the compiled forward.

- **Speed.** Four methods side by side in one interleaved loop (`bench.timing.interleaved`):
  the **compiled forward** (``torch.compile`` of a copy of the model, called in training
  mode under ``torch.no_grad()``, compiled and warmed up before timing: the forward
  a user who compiled runs, and the baseline of every ratio), the **compiled
  recompute** (``precisebn.recompute_bn_buffers(model, batches, compile=...)``, its graph
  compiled before timing), the **eager forward** (the floor of the other sections) and the
  **eager recompute** (``compile=False``). The compiled models are not deep-copied per call:
  a copy would be compiled anew. Workloads: the bench CNN, torchvision's ResNet-18 layout
  at 64 x 64 (`bench.models.ResNet`; timm and torchvision are not installable next to the
  bench's torch), and a detection-style net (`bench.models.Detector`: the ResNet-18 trunk,
  an FPN and an FCOS-style GroupNorm head) recomputed with ``layers=`` its backbone's BN
  layers, where the graph leaves the FPN and the head out.
- **Compile time.** The wall time of the first call of each compiled method (one batch),
  each with an empty inductor cache of its own (`cold_cache`), after a throwaway compile
  that pays dynamo's one-time set-up; then amortised over `AMORTISE` batches.
- **Repeated run.** A second ``recompute_bn_buffers(..., compile=...)`` on the same model
  (one batch): its wall time and the graphs dynamo compiled for it (0: the graph is
  cached). The graphs compiled during the timed rounds are counted too, and every
  "runs eagerly" log of precisebn is kept, so a row that fell back to eager says so.
- **Exactness.** The compiled recompute's buffers against the eager recompute's.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

import precisebn
from bench.methods import bn_layers, floor
from bench.models import (
    CNN,
    DETECTOR,
    RESNET18,
    Workload,
    detector_backbone,
    make_batches,
    make_model,
)
from bench.timing import interleaved, same, speed_row, synchronize

AMORTISE = 200
"""Batches a compile is amortised over (``recompute_bn_buffers``'s default ``num_batches``)."""
TARGET = 1.05
"""Compiled recompute / compiled forward, at most (issue 18)."""
CLASSIFIER_TARGET = 1.0
"""Compiled recompute / compiled forward on a plain classifier, at most (issue 18)."""
PRUNED_TARGET = 0.6
"""Compiled recompute of a detector's backbone / the full compiled forward, at most."""
BASELINE = "compiled forward"
METHOD_NAMES = (BASELINE, "compiled recompute", "eager forward", "eager recompute")

Layers = Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class Case:
    """One row: a workload, its batches, which BN layers are recomputed, and the target."""

    workload: Workload
    batch: int
    batches: int
    target: float
    layers: Layers = None
    layers_note: str = "all"
    kind: str = "classifier"
    """``classifier`` (targets `TARGET` and `CLASSIFIER_TARGET`) or ``pruned``."""

    @property
    def label(self) -> str:
        return f"{self.workload.name} batch {self.batch}"


FULL = (
    Case(CNN, 32, 32, CLASSIFIER_TARGET),
    Case(RESNET18, 16, 16, CLASSIFIER_TARGET),
    Case(DETECTOR, 8, 8, PRUNED_TARGET, detector_backbone, "backbone", "pruned"),
)


@dataclass
class Watch:
    """What precisebn logged ("runs eagerly") and dynamo compiled while watched."""

    eager: list[str] = field(default_factory=list)
    graphs: int = 0


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "eagerly" in message:
            self.into.append(message)


@contextmanager
def watched() -> Iterator[Watch]:
    """Collect precisebn's fallback logs and count the graphs dynamo compiles."""
    watch = Watch()
    logger = logging.getLogger("precisebn")
    handler, level = _Collect(watch.eager), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    before = _graphs()
    try:
        yield watch
    finally:
        watch.graphs = _graphs() - before
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def cold_cache(root: str | None) -> Iterator[None]:
    """Compile into an empty inductor cache (a new folder under ``root``), so the first
    call's time is a compile from scratch, not a read of an earlier run's artifacts."""
    if root is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(tempfile.mkdtemp(dir=root)):
        yield


def warm_up_compiler(device: torch.device, options: Mapping[str, Any], root: str | None) -> float:
    """A throwaway compile: dynamo's and the backend's one-time set-up (imports, worker
    pools) is paid here, not by the first compile measured. Returns its seconds."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    start = time.perf_counter()
    with cold_cache(root), torch.no_grad():
        torch.compile(conv, **options)(x)
    synchronize(device)
    return time.perf_counter() - start


def _timed(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def relative_difference(got: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> dict[str, float]:
    """Worst over layers and channels: |mean - ref| / (|ref| + ref std), |var - ref| / ref."""
    mean = var = 0.0
    for key, r in ref.items():
        if not key.endswith("running_mean"):
            continue
        rv = ref[key.removesuffix("mean") + "var"].double()
        g, gv = got[key].double(), got[key.removesuffix("mean") + "var"].double()
        scale = r.double().abs() + rv.sqrt()
        mean = max(mean, ((g - r.double()).abs() / scale).max().item())
        var = max(var, ((gv - rv).abs() / rv).max().item())
    return {"mean": mean, "var": var}


def time_case(
    case: Case,
    *,
    repeats: int,
    device: torch.device | None = None,
    options: Mapping[str, Any] | None = None,
    cache_root: str | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """One row: compile times, the repeated run, the interleaved timings, the difference
    of the compiled buffers from the eager ones, and the fallbacks, if any."""
    device = device or torch.device("cpu")
    options = dict(options or {})
    compile_arg: bool | dict[str, Any] = options or True
    model = make_model(case.workload).to(device)
    batches = make_batches(case.workload, [case.batch] * case.batches, device=device.type)
    eager_model = copy.deepcopy(model)
    compiled_model = cast(nn.Module, torch.compile(copy.deepcopy(model), **options))

    def recompute(batches: Sequence[Tensor], compile: bool | dict[str, Any]) -> dict[str, Tensor]:
        return precisebn.recompute_bn_buffers(
            model, batches, num_batches=len(batches), layers=case.layers, compile=compile
        )

    methods = {
        BASELINE: lambda _, b: floor(compiled_model, b),
        "compiled recompute": lambda _, b: recompute(b, compile_arg),
        "eager forward": lambda _, b: floor(eager_model, b),
        "eager recompute": lambda _, b: recompute(b, False),
    }
    first = batches[:1]
    with watched() as compiling:
        with cold_cache(cache_root):
            forward_s = _timed(lambda: floor(compiled_model, first), device)
        forward_graphs = _graphs()
        with cold_cache(cache_root):
            recompute_s = _timed(lambda: recompute(first, compile_arg), device)
        recompute_graphs = _graphs() - forward_graphs
    with watched() as repeated:
        repeat_s = _timed(lambda: recompute(first, compile_arg), device)
    with watched() as timed:
        timings = interleaved(
            methods,
            model,
            batches,
            repeats=repeats,
            warmup=warmup,
            device=device,
            baseline=BASELINE,
            prepare=same,
        )
    with watched() as checked:
        difference = relative_difference(recompute(batches, compile_arg), recompute(batches, False))
    row: dict[str, Any] = speed_row(case.label, case.batches, timings)
    recomputed = [
        n for n, m in bn_layers(model).items() if case.layers is None or case.layers(n, m)
    ]
    row.update(
        kind=case.kind,
        target=case.target,
        layers=case.layers_note,
        recomputed_layers=len(recomputed),
        bn_layers=len(bn_layers(model)),
        compile_s={"forward": forward_s, "recompute": recompute_s},
        recompute_graphs=recompute_graphs,
        repeat={"seconds": repeat_s, "graphs": repeated.graphs},
        timed_graphs=timed.graphs + checked.graphs,
        eager_fallbacks=compiling.eager + repeated.eager + timed.eager + checked.eager,
        difference=difference,
    )
    return row


def amortised(row: dict[str, Any], n: int = AMORTISE) -> dict[str, float]:
    """ms per batch over a run of ``n`` batches that compiles first, and the batches from
    which the compiled recompute (compile included) beats the eager recompute."""
    per = {name: t["median_s"] / row["num_batches"] for name, t in row["methods"].items()}
    compile_s = row["compile_s"]
    out = {
        "forward_ms": (per[BASELINE] + compile_s["forward"] / n) * 1e3,
        "recompute_ms": (per["compiled recompute"] + compile_s["recompute"] / n) * 1e3,
        "eager_recompute_ms": per["eager recompute"] * 1e3,
    }
    saved = per["eager recompute"] - per["compiled recompute"]
    out["break_even"] = compile_s["recompute"] / saved if saved > 0 else float("inf")
    return out


def run(
    *,
    quick: bool,
    repeats: int,
    device: torch.device | None = None,
    cases: Sequence[Case] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every row of this module, as JSON-serialisable results. A quick run has none
    (compiling costs tens of seconds per graph on a small CPU machine): the full run has
    them."""
    device = device or torch.device("cpu")
    if cases is None:
        cases = () if quick else FULL
    out: dict[str, Any] = {
        "target": TARGET,
        "classifier_target": CLASSIFIER_TARGET,
        "pruned_target": PRUNED_TARGET,
        "amortise": AMORTISE,
        "options": {k: str(v) for k, v in (options or {}).items()},
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    if not cases:
        out["skipped"] = "quick run"
        return out
    start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="bench-inductor-")
    try:
        out["warm_up_s"] = warm_up_compiler(device, options or {}, root)
        for case in cases:
            out["rows"].append(
                time_case(case, repeats=repeats, device=device, options=options, cache_root=root)
            )
            print(f"  compiled: {case.label} done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["wall_s"] = time.perf_counter() - start
    return out
