"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from precisebn._fold import BlockFold


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def direct_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches folded as direct batches during a test."""
    seen: list[int] = []
    original = BlockFold.end_direct

    def counting(self: BlockFold, live: Tensor, *args: Any) -> None:
        seen.append(1)
        original(self, live, *args)

    monkeypatch.setattr(BlockFold, "end_direct", counting)
    return seen
