"""GPU figures in one short run: ``python bench/gpu.py`` (under 5 minutes on one GPU
without the compiled parts).

Speed table (float32, bf16 autocast, channels_last) of every method against the floor,
side by side and interleaved as on the CPU; ``recompute_bn_buffers`` and the functional
update loop against the floor on the bench CNN and torchvision's ResNet-18 and ResNet-50
layouts (``bench/overhead.py``); host-device synchronisations per batch of
every method (counted with ``torch.cuda.set_sync_debug_mode("warn")`` at two loader
lengths); a hard check that precisebn's batch loop never synchronises
(``set_sync_debug_mode("error")`` from the second batch to the end of the loop); the
CNN exactness row on the GPU; and the many-models rows of ``bench/many.py`` (quick sizes:
``recompute_bn_buffers_many``, ``vmap``, sequential precisebn and update_bn, on a free and
an image-decoding loader, plus the vmapped-forward reference point). Compiled runs
(``bench/compiled.py``, float32): the compiled recompute against the compiled forward on
the bench CNN, the ResNet-18 layout and the detection-style net (``layers=`` its
backbone), with compile times and the repeated run; the syncs per batch of the compiled
forward and the compiled recompute, and the same hard check on the compiled run's batch
loop. The compiled parts add a few minutes of compiling; ``--only NAME`` (repeatable)
runs some parts alone, e.g. ``--only compiled --only compiled_syncs``. Writes
``bench/results/gpu.json`` and ``bench/results/gpu.md`` (which ``bench/run.py`` includes in
``docs/benchmarks.md``). Without CUDA it says so and exits 0; it exits 1 when a hard sync
check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import precisebn  # noqa: E402
from bench import compiled, exactness, many, overhead, report  # noqa: E402
from bench.methods import METHODS, Method  # noqa: E402
from bench.models import (  # noqa: E402
    CNN,
    CONV3D,
    DETECTOR,
    MLP,
    RESNET18,
    RESNET50,
    Workload,
    batch_sizes,
    detector_backbone,
    make_batches,
    make_model,
)
from bench.timing import interleaved, speed_row  # noqa: E402

VARIANTS = ("float32", "bf16 autocast", "channels_last")


def _autocast(method: Method) -> Method:
    def run(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return method(model, batches)

    return run


def prepared(
    workload: Workload, batch: int, n: int, variant: str, device: torch.device
) -> tuple[nn.Module, list[Tensor], dict[str, Method]]:
    """The model, batches and methods for one row of the speed table."""
    model = make_model(workload).to(device)
    batches = make_batches(workload, [batch] * n, device=device.type)
    methods = dict(METHODS)
    if variant == "bf16 autocast":
        methods = {name: _autocast(m) for name, m in methods.items()}
    elif variant == "channels_last":
        fmt = torch.channels_last if len(workload.sample_shape) == 3 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        batches = [b.contiguous(memory_format=fmt) for b in batches]
    return model, batches, methods


def speed(device: torch.device, repeats: int, n: int) -> list[dict[str, Any]]:
    rows = []
    for workload, batch in ((CNN, 32), (CNN, 128), (MLP, 128), (CONV3D, 8)):
        for variant in VARIANTS:
            if variant == "channels_last" and len(workload.sample_shape) < 3:
                continue
            model, batches, methods = prepared(workload, batch, n, variant, device)
            timings = interleaved(methods, model, batches, repeats=repeats, device=device)
            rows.append(speed_row(f"{workload.name} batch {batch}, {variant}", n, timings))
            print(f"  {rows[-1]['workload']} done", flush=True)
    return rows


def count_syncs(call: Callable[[], object]) -> int:
    """Synchronising CUDA calls made by ``call()`` (sync debug mode "warn")."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def syncs_per_batch(device: torch.device) -> dict[str, dict[str, float]]:
    """Per method: syncs for 4 and 12 batches, and the per-batch slope (0 means none)."""
    model = make_model(CNN).to(device)
    out = {}
    for name, method in METHODS.items():
        counts = {}
        for n in (4, 12):
            batches = make_batches(CNN, [32] * n, device=device.type)
            fresh = copy.deepcopy(model)
            method(copy.deepcopy(model), batches)  # warm-up: lazy set-up is not per batch
            counts[n] = count_syncs(lambda m=method, f=fresh, b=batches: m(f, b))
        out[name] = {"4": counts[4], "12": counts[12], "per_batch": (counts[12] - counts[4]) / 8}
    return out


def _guarded(batches: Sequence[Tensor]) -> Iterator[Tensor]:
    """Yield the batches; from the second on, any host-device sync raises."""
    it = iter(batches)
    yield next(it)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield from it
    finally:
        torch.cuda.set_sync_debug_mode("default")


