"""Tables (Markdown and plain text) and plots from a results dict."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.compiled import BASELINE as COMPILED_BASELINE
from bench.compiled import amortised
from bench.errors import ERRORS_TARGET
from bench.exactness import MEAN_BOUND, VAR_BOUND, VAR_BOUND_SHIFTED
from bench.many import BASELINE as MANY_BASELINE
from bench.many import METHOD_NAMES as MANY_METHODS
from bench.methods import ESTIMATORS, METHODS
from precisebn._fold import BLOCK

ERRORS_HEADER = "## Standard errors and tol="
LONG_RUN = 200
"""Batches of the run whose ratio the overhead section predicts (the default num_batches)."""
OVERHEAD_HEADER = "## Where the time goes: the recorder against the bare forward"
MANY_HEADER = "## Many models, one pass"
COMPILED_HEADER = "## Compiled runs"
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
    """Tensor peaks of a run on a model with a large buffer it reads (and one it writes)."""
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
    return _table(header, rows)


def _spread(t: dict[str, Any]) -> str:
    """A method's median ratio to the floor, with the min-max over rounds."""
    return f"{t['ratio_to_floor']:.3f} ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})"


def _met(ratio: float, target: float) -> str:
    return "yes" if ratio <= target else "**no**"


def overhead_speed_table(rows: list[dict[str, Any]], data: dict[str, Any]) -> str:
    """recompute and the update loop against the floor, with the issue's targets."""
    rec_target, upd_target = data["recompute_target"], data["update_target"]
    header = ["workload", "batches", "BN calls per batch", "floor ms/batch"]
    header += ["recompute / floor", f"<= {rec_target:g}", "update loop / floor"]
    header += [f"<= {upd_target:g}", "floor max/min over rounds"]
    out = []
    for row in rows:
        ms, n = row["methods"], row["num_batches"]
        floor_s = ms["floor"]["seconds"]
        rec, upd = ms["recompute"], ms["update loop"]
        out.append(
            [
                row["workload"],
                str(n),
                str(row["bn_calls"]),
                f"{ms['floor']['median_s'] / n * 1e3:.2f}",
                _spread(rec),
                _met(rec["ratio_to_floor"], rec_target),
                _spread(upd),
                _met(upd["ratio_to_floor"], upd_target),
                f"{max(floor_s) / min(floor_s):.2f}",
            ]
        )
    return _table(header, out)


def overhead_why_table(rows: list[dict[str, Any]]) -> str:
    """Per workload, the overhead per batch that the measured parts predict, and the
    measured overhead (µs per batch)."""
    header = ["workload", "BN calls", "floor µs/batch", "calls x stacks' µs per call"]
    header += ["calls in situ µs/batch (per call)", "run's fixed cost µs (/ batches)"]
    header += ["recompute: predicted / measured", "per update µs: no forward / in situ"]
    header += ["update loop: predicted / measured", "recompute at 200 batches (predicted)"]
    out = []
    for r in rows:
        n = r["num_batches"]
        per_batch = r["recompute_predicted_us"] - r["run_us"] / n
        long_run = 1 + (per_batch + r["run_us"] / LONG_RUN) / r["floor_us"]
        out.append(
            [
                r["workload"],
                str(r["bn_calls"]),
                f"{r['floor_us']:,.0f}",
                f"{r['calls_us']:.0f}",
                f"{r['in_situ_us']:,.0f} ({r['in_situ_per_call_us']:.1f})",
                f"{r['run_us']:,.0f} (/ {n} = {r['run_us'] / n:,.0f})",
                f"{r['recompute_predicted_us']:,.0f} / {r['recompute_measured_us']:,.0f}",
                f"{r['update_us']:,.0f} / {r['update_in_situ_us']:,.0f}",
                f"{r['update_predicted_us']:,.0f} / {r['update_measured_us']:,.0f}",
                f"{long_run:.3f}",
            ]
        )
    return _table(header, out)


def per_call_table(data: dict[str, Any]) -> str:
    """Overhead per batch of BN stacks of several depths, and the fits."""
    header = ["BN layers D", "floor µs/batch", "recompute overhead µs/batch"]
    header += ["update loop overhead µs/batch"]
    out = [
        [
            str(r["depth"]),
            f"{r['floor_us_per_batch']:.0f}",
            f"{r['recompute_us_per_batch']:.0f}",
            f"{r['update_us_per_batch']:.0f}",
        ]
        for r in data["rows"]
    ]
    rec, upd = data["fits"]["recompute"], data["fits"]["update"]
    return (
        _table(header, out)
        + f"\n\nFitted against D: **recompute {rec['per_call_us']:.1f} µs per intercepted call** "
        f"+ {rec['per_batch_us']:.0f} µs per batch; **update loop {upd['per_call_us']:.1f} µs per "
        f"layer + {upd['per_batch_us']:.0f} µs per update**. The floor's own BN call (module "
        f"call and kernel) costs {data['floor_per_call_us']:.1f} µs here."
    )


