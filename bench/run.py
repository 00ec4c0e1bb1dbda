"""Run the precisebn benchmarks: ``python bench/run.py [--quick] [--name NAME]``.

Measures speed, exactness, memory and scaling of precisebn, fvcore, torch's update_bn
and the seed algorithm side by side; where precisebn's time goes against the bare forward
(``recompute_bn_buffers`` and the functional update loop, per intercepted call, per
update, and what the block fold saves: ``bench/overhead.py``); the compiled recompute
against the compiled forward, compile times included, and what its graph leaves out
(``bench/compiled.py``, full run only); what copy on write costs in memory
(``bench/guarantees.py``); how its standard errors and ``tol=`` behave
(``bench/errors.py``); and how many models fare in one pass over the data against one
pass each (``bench/many.py``). Writes ``bench/results/<name>.json`` and regenerates
``docs/benchmarks.md`` (plus PNG plots when matplotlib is installed). The quick mode takes
under 2 minutes on 2 CPU cores (it has no compiled rows), the full run about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import (  # noqa: E402
    compiled,
    errors,
    exactness,
    guarantees,
    many,
    memory,
    overhead,
    report,
    scaling,
)
from bench.methods import METHODS  # noqa: E402
from bench.models import (  # noqa: E402
    CNN,
    CONV3D,
    MLP,
    Workload,
    batch_sizes,
    bn_mlp,
    make_batches,
    make_model,
    tabular_workload,
)
from bench.timing import interleaved, speed_row  # noqa: E402


@dataclass(frozen=True)
class Config:
    """How much of each figure to run."""

    speed: list[tuple[Workload, int, int]]  # (workload, batch, number of batches)
    repeats: int
    exact_batches: int
    small_batches: int
    memory_sizes: list[int]
    tensor_sizes_max: int  # profile live tensor bytes only up to this many batches (slow)
    scaling_counts: list[int]
    scaling_widths: list[int]
    scaling_width_batches: int  # batches per call in the channel-count figure
    scaling_repeats: int


QUICK = Config(
    speed=[(CNN, 32, 8), (CNN, 128, 2), (MLP, 128, 100), (CONV3D, 8, 32)],
    repeats=5,
    exact_batches=6,
    small_batches=64,
    memory_sizes=[100],
    tensor_sizes_max=100,
    scaling_counts=[8, 16, 32],
    scaling_widths=[64, 256, 1024],
    scaling_width_batches=32,
    scaling_repeats=3,
)
FULL = Config(
    speed=[(CNN, 32, 32), (CNN, 128, 8), (MLP, 128, 200), (CONV3D, 8, 64)],
    repeats=11,
    exact_batches=15,
    small_batches=256,
    memory_sizes=[10, 100, 1000],
    tensor_sizes_max=1000,
    scaling_counts=[10, 20, 40, 80, 160],
    scaling_widths=[32, 64, 128, 256, 512, 1024],
    scaling_width_batches=100,
    scaling_repeats=7,
)
SMALL_MLP = Workload("mlp small", lambda: bn_mlp(16, 32, 3), (16,))


def run_speed(config: Config) -> list[dict[str, Any]]:
    rows = []
    for workload, batch, n in config.speed:
        model = make_model(workload)
        batches = make_batches(workload, [batch] * n)
        timings = interleaved(METHODS, model, batches, repeats=config.repeats)
        rows.append(speed_row(f"{workload.name} batch {batch}", n, timings))
        print(f"  speed: {rows[-1]['workload']} done", flush=True)
    return rows


def exactness_cases(config: Config) -> list[tuple[str, Workload, list[int], float]]:
    """(label, workload, batch sizes, mean/std of the first BN's input) per exactness row."""
    n = config.exact_batches
    cases = [("cnn, ragged batches", CNN, batch_sizes(n, 16, ragged=True), 0.0)]
    for ratio in (1e3, 1e4):
        sizes = batch_sizes(3 * n, 64, ragged=True)
        label = f"tabular, mean = {ratio:g} x std, ragged"
        cases.append((label, tabular_workload(ratio), sizes, ratio))
    for b in (2, 4):
        cases.append((f"mlp, batches of {b}", SMALL_MLP, [b] * config.small_batches, 0.0))
    return cases


def run_exactness(config: Config) -> list[dict[str, Any]]:
    rows = []
    for label, workload, sizes, ratio in exactness_cases(config):
        model = make_model(workload)
        batches = make_batches(workload, sizes)
        errs = exactness.all_errors(model, batches)
        rows.append(
            {
                "case": label,
                "mean_over_std": ratio,
                "batch_sizes": sizes,
                "errors": {name: asdict(e) for name, e in errs.items()},
            }
        )
    print("  exactness done", flush=True)
    return rows


def run_memory(config: Config) -> dict[str, Any]:
    methods = memory.table(config.memory_sizes, tensors_up_to=config.tensor_sizes_max)
    print("  memory done", flush=True)
    return {
        "what": (memory.__doc__ or "").strip().replace("\n", " ")
        + f" Model: {memory.WORKLOAD.name} (4 BN layers of 512), batch {memory.BATCH}.",
        "stats_mib": memory.stats_mib(),
        "methods": methods,
    }


def run_scaling(config: Config) -> dict[str, Any]:
    out = {
        "batches": scaling.vs_batches(
            config.scaling_counts, batch=32, repeats=config.scaling_repeats
        ),
        "channels": scaling.vs_channels(
            config.scaling_widths,
            batch=32,
            num_batches=config.scaling_width_batches,
            repeats=config.scaling_repeats,
        ),
    }
    print("  scaling done", flush=True)
    return out


def machine() -> str:
    cores = os.cpu_count()
    return f"{platform.machine()} CPU, {cores} cores ({platform.processor() or 'unknown model'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes")
    parser.add_argument("--name", help="results name (default: quick or full)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--note", default="", help="free text about the machine, e.g. 'shared'")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    name = args.name or ("quick" if args.quick else "full")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "name": name,
            "quick": args.quick,
            "machine": machine() + (f", {args.note}" if args.note else ""),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": "cpu",
            "repeats": config.repeats,
            "cores": os.cpu_count(),
            "malloc": {k: os.environ[k] for k in overhead.TUNED_MALLOC if k in os.environ},
        }
    }
    quick, repeats = args.quick, config.repeats
    sections: dict[str, Callable[[], Any]] = {
        "speed": lambda: run_speed(config),
        "overhead": lambda: overhead.run(quick=quick, repeats=repeats, threads=args.threads),
        # Full run only: compiling takes tens of seconds per graph here.
        "compiled": lambda: compiled.run(quick=quick, repeats=repeats),
        "exactness": lambda: run_exactness(config),
        "memory": lambda: run_memory(config),
        "scaling": lambda: run_scaling(config),
        "guarantees": lambda: guarantees.run(quick=quick),
        "errors": lambda: errors.run(quick=quick, repeats=repeats),
        # Each round of this module runs 8 models several times over: fewer rounds.
        "many": lambda: many.run(quick=quick, repeats=2 if quick else min(repeats, 7)),
    }
    walls: dict[str, float] = {}
    loads: dict[str, list[float]] = {}
    for section, compute in sections.items():
        began, load = time.perf_counter(), os.getloadavg()[0]
        results[section] = compute()
        walls[section] = time.perf_counter() - began
        loads[section] = [load, os.getloadavg()[0]]
    results["meta"]["section_wall_s"] = walls
    results["meta"]["load"] = loads
    results["meta"]["wall_s"] = time.perf_counter() - start
    write(results, name, docs=not args.no_docs)
    print(report.speed_table(results["speed"]))
    print(report.overhead_tables(results["overhead"]))
    print(report.compiled_tables(results["compiled"]))
    print(report.exactness_table(results["exactness"]))
    print(report.memory_table(results["memory"]))
    print(report.scaling_tables(results["scaling"]))
    print(report.guarantees_tables(results["guarantees"]))
    print(report.errors_tables(results["errors"]))
    print(report.many_tables(results["many"]))
    print(f"total {results['meta']['wall_s']:.0f} s")
    return 0


def write(results: dict[str, Any], name: str, *, docs: bool) -> None:
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    if docs:
        gpu = out_dir / "gpu.md"  # written by bench/gpu.py on a CUDA machine
        if gpu.exists():
            results = {**results, "gpu_note": gpu.read_text()}
        docs_dir = ROOT / "docs"
        image_dir = docs_dir / "images" / "benchmarks"  # inside docs/, where mkdocs finds it
        image_dir.mkdir(parents=True, exist_ok=True)
        images = report.plots(results, image_dir, name)
        (docs_dir / "benchmarks.md").write_text(report.markdown(results, images, docs_dir))


if __name__ == "__main__":
    sys.exit(main())