def no_sync_check(device: torch.device) -> str:
    """Run precisebn with sync debug mode "error" around the batch loop (after batch 0)."""
    model = make_model(CNN).to(device)
    batches = make_batches(CNN, [32] * 8, device=device.type)
    precisebn.recompute_bn_buffers(model, batches)  # warm-up
    try:
        # num_batches > len: the loop asks for one more batch, so the guard is lifted
        # (generator exhausted) before finalize, which reads the counts once.
        precisebn.recompute_bn_buffers(model, _guarded(batches), num_batches=len(batches) + 1)
    except RuntimeError as error:
        return f"FAILED: a host-device sync inside the batch loop: {error}"
    return "passed: no host-device sync in precisebn's batch loop (8 batches, mode 'error')"


def compiled_rows(device: torch.device, repeats: int, n: int) -> dict[str, Any]:
    """The rows of ``bench/compiled.py`` on the GPU (float32): compiled recompute against
    the compiled forward, compile times, the repeated run, the detector's pruned graph."""
    cases = [
        compiled.Case(CNN, 32, n, compiled.CLASSIFIER_TARGET),
        compiled.Case(RESNET18, 16, n, compiled.CLASSIFIER_TARGET),
        compiled.Case(
            DETECTOR, 8, n, compiled.PRUNED_TARGET, detector_backbone, "backbone", "pruned"
        ),
    ]
    return compiled.run(quick=False, repeats=repeats, device=device, cases=cases)


