"""Draw the documentation's figures into docs/images/.

``ema_vs_precise.png`` (*Why precise BN*): BN buffers estimated from k batches, three ways.
The network and data are those of ``examples/functional_training.py`` (a small CNN on
scikit-learn's 8x8 digits). After training, the weights are held fixed and the BN buffers
are estimated afresh from ``k`` training batches, starting from the default buffers (mean 0,
variance 1), as one must after SWA weight averaging, pruning or any other change of weights:

* EMA: what training-mode forward passes do, momentum 0.1 (PyTorch's default);
* per-batch average: equal weights for every batch's mean and variance
  (``torch.optim.swa_utils.update_bn``, which sets momentum to None);
* precise: ``precisebn``, every value pooled as one batch.

Each curve is the mean over several random orders of the batches. The right panel measures
the error of the last BN layer's variance against the statistics of the whole training set.

``plot_shifts.png``, ``plot_adaptation.png`` (*Pictures*) and ``plot_convergence.png``
(*How many batches?*): the figures of ``precisebn.plot`` for a ten-layer BN conv net trained
on the digits with the demo's settings (small batches, BN momentum 0.5, a high learning
rate), then averaged with SWA (`draw_pictures`):

* shifts: the SWA model's stale buffers (those of the model when averaging began) against
  precise ones recomputed over the training images;
* convergence: the standard errors of a recompute over batches of 32 drawn at random from
  the training images, against ``tol=1e-2``;
* adaptation: the precise buffers of the training images (source) against those that
  ``precisebn.adapt`` gives for the test images with a covariate shift (half the contrast
  and Gaussian noise), with no prior: full adaptation (target).

Run ``python docs/scripts/make_figures.py`` from the repository root (about two minutes on a
CPU; ``--only pictures`` draws only the ``plot_*`` figures, in well under a minute).
"""

from __future__ import annotations

import argparse
import copy
import runpy
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import precisebn
from precisebn import _demo, plot
from precisebn._report import eps_by_layer

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
BATCH_SIZE = 16
CHECKPOINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 88)  # 88 batches: one pass
REPEATS = 20
DPI = 110


def draw_ema_vs_precise(out_dir: Path) -> Path:
    """Draw ``ema_vs_precise.png`` into ``out_dir``; return its path."""
    ex = runpy.run_path(str(ROOT / "examples" / "functional_training.py"), run_name="figures")
    trained = ex["main"]()
    model, params, train, test = (trained[k] for k in ("model", "params", "train", "test"))
    fresh = {k: v.detach() for k, v in ex["make_model"]().named_buffers()}
    exact = precisebn.recompute_bn_buffers(model, [train[0]], params=params, buffers=fresh)
    probe = "1.running_var"

    def score(buffers: dict[str, torch.Tensor]) -> tuple[float, float]:
        acc = ex["accuracy"](model, params, {**fresh, **buffers}, test)
        err = ((buffers[probe] - exact[probe]).abs() / exact[probe]).mean().item()
        return acc, err

    curves: dict[str, list[list[tuple[float, float]]]] = {"ema": [], "average": [], "precise": []}
    for repeat in range(REPEATS):
        ema = dict(fresh)
        total: dict[str, torch.Tensor] | None = None
        stats = precisebn.init(fresh)
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in curves}
        loader = ex["batches"](train, BATCH_SIZE, seed=1000 + repeat)
        for k, (images, _) in enumerate(loader, 1):
            if k > CHECKPOINTS[-1]:
                break
            with torch.no_grad():
                _, moments = precisebn.capture(model, images, params=params, buffers=fresh)
            ema = ex["ema_buffers"](ema, moments)
            batch = precisebn.finalize(moments, like=fresh)
            total = batch if total is None else {key: total[key] + batch[key] for key in batch}
            stats = precisebn.merge(stats, moments)
            if k in CHECKPOINTS:
                rows["ema"].append(score(ema))
                rows["average"].append(score({key: v / k for key, v in total.items()}))
                rows["precise"].append(score(precisebn.finalize(stats, like=fresh)))
        for name, row in rows.items():
            curves[name].append(row)

    styles = {
        "ema": ("EMA, momentum 0.1", "tab:red", "o"),
        "average": ("per-batch average (update_bn)", "tab:orange", "s"),
        "precise": ("precise BN (precisebn)", "tab:blue", "^"),
    }
    fig = Figure(figsize=(6.4, 7.6), layout="constrained")
    left, right = fig.subplots(2, 1, sharex=True)
    for name, runs in curves.items():
        mean = torch.tensor(runs, dtype=torch.float64).mean(0)
        label, color, marker = styles[name]
        left.plot(CHECKPOINTS, mean[:, 0], label=label, color=color, marker=marker, ms=4)
        right.plot(CHECKPOINTS, mean[:, 1], label=label, color=color, marker=marker, ms=4)
    full = ex["accuracy"](model, params, {**fresh, **exact}, test)
    left.axhline(full, color="gray", ls=":", lw=1, label="whole training set as one batch")
    left.set(
        xscale="log",
        ylabel="test accuracy",
        title="Digits test accuracy, weights fixed",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel=f"batches used (batch size {BATCH_SIZE})",
        ylabel="relative error",
        title="Mean relative error of the first BN layer's running_var",
    )
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    out = out_dir / "ema_vs_precise.png"
    fig.savefig(out, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {out}; whole-set accuracy {full:.4f}")
    return out


# ------------------------------------------------------------------------ precisebn.plot

PICTURE_EPOCHS = {False: (4, 4), True: (1, 1)}
"""Epochs of plain training, then of SWA, by ``quick``."""


def make_deep_net() -> nn.Sequential:
    """Ten BN layers: a stem, three stages of conv blocks, and a BatchNorm1d in the head."""

    def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        bn = nn.BatchNorm2d(cout, momentum=_demo.BN_MOMENTUM)
        return nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=nn.ReLU()))

    def stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        first = block(cin, cout, stride)
        return nn.Sequential(first, *(block(cout, cout) for _ in range(blocks - 1)))

    head = OrderedDict(
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(64, 32, bias=False),
        bn=nn.BatchNorm1d(32, momentum=_demo.BN_MOMENTUM),
        relu=nn.ReLU(),
        out=nn.Linear(32, 10),
    )
    return nn.Sequential(
        OrderedDict(
            stem=block(1, 16),
            stage1=stage(16, 16, 2, 1),
            stage2=stage(16, 32, 3, 2),
            stage3=stage(32, 64, 3, 2),
            head=nn.Sequential(head),
        )
    )


