"""The digits demo: what precise BN buys on real data, in seconds on a CPU.

A small BatchNorm conv net is trained on scikit-learn's bundled handwritten digits
(1,797 8x8 images, no download) with settings under which the running (EMA) statistics
go stale: small batches, a high BN momentum and a high learning rate up to the last step.
A stochastic weight averaging (SWA) phase follows, with
`torch.optim.swa_utils.AveragedModel`, whose averaged weights never ran in
training, so their BN buffers are whatever the model had when averaging began.

Five models are scored on the held-out images: the final weights with their EMA buffers
and with precise buffers; the SWA weights with their stale buffers, with precise buffers,
and with `torch.optim.swa_utils.update_bn` (the peer). A `precisebn.report` of the SWA
model's layers shows how far recomputation moved its stale statistics.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from precisebn._buffers import bn_buffers
from precisebn._recompute import recompute_bn_buffers
from precisebn._report import Report, eps_by_layer, report

ROWS: dict[str, str] = {
    "ema": "final weights, EMA buffers (as trained)",
    "precise": "final weights, precise buffers",
    "swa_stale": "SWA weights, stale buffers",
    "swa_precise": "SWA weights, precise buffers",
    "swa_update_bn": "SWA weights, update_bn (peer)",
}
"""The scored models: JSON name -> table label, in table order."""

TEST_EVERY = 5
"""Image ``i`` of the dataset is a test image when ``i % TEST_EVERY == 0``: a fixed split."""


@dataclass(frozen=True)
class Settings:
    """How the demo trains.

    Attributes:
        epochs: epochs of plain training before averaging begins.
        swa_epochs: epochs of the SWA phase; the weights are averaged after each.
        batch_size: training batch size (small, so batch statistics are noisy).
        lr: SGD learning rate, constant throughout (high, so the weights keep moving).
        bn_momentum: BatchNorm momentum (high, so the EMA remembers only the last batches).
        weight_decay: SGD weight decay.
        stats_batch: batch size of the passes that recompute the statistics.
    """

    epochs: int
    swa_epochs: int
    batch_size: int = 16
    lr: float = 0.3
    bn_momentum: float = 0.5
    weight_decay: float = 5e-4
    stats_batch: int = 256


FULL = Settings(epochs=10, swa_epochs=10)
QUICK = Settings(epochs=2, swa_epochs=4)


@dataclass(frozen=True)
class Digits:
    """The digits images ``[N, 1, 8, 8]``, standardised with the training set's mean and std."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass(frozen=True)
class Score:
    """Test accuracy (a fraction) and mean cross-entropy loss of one model."""

    accuracy: float
    loss: float


@dataclass(frozen=True)
class DemoResult:
    """What one demo run measured.

    Attributes:
        seed: the seed of the weight initialisation and the batch order.
        quick: whether the reduced settings were used.
        settings: the training settings.
        scores: one `Score` per name in `ROWS`.
        train_size: number of training images.
        test_size: number of test images.
        seconds: wall time of training and scoring.
        report: how far recomputation moved the SWA model's stale BN statistics.
    """

    seed: int
    quick: bool
    settings: Settings
    scores: dict[str, Score]
    train_size: int
    test_size: int
    seconds: float
    report: Report = field(default_factory=Report)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``accuracy`` and ``loss`` map each row name to a float,
        ``report`` each BN layer of the SWA model to `Report.to_dict`'s figures."""
        return {
            "seed": self.seed,
            "quick": self.quick,
            "accuracy": {name: s.accuracy for name, s in self.scores.items()},
            "loss": {name: s.loss for name, s in self.scores.items()},
            "train_size": self.train_size,
            "test_size": self.test_size,
            "settings": asdict(self.settings),
            "seconds": round(self.seconds, 3),
            "report": self.report.to_dict(),
        }


