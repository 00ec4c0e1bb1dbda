"""Layers laid end to end: each layer's channels are one span of a flat vector.

A run keeps its per-channel sums, the batch rows the BN kernels write, the tensors a
distributed reduction sends and the standard errors it evaluates as flat vectors over all
recomputed channels, so that a handful of vectorised operations serve every layer at
once, whatever their number. `Layout` is the one map between those vectors and the
layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Layout"]


class Layout:
    """Named layers of ``sizes[i]`` channels each, laid end to end in that order.

    Example:
        >>> import torch
        >>> layout = Layout({"a": 2, "b": 3})
        >>> layout.spans, layout.channels
        ([(0, 2), (2, 5)], 5)
        >>> flat = layout.join([torch.zeros(2), torch.ones(3)])
        >>> [t.tolist() for t in layout.split(flat)]
        [[0.0, 0.0], [1.0, 1.0, 1.0]]
        >>> layout.per_channel([7, 1], torch.device("cpu")).tolist()
        [7.0, 7.0, 1.0, 1.0, 1.0]
    """

    __slots__ = ("channels", "index", "names", "sizes", "spans", "starts")

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.names = list(sizes)
        self.sizes = list(sizes.values())
        self.index = {name: i for i, name in enumerate(self.names)}
        offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.spans = list(itertools.pairwise(offsets))
        self.starts = torch.tensor(offsets[:-1])
        self.channels = offsets[-1]

    @classmethod
    def of(cls, means: Mapping[str, Tensor]) -> Layout:
        """The layout of one ``[C]`` tensor per layer (a mean, a buffer)."""
        return cls({name: value.numel() for name, value in means.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.names, self.sizes) == (other.names, other.sizes)

    def __hash__(self) -> int:
        return hash((tuple(self.names), tuple(self.sizes)))

    def __repr__(self) -> str:
        return f"Layout({dict(zip(self.names, self.sizes, strict=True))})"

    def join(self, parts: Iterable[Tensor]) -> Tensor:
        """One flat vector of the per-layer ``[C]`` tensors ``parts``."""
        flat = list(parts)
        return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)

    def split(self, flat: Tensor) -> list[Tensor]:
        """The per-layer views of a flat vector (the last dimension is split)."""
        return list(flat.split_with_sizes(self.sizes, dim=-1))

    def per_channel(self, values: Sequence[float], device: torch.device) -> Tensor:
        """A float64 vector holding ``values[i]`` on every channel of layer ``i``."""
        if not self.names:
            return torch.zeros(0, dtype=torch.float64, device=device)
        plain = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return torch.repeat_interleave(plain, torch.tensor(self.sizes)).to(device)

    def owners(self, device: torch.device) -> Tensor:
        """Per channel, the index of its layer."""
        sizes = torch.tensor(self.sizes, device=device)
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=device), sizes)

    def count_per_layer(self, flags: Tensor) -> list[list[int]]:
        """Per layer, how many of its channels ``flags`` (``[k, C]`` booleans) set, for each
        of the ``k`` rows: one transfer to the host whatever the number of layers."""
        device = flags.device
        owner = self.owners(device)
        totals = torch.zeros(flags.shape[0], len(self.sizes), dtype=torch.long, device=device)
        totals.index_add_(1, owner, flags.long())
        counts: list[list[int]] = totals.cpu().tolist()
        return counts
