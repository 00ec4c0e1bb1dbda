"""Tables (Markdown and plain text) and plots from a results dict."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.exactness import MEAN_BOUND, VAR_BOUND, VAR_BOUND_SHIFTED
from bench.methods import ESTIMATORS, METHODS
from precisebn._fold import BLOCK

SPEED_TARGET_FLOOR = 1.05
SPEED_TARGET_FVCORE = 1.0


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def vs_fvcore(row: dict[str, Any]) -> float:
    """Median over rounds of precisebn's time / fvcore's time in the same round."""
    pbn, fv = row["methods"]["precisebn"]["seconds"], row["methods"]["fvcore"]["seconds"]
    return statistics.median(a / b for a, b in zip(pbn, fv, strict=True))


def speed_table(speed: list[dict[str, Any]]) -> str:
    header = ["workload", "batches", "floor ms/batch", *(m for m in METHODS if m != "floor")]
    header += ["precisebn / fvcore", "overhead µs/batch", "target met"]
    rows = []
    for row in speed:
        ms = row["methods"]
        n = row["num_batches"]
        cells = [row["workload"], str(n), f"{ms['floor']['median_s'] / n * 1e3:.2f}"]
        for name in METHODS:
            if name != "floor":
                t = ms[name]
                spread = f"{t['ratio_min']:.2f}-{t['ratio_max']:.2f}"
                cells.append(f"{t['ratio_to_floor']:.3f} ({spread})")
        ratio_fv = vs_fvcore(row)
        overhead = (ms["precisebn"]["median_s"] - ms["floor"]["median_s"]) / n * 1e6
        met = (
            ms["precisebn"]["ratio_to_floor"] <= SPEED_TARGET_FLOOR
            and ratio_fv <= SPEED_TARGET_FVCORE
        )
        cells += [f"{ratio_fv:.3f}", f"{overhead:.0f}", "yes" if met else "**no**"]
        rows.append(cells)
    return _table(header, rows)


def exactness_bounds(case: dict[str, Any]) -> tuple[float, float]:
    """precisebn's (mean, var) bounds for a case: float32, or the shifted-mean var bound."""
    ratio = case.get("mean_over_std", 0.0)
    if ratio >= 1e4:
        return MEAN_BOUND, float("nan")  # no bound stated beyond mean = 1e3 * std
    return MEAN_BOUND, VAR_BOUND_SHIFTED if ratio >= 1e3 else VAR_BOUND


def exactness_table(cases: list[dict[str, Any]]) -> str:
    header = ["case", *(f"{m} mean / var" for m in ESTIMATORS), "precisebn bound", "met"]
    rows = []
    for case in cases:
        errs = case["errors"]
        cells = [case["case"]]
        cells += [f"{errs[m]['mean']:.1e} / {errs[m]['var']:.1e}" for m in ESTIMATORS]
        mean_bound, var_bound = exactness_bounds(case)
        pbn = errs["precisebn"]
        if var_bound == var_bound:  # not NaN
            met = pbn["mean"] <= mean_bound and pbn["var"] <= var_bound
            cells += [f"{mean_bound:.0e} / {var_bound:.0e}", "yes" if met else "**no**"]
        else:
            cells += [f"{mean_bound:.0e} / none stated", "n/a"]
        rows.append(cells)
    return _table(header, rows)


def memory_table(memory: dict[str, Any]) -> str:
    sizes = list(next(iter(memory["methods"].values())))
    header = ["method", *(f"{n} batches: RSS first / repeat; tensors (MiB)" for n in sizes)]
    rows = [
        [name, *(_memory_cell(per[n]) for n in sizes)] for name, per in memory["methods"].items()
    ]
    return _table(header, rows)


def _memory_cell(cell: dict[str, float | None]) -> str:
    tensors = cell.get("tensor_mib")
    shown = "not run" if tensors is None else f"{tensors:.3f}"
    return f"{cell['first_mib']:.1f} / {cell['repeat_mib']:.1f}; {shown}"