def train_swa(x: Tensor, y: Tensor, *, quick: bool) -> nn.Module:
    """The demo's stale-statistics training of the deeper net, then SWA; returns the
    averaged model, whose buffers are those of the model when averaging began."""
    epochs, swa_epochs = PICTURE_EPOCHS[quick]
    _, averaged = _demo.train(
        x, y, epochs=epochs, swa_epochs=swa_epochs, seed=0, net=make_deep_net, lr=0.1
    )
    return averaged.eval()


def shifted(x: Tensor) -> Tensor:
    """A covariate shift: half the contrast, and Gaussian noise of 0.6 standard deviations."""
    generator = torch.Generator().manual_seed(1)
    return 0.5 * x + 0.6 * torch.randn(x.shape, generator=generator)


def accuracy(model: nn.Module, buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        logits = torch.func.functional_call(model, buffers, (x,))
    return (logits.argmax(1) == y).double().mean().item()


def draw_pictures(out_dir: Path, *, quick: bool = False) -> list[Path]:
    """Draw ``plot_shifts.png``, ``plot_convergence.png`` and ``plot_adaptation.png`` into
    ``out_dir``; return their paths. ``quick``: a short training on part of the data, for
    the tests (the same figures, other values)."""
    train_x, train_y, test_x, test_y = _demo.load_digits()
    if quick:
        train_x, train_y = train_x[:320], train_y[:320]
    model = train_swa(train_x, train_y, quick=quick)
    eps = eps_by_layer(model)
    stale = copy.deepcopy(precisebn.bn_buffers(model))
    by_256 = list(torch.split(train_x, 256))
    source = precisebn.recompute_bn_buffers(model, by_256, num_batches=len(by_256))

    generator = torch.Generator().manual_seed(2)
    draws = 32 if quick else 1024
    batches = [
        train_x[torch.randint(len(train_x), (32,), generator=generator)] for _ in range(draws)
    ]
    _, info = precisebn.recompute_bn_buffers(model, batches, num_batches=draws, return_info=True)

    corrupted = shifted(test_x)
    target = precisebn.adapt(model, list(torch.split(corrupted, 128)), num_batches=10)  # full
    print(
        "test accuracy: SWA weights, precise buffers "
        f"{accuracy(model, source, test_x, test_y):.3f}; on the shifted test images "
        f"{accuracy(model, source, corrupted, test_y):.3f} with the source buffers, "
        f"{accuracy(model, target, corrupted, test_y):.3f} with the target's"
    )

    figures: Sequence[tuple[str, Figure]] = (
        ("plot_shifts.png", plot.shifts(stale, source, eps=eps)),
        ("plot_convergence.png", plot.convergence(info, tol=1e-2)),
        ("plot_adaptation.png", plot.adaptation(source, target, eps=eps)),
    )
    written = []
    for name, figure in figures:
        out = out_dir / name
        plot.save(figure, out, dpi=DPI)
        print(f"wrote {out}")
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the documentation's figures.")
    parser.add_argument("--only", choices=("ema", "pictures"), help="draw only these figures")
    parser.add_argument("--out-dir", type=Path, default=IMAGES, help="default: docs/images")
    parser.add_argument("--quick", action="store_true", help="pictures from a short training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "ema"):
        draw_ema_vs_precise(args.out_dir)
    if args.only in (None, "pictures"):
        draw_pictures(args.out_dir, quick=args.quick)


if __name__ == "__main__":
    main()
