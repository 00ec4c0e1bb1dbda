"""Test-time BatchNorm adaptation on scikit-learn's digits under a covariate shift.

A small BatchNorm network is trained on clean digits, then scored on test digits that were
corrupted (noise, lower contrast and a shift of brightness, blur). Four ways to set the BN
statistics at prediction time, each on batches of the corrupted test images:

- **none**: the source statistics the network was trained with (eval mode);
- **linear mix**: ``prior * source + (1 - prior) * batch`` for the mean and the variance
  alike, the formula of common test-time adaptation code;
- **exact prior**: `precisebn.adapter` with the same prior, the source counted as
  pseudo-samples and merged with the batch exactly (the variance gains the spread between
  the source's and the batch's means);
- **full**: the batch's own statistics (prediction-time BN, ``prior = 0``).

Run it with ``python examples/test_time_adaptation.py``: a few seconds on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import precisebn

PRIOR = 0.6  # the source's share of the statistics, in both mixes
BATCH = 16  # test batches: small, so the source prior matters


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits ``[N, 1, 8, 8]`` in [0, 1]: every fifth image is a test image."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    test = torch.arange(len(labels)) % 5 == 0
    return images[~test], labels[~test], images[test], labels[test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def train(images: Tensor, labels: Tensor, *, epochs: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=gen).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    # Precise source statistics, so that only the shift separates source from target.
    precisebn.apply_bn_buffers(model, precisebn.recompute_bn_buffers(model, images.split(64)))
    return model.eval()


SHIFTS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "clean": lambda x, g: x,
    "noise": lambda x, g: x + 0.4 * torch.randn(x.shape, generator=g),
    "contrast": lambda x, g: 0.35 * x + 0.45,
    "blur": lambda x, g: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
}


class LinearMix(nn.Module):
    """A BN layer normalising with the linear mix of its source and batch statistics."""

    def __init__(self, bn: nn.BatchNorm2d, prior: float) -> None:
        super().__init__()
        self.bn, self.prior = bn, prior

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        w, bn = self.prior, self.bn
        mixed_mean = w * bn.running_mean + (1 - w) * mean
        mixed_var = w * bn.running_var + (1 - w) * var
        return F.batch_norm(x, mixed_mean, mixed_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def linear_mix(model: nn.Module, prior: float) -> nn.Module:
    mixed = copy.deepcopy(model)
    for name, module in list(mixed.named_children()):
        if isinstance(module, nn.BatchNorm2d):
            setattr(mixed, name, LinearMix(module, prior))
    return mixed


def accuracy(predict: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        hits = sum(
            (predict(x).argmax(1) == y).sum().item()
            for x, y in zip(images.split(BATCH), labels.split(BATCH), strict=True)
        )
    return hits / len(labels)


def main(seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy per shift (rows) and per way of setting the statistics (columns)."""
    train_x, train_y, test_x, test_y = load_digits()
    model = train(train_x, train_y, seed=seed)
    mixed = linear_mix(model, PRIOR)
    exact = precisebn.adapter(model, prior=PRIOR)
    full = precisebn.adapter(model)  # no prior: the batch's own statistics
    table = {}
    for shift, corrupt in SHIFTS.items():
        images = corrupt(test_x, torch.Generator().manual_seed(seed))
        table[shift] = {
            "none": accuracy(model, images, test_y),
            "linear mix": accuracy(mixed, images, test_y),
            "exact prior": accuracy(lambda x: exact.predict(exact.init(), x)[0], images, test_y),
            "full": accuracy(lambda x: full.predict(full.init(), x)[0], images, test_y),
        }
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"{'shift':<10}" + "".join(f"{c:>13}" for c in columns)]
    for shift, row in table.items():
        lines.append(f"{shift:<10}" + "".join(f"{row[c]:>13.1%}" for c in columns))
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"test accuracy, batches of {BATCH}, prior {PRIOR} in both mixes")
    print(format_table(main()))
