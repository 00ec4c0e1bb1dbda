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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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

# How the demo trains. The first three make the running statistics stale.
BATCH_SIZE = 16  # small, so batch statistics are noisy
LR = 0.3  # SGD, constant and high, so the weights keep moving
BN_MOMENTUM = 0.5  # high, so the EMA remembers only the last batches
WEIGHT_DECAY = 5e-4
STATS_BATCH = 256  # batch size of the passes that recompute the statistics

EPOCHS = {"full": (10, 10), "quick": (2, 4)}
"""Epochs of plain training, then of the SWA phase (the weights are averaged after each)."""

TEST_EVERY = 5
"""Image ``i`` of the dataset is a test image when ``i % TEST_EVERY == 0``: a fixed split."""


class Score(NamedTuple):
    """Test accuracy (a fraction) and mean cross-entropy loss of one model."""

    accuracy: float
    loss: float


class DemoResult(NamedTuple):
    """What one demo run measured.

    Attributes:
        seed: the seed of the weight initialisation and the batch order.
        quick: whether the reduced run was made.
        scores: one `Score` per name in `ROWS`.
        train_size: number of training images.
        test_size: number of test images.
        seconds: wall time of training and scoring.
        report: how far recomputation moved the SWA model's stale BN statistics.
    """

    seed: int
    quick: bool
    scores: dict[str, Score]
    train_size: int
    test_size: int
    seconds: float
    report: Report = Report()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``accuracy`` and ``loss`` map each row name to a float,
        ``report`` each BN layer of the SWA model to `Report.to_dict`'s figures."""
        epochs, swa_epochs = EPOCHS["quick" if self.quick else "full"]
        return {
            "seed": self.seed,
            "quick": self.quick,
            "accuracy": {name: s.accuracy for name, s in self.scores.items()},
            "loss": {name: s.loss for name, s in self.scores.items()},
            "train_size": self.train_size,
            "test_size": self.test_size,
            "settings": {
                "epochs": epochs,
                "swa_epochs": swa_epochs,
                "batch_size": BATCH_SIZE,
                "lr": LR,
                "bn_momentum": BN_MOMENTUM,
                "weight_decay": WEIGHT_DECAY,
                "stats_batch": STATS_BATCH,
            },
            "seconds": round(self.seconds, 3),
            "report": self.report.to_dict(),
        }


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits ``[N, 1, 8, 8]`` as ``(train_x, train_y, test_x, test_y)``.

    Every fifth image is a test image; the images are standardised with the training
    set's mean and standard deviation.

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
    mean, std = images[~test].mean(), images[~test].std()
    images = (images - mean) / std
    return images[~test], labels[~test], images[test], labels[test]


def make_net(*, bn_momentum: float) -> nn.Sequential:
    """A small conv net for 8x8 images with three BatchNorm layers.

    Example:
        >>> net = make_net(bn_momentum=0.5)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(cout, momentum=bn_momentum), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    swa_epochs: int,
    seed: int,
    net: Callable[[], nn.Module] | None = None,
    lr: float = LR,
) -> tuple[nn.Module, nn.Module]:
    """SGD over shuffled batches (the last partial one dropped), then an SWA phase.

    ``net`` makes the model (default: `make_net` with the demo's BN momentum), under the
    global seed ``seed``. Returns the final model and the averaged one, whose buffers are
    those of the model when averaging began (`AveragedModel` copies them then, and does
    not average them).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (net() if net is not None else make_net(bn_momentum=BN_MOMENTUM)).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)

    def epoch() -> None:
        order = torch.randperm(len(y), generator=generator)
        for index in torch.split(order[: len(order) - len(order) % BATCH_SIZE], BATCH_SIZE):
            optimizer.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(x[index]), y[index]))
            optimizer.step()

    for _ in range(epochs):
        epoch()
    swa = AveragedModel(model)
    for _ in range(swa_epochs):
        epoch()
        swa.update_parameters(model)
    return model, swa.module


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, *, buffers: Mapping[str, Tensor] | None = None
) -> Score:
    """Score ``model`` in eval mode on ``(x, y)``, with ``buffers`` in place of its own."""
    model.eval()
    with torch.no_grad():
        logits = torch.func.functional_call(model, dict(buffers or {}), (x,))
    accuracy = (logits.argmax(1) == y).double().mean().item()
    return Score(accuracy=accuracy, loss=F.cross_entropy(logits, y).item())


def run_demo(*, seed: int = 0, quick: bool = False) -> DemoResult:
    """Train, average, recompute and score; deterministic for a given seed and torch build.

    Runs on one CPU thread (restored afterwards); the global random state is left as it was.

    Args:
        seed: seeds the weight initialisation and the batch order.
        quick: the reduced run of `EPOCHS` (a few seconds) instead of the full one.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    train_x, train_y, test_x, test_y = load_digits()
    epochs, swa_epochs = EPOCHS["quick" if quick else "full"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster for a net this small, and the same sums on every machine
    try:
        start = time.perf_counter()
        model, averaged = train(train_x, train_y, epochs=epochs, swa_epochs=swa_epochs, seed=seed)
        loader = list(
            zip(torch.split(train_x, STATS_BATCH), torch.split(train_y, STATS_BATCH), strict=True)
        )
        stale = {key: value.detach().clone() for key, value in bn_buffers(averaged).items()}
        peer = copy.deepcopy(averaged)
        update_bn(loader, peer)
        precise = recompute_bn_buffers(model, loader, num_batches=len(loader))
        swa_precise, info = recompute_bn_buffers(
            averaged, loader, num_batches=len(loader), return_info=True
        )
        scores = {
            "ema": evaluate(model, test_x, test_y),
            "precise": evaluate(model, test_x, test_y, buffers=precise),
            "swa_stale": evaluate(averaged, test_x, test_y),
            "swa_precise": evaluate(averaged, test_x, test_y, buffers=swa_precise),
            "swa_update_bn": evaluate(peer, test_x, test_y),
        }
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    moved = report(stale, swa_precise, info=info, eps=eps_by_layer(averaged))
    return DemoResult(seed, quick, scores, len(train_y), len(test_y), seconds, moved)


def format_table(result: DemoResult) -> str:
    """The scores as an aligned text table, with a header saying what was run."""
    epochs, swa_epochs = EPOCHS["quick" if result.quick else "full"]
    width = max(map(len, ROWS.values()))
    lines = [
        f"precise BN on scikit-learn's digits: seed {result.seed}, "
        f"{'quick' if result.quick else 'full'} run, {result.seconds:.1f} s",
        f"{result.train_size} training / {result.test_size} test images; "
        f"{epochs} epochs + {swa_epochs} SWA epochs, batch {BATCH_SIZE}, "
        f"lr {LR}, BN momentum {BN_MOMENTUM}",
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
        >>> line = verdict(DemoResult(0, True, scores, 1437, 360, 1.0))[1]
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
