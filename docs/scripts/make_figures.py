"""Draw docs/images/ema_vs_precise.png: BN buffers estimated from k batches, three ways.

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

Run ``python docs/scripts/make_figures.py`` from the repository root (about a minute on a CPU).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import precisebn

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "images" / "ema_vs_precise.png"
BATCH_SIZE = 16
CHECKPOINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 88)  # 88 batches: one pass
REPEATS = 20


def main() -> None:
    torch.set_num_threads(1)
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
    fig, (left, right) = plt.subplots(
        2, 1, figsize=(6.4, 7.6), sharex=True, constrained_layout=True
    )
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
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {OUT.relative_to(ROOT)}; whole-set accuracy {full:.4f}")


if __name__ == "__main__":
    main()