def block_table(rows: list[dict[str, Any]], block: int) -> str:
    """recompute with the fold's block against a block of one row."""
    header = ["workload", "batches", f"block of {block} / floor", "block of 1 / floor"]
    header += [f"block of 1 / block of {block}", "floor ms/batch"]
    out = []
    for row in rows:
        ms, n = row["methods"], row["num_batches"]
        out.append(
            [
                row["workload"],
                str(n),
                _spread(ms[f"block of {block}"]),
                _spread(ms["block of 1"]),
                _ratio_cell(row["one_row_ratio"], row["one_row_ratios"]),
                f"{ms['floor']['median_s'] / n * 1e3:.2f}",
            ]
        )
    return _table(header, out)


def overhead_tables(data: dict[str, Any]) -> str:
    """Every table of the overhead section, as plain Markdown."""
    parts = [overhead_speed_table(data["speed"], data)]
    if "speed_tuned" in data:
        parts.append(overhead_speed_table(data["speed_tuned"], data))
    parts += [
        overhead_why_table(data["predicted"]),
        per_call_table(data["per_call"]),
        block_table(data["blocks"], data["block"]),
    ]
    return "\n\n".join(parts)


def overhead_section(results: dict[str, Any]) -> list[str]:
    """The section on where precisebn's time goes, as Markdown lines."""
    data = results.get("overhead")
    if data is None:
        return [OVERHEAD_HEADER, "", "Not in this run.", ""]
    block = data["block"]
    per_call = data["per_call"]
    tuned = []
    if "speed_tuned" in data:
        env = " ".join(f"{k}={v}" for k, v in data["tuned_malloc"].items())
        tuned = [
            f"The same rows in a child process started with `{env}`: glibc's malloc then "
            "serves blocks of up to 64 MiB from its heap and keeps up to 256 MiB of freed "
            "heap memory. By default, blocks above its mmap threshold are returned to the "
            "kernel when freed, so large activations page-fault anew on every batch; that "
            "slows the floor and every method alike, and the same overhead in µs is then a "
            "smaller ratio. The default threshold adapts (it rises to the size of a mapped "
            "block once one is freed, up to 32 MiB), so how often that happens depends on "
            "what the process ran before: in a fresh process (a separate check on this "
            "machine, 2026-12-03, bench CNN batch 32, fastest of 40 rounds) the floor took "
            "19.2 ms per batch with the default settings and 13.6 ms with these; by the "
            "time this section runs in the bench's process, the two floors are close "
            "(compare the tables).",
            "",
            overhead_speed_table(data["speed_tuned"], data),
            "",
        ]
    return [
        OVERHEAD_HEADER,
        "",
        "Every batch-norm call is intercepted, on every batch. Three methods, side by side "
        "in one interleaved loop (`bench/overhead.py`): the **floor**; **recompute** = "
        "`precisebn.recompute_bn_buffers(model, batches)`; **update loop** = "
        "`rec = precisebn.recorder(model)`, `state = rec.init()`, then "
        "`state = rec.update(state, batch)` per batch and `rec.finalize(state)` (all of it "
        "timed). Workloads: the bench CNN, torchvision's ResNet-18 and ResNet-50 "
        "(`bench/models.py`: written out by hand in torchvision's layout, with its module "
        "names, channel counts and parameter counts; torchvision itself is not installable "
        "next to the bench's torch build) at 64 x 64 pixels, and the BN-heavy bench MLP "
        f"(outside the targets' workloads). Targets: recompute <= {data['recompute_target']:g}x "
        f"the floor, the update loop <= {data['update_target']:g}x. The last column shows "
        "how much the floor itself moved between rounds on this machine.",
        "",
        overhead_speed_table(data["speed"], data),
        "",
        *tuned,
        "**Why: the parts of the overhead.** Measured separately and put together per "
        "workload (µs per batch of the speed rows above, with the default malloc):",
        "",
        "- *stacks' µs per call*: BN stacks (below) give the cost of one intercepted call "
        "over the floor's own call where the kernels cost nothing; times the workload's BN "
        "calls per batch;",
        "- *in situ*: the same calls inside a real run of the workload: a "
        "`recompute_bn_buffers` run whose `forward=` times, batch by batch, the bound model's "
        "forward and a bare deep copy's, in alternating order (median of the paired "
        "differences); per call in brackets;",
        "- *run's fixed cost*: one `recompute_bn_buffers` call over one batch with a forward "
        "that runs nothing (`forward=lambda model, batch: None`) on the workload's model: "
        "the recorder, the binding's session, the fold, its final pooling, the finite check "
        "and the new buffers, paid once per run, so divided by the row's batches;",
        "- *per update, no forward*: one `rec.update(state, batch)` with that forward: what "
        "every update pays besides its BN calls (resolving the weights, a fold, a session "
        "binding the model, pooling, the new state); *in situ*: the same part of an update "
        "in an update loop with the paired forward (the update's time minus both forwards);",
        "- predicted recompute = calls in situ + the stacks' µs per batch (closing a batch, "
        "pooling) + fixed / batches; predicted update loop = its own calls in situ (not "
        "shown) + per update in situ. *measured* = (the paired ratio to the floor - 1) x "
        "the floor's time per batch, from the speed rows: a percent of a conv net's batch "
        "is within the rounds' noise, so predicted and measured agree only to about that;",
        f"- *recompute at {LONG_RUN} batches*: 1 + (calls in situ + the stacks' µs per batch "
        f"+ fixed / {LONG_RUN}) / floor, the ratio the parts predict for a run of the default "
        f"`num_batches={LONG_RUN}`, where the fixed cost weighs less than in the short rows "
        "above.",
        "",
        overhead_why_table(data["predicted"]),
        "",
        f"**Per intercepted call.** {per_call['what']}: stacks of D BatchNorm1d layers and "
        "nothing else, where the kernels cost next to nothing, so the overhead per batch "
        "over the floor is the interception's: the Python of a tag's handler and the fold's "
        "bookkeeping, the least a call costs. In a real model the same calls cost more "
        "(*calls in situ* above, per call in brackets), although the kernels are the "
        "same: see the notes below the table.",
        "",
        per_call_table(per_call),
        "",
        "Notes on the gap between the stacks' cost per call and the calls in situ, from "
        "separate checks made on this machine while writing this bench (2026-12-03, bench "
        "CNN, not part of this run): `torch.profiler` finds the same operators, with the "
        "same self times, in a recompute of 16 batches as in the floor's 16 forwards, apart "
        "from the few operators of pooling (about 1 ms in all); the in-situ difference grows "
        "with the batch (146 µs per batch at batch 2, 307 at 32, 527 at 64, with the tuned "
        "malloc settings of this section), while 9 BatchNorm2d layers alone at batch 32 show "
        "5-10 µs per call, and the kernel `torch.batch_norm` itself takes the same time "
        "with momentum 1 on rows of a block as with momentum 0.1 on buffers. The extra cost "
        "is therefore outside the kernels and grows with the activations, as Python running "
        "between kernels on caches that they have just filled would; that cause is a guess, not "
        "measured. Likewise an update's own work costs about twice as much right after a "
        "real forward (*per update, in situ*) as in a loop without one.",
        "",
        f"**The block fold.** Each intercepted call's kernel writes the batch's moments into "
        f"row k of a [{block}, 2, C] block, pooled into the float64 sums every {block} "
        f"batches. Against the same run with a block of one row, pooled after every batch "
        "(`bench/overhead.py` swaps in a subclass of the private `_ModelPass` whose fold "
        "has 1 row); the third column is paired per round:",
        "",
        block_table(data["blocks"], block),
        "",
    ]


