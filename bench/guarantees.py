"""What the guarantees cost: copying buffers on write, and checking direct batches.

- **Buffers.** The peak of live tensor bytes (``torch.profiler`` allocation records,
  replayed in time order) of one precisebn run, against the floor's on the same model, for
  a BN MLP that keeps a large buffer it only reads (a table) and for the same model when
  its forward also writes a buffer of that size (a running sum). Copying every buffer
  blindly would cost the table's size in both; copy on write costs it only where written.
- **Direct batches.** Speed of a default run (one direct batch in eight verified) against
  the same run with no verification and with every batch intercepted, side by side with
  the floor. Then the check itself: runs over batches of which a random fraction ``p``
  silently changes a layer's input size (by a rule no watch sees), counting how often the
  run noticed, against ``1 - (1 - p) ** V`` for ``V`` verified batches.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import precisebn
import precisebn._direct as direct_module
from bench.memory import peak_tensor_mib
from bench.methods import floor, run_precisebn
from bench.models import CNN, MLP, bn_mlp, make_batches, make_model
from bench.timing import interleaved, speed_row

TABLE_MIB = 64
FEATURES = 64


class WithTable(nn.Module):
    """A BN MLP that adds rows of a large table it only reads (a positional table)."""

    def __init__(self, *, writes: bool) -> None:
        super().__init__()
        rows = TABLE_MIB * 2**20 // (4 * FEATURES)
        self.register_buffer("table", torch.randn(rows, FEATURES))
        self.register_buffer("running_sum", torch.zeros(rows, FEATURES) if writes else None)
        self.mlp = bn_mlp(FEATURES, 256, 4)

    def forward(self, x: Tensor) -> Tensor:
        if self.running_sum is not None:
            self.running_sum[: x.shape[0]] += x
        return self.mlp(x + self.table[: x.shape[0]])


def buffer_memory(num_batches: int) -> list[dict[str, Any]]:
    """Per model: the floor's and precisebn's tensor peaks (MiB), and the buffers' sizes."""
    rows = []
    for label, writes in (("reads a table", False), ("reads a table, writes a sum", True)):
        torch.manual_seed(0)
        model = WithTable(writes=writes).train()
        batches = [torch.randn(256, FEATURES) for _ in range(num_batches)]
        buffer_mib = sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20
        written_mib = TABLE_MIB if writes else 0.0
        twin = copy.deepcopy(model)  # the floor writes BN buffers; precisebn writes nothing
        floor_mib = peak_tensor_mib(lambda m=twin, b=batches: floor(m, b))
        ours = peak_tensor_mib(lambda m=model, b=batches: run_precisebn(m, b))
        rows.append(
            {
                "model": label,
                "buffers_mib": buffer_mib,
                "written_mib": written_mib,
                "floor_mib": floor_mib,
                "precisebn_mib": ours,
            }
        )
        print(f"  guarantees: memory, {label} done", flush=True)
    return rows


def _with_verification(every: int) -> Callable[[nn.Module, Sequence[Tensor]], dict[str, Tensor]]:
    def method(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
        saved = direct_module.VERIFY_EVERY
        direct_module.VERIFY_EVERY = every
        try:
            return run_precisebn(model, batches)
        finally:
            direct_module.VERIFY_EVERY = saved

    return method


def _intercepted(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    new = precisebn.recompute_bn_buffers(model, batches, num_batches=len(batches), direct=False)
    return dict(new)


def verification_speed(
    rows: list[tuple[str, int, int]], *, repeats: int
) -> list[dict[str, object]]:
    """Speed rows: the floor, the default run, no verification, every batch intercepted."""
    workloads = {"cnn": CNN, "mlp": MLP}
    methods = {
        "floor": floor,
        "precisebn": run_precisebn,
        "no verification": _with_verification(0),
        "all intercepted": _intercepted,
    }
    out = []
    for name, batch, n in rows:
        workload = workloads[name]
        model = make_model(workload)
        batches = make_batches(workload, [batch] * n)
        timings = interleaved(methods, model, batches, repeats=repeats)
        out.append(speed_row(f"{workload.name} batch {batch}", n, timings))
        print(f"  guarantees: speed, {out[-1]['workload']} done", flush=True)
    return out


class _HiddenResize(nn.Module):
    """Halves the input's width on the batches listed in ``cropped``: a rule no watch sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cropped: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        if x.data_ptr() in self.cropped:
            x = x[:, :, :, :4]
        return self.bn(F.relu(self.conv(x)))


def detection(rates: list[float], *, runs: int, num_batches: int) -> list[dict[str, float]]:
    """How often a run notices a fraction ``p`` of batches with silently changed sizes."""
    out = []
    model = _HiddenResize().train()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(num_batches)]
    verified = (num_batches - 2) / direct_module.VERIFY_EVERY
    for rate in rates:
        caught = 0
        for run in range(runs):
            draw = random.Random(f"{rate}-{run}")
            # The first two batches agree, so that direct batches start.
            model.cropped = {
                b.data_ptr() for i, b in enumerate(batches) if i >= 2 and draw.random() < rate
            }
            try:
                precisebn.recompute_bn_buffers(model, iter(batches))
            except RuntimeError:
                caught += 1
        out.append(
            {
                "rate": rate,
                "runs": runs,
                "caught": caught / runs,
                "expected": 1 - (1 - rate) ** verified,
            }
        )
    print("  guarantees: detection done", flush=True)
    return out


def run(*, quick: bool, repeats: int) -> dict[str, Any]:
    speed_rows = (
        [("mlp", 128, 100), ("cnn", 32, 8)] if quick else [("mlp", 128, 200), ("cnn", 32, 32)]
    )
    return {
        "buffers": buffer_memory(4 if quick else 8),
        "speed": verification_speed(speed_rows, repeats=repeats),
        "detection": detection([0.01, 0.05, 0.1, 0.25], runs=10 if quick else 40, num_batches=200),
        "verify_every": direct_module.VERIFY_EVERY,
        "num_batches": 200,
    }
