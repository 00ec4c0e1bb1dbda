"""The models and synthetic batches the benchmarks run on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN pairs and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_cnn(width: int = 16, blocks: int = 1, classes: int = 10) -> nn.Module:
    """A CIFAR-style ResNet (3 stages, ``blocks`` basic blocks each) for 32x32 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def bn_mlp(features: int = 64, width: int = 256, depth: int = 6) -> nn.Module:
    """An MLP with a BatchNorm1d after every linear layer: BN is a large share of the work."""
    layers: list[nn.Module] = []
    cin = features
    for _ in range(depth):
        layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
        cin = width
    layers.append(nn.Linear(cin, 1))
    return nn.Sequential(*layers)


def conv3d_net(width: int = 8) -> nn.Module:
    """A small video-style 3-D conv net with BatchNorm3d layers."""
    return nn.Sequential(
        nn.Conv3d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(),
        nn.Conv3d(width, 2 * width, 3, 2, 1, bias=False),
        nn.BatchNorm3d(2 * width),
        nn.ReLU(),
        nn.Conv3d(2 * width, 2 * width, 3, 1, 1, bias=False),
        nn.BatchNorm3d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def tabular(features: int = 16, width: int = 32) -> nn.Module:
    """A tabular model whose first layer is a BatchNorm1d on the raw features."""
    return nn.Sequential(
        nn.BatchNorm1d(features),
        nn.Linear(features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 1),
    )


@dataclass(frozen=True)
class Workload:
    """A model, the shape of one input sample, and how to scale the synthetic inputs."""

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    offset: float = 0.0
    scale: float = 1.0


def make_model(workload: Workload, seed: int = 0) -> nn.Module:
    """Build the workload's model with deterministic weights, in training mode."""
    torch.manual_seed(seed)
    return workload.build().train()


def batch_sizes(num_batches: int, batch: int, *, ragged: bool) -> list[int]:
    """``num_batches`` sizes: all ``batch``, or cycling through ragged sizes up to ``batch``."""
    if not ragged:
        return [batch] * num_batches
    pattern = [batch, max(2, batch // 3), max(2, batch - 5), max(2, batch // 2 + 1), 2 * batch]
    return [pattern[i % len(pattern)] for i in range(num_batches)]


def make_batches(
    workload: Workload, sizes: list[int], *, seed: int = 1, device: str = "cpu"
) -> list[Tensor]:
    """Synthetic float32 batches: ``scale * tilt * (offset + N(0, 1))`` per feature.

    ``tilt`` spreads the features' scales over [0.5, 1.5]; the mean of every feature is
    ``offset`` times its standard deviation.
    """
    return list(iter_batches(workload, sizes, seed=seed, device=device))


def iter_batches(
    workload: Workload, sizes: list[int], *, seed: int = 1, device: str = "cpu"
) -> Iterator[Tensor]:
    """Like :func:`make_batches`, generated lazily so that only one batch is alive."""
    gen = torch.Generator().manual_seed(seed)
    channels = workload.sample_shape[0]
    shape = (channels, *[1] * (len(workload.sample_shape) - 1))
    tilt = torch.linspace(0.5, 1.5, channels, dtype=torch.float64).reshape(shape)
    for size in sizes:
        z = torch.randn((size, *workload.sample_shape), generator=gen, dtype=torch.float64)
        x = workload.scale * (workload.offset + z) * tilt
        yield x.to(torch.float32).to(device)


CNN = Workload("cnn", lambda: resnet_cnn(16, 1), (3, 32, 32))
MLP = Workload("mlp", lambda: bn_mlp(64, 256, 6), (64,))
CONV3D = Workload("conv3d", lambda: conv3d_net(8), (3, 8, 24, 24))


def tabular_workload(ratio: float) -> Workload:
    """The tabular model on features whose mean is ``ratio`` times their spread."""
    return Workload(f"tabular mean={ratio:g}*std", lambda: tabular(16, 32), (16,), ratio, 1.0)


def cnn_width(width: int) -> Workload:
    """The ResNet-style CNN with its first stage ``width`` channels wide."""
    return Workload(f"cnn width {width}", lambda: resnet_cnn(width, 1), (3, 32, 32))