def _ratio_cell(ratio: float, ratios: list[float]) -> str:
    return f"{ratio:.3f} ({min(ratios):.2f}-{max(ratios):.2f})"


def errors_cost_table(rows: list[dict[str, Any]]) -> str:
    """What the standard-error sums cost: precisebn with them against itself without."""
    header = ["workload", "batches", "precisebn / floor", "with errors / floor"]
    header += ["with errors / precisebn", "errors cost µs/batch", "target met"]
    out = []
    for row in rows:
        ms = row["methods"]
        cells = [row["workload"], str(row["num_batches"])]
        for name in ("precisebn", "with errors"):
            t = ms[name]
            cells.append(f"{t['ratio_to_floor']:.3f} ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})")
        cells.append(_ratio_cell(row["errors_ratio"], row["errors_ratios"]))
        cells.append(f"{row['errors_us_per_batch']:.0f}")
        cells.append("yes" if row["errors_ratio"] <= ERRORS_TARGET else "**no**")
        out.append(cells)
    return _table(header, out)


def tol_table(rows: list[dict[str, Any]]) -> str:
    """Batches a ``tol=`` run used, or ``> cap`` with an estimate of those it needed."""
    header = ["workload", "tol", "batches used", "worst relative error (layer)"]
    header += ["batches needed (est.)", "wall s"]
    out = []
    for r in rows:
        used = str(r["num_batches"]) if r["converged"] else f"> {r['cap']}"
        needed = "-" if r["needed"] is None else f"≈ {r['needed']:,.0f}"
        worst = f"{r['worst']:.1e} ({r['worst_layer']})"
        out.append([r["workload"], f"{r['tol']:g}", used, worst, needed, f"{r['wall_s']:.2f}"])
    return _table(header, out)


def curve_table(curve: dict[str, Any]) -> str:
    """RMS reported and actual relative errors per batch count, for one workload."""
    header = ["batches B", "runs", "reported mean", "actual mean", "actual / reported"]
    header += ["reported var", "actual var", "actual / reported", "expected sqrt(1 + B/long)"]
    out = [
        [
            str(r["batches"]),
            str(r["runs"]),
            f"{r['reported_mean']:.2e}",
            f"{r['actual_mean']:.2e}",
            f"{r['ratio_mean']:.2f}",
            f"{r['reported_var']:.2e}",
            f"{r['actual_var']:.2e}",
            f"{r['ratio_var']:.2f}",
            f"{r['expected_ratio']:.2f}",
        ]
        for r in curve["rows"]
    ]
    return _table(header, out)