def compiled_syncs(
    device: torch.device, options: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Syncs for 4 and 12 batches and the per-batch slope, of the compiled forward and the
    compiled recompute (each compiled and warmed up first), CNN batch 32."""
    options = options or {}
    model = make_model(CNN).to(device)
    forward = cast(nn.Module, torch.compile(copy.deepcopy(model), **options))

    def run_forward(batches: Sequence[Tensor]) -> object:
        return METHODS["floor"](forward, batches)

    def run_recompute(batches: Sequence[Tensor]) -> object:
        return precisebn.recompute_bn_buffers(model, batches, compile=options or True)

    out = {}
    for name, method in (("compiled forward", run_forward), ("compiled recompute", run_recompute)):
        counts = {}
        for n in (4, 12):
            batches = make_batches(CNN, [32] * n, device=device.type)
            method(batches)  # warm-up: compiles on the first call
            counts[n] = count_syncs(lambda m=method, b=batches: m(b))
        out[name] = {"4": counts[4], "12": counts[12], "per_batch": (counts[12] - counts[4]) / 8}
    return out


def compiled_no_sync_check(device: torch.device, options: dict[str, Any] | None = None) -> str:
    """The compiled run under sync debug mode "error" from its second batch to the end of
    its batch loop: 0 host-device syncs per batch, or the error."""
    model = make_model(CNN).to(device)
    batches = make_batches(CNN, [32] * 8, device=device.type)
    how = options or True
    with compiled.watched() as warm:
        precisebn.recompute_bn_buffers(model, batches, compile=how)  # warm-up: compiles
    with compiled.watched() as watch:
        try:
            n = len(batches) + 1  # the guard is lifted before finalize (see no_sync_check)
            precisebn.recompute_bn_buffers(model, _guarded(batches), num_batches=n, compile=how)
        except RuntimeError as error:
            return f"FAILED: a host-device sync inside the compiled batch loop: {error}"
    if warm.eager or watch.eager:
        return f"FAILED: the run fell back to eager: {(warm.eager + watch.eager)[0]}"
    return (
        "passed: 0 host-device syncs per batch in the compiled run's batch loop "
        f"(batches 2-8, mode 'error'; {watch.graphs} new graphs)"
    )


def gpu_exactness(device: torch.device) -> dict[str, Any]:
    model = make_model(CNN).to(device)
    batches = make_batches(CNN, batch_sizes(8, 32, ragged=True), device=device.type)
    return {k: asdict(v) for k, v in exactness.all_errors(model, batches).items()}


def many_rows(device: torch.device, repeats: int) -> dict[str, Any]:
    """The rows of ``bench/many.py`` at its quick sizes, on the GPU (the costly loader
    decodes on the CPU and copies each batch to the GPU, as a loader without workers)."""
    return many.run(quick=True, repeats=repeats, device=device)


def markdown(results: dict[str, Any]) -> str:
    """``bench/results/gpu.md``: every part this run has (``--only`` runs some)."""
    lines = [
        f"Card: {results['card']}, torch {results['torch']}, CUDA {results['cuda']}; "
        f"`python bench/gpu.py`, {results['wall_s']:.0f} s.",
        "",
    ]
    if "speed" in results:
        lines += [report.speed_table(results["speed"]), ""]
    lines += _overhead_part(results)
    if "syncs" in results:
        syncs = results["syncs"]
        lines += [
            "Host-device synchronisations (sync debug mode 'warn'), CNN batch 32:",
            "",
            "| method | 4 batches | 12 batches | per batch |",
            "|---|---|---|---|",
            *(
                f"| {name} | {s['4']} | {s['12']} | {s['per_batch']:g} |"
                for name, s in syncs.items()
            ),
            "",
        ]
    if "no_sync_check" in results:
        lines += [
            f"precisebn under `set_sync_debug_mode('error')`: {results['no_sync_check']}",
            "",
        ]
    if "exactness_cnn_ragged" in results:
        errs = results["exactness_cnn_ragged"]
        lines += [
            "CNN, ragged batches, on the GPU (mean / var error):",
            "",
            "| method | mean | var |",
            "|---|---|---|",
            *(f"| {n} | {e['mean']:.1e} | {e['var']:.1e} |" for n, e in errs.items()),
        ]
    lines += _compiled_part(results)
    lines += _many_part(results)
    return "\n".join(lines)


def _compiled_part(results: dict[str, Any]) -> list[str]:
    """The compiled rows and their syncs, where this run has them."""
    lines = []
    if "compiled" in results:
        data = results["compiled"]
        lines += [
            "",
            "Compiled runs (`bench/compiled.py` on the GPU, float32; see the CPU section "
            "*Compiled runs* for the methods): the compiled recompute against the compiled "
            "forward, compile times and the repeated run:",
            "",
            report.compiled_tables(data),
        ]
    if "compiled_syncs" in results:
        lines += [
            "",
            "Host-device synchronisations of the compiled runs (sync debug mode 'warn'), "
            "CNN batch 32, each compiled and warmed up first:",
            "",
            "| method | 4 batches | 12 batches | per batch |",
            "|---|---|---|---|",
            *(
                f"| {name} | {s['4']} | {s['12']} | {s['per_batch']:g} |"
                for name, s in results["compiled_syncs"].items()
            ),
        ]
    if "compiled_no_sync_check" in results:
        lines += [
            "",
            "Compiled recompute under `set_sync_debug_mode('error')`: "
            + results["compiled_no_sync_check"],
        ]
    return lines


def recorder_speed(device: torch.device, repeats: int, n: int) -> list[dict[str, Any]]:
    """The floor, ``recompute`` and the ``update loop`` of ``bench/overhead.py``."""
    rows = [(CNN, 32, n), (RESNET18, 16, n), (RESNET50, 8, n)]
    return overhead.speed(rows, repeats=repeats, device=device)


def _overhead_part(results: dict[str, Any]) -> list[str]:
    """The recorder's speed table, where this run has it (older results do not)."""
    if "overhead" not in results:
        return []
    targets = {"recompute_target": overhead.RECOMPUTE_TARGET}
    targets["update_target"] = overhead.UPDATE_TARGET
    return [
        "recompute_bn_buffers and the functional update loop (`precisebn.recorder`) "
        "against the floor (float32):",
        "",
        report.overhead_speed_table(results["overhead"], targets),
        "",
    ]


def _many_part(results: dict[str, Any]) -> list[str]:
    """The many-models tables, where this run has them (older results do not)."""
    if "many" not in results:
        return []
    return [
        "",
        f"Many models, one pass (K = {results['many']['k']}, `bench/many.py` at its quick "
        "sizes; ratios to the sequential precisebn runs, paired per round):",
        "",
        report.many_tables(results["many"]),
    ]


SECTIONS = (
    "no_sync_check",
    "syncs",
    "exactness",
    "speed",
    "overhead",
    "compiled",
    "compiled_syncs",
    "many",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="precisebn GPU figures")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this part (repeatable); default: all. The compiled parts compile a "
        "graph per model: a few minutes in all",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU figures skipped (nothing written)")
        return 0
    only = set(args.only or SECTIONS)
    start = time.perf_counter()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if "no_sync_check" in only:
        results["no_sync_check"] = no_sync_check(device)
        print(" ", results["no_sync_check"], flush=True)
    if "syncs" in only:
        results["syncs"] = syncs_per_batch(device)
    if "exactness" in only:
        results["exactness_cnn_ragged"] = gpu_exactness(device)
    if "speed" in only:
        results["speed"] = speed(device, args.repeats, args.batches)
    if "overhead" in only:
        results["overhead"] = recorder_speed(device, args.repeats, args.batches)
    if "compiled_syncs" in only:
        results["compiled_no_sync_check"] = compiled_no_sync_check(device)
        print(" ", results["compiled_no_sync_check"], flush=True)
        results["compiled_syncs"] = compiled_syncs(device)
    if "compiled" in only:
        results["compiled"] = compiled_rows(device, args.repeats, args.batches)
    if "many" in only:
        results["many"] = many_rows(device, args.repeats)
    results["wall_s"] = time.perf_counter() - start
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = out_dir / "gpu.json"
    if args.only and earlier.exists():  # keep the parts not run from the last results
        results = {**json.loads(earlier.read_text()), **results}
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out_dir / "gpu.md").write_text(text + "\n")
    print(text)
    checks = [results.get(k, "passed") for k in ("no_sync_check", "compiled_no_sync_check")]
    return 0 if all(c.startswith("passed") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
