"""Model and loader factories for the CLI tests, named ``cli_factories:<name>`` on the command line.

The tests put this directory on ``PYTHONPATH`` (subprocesses) or ``sys.path`` (in-process).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

NUM_BATCHES = 6
BATCH_SIZE = 8


def make_model() -> nn.Module:
    """A small conv net with three BN layers (2-D, 2-D, 1-D), initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
            nn.BatchNorm1d(4),
        )


def make_other_model() -> nn.Module:
    """A model whose state dict does not fit :func:`make_model`'s (another width)."""
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5))


class _WithSpareBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.spare = nn.BatchNorm2d(4)  # never called in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def make_model_with_spare_bn() -> nn.Module:
    """A model with a BN layer that no batch reaches."""
    return _WithSpareBN()


class _Writer(nn.Module):
    """Spectral norm and a counter: a training-mode forward writes both buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        return self.bn(self.conv(x))


def make_writer_model() -> nn.Module:
    """A model whose forward writes buffers of its own, initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Writer()


def make_loader() -> list[tuple[Tensor, Tensor]]:
    """``NUM_BATCHES`` (input, label) batches, far from the statistics of a fresh model."""
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH_SIZE, 3, 6, 6, generator=generator) * 3.0 + 2.0,
            torch.randint(0, 4, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


def make_long_loader() -> list[tuple[Tensor, Tensor]]:
    """48 larger batches of the same distribution, for --tol."""
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(64, 3, 6, 6, generator=generator) * 3.0 + 2.0, torch.zeros(64))
        for _ in range(48)
    ]


def _signalling_loader(signum: int) -> Iterator[tuple[Tensor, Tensor]]:
    for index, batch in enumerate(make_loader()):
        if index == 2:
            os.kill(os.getpid(), signum)
            time.sleep(60)  # the signal cuts this short
        yield batch


def make_loader_sending_sigterm() -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of :func:`make_loader`, but at the third it sends SIGTERM to its process."""
    return _signalling_loader(signal.SIGTERM)


def make_loader_sending_sigint() -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of :func:`make_loader`, but at the third it sends SIGINT (Ctrl-C) to its process."""
    return _signalling_loader(signal.SIGINT)


def make_dict_loader() -> list[dict[str, Tensor]]:
    """The batches of :func:`make_loader` as dicts, which need :func:`forward_image`."""
    return [{"image": x, "label": y} for x, y in make_loader()]


def forward_image(model: Callable[..., Tensor], batch: dict[str, Tensor]) -> Tensor:
    """``--forward`` for :func:`make_dict_loader`'s batches."""
    return model(batch["image"])


def make_empty_loader() -> list[Tensor]:
    """A loader with no batches."""
    return []


def make_number() -> int:
    """Returns neither a model nor a loader."""
    return 3


def make_broken() -> nn.Module:
    """A factory that raises."""
    raise RuntimeError("the factory is broken on purpose")


model_instance = nn.BatchNorm1d(3)
"""A module instance, not a factory."""