def n_eff_table(groups: list[dict[str, Any]]) -> str:
    """Per layer, ``n_eff`` against ``N``, the number of values per channel of the run."""
    header = ["workload", "batches", "layer", "values per channel N", "n_eff", "n_eff / N"]
    out = [
        [
            g["workload"],
            str(g["batches"]),
            r["layer"],
            f"{r['values']:,}",
            f"{r['n_eff']:,.0f}",
            f"{r['n_eff_over_values']:.2f}",
        ]
        for g in groups
        for r in g["rows"]
    ]
    return _table(header, out)


def errors_tables(data: dict[str, Any]) -> str:
    """Every table of the standard-errors section, as plain Markdown."""
    parts = [errors_cost_table(data["cost"]), tol_table(data["tol"])]
    for curve in data["curves"]:
        parts.append(
            f"{curve['workload']}, reference {curve['long']} batches\n\n" + curve_table(curve)
        )
    parts.append(n_eff_table(data["n_eff"]))
    return "\n\n".join(parts)


def _many_cell(t: dict[str, Any] | None) -> str:
    return "-" if t is None else f"{t['ratio']:.3f} ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})"


def many_seconds_table(data: dict[str, Any]) -> str:
    """Seconds per call (median over rounds) of every method, per row and loader."""
    header = ["models", "loader", "batches", "loader ms/batch", "one forward ms/batch"]
    header += [f"{m} s" for m in MANY_METHODS]
    out = []
    for row in data["rows"]:
        for loader, per in row["loaders"].items():
            ms = per["methods"]
            cells = [row["label"], loader, f"{row['num_batches']} x {row['batch']}"]
            cells += [f"{per['loader_ms_per_batch']:.2f}", f"{row['forward_ms']:.2f}"]
            cells += [f"{ms[m]['median_s']:.3f}" if m in ms else "-" for m in MANY_METHODS]
            out.append(cells)
    return _table(header, out)


def many_target(loader: str, data: dict[str, Any]) -> float:
    """``many`` / sequential precisebn at most, for ``loader``."""
    return float(data["costly_target"] if loader == "costly" else data["free_target"])


def _many_met(t: dict[str, Any], target: float) -> str:
    """Say "yes" when the median ratio meets ``target``; a miss says if some round met it."""
    if t["ratio"] <= target:
        return "yes"
    return "**no** (within spread)" if t["ratio_min"] <= target else "**no**"


def many_ratio_table(data: dict[str, Any]) -> str:
    """Paired per-round ratios to K sequential precisebn runs, and many / update_bn."""
    others = [m for m in MANY_METHODS if m != MANY_BASELINE]
    header = ["models", "loader", *(f"{m} / {MANY_BASELINE}" for m in others)]
    header += ["many / sequential update_bn", "expected many / sequential", "target", "met"]
    header += ["max abs difference from sequential (many, vmap)"]
    out = []
    for row in data["rows"]:
        for loader, per in row["loaders"].items():
            ms = per["methods"]
            cells = [row["label"], loader, *(_many_cell(ms.get(m)) for m in others)]
            cells.append(_many_cell(per["many_vs_update_bn"]))
            expected = per["expected_ratio"]
            cells.append("-" if expected is None else f"{expected:.3f}")
            target = many_target(loader, data)
            cells.append(f"<= {target:g}")
            cells.append(_many_met(ms["many"], target))
            diff = per["max_difference"]
            cells.append(
                ", ".join(f"{diff[m]:.1e}" if m in diff else "-" for m in ("many", "vmap"))
            )
            out.append(cells)
    return _table(header, out)


def many_forward_table(rows: list[dict[str, Any]]) -> str:
    """A vmapped training-mode forward of the K members against K sequential ones."""
    header = ["workload", "batches", "sequential ms/batch (K forwards)", "vmap ms/batch"]
    header += ["vmap / sequential"]
    out = [
        [
            r["workload"],
            str(r["num_batches"]),
            f"{r['sequential_ms_per_batch']:.2f}",
            f"{r['vmap_ms_per_batch']:.2f}",
            f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
        ]
        for r in rows
    ]
    return _table(header, out)


def many_tables(data: dict[str, Any]) -> str:
    """Every table of the many-models section, as plain Markdown."""
    return "\n\n".join(
        [many_seconds_table(data), many_ratio_table(data), many_forward_table(data["forward"])]
    )