def scaling_tables(scaling: dict[str, Any]) -> str:
    nb = scaling["batches"]
    header = [
        "method",
        *(f"{n} batches (ms)" for n in nb["num_batches"]),
        "µs per batch (slope)",
        "ms per call (intercept)",
    ]
    fixed = nb.get("fixed_ms", {})
    rows = [
        [
            name,
            *(f"{s * 1e3:.1f}" for s in secs),
            f"{nb['per_batch_us'][name]:.0f}",
            f"{fixed[name]:.2f}" if name in fixed else "-",
        ]
        for name, secs in nb["median_s"].items()
    ]
    first = f"{nb['workload']}\n\n" + _table(header, rows)
    first += (
        f"\n\nprecisebn overhead over the floor: {nb['overhead_per_batch_us']:.0f} µs per batch, "
        f"{nb['overhead_per_layer_us']:.0f} µs per BN layer per batch."
    )
    ch = scaling["channels"]
    header = ["width", "floor ms/batch", "precisebn / floor", "fvcore / floor", "overhead µs/batch"]
    rows = [
        [
            str(r["width"]),
            f"{r['floor_ms_per_batch']:.2f}",
            f"{r['precisebn_ratio']:.3f}",
            f"{r['fvcore_ratio']:.3f}",
            f"{r['overhead_per_batch_us']:.0f}",
        ]
        for r in ch["rows"]
    ]
    return first + f"\n\n{ch['workload']}\n\n" + _table(header, rows)


def guarantees_tables(data: dict[str, Any]) -> str:
    """Buffer memory, the speed of checked direct batches, and how often the check fires."""
    header = ["model", "buffers (MiB)", "written by the forward (MiB)", "floor tensors (MiB)"]
    header += ["precisebn tensors (MiB)", "precisebn - floor (MiB)"]
    rows = [
        [
            r["model"],
            f"{r['buffers_mib']:.1f}",
            f"{r['written_mib']:.1f}",
            f"{r['floor_mib']:.2f}",
            f"{r['precisebn_mib']:.2f}",
            f"{r['precisebn_mib'] - r['floor_mib']:.2f}",
        ]
        for r in data["buffers"]
    ]
    memory = _table(header, rows)
    names = ["precisebn", "no verification", "all intercepted"]
    header = ["workload", "batches", *(f"{n} / floor" for n in names), "verification costs"]
    rows = []
    for row in data["speed"]:
        ms = row["methods"]
        ratios = [ms[n]["ratio_to_floor"] for n in names]
        cells = [row["workload"], str(row["num_batches"])]
        cells += [
            f"{r:.3f} ({ms[n]['ratio_min']:.2f}-{ms[n]['ratio_max']:.2f})"
            for n, r in zip(names, ratios, strict=True)
        ]
        cells.append(f"{(ratios[0] - ratios[1]) * 100:+.1f} points")
        rows.append(cells)
    speed = _table(header, rows)
    header = ["batches with another size", "runs", "noticed", "1 - (1 - p)^V"]
    rows = [
        [f"{r['rate']:.0%}", str(r["runs"]), f"{r['caught']:.0%}", f"{r['expected']:.0%}"]
        for r in data["detection"]
    ]
    detection = _table(header, rows)
    return f"{memory}\n\n{speed}\n\n{detection}"


