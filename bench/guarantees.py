"""What purity costs in memory: buffers are copied on write, not up front.

The peak of live tensor bytes (``torch.profiler`` allocation records, replayed in time
order) of one precisebn run, against the floor's on the same model, for a BN MLP that
keeps a large buffer it only reads (a table) and for the same model when its forward also
writes a buffer of that size (a running sum). Copying every buffer blindly would cost the
table's size in both; copy on write costs it only where written.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from bench.memory import peak_tensor_mib
from bench.methods import floor, run_precisebn
from bench.models import bn_mlp

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


def run(*, quick: bool) -> dict[str, Any]:
    """The figure of this module, as JSON-serialisable results."""
    return {"buffers": buffer_memory(4 if quick else 8), "table_mib": TABLE_MIB}