def many_section(results: dict[str, Any]) -> list[str]:
    """The section on many models in one pass, as Markdown lines."""
    data = results.get("many")
    if data is None:
        return [MANY_HEADER, "", "Not in this run.", ""]
    k = data["k"]
    target = data["costly_target"]
    needed = k * (1 - target) / (target * k - 1) if target * k > 1 else math.inf
    return [
        MANY_HEADER,
        "",
        "See [Many models, one pass](ensembles.md) for the API. Each row holds "
        f"K = {k} models, and every method computes the BN buffers of all {k}, side by side in "
        "one interleaved loop (`bench/many.py`), each call on fresh deep copies of the models "
        "(not timed):",
        "",
        "- **many**: one `precisebn.recompute_bn_buffers_many(models, loader)`;",
        "- **vmap**: `precisebn.recompute_bn_buffers` under `torch.func.vmap` over the "
        "members' weights stacked by `torch.func.stack_module_state` (stacked once, before "
        "timing; same-architecture rows only);",
        f"- **sequential precisebn**: {k} calls of `precisebn.recompute_bn_buffers`, one per "
        "model, each reading the loader again;",
        f"- **sequential update_bn**: {k} calls of `torch.optim.swa_utils.update_bn`.",
        "",
        "Two loaders: **free** is a list of prebuilt tensors; **costly** decodes one PNG "
        "image per sample with PIL on every pass, resizes it with PIL where the source's size "
        "asks for it, crops and flips every sample at random (seeded, so every pass yields "
        "the same batches) and normalises the batch: an image pipeline, in the process and "
        "without workers. *loader ms/batch* is the time to iterate it alone (timed in the "
        "same loop); *one forward ms/batch* is one member's training-mode forward of one "
        f"batch under `torch.no_grad()`, the mean over the {k} members (best of two passes). "
        "Rows:",
        "",
        *(
            f"- **{row['label']}**: {row['models']}, batch {row['batch']}; costly loader: "
            f"{row['costly_loader']}."
            for row in data["rows"]
        ),
        "",
        "Ratios are to the sequential precisebn runs on the same loader, paired within each "
        f"round: the median over rounds, with the min-max in brackets. Targets: with the "
        f"costly loader, many <= {data['costly_target']:g}x; with the free loader, many never "
        f"slower, <= {data['free_target']:g}x; met when the median meets it (*within "
        "spread*: it does not, but the fastest round does). The last column checks that many "
        "and vmap return the sequential runs' buffers.",
        "",
        "What to expect: with F the cost of one member's forward of a batch and L the "
        f"loader's, the {k} sequential runs cost about {k}(F + L) per batch and many "
        f"{k}F + L, so many / sequential is about ({k} + r) / ({k}(1 + r)) with r = L / F: "
        f"{(k + 1) / (2 * k):.2f} at r = 1, {(k + 2) / (3 * k):.2f} at r = 2, and never below "
        f"1/{k}. *expected many / sequential* puts the measured times into that model: (many "
        "on the free loader + one pass of the costly loader) / (sequential on the free loader "
        f"+ {k} passes of it). A target of {target:g} at K = {k} needs r >= {needed:.1f}: a "
        f"loader {needed:.1f} times as costly as one forward.",
        "",
        many_seconds_table(data),
        "",
        many_ratio_table(data),
        "",
        "**Reference point: a vmapped forward.** Why precisebn runs the members one after "
        f"the other instead of vmapping the forward: a training-mode forward of the {k} "
        "members under `torch.func.vmap` (`torch.func.functional_call` over "
        "`torch.func.stack_module_state`, on copies whose BN layers keep no running "
        f"statistics, `torch.func.replace_all_batch_norm_modules_`) against {k} sequential "
        "forwards of the same copies, both under `torch.no_grad()`, interleaved.",
        "",
        many_forward_table(data["forward"]),
        "",
    ]


def compiled_speed_table(data: dict[str, Any]) -> str:
    """The compiled recompute against the compiled forward, with the eager methods."""
    target = data["target"]
    header = ["workload", "batches", "BN layers recomputed", "compiled forward ms/batch"]
    header += ["compiled recompute / compiled forward", f"<= {target:g}", "pruning target"]
    header += ["met", "eager forward / compiled forward", "eager recompute / compiled forward"]
    header += ["compiled forward max/min over rounds"]
    out = []
    for row in data["rows"]:
        ms, n = row["methods"], row["num_batches"]
        base = ms[COMPILED_BASELINE]
        rec = ms["compiled recompute"]
        layers = f"{row['recomputed_layers']} of {row['bn_layers']} ({row['layers']})"
        out.append(
            [
                row["workload"],
                str(n),
                layers,
                f"{base['median_s'] / n * 1e3:.2f}",
                _spread(rec),
                _met(rec["ratio_to_floor"], target),
                f"<= {row['target']:g}",
                _met(rec["ratio_to_floor"], row["target"]),
                _spread(ms["eager forward"]),
                _spread(ms["eager recompute"]),
                f"{max(base['seconds']) / min(base['seconds']):.2f}",
            ]
        )
    return _table(header, out)


