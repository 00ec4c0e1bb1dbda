"""`precisebn.plot`: what each figure shows, that it leaves its inputs alone, and the files."""

from __future__ import annotations

import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import precisebn

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")  # precisebn.plot draws without pyplot; this keeps any other use headless

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from precisebn import plot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def buffers(layers: dict[str, int], *, seed: int) -> dict[str, Tensor]:
    """Random BN buffers for layers of the given widths, in the given order."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, width in layers.items():
        out[f"{layer}.running_mean"] = torch.randn(width, generator=gen)
        out[f"{layer}.running_var"] = torch.rand(width, generator=gen) * 3 + 0.1
        out[f"{layer}.num_batches_tracked"] = torch.tensor(7)
    return out


# Not in sorted order: the x axis must follow the buffers' (model) order.
LAYERS = {"stem.bn": 4, "block.2.bn": 6, "block.10.bn": 3, "head": 5}


def line(ax: Axes, label: str) -> Line2D:
    (found,) = (each for each in ax.get_lines() if each.get_label() == label)
    return found


def ticks(ax: Axes) -> list[str]:
    return [label.get_text() for label in ax.get_xticklabels()]


def copies(mapping: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in mapping.items()}


def assert_unchanged(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert list(before) == list(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ------------------------------------------------------------------------------- shifts


def test_shifts_draws_every_channel_of_every_layer_in_model_order() -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    eps = {"stem.bn": 1e-3}
    figure = plot.shifts(old, new, eps=eps)
    assert isinstance(figure, Figure)
    shift_ax, ratio_ax = figure.axes
    assert ticks(ratio_ax) == list(LAYERS)  # the top panel shares them, unlabelled
    for ax in (shift_ax, ratio_ax):
        assert list(ax.get_xticks()) == list(range(len(LAYERS)))
        (strip,) = (c for c in ax.collections if isinstance(c, PathCollection))
        assert len(strip.get_offsets()) == sum(LAYERS.values())  # one dot per channel
    assert shift_ax.get_ylabel() == "mean shift (std)"
    assert ratio_ax.get_ylabel() == "log₂ var ratio"
    assert ratio_ax.get_xlabel() == "BatchNorm layer"
    assert "old → new" in shift_ax.get_title()
    assert "old → new" in ratio_ax.get_title()

    # The markers are the report's per-layer figures.
    rows = precisebn.report(old, new, eps=eps)
    torch.testing.assert_close(
        torch.tensor(line(shift_ax, "largest").get_ydata(), dtype=torch.float64),
        torch.tensor([row.shift_max for row in rows], dtype=torch.float64),
    )
    for label, figures in (
        ("largest", [row.ratio_max for row in rows]),
        ("smallest", [row.ratio_min for row in rows]),
    ):
        torch.testing.assert_close(
            torch.tensor(line(ratio_ax, label).get_ydata(), dtype=torch.float64),
            torch.tensor([math.log2(r) for r in figures], dtype=torch.float64),
        )
    # The median, per layer, of the channels' shifts.
    layer = "block.2.bn"
    want = (
        (old[f"{layer}.running_mean"] - new[f"{layer}.running_mean"]).abs().double()
        / (new[f"{layer}.running_var"].double() + 1e-5).sqrt()
    ).median()
    assert line(shift_ax, "median").get_ydata()[1] == pytest.approx(want.item())


def test_shifts_leaves_its_inputs_alone() -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    old_copy, new_copy = copies(old), copies(new)
    plot.shifts(old, new)
    plot.adaptation(old, new)
    plot.report(old, new)
    assert_unchanged(old_copy, old)
    assert_unchanged(new_copy, new)


def test_unchanged_statistics_sit_on_zero() -> None:
    new = buffers({"bn": 8}, seed=0)
    shift_ax, ratio_ax = plot.shifts(copies(new), new).axes
    assert list(line(shift_ax, "largest").get_ydata()) == [0.0]
    assert list(line(ratio_ax, "largest").get_ydata()) == [0.0]
    assert shift_ax.get_ylim()[0] == 0.0


def test_shifts_draws_into_given_axes() -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    figure = Figure()
    left, right, spare = figure.subplots(1, 3)
    assert plot.shifts(old, new, axes=(left, right)) is figure
    assert ticks(left) == ticks(right) == list(LAYERS)
    assert not spare.has_data()
    # Into a subfigure: the figure returned is the root one.
    sub = figure.subfigures(1, 1)
    assert plot.shifts(old, new, axes=sub.subplots(2, 1)) is figure
    with pytest.raises(ValueError, match="two axes"):
        plot.shifts(old, new, axes=[left])


def test_shifts_leaves_out_non_finite_channels() -> None:
    new = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.tensor([0.0, 1.0, 1.0])}
    old = {"bn.running_mean": torch.ones(3), "bn.running_var": torch.ones(3)}
    shift_ax, _ = plot.shifts(old, new, eps=0.0).axes  # channel 0: 1 / 0
    (strip,) = shift_ax.collections
    assert len(strip.get_offsets()) == 2
    assert list(line(shift_ax, "largest").get_ydata()) == [1.0]


def test_shifts_errors_are_the_reports() -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    del old["head.running_var"]
    with pytest.raises(KeyError, match=r"head\.running_var"):
        plot.shifts(old, new)
    wrong = {**buffers(LAYERS, seed=0), "head.running_mean": torch.zeros(2)}
    with pytest.raises(ValueError, match="shape"):
        plot.shifts(wrong, new)
    with pytest.raises(ValueError, match="no BatchNorm buffers"):
        plot.shifts({}, {"weight": torch.zeros(2)})


def test_many_layers_get_upright_names() -> None:
    many = {f"stage{i // 4}.block{i % 4}.bn": 4 for i in range(40)}
    old, new = buffers(many, seed=0), buffers(many, seed=1)
    figure = plot.shifts(old, new)
    _, ratio_ax = figure.axes
    assert ticks(ratio_ax) == list(many)
    assert {label.get_rotation() for label in ratio_ax.get_xticklabels()} == {90.0}
    assert figure.get_figwidth() > 6.4  # room for the columns
    few = plot.shifts(buffers({"a": 2, "b": 2}, seed=0), buffers({"a": 2, "b": 2}, seed=1))
    assert {label.get_rotation() for label in few.axes[1].get_xticklabels()} == {0.0}


def test_a_model_that_is_a_bn_layer_is_named() -> None:
    old, new = buffers({"": 3}, seed=0), buffers({"": 3}, seed=1)
    old = {key.lstrip("."): value for key, value in old.items()}
    new = {key.lstrip("."): value for key, value in new.items()}
    assert ticks(plot.shifts(old, new).axes[1]) == ["<model>"]


# --------------------------------------------------------------------------- adaptation


def test_adaptation_labels_source_to_target() -> None:
    source, target = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    figure = plot.adaptation(source, target)
    shift_ax, ratio_ax = figure.axes
    assert shift_ax.get_title().startswith("Mean shift, source → target")
    assert "|source mean - target mean| / target std" in shift_ax.get_title()
    assert "log₂(source var / target var)" in ratio_ax.get_title()
    assert ticks(ratio_ax) == list(LAYERS)
    # The same measures as shifts(old=source, new=target).
    old_ax = plot.shifts(source, target).axes[1]
    for label in ("median", "largest", "smallest"):
        assert list(line(ratio_ax, label).get_ydata()) == list(line(old_ax, label).get_ydata())


# -------------------------------------------------------------------------- convergence


def trace_info(layers: int, *, points: int = 6) -> precisebn.RunInfo:
    """A trace falling as 1/sqrt(batches), layer i starting at (i + 1) / 100."""
    trace = {
        f"layer{i}": tuple((16 * k, (i + 1) / 100 / math.sqrt(k)) for k in range(1, points + 1))
        for i in range(layers)
    }
    return precisebn.RunInfo(16 * points, 1024 * points, None, {}, {}, trace)


def test_convergence_highlights_the_worst_layers_and_draws_tol() -> None:
    info = trace_info(8)
    before = dict(info.trace)
    figure = plot.convergence(info, tol=0.02, highlight=3)
    (ax,) = figure.axes
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert ax.get_xlabel() == "batches folded"
    assert ax.get_ylabel() == "largest relative standard error"
    lines = ax.get_lines()
    assert len(lines) == 8 + 2  # a line per layer, the guide and tol
    named = [each.get_label() for each in lines if not each.get_label().startswith("_")]
    assert named == ["other layers", "layer7", "layer6", "layer5", "∝ 1/√batches", "tol = 0.02"]
    assert {each.get_color() for each in lines[:5]} == {"0.6"}
    assert len({each.get_color() for each in lines[5:8]}) == 3
    # The tol line lies at tol, across the whole axes.
    tol = line(ax, "tol = 0.02")
    assert list(tol.get_ydata()) == [0.02, 0.02]
    assert list(tol.get_xdata()) == [0, 1]
    # Each layer's points, as given.
    assert list(line(ax, "layer7").get_xdata()) == [16, 32, 48, 64, 80, 96]
    assert list(line(ax, "layer7").get_ydata()) == [e for _, e in info.trace["layer7"]]
    legend = ax.get_legend()
    assert legend is not None
    assert legend.get_title().get_text() == "worst 3 of 8 layers"
    assert dict(info.trace) == before


def test_convergence_colours_all_of_few_layers() -> None:
    (ax,) = plot.convergence(trace_info(2).trace).axes  # a trace mapping works too
    labels = [each.get_label() for each in ax.get_lines()]
    assert labels == ["layer1", "layer0", "∝ 1/√batches"]  # no tol line without tol
    legend = ax.get_legend()
    assert legend is not None
    assert legend.get_title().get_text() == ""


def test_convergence_of_a_real_run(one_thread: None) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    gen = torch.Generator().manual_seed(0)
    loader = [torch.randn(32, 3, generator=gen) for _ in range(40)]
    _, info = precisebn.recompute_bn_buffers(model, loader, num_batches=40, return_info=True)
    (ax,) = plot.convergence(info, tol=1e-2).axes
    assert list(line(ax, "1").get_xdata()) == [16, 32, 40]
    assert list(line(ax, "1").get_ydata()) == [e for _, e in info.trace["1"]]


def test_convergence_needs_a_trace() -> None:
    empty = precisebn.RunInfo(4, 64, None, {}, {})
    with pytest.raises(ValueError, match="return_info=True"):
        plot.convergence(empty)
    with pytest.raises(ValueError, match="return_info=True"):
        plot.convergence({"bn": ((16, math.inf),)})
    with pytest.raises(ValueError, match="tol"):
        plot.convergence(trace_info(2), tol=0.0)
    with pytest.raises(ValueError, match="highlight"):
        plot.convergence(trace_info(2), highlight=-1)


def test_convergence_draws_into_given_axes() -> None:
    figure = Figure()
    ax = figure.add_subplot()
    assert plot.convergence(trace_info(3), ax=ax) is figure
    assert len(ax.get_lines()) == 4


# ------------------------------------------------------------------------- report, save


def test_report_adds_convergence_when_there_is_a_trace() -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    info = trace_info(4)
    figure = plot.report(old, new, info=info, tol=0.05)
    _, ratio_ax, errors_ax = figure.axes
    assert ticks(ratio_ax) == list(LAYERS)
    assert list(line(errors_ax, "tol = 0.05").get_ydata()) == [0.05, 0.05]
    suptitle = figure.get_suptitle()
    assert suptitle == "4 BatchNorm layers recomputed over 96 batches (6144 samples)"
    assert len(plot.report(old, new).axes) == 2
    assert len(plot.report(old, new, info=precisebn.RunInfo(1, 8, None, {}, {})).axes) == 2


def test_save_writes_the_image_atomically(tmp_path: Path) -> None:
    old, new = buffers(LAYERS, seed=0), buffers(LAYERS, seed=1)
    figure = plot.report(old, new, info=trace_info(4))
    out = tmp_path / "report.png"
    out.write_bytes(b"old")
    plot.save(figure, out)
    first = out.read_bytes()
    assert first.startswith(PNG)
    assert os.listdir(tmp_path) == ["report.png"]  # no temporary file left
    plot.save(plot.report(old, new, info=trace_info(4)), str(out))
    assert out.read_bytes() == first  # no date or version in the file: the same bytes
    plot.save(figure, tmp_path / "report.svg")
    assert b"<svg" in (tmp_path / "report.svg").read_bytes()
    with pytest.raises(ValueError, match="unknown image format 'pt'"):
        plot.save(figure, tmp_path / "report.pt")
    with pytest.raises(FileNotFoundError):
        plot.save(figure, tmp_path / "missing" / "report.png")
    assert sorted(os.listdir(tmp_path)) == ["report.png", "report.svg"]


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.png"
    out.write_bytes(b"old")

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    figure = plot.shifts(buffers({"bn": 2}, seed=0), buffers({"bn": 2}, seed=1))
    with pytest.raises(KeyboardInterrupt):
        plot.save(figure, out)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["report.png"]


# ------------------------------------------------------------------- without matplotlib


def test_importing_precisebn_does_not_import_matplotlib() -> None:
    code = (
        "import sys, precisebn, precisebn.plot, precisebn._cli\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_without_matplotlib_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    new = buffers({"bn": 2}, seed=0)
    for draw in (
        lambda: plot.shifts(new, new),
        lambda: plot.adaptation(new, new),
        lambda: plot.convergence(trace_info(1)),
        lambda: plot.report(new, new),
    ):
        with pytest.raises(ImportError, match=r"pip install 'precisebn\[plot\]'"):
            draw()


# ------------------------------------------------------------------------------- docs


def test_pictures_page_snippets_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)  # the snippets save their figures here
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    scope: dict[str, Any] = {
        "model": model,
        "train_loader": [(torch.randn(8, 3, 6, 6, generator=gen) + 1, None) for _ in range(20)],
        "target_loader": [torch.randn(8, 3, 6, 6, generator=gen) * 2 for _ in range(4)],
    }
    blocks = FENCE.findall((ROOT / "docs" / "pictures.md").read_text())
    assert blocks
    for index, block in enumerate(blocks):
        exec(compile(block, f"pictures.md[{index}]", "exec"), scope)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["adaptation.png", "convergence.png", "report.png", "shifts.png"]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_figure_script_draws_the_pictures(tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("sklearn")
    script = runpy.run_path(str(ROOT / "docs" / "scripts" / "make_figures.py"), run_name="test")
    written = script["draw_pictures"](tmp_path, quick=True)
    assert sorted(path.name for path in written) == [
        "plot_adaptation.png",
        "plot_convergence.png",
        "plot_shifts.png",
    ]
    for path in written:
        assert path.parent == tmp_path
        assert path.read_bytes().startswith(PNG)