def plots(results: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Speed and scaling PNGs; an empty list without matplotlib (the optional bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [row["workload"] for row in results["speed"]]
    estimators = [m for m in METHODS if m != "floor"]
    width = 0.8 / len(estimators)
    for i, method in enumerate(estimators):
        ratios = [row["methods"][method]["ratio_to_floor"] for row in results["speed"]]
        ax.bar([x + i * width for x in range(len(labels))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(SPEED_TARGET_FLOOR, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("time / floor (median)")
    paths.append(_save(fig, ax, out_dir / f"{name}_speed.png"))

    nb = results["scaling"]["batches"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, secs in nb["median_s"].items():
        ax.plot(nb["num_batches"], [s * 1e3 for s in secs], marker="o", label=method)
    ax.set_xlabel("batches")
    ax.set_ylabel("ms per call (median)")
    paths.append(_save(fig, ax, out_dir / f"{name}_scaling.png"))
    return paths


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """Add the legend, lay the figure out, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _guarantees_part(results: dict[str, Any]) -> list[str]:
    data = results.get("guarantees")
    if data is None:
        return ["Not in this run.", ""]
    every, n = data["verify_every"], data["num_batches"]
    return [
        "See [Guarantees](guarantees.md) for what is promised. Three figures, from "
        "`bench/guarantees.py`:",
        "",
        "1. **Buffers the forward writes are copied, the rest are not.** Peak of live tensor "
        "bytes of one run (profiler allocation records) on a BN MLP that keeps a "
        f"{64} MiB table it only reads, and on the same model when its forward also adds "
        "into a buffer of that size. Copying every buffer would add the buffers' size to "
        "both rows; copy on write adds only what the forward writes.",
        "2. **Checked direct batches.** The default run (one direct batch in "
        f"{every} checked: its BN calls report their counts) against the same run without the "
        "check and with every batch intercepted, side by side with the floor.",
        f"3. **How often the check fires.** Runs over {n} batches of a model that silently "
        "changes a layer's input size (by a rule no watch sees) on a random fraction p of "
        "its batches, with a loader that can be read once, so that noticing raises. "
        f"V = {(n - 2) / every:.1f} verified batches; the last column is the chance of "
        "noticing if every verified batch had probability p.",
        "",
        guarantees_tables(data),
        "",
    ]


def markdown(results: dict[str, Any], images: list[Path], docs_dir: Path) -> str:
    """The whole report as Markdown, for ``docs/benchmarks.md``."""
    meta = results["meta"]
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python bench/run.py"
        + (" --quick" if meta["quick"] else "")
        + "`; do not edit by hand. Raw numbers: "
        + f"`bench/results/{meta['name']}.json`.",
        "",
        f"Machine: {meta['machine']}. torch {meta['torch']}, {meta['threads']} intra-op "
        f"thread(s), device {meta['device']}. Every ratio is measured side by side in one run: "
        f"methods interleaved (A B C D E, then B C D E A, ...), {meta['repeats']} rounds after "
        "a warm-up round, each call on a fresh deep copy of the model (the copy is not timed). "
        "Ratios are the median over rounds of the method's time over the floor's time in the "
        "same round, with the min-max over rounds in brackets.",
        "",
        "Methods: **floor** = bare training-mode forward passes under `torch.no_grad()`; "
        "**precisebn** = `precisebn.recompute_bn_buffers`; **fvcore** = "
        "`fvcore.nn.precise_bn.update_bn_stats`; **torch update_bn** = "
        "`torch.optim.swa_utils.update_bn`; **seed** = the seed helper's algorithm "
        "(momentum 1, equal-weight averages of per-batch mean and mean square), "
        "re-implemented in `bench/methods.py`.",
        "",
        "## Speed",
        "",
        f"Target for precisebn: <= {SPEED_TARGET_FLOOR}x the floor and "
        f"<= {SPEED_TARGET_FVCORE}x fvcore.",
        "",
        speed_table(results["speed"]),
        "",
        "Each row runs the number of batches shown (a precise-BN run is a few hundred "
        "batches; `num_batches` defaults to 200). Besides its cost per batch, a precisebn "
        "call has a fixed cost (set-up, the two intercepted batches and the watched one per "
        "batch shape, the final pooling): the *Scaling* section gives both, as the slope and "
        "the intercept of time against the number of batches.",
        "",
        "## Exactness",
        "",
        "Worst relative error over every BN layer and channel against a float64 pooled "
        "reference (the same float32 model's BN inputs, captured with forward pre-hooks and "
        "pooled in float64: mean and unbiased variance N/(N-1)). Mean error is "
        "|mean - ref| / (|ref mean| + ref std); variance error is |var - ref| / ref var.",
        "",
        exactness_table(results["exactness"]),
        "",
        "## Memory",
        "",
        results["memory"]["what"],
        "",
        memory_table(results["memory"]),
        "",
        f"precisebn's statistics for this model: {results['memory']['stats_mib']:.3f} MiB "
        "(float64 mean and m2 per channel). Its tensor peak above the floor is the batch "
        f"block and its pooling (at most {BLOCK} batches of float32 mean and variance per "
        "channel, and a few float64 arrays of that size while a block is pooled): bounded, "
        "whatever the number of batches. The RSS of a first call includes one-time set-up of the "
        "process: in a separate check (2026-11-27, this machine), a first precisebn call "
        "on this model grew RSS by 13.3 MiB, and by 4.5 MiB after one call on an unrelated "
        "two-layer model.",
        "",
        "## Scaling",
        "",
        scaling_tables(results["scaling"]),
        "",
        "## What the guarantees cost",
        "",
        *_guarantees_part(results),
        "## GPU",
        "",
        results.get("gpu_note", "Not run: `python bench/gpu.py` on a CUDA machine."),
        "",
    ]
    for image in images:
        parts += [f"![{image.stem}]({image.relative_to(docs_dir).as_posix()})", ""]
    return "\n".join(parts)