def compiled_compile_table(data: dict[str, Any]) -> str:
    """Compile times, the repeated run, and the compile amortised over a run."""
    n = data["amortise"]
    header = ["workload", "compiled forward: first call s", "compiled recompute: first call s"]
    header += ["second recompute (1 batch): ms, new graphs", "new graphs while timed"]
    header += [f"ms/batch over {n} batches, compile included: compiled forward"]
    header += ["compiled recompute", "eager recompute (no compile)"]
    header += ["compiled recompute beats eager from (batches)"]
    out = []
    for row in data["rows"]:
        a = amortised(row, n)
        repeat = row["repeat"]
        even = a["break_even"]
        out.append(
            [
                row["workload"],
                f"{row['compile_s']['forward']:.1f}",
                f"{row['compile_s']['recompute']:.1f}",
                f"{repeat['seconds'] * 1e3:.1f}, {repeat['graphs']}",
                str(row["timed_graphs"]),
                f"{a['forward_ms']:.2f}",
                f"{a['recompute_ms']:.2f}",
                f"{a['eager_recompute_ms']:.2f}",
                "never" if math.isinf(even) else f"{math.ceil(even):,}",
            ]
        )
    return _table(header, out)


def compiled_checks_table(data: dict[str, Any]) -> str:
    """Whether every row ran compiled, and its buffers against the eager recompute's."""
    header = ["workload", "fell back to eager", "max relative difference from eager: mean / var"]
    out = []
    for row in data["rows"]:
        fallbacks = row["eager_fallbacks"]
        d = row["difference"]
        out.append(
            [
                row["workload"],
                "; ".join(fallbacks) if fallbacks else "no",
                f"{d['mean']:.1e} / {d['var']:.1e}",
            ]
        )
    return _table(header, out)


def _slower_compiled(data: dict[str, Any]) -> list[str]:
    """A note on the rows where the compiler slows the forward down."""
    slower, losing = [], []
    for row in data["rows"]:
        ms = row["methods"]
        if ms["eager forward"]["ratio_to_floor"] < 1:
            slower.append(row["workload"])
            if ms["compiled recompute"]["ratio_to_floor"] > ms["eager recompute"]["ratio_to_floor"]:
                losing.append(row["workload"])
    if not slower:
        return []
    if losing:
        cost = (
            f"on {', '.join(losing)} the compiled recompute is slower than the eager one too, "
            "so `compile=True` does not pay there; "
        )
    else:
        cost = ""
    return [
        f"On {', '.join(slower)} the eager forward is faster than the compiled one on this "
        "machine, so the ratios above compare the compiled recompute with a forward slower "
        f"than eager; {cost}where the graph leaves most of the forward out, the compiled "
        "recompute can beat the eager one all the same. (A separate check on this machine, "
        "2026-12-03, not part of this run: inductor's code for the ResNet-18 forward, and "
        "likewise for the recompute's graph, runs every convolution channels-last and "
        "copies each weight into that layout on every call; both graphs have the same "
        "reductions, one per BN layer.) The targets are against the compiled forward, the "
        "forward a user who compiled runs.",
        "",
    ]


def compiled_tables(data: dict[str, Any]) -> str:
    """Every table of the compiled section, as plain Markdown."""
    if not data["rows"]:
        return f"compiled runs: none ({data.get('skipped', 'not run')})"
    return "\n\n".join(
        [compiled_speed_table(data), compiled_compile_table(data), compiled_checks_table(data)]
    )


