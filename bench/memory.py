"""Memory: peak resident-set growth of one call, and its peak of live tensor bytes.

What it measures: a child process builds the model, then resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``, Linux) and reads its current RSS; it runs one method over
``n`` batches that are generated on the fly (only the live batch exists, so the data set
itself is not counted), and reports ``VmHWM - RSS before``: the most host memory the call
held at once, whatever allocated it (torch's CPU allocator, Python objects). It does so
twice on fresh copies of the model: "first" includes one-time set-up in the process
(kernel and dispatcher state, allocator pools), "repeat" is the steady state. Modules are
imported before the mark is reset, so lazy imports are not counted. Without
``clear_refs`` it falls back to ``ru_maxrss``, which includes import-time peaks. RSS moves
with the allocator's pools, so a third call on a fresh copy runs under ``torch.profiler``
with ``profile_memory=True``: replaying its allocation records in time order gives the
most bytes of tensors that the call held alive at once ("tensors"), exact and repeatable.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from bench.methods import METHODS, fvcore_update_bn_stats
from bench.models import Workload, bn_mlp, iter_batches, make_model

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = Workload("mlp (memory)", lambda: bn_mlp(64, 512, 4), (64,))
BATCH = 256


class LazyBatches:
    """``n`` batches of ``WORKLOAD`` made as they are iterated; has a length for the peers."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tensor]:
        return iter_batches(WORKLOAD, [BATCH] * self.n)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_growth(method: str, model: torch.nn.Module, n: int) -> tuple[float, str]:
    """Peak RSS growth (MiB) over one call, and which counter gave it."""
    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    METHODS[method](model, LazyBatches(n))  # type: ignore[arg-type]
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) / 1024, "VmHWM" if exact else "ru_maxrss"


def _tensor_peak(method: str, model: torch.nn.Module, n: int) -> float:
    """Most MiB of tensors allocated during one call and alive at the same time."""
    return peak_tensor_mib(lambda: METHODS[method](model, LazyBatches(n)))  # type: ignore[arg-type]


def peak_tensor_mib(call: Callable[[], object]) -> float:
    """Most MiB of tensors allocated during ``call()`` and alive at the same time."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure_here(method: str, n: int, tensors: bool = True) -> dict[str, float | str | None]:
    """Peak RSS growth (MiB) of a first and a repeated call of ``method`` over ``n`` batches,
    and (``tensors``) the peak of live tensor bytes of a third call (None when skipped)."""
    torch.set_num_threads(1)
    fvcore_update_bn_stats()  # imports are not what is measured
    model = make_model(WORKLOAD)
    first, how = _peak_growth(method, copy.deepcopy(model), n)
    repeat, _ = _peak_growth(method, copy.deepcopy(model), n)
    peak = _tensor_peak(method, copy.deepcopy(model), n) if tensors else None
    return {"first_mib": first, "repeat_mib": repeat, "tensor_mib": peak, "how": how}


def measure(method: str, n: int, *, tensors: bool = True) -> dict[str, float | str | None]:
    """:func:`measure_here` in a fresh Python process."""
    code = (
        "import json, sys; from bench.memory import measure_here; "
        "print(json.dumps(measure_here(sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1')))"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", code, method, str(n), "1" if tensors else "0"],
        capture_output=True, text=True, check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def stats_mib() -> float:
    """Size of the statistics precisebn keeps: float64 count, mean and m2 per BN channel."""
    model = make_model(WORKLOAD)
    channels = sum(b.numel() for n, b in model.named_buffers() if n.endswith("running_mean"))
    return channels * 2 * 8 / 2**20


def table(
    sizes: list[int], *, tensors_up_to: int, processes: int = 2
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{method: {n: {"first_mib", "repeat_mib", "tensor_mib"}}}``: peak RSS growth per
    call and the tensor peak. Each (method, n) runs in a process of its own, ``processes``
    of them at a time (memory, not time, is measured: they may share the cores)."""
    jobs = [(method, n) for n in sizes for method in METHODS]
    with ThreadPoolExecutor(max_workers=processes) as pool:
        done = pool.map(lambda job: measure(job[0], job[1], tensors=job[1] <= tensors_up_to), jobs)
        results = dict(zip(jobs, done, strict=True))
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for n in sizes:
        for method in METHODS:
            got = results[method, n]
            out.setdefault(method, {})[str(n)] = {
                key: None if got[key] is None else float(got[key])  # type: ignore[arg-type]
                for key in ("first_mib", "repeat_mib", "tensor_mib")
            }
    return out