def load_digits_split() -> Digits:
    """scikit-learn's bundled digits, split by index (every fifth image is a test image).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError:
        raise ImportError(
            "the demo needs scikit-learn (its digits dataset ships with it): "
            "pip install 'precisebn[demo]'"
        ) from None
    bunch = datasets.load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    test = torch.arange(len(labels)) % TEST_EVERY == 0
    train_x = images[~test]
    mean, std = train_x.mean(), train_x.std()
    return Digits(
        train_x=(train_x - mean) / std,
        train_y=labels[~test],
        test_x=(images[test] - mean) / std,
        test_y=labels[test],
    )


def make_net(*, bn_momentum: float) -> nn.Sequential:
    """A small conv net for 8x8 images with three BatchNorm layers.

    Example:
        >>> net = make_net(bn_momentum=0.5)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16, momentum=bn_momentum),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32, momentum=bn_momentum),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64, momentum=bn_momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    digits: Digits,
    *,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """One epoch of SGD over the training images, shuffled (the last partial batch is dropped)."""
    model.train()
    order = torch.randperm(len(digits.train_y), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        loss = F.cross_entropy(model(digits.train_x[index]), digits.train_y[index])
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()


def train(digits: Digits, settings: Settings, *, seed: int) -> tuple[nn.Module, AveragedModel]:
    """Train the net, then run the SWA phase; return the final model and the averaged one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_net(bn_momentum=settings.bn_momentum)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
    )
    for _ in range(settings.epochs):
        train_epoch(model, optimizer, digits, batch_size=settings.batch_size, generator=generator)
    swa = AveragedModel(model)  # copies the buffers as they are now; they are not averaged
    for _ in range(settings.swa_epochs):
        train_epoch(model, optimizer, digits, batch_size=settings.batch_size, generator=generator)
        swa.update_parameters(model)
    return model, swa


def evaluate(
    model: nn.Module, digits: Digits, *, buffers: Mapping[str, Tensor] | None = None
) -> Score:
    """Score ``model`` in eval mode on the test images, with ``buffers`` in place of its own."""
    model.eval()
    with torch.no_grad():
        logits = torch.func.functional_call(model, dict(buffers or {}), (digits.test_x,))
    accuracy = (logits.argmax(1) == digits.test_y).double().mean().item()
    return Score(accuracy=accuracy, loss=F.cross_entropy(logits, digits.test_y).item())


def run_demo(*, seed: int = 0, quick: bool = False) -> DemoResult:
    """Train, average, recompute and score; deterministic for a given seed and torch build.

    Runs on one CPU thread (restored afterwards); the global random state is left as it was.

    Args:
        seed: seeds the weight initialisation and the batch order.
        quick: use the reduced settings `QUICK` (a few seconds) instead of `FULL`.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    settings = QUICK if quick else FULL
    digits = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster for a net this small, and the same sums on every machine
    try:
        return _run(digits, settings, seed=seed, quick=quick)
    finally:
        torch.set_num_threads(threads)


def _run(digits: Digits, settings: Settings, *, seed: int, quick: bool) -> DemoResult:
    start = time.perf_counter()
    model, swa = train(digits, settings, seed=seed)
    loader = [
        (digits.train_x[i : i + settings.stats_batch], digits.train_y[i : i + settings.stats_batch])
        for i in range(0, len(digits.train_y), settings.stats_batch)
    ]
    averaged = swa.module
    stale = {key: value.detach().clone() for key, value in bn_buffers(averaged).items()}
    peer = copy.deepcopy(averaged)
    update_bn(loader, peer)
    swa_precise = recompute_bn_buffers(averaged, loader, num_batches=len(loader))
    scores = {
        "ema": evaluate(model, digits),
        "precise": evaluate(
            model, digits, buffers=recompute_bn_buffers(model, loader, num_batches=len(loader))
        ),
        "swa_stale": evaluate(averaged, digits),
        "swa_precise": evaluate(averaged, digits, buffers=swa_precise),
        "swa_update_bn": evaluate(peer, digits),
    }
    return DemoResult(
        seed=seed,
        quick=quick,
        settings=settings,
        scores=scores,
        train_size=len(digits.train_y),
        test_size=len(digits.test_y),
        seconds=time.perf_counter() - start,
        report=report(stale, swa_precise, eps=eps_by_layer(averaged)),
    )


def format_table(result: DemoResult) -> str:
    """The scores as an aligned text table, with a header saying what was run."""
    s = result.settings
    width = max(map(len, ROWS.values()))
    lines = [
        f"precise BN on scikit-learn's digits: seed {result.seed}, "
        f"{'quick' if result.quick else 'full'} run, {result.seconds:.1f} s",
        f"{result.train_size} training / {result.test_size} test images; "
        f"{s.epochs} epochs + {s.swa_epochs} SWA epochs, batch {s.batch_size}, "
        f"lr {s.lr}, BN momentum {s.bn_momentum}",
        "",
        f"  {'model':<{width}}  {'accuracy':>9}  {'loss':>7}",
        f"  {'-' * width}  {'-' * 9}  {'-' * 7}",
    ]
    for name, label in ROWS.items():
        score = result.scores[name]
        lines.append(f"  {label:<{width}}  {score.accuracy:>8.2%}  {score.loss:>7.4f}")
    return "\n".join(lines)


def verdict(result: DemoResult) -> list[str]:
    """Plain sentences on whether precise BN helped, on this seed, with the numbers.

    Example:
        >>> scores = {n: Score(accuracy=0.9, loss=0.3) for n in ROWS}
        >>> scores["swa_precise"] = Score(accuracy=0.95, loss=0.2)
        >>> r = DemoResult(0, True, QUICK, scores, 1437, 360, 1.0)
        >>> line = verdict(r)[1]
        >>> line[: line.index(",")]
        'SWA weights: 95.00% precise vs 90.00% stale (+5.00 points)'
        >>> line.endswith("precise BN helps.")
        True
    """
    sc = result.scores
    unit = 1 / result.test_size
    return [
        _compare("Final weights", sc["precise"], sc["ema"], "EMA", unit),
        _compare("SWA weights", sc["swa_precise"], sc["swa_stale"], "stale", unit),
        _versus_peer(sc["swa_precise"], sc["swa_update_bn"], unit),
    ]


def _compare(what: str, new: Score, old: Score, old_name: str, unit: float) -> str:
    gain = new.accuracy - old.accuracy
    if gain > unit / 2:
        judgement = "precise BN helps"
    elif gain < -unit / 2:
        judgement = "precise BN did not help on this seed"
    else:
        judgement = "the same accuracy on this seed"
        judgement += ", lower loss with precise BN" if new.loss < old.loss else ""
    return (
        f"{what}: {new.accuracy:.2%} precise vs {old.accuracy:.2%} {old_name} "
        f"({gain * 100:+.2f} points), loss {new.loss:.4f} vs {old.loss:.4f}: {judgement}."
    )


def _versus_peer(precise: Score, peer: Score, unit: float) -> str:
    diff = precise.accuracy - peer.accuracy
    if abs(diff) < unit / 2:
        head = "update_bn reaches the same accuracy"
    else:
        head = f"update_bn is {abs(diff) * 100:.2f} points {'behind' if diff > 0 else 'ahead'}"
    return f"Peer: {head} on the SWA weights (loss {peer.loss:.4f} vs {precise.loss:.4f} precise)."