def compiled_section(results: dict[str, Any]) -> list[str]:
    """The section on compiled runs, as Markdown lines."""
    data = results.get("compiled")
    if data is None:
        return [COMPILED_HEADER, "", "Not in this run.", ""]
    if not data["rows"]:
        return [
            COMPILED_HEADER,
            "",
            "Not in a `--quick` run: compiling costs tens of seconds per graph on a small "
            "CPU machine, more than the quick run's budget. The full run (`python "
            "bench/run.py`) has the rows (`bench/compiled.py`).",
            "",
        ]
    n = data["amortise"]
    compiled_throughout = not any(row["eager_fallbacks"] for row in data["rows"])
    backend = ", ".join(f"{k}={v}" for k, v in data["options"].items()) or "inductor, defaults"
    return [
        COMPILED_HEADER,
        "",
        "See [How a run works](design.md#compiled-runs). With `compile=True` (or when the "
        "model is `torch.compile`d) `recompute_bn_buffers` sends each batch through one "
        "compiled graph that returns only the batch statistics; what the statistics do not "
        "need is dead code, and the compiler leaves it out. Four methods, side by side in "
        "one interleaved loop (`bench/compiled.py`), "
        f"{len(data['rows'][0]['methods'][COMPILED_BASELINE]['seconds'])} rounds after a "
        f"warm-up round, torch.compile with {backend}, {data['threads']} thread(s):",
        "",
        "- **compiled forward**: `torch.compile` of a copy of the model, called in training "
        "mode under `torch.no_grad()` (compiled and warmed up before timing): the forward "
        "a user who compiled runs, and the baseline of every ratio here;",
        "- **compiled recompute**: `precisebn.recompute_bn_buffers(model, batches, "
        "compile=True)` (its graph compiled before timing; every timed round is a repeated "
        "run on the same model);",
        "- **eager forward**: the floor of the other sections;",
        "- **eager recompute**: `recompute_bn_buffers(..., compile=False)`.",
        "",
        "The compiled models are not deep-copied per call, as elsewhere on this page: a copy "
        "would be compiled anew. Workloads: the bench CNN; torchvision's ResNet-18 layout "
        "at 64 x 64 (`bench/models.py`; timm and torchvision are not installable next to "
        "the bench's torch, so this stands in for a timm-sized net); and a detection-style "
        "net (`bench.models.Detector`: the ResNet-18 trunk, an FPN on C3-C5 and an "
        "FCOS-style head shared over P3-P5, with towers of four 3x3 convs of 256 channels, "
        "each with GroupNorm and ReLU, and no BatchNorm after the backbone), recomputed "
        "with `layers=` its backbone's BN layers: the graph leaves the FPN and the head "
        "out. Targets (issue 18): compiled recompute <= "
        f"{data['target']:g}x the compiled forward; with what the graph leaves out, "
        f"<= {data['classifier_target']:g}x on a plain classifier and <= "
        f"{data['pruned_target']:g}x on the detector.",
        "",
        compiled_speed_table(data),
        "",
        *_slower_compiled(data),
        "**Compile time.** The wall time of each compiled method's first call (one batch), "
        "each compiling into an empty inductor cache of its own, after a throwaway compile "
        f"that paid dynamo's one-time set-up ({data['warm_up_s']:.1f} s, not counted). The "
        "second recompute is `recompute_bn_buffers(..., compile=True)` again on the same "
        "model, one batch: its graph is cached, so it compiles nothing (new graphs counted "
        "with dynamo's own counter, as over the timed rounds). Then the time per batch of "
        f"a run of {n} batches (`num_batches`' default) with its compile included: the "
        "compiled times above plus the first call's seconds / "
        f"{n}, and after how many batches the compiled recompute, its compile included, "
        "costs less than the eager recompute.",
        "",
        compiled_compile_table(data),
        "",
        ("Every row ran compiled" if compiled_throughout else "Not every row ran compiled")
        + " (precisebn logs at INFO when it falls back to eager; the bench keeps those "
        "logs). The compiled recompute's buffers against the eager recompute's, worst over "
        "layers and channels (|mean - eager| / (|eager| + eager std), "
        "|var - eager| / eager var):",
        "",
        compiled_checks_table(data),
        "",
    ]


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
    if "errors" in results:
        paths.append(_errors_plot(results["errors"]["curves"], out_dir / f"{name}_errors.png"))
    if results.get("compiled", {}).get("rows"):
        paths.append(_compiled_plot(results["compiled"], out_dir / f"{name}_compiled.png"))
    return paths


