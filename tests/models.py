"""Small models with every kind of BN layer precisebn covers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class CustomBN(_BatchNorm):
    """A user-defined BatchNorm subclass (any input with a channel dimension)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError("expected at least 2-D input")


class SmallCNN(nn.Module):
    def __init__(self, *, channels: int = 8, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.head = nn.Linear(channels, 5)
        self.bn_head = nn.BatchNorm1d(5, momentum=None, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.bn2(self.conv2(x)))
        return self.bn_head(self.head(x.mean(dim=(2, 3))))


class ReusedBN(nn.Module):
    """One BN layer called three times per forward (shared across crops), and one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.unused = nn.BatchNorm2d(6)

    def forward(self, x: Tensor) -> Tensor:
        full = self.bn(self.conv(x))
        crop = self.bn(self.conv(x[:, :, 2:, 2:]))
        again = self.bn(full)
        return full.mean() + crop.mean() + again.mean()


class Slimmable(nn.Module):
    """A BN layer of 4 channels run at a width chosen per batch: ``(x, c)`` is normalised
    over its first ``c`` channels with slices of the running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, batch: tuple[Tensor, int]) -> Tensor:
        x, c = batch
        bn = self.bn
        return nn.functional.batch_norm(
            x[:, :c],
            bn.running_mean[:c],
            bn.running_var[:c],
            bn.weight[:c],
            bn.bias[:c],
            training=True,
        )


class Seq1d(nn.Module):
    """BatchNorm1d on 3-D input (N, C, L), BatchNorm3d, SyncBatchNorm and a custom subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.bn1d = nn.BatchNorm1d(6)
        self.conv3d = nn.Conv3d(1, 3, 3)
        self.bn3d = nn.BatchNorm3d(3)
        self.sync = nn.SyncBatchNorm(3)
        self.custom = CustomBN(6)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1d(self.conv1d(x)))
        y = self.custom(y)
        v = self.bn3d(self.conv3d(y[:, None, None, :4, :4].expand(-1, 1, 4, 4, 4).contiguous()))
        return self.sync(v).mean() + y.mean()


def tabular(features: int = 6) -> nn.Sequential:
    """A tabular MLP whose first layer is a BatchNorm1d over raw features."""
    return nn.Sequential(
        nn.BatchNorm1d(features),
        nn.Linear(features, 16),
        nn.ReLU(),
        nn.BatchNorm1d(16),
        nn.Linear(16, 3),
    )


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