def _compiled_plot(data: dict[str, Any], path: Path) -> Path:
    """Each method's time over the compiled forward's, per compiled row."""
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = list(rows[0]["methods"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, method in enumerate(names):
        ratios = [row["methods"][method]["ratio_to_floor"] for row in rows]
        ax.bar([x + i * width for x in range(len(rows))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(data["target"], color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(data["pruned_target"], color="grey", linestyle=":", linewidth=0.8)
    labels = [row["workload"] for row in rows]
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("time / compiled forward (median)")
    return _save(fig, ax, path)


def _errors_plot(curves: list[dict[str, Any]], path: Path) -> Path:
    """Log-log, per workload: reported relative errors (lines), actual ones (markers)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        b = [r["batches"] for r in curve["rows"]]
        for stat, color in (("mean", "tab:blue"), ("var", "tab:orange")):
            reported = [r[f"reported_{stat}"] for r in curve["rows"]]
            actual = [r[f"actual_{stat}"] for r in curve["rows"]]
            ax.plot(b, reported, color=color, label=f"reported {stat}")
            ax.plot(b, actual, "o", color=color, label=f"actual {stat}")
        first = curve["rows"][0]
        anchor = (first["reported_mean"] * first["reported_var"]) ** 0.5
        guide = [anchor * (b[0] / x) ** 0.5 for x in b]
        ax.plot(b, guide, "--", color="grey", linewidth=0.8, label="1/sqrt(B)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(b, [str(x) for x in b])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batches B")
        ax.set_ylabel("relative error (RMS over channels)")
        ax.set_title(f"{curve['workload']}, reference {curve['long']} batches", fontsize=9)
        if ax is not axes[0][-1]:
            ax.legend(fontsize=7)
    return _save(fig, axes[0][-1], path)


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
    table = data.get("table_mib", 64)
    return [
        "See [Guarantees](guarantees.md) for what is promised. **Buffers the forward writes "
        "are copied, the rest are not** (`bench/guarantees.py`): the peak of live tensor "
        "bytes of one run (profiler allocation records) on a BN MLP that keeps a "
        f"{table} MiB table it only reads, and on the same model when its forward also adds "
        "into a buffer of that size. Copying every buffer would add the buffers' size to "
        "both rows; copy on write adds only what the forward writes.",
        "",
        guarantees_tables(data),
        "",
    ]


def errors_section(results: dict[str, Any]) -> list[str]:
    """The section on standard errors and ``tol=``, as Markdown lines."""
    data = results.get("errors")
    if data is None:
        return [ERRORS_HEADER, "", "Not in this run.", ""]
    return [
        ERRORS_HEADER,
        "",
        "See [How many batches?](how-many-batches.md) for what is reported. A run with "
        "`return_info=True` (or `tol=`) reports each channel's standard error "
        "(`info.stderr`, by batch means: the spread of the per-batch moments across batches) "
        "and `tol=` stops at the first check (every "
        "16 batches, from batch 16 on) where every channel has `stderr(mean) / std <= tol` "
        "and `stderr(var) / var <= tol`. Four figures, from `bench/errors.py`, on fresh "
        "synthetic Gaussian batches (`bench/models.py`, `iter_batches`):",
        "",
        "1. **What the standard errors cost.** The same run with `return_info=True`, which "
        "adds the standard-error sums, against the default run, which computes none, side "
        "by side with the floor. The ratio of the two is taken within each round (median, "
        f"min-max); target <= {ERRORS_TARGET}. Short runs weigh the errors' fixed cost per "
        "call (their evaluation at the end) more than a run of a few hundred batches does.",
        "2. **Batches to reach tol.** One `tol=` run per row on a stream of at most *cap* "
        "batches; *> cap* where it did not converge, with the batches it would have needed "
        "(errors shrink as 1/sqrt(B): used x (worst / tol)^2). The worst relative error is "
        "the largest of `stderr(mean) / std` and `stderr(var) / var` over every channel.",
        "3. **Reported against actual errors.** One long run gives the reference; then, per "
        "batch count B, runs of B batches on other fresh batches. *Reported* is the RMS "
        "over every channel of every BN layer and over the runs of `stderr(mean) / std_ref` "
        "and `stderr(var) / var_ref`; *actual* the RMS of `|mean - mean_ref| / std_ref` and "
        "`|var - var_ref| / var_ref`. The reference has its own error, about sqrt(B / long) "
        "of a B-batch run's, so actual / reported should be near sqrt(1 + B / long), not 1. "
        "The figure at the end plots both against B.",
        "4. **Effective number of values.** `n_eff` per layer (the median over its channels "
        "of `var / stderr(mean)^2`, and over the runs) against N, the values per channel "
        "(batches x batch x H x W for a conv layer). The inputs are independent Gaussian "
        "pixels, without the spatial correlation of natural images that puts `n_eff` far "
        "below N; behind another BN layer, which normalises every batch, batch means vary "
        "less than independent values would, and `n_eff` can exceed N.",
        "",
        errors_tables(data),
        "",
    ]


def _malloc(meta: dict[str, Any]) -> str:
    settings = meta.get("malloc") or {}
    if not settings:
        return "with its default settings"
    return "with " + " ".join(f"{k}={v}" for k, v in settings.items())


def noise_note(results: dict[str, Any]) -> list[str]:
    """How busy the machine was: load averages per section, and the floor's spread."""
    meta = results["meta"]
    loads = meta.get("load")
    if not loads:
        return []
    low = min(min(v) for v in loads.values())
    high = max(max(v) for v in loads.values())
    spreads = [
        max(s) / min(s)
        for row in results.get("speed", [])
        for s in [row["methods"]["floor"]["seconds"]]
    ]
    spread = f"{statistics.median(spreads):.2f}" if spreads else "-"
    worst = f"{max(spreads):.2f}" if spreads else "-"
    return [
        f"Noise: this run took {meta['wall_s']:.0f} s; the machine's 1-minute load average, "
        f"read at the start and the end of each section, went from {low:.2f} to {high:.2f} "
        f"on {meta.get('cores', '?')} cores (this bench uses one thread; a load above 1 means "
        "other work shared the cores). The floor's slowest round over its fastest, per speed "
        f"row: median {spread}, worst {worst}. Single rounds move by several percent: read "
        "differences of a percent or two between medians as ties, not as measurements.",
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
        f"thread(s), device {meta['device']}, glibc malloc {_malloc(meta)}. Every ratio is "
        "measured side by side in one run: "
        f"methods interleaved (A B C D E, then B C D E A, ...), {meta['repeats']} rounds after "
        "a warm-up round, each call on a fresh deep copy of the model (the copy is not timed). "
        "Ratios are the median over rounds of the method's time over the floor's time in the "
        "same round, with the min-max over rounds in brackets.",
        "",
        *noise_note(results),
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
        "call has a fixed cost (the recorder and its binding, the final pooling, the finite "
        "check, the new buffers): the *Scaling* section gives both, as the slope and the "
        "intercept of time against the number of batches, and the next section measures "
        "them on each workload.",
        "",
        *overhead_section(results),
        *compiled_section(results),
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
        "whatever the number of batches. The RSS of a first call includes one-time set-up of "
        "the process (compare *first* with *repeat*).",
        "",
        "## Scaling",
        "",
        scaling_tables(results["scaling"]),
        "",
        "## What the guarantees cost",
        "",
        *_guarantees_part(results),
        *errors_section(results),
        *many_section(results),
        "## GPU",
        "",
        results.get("gpu_note", "Not run: `python bench/gpu.py` on a CUDA machine."),
        "",
    ]
    for image in images:
        parts += [f"![{image.stem}]({image.relative_to(docs_dir).as_posix()})", ""]
    return "\n".join(parts)
