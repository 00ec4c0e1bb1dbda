"""Pictures of a recompute: how far each BatchNorm layer's statistics moved, and how fast
their standard errors fell. Needs matplotlib: ``pip install 'precisebn[plot]'``.

Every function returns a matplotlib ``Figure`` drawn with the object API (no pyplot state,
any backend), or draws into the axes it is given and returns their figure. Importing
``precisebn`` does not import this module, and this module imports matplotlib only when a
function is called.

- `shifts`: per layer, old against new statistics (e.g. a checkpoint's EMA buffers against
  recomputed ones), as the standardized mean shift and the log variance ratio of every
  channel: the per-channel figures behind `precisebn.report`'s table.
- `adaptation`: the same picture for test-time adaptation, source against target buffers.
- `convergence`: ``RunInfo.trace``, each layer's largest relative standard error against
  the batches folded, with the ``tol`` line.
- `report`: `shifts` and `convergence` in one figure: what ``precisebn recompute --plot``
  writes.
- `save`: write a figure atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from precisebn._buffers import RunInfo
from precisebn._checkpoint import write_atomically
from precisebn._report import DEFAULT_EPS, channel_moves

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

__all__ = ["adaptation", "convergence", "report", "save", "shifts"]

Trace = Mapping[str, Sequence[tuple[int, float]]]
"""Per layer, ``(batches, largest relative standard error)`` points: ``RunInfo.trace``."""

HIGHLIGHT = 5
"""How many layers `convergence` draws in colour by default: those with the largest final
error; the others are grey."""

DPI = 120
"""The resolution `save` writes raster images at, in dots per inch."""

_MISSING = "precisebn.plot needs matplotlib: pip install 'precisebn[plot]'"
_GREY = "0.6"


class _Moves(NamedTuple):
    """Per layer (in the order of the new buffers), every channel's two measures."""

    layers: list[str]
    shift: list[Tensor]  # |before mean - after mean| / sqrt(after var + eps)
    log_ratio: list[Tensor]  # log2((before var + eps) / (after var + eps))


def shifts(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    *,
    eps: float | Mapping[str, float] = DEFAULT_EPS,
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """Per layer, how far every channel's statistics moved from ``old`` to ``new``.

    Two panels share the x axis, one position per layer in the order of ``new`` (model
    order, for buffers from `precisebn.recompute_bn_buffers`):

    - the standardized mean shift ``|old mean - new mean| / sqrt(new var + eps)``;
    - the log variance ratio ``log2((old var + eps) / (new var + eps))``: 0 unchanged,
      +1 an old variance twice the new one.

    Each channel is a grey dot (spread sideways so they do not hide one another); the
    median channel is a black bar, the largest (and, for the ratio, the smallest) a
    triangle. These are the per-channel figures `precisebn.report` summarises: the
    largest shift is its ``shift_max``, the ratio's extremes the ``log2`` of its
    ``ratio_min`` and ``ratio_max``. Non-finite values (a zero variance with ``eps=0``)
    are left out.

    Args:
        old: the buffers before, keyed ``"<layer>.running_mean"`` and
            ``"<layer>.running_var"`` (e.g. a checkpoint's state dict; other keys are
            ignored).
        new: the recomputed buffers; its layers, in its order, are the x axis.
        eps: each layer's ``eps``: one value for all, or a mapping from layer name to
            ``eps`` (a name missing from it gets 1e-5, PyTorch's default).
        axes: two axes to draw into (mean shift, then variance ratio); default: a new
            figure.

    Returns:
        The figure drawn into.

    Raises:
        ImportError: matplotlib is not installed.
        KeyError, ValueError: as `precisebn.report` (a layer missing from ``old``, shapes
            that differ); ValueError also when ``new`` holds no BN layer, or ``axes`` is
            not two axes.

    Example:
        >>> import torch
        >>> from precisebn import plot
        >>> old = {"bn.running_mean": torch.tensor([1.0, 0.0]),
        ...        "bn.running_var": torch.tensor([4.0, 1.0])}
        >>> new = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
        >>> figure = plot.shifts(old, new, eps=0.0)
        >>> labels = [ax.get_ylabel() for ax in figure.axes]
        >>> labels
        ['mean shift (std)', 'log₂ var ratio']
        >>> layers = [label.get_text() for label in figure.axes[1].get_xticklabels()]
        >>> layers
        ['bn']
    """
    return _draw_moves(_moves(old, new, eps), axes, before="old", after="new")


def adaptation(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    *,
    eps: float | Mapping[str, float] = DEFAULT_EPS,
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """Per layer, how far test-time adaptation moved the statistics: source -> target.

    The picture of `shifts`, with the source buffers (those the model was trained with)
    in place of ``old`` and the adapted target buffers in place of ``new``: the mean shift
    ``|source mean - target mean| / sqrt(target var + eps)`` and
    ``log2((source var + eps) / (target var + eps))``, every channel of every layer. A
    covariate shift of the input (noise, contrast, blur) shows where it reaches: often
    most in the first layers' variances.

    Args:
        source: the source buffers, keyed ``"<layer>.running_mean"`` and
            ``"<layer>.running_var"`` (e.g. `precisebn.bn_buffers` of the trained model).
        target: the adapted buffers; its layers, in its order, are the x axis.
        eps: each layer's ``eps``, as in `shifts`.
        axes: two axes to draw into; default: a new figure.

    Returns:
        The figure drawn into.

    Raises:
        ImportError: matplotlib is not installed.
        KeyError, ValueError: as `shifts`.

    Example:
        >>> import torch
        >>> from precisebn import plot
        >>> source = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
        >>> target = {"bn.running_mean": torch.ones(3), "bn.running_var": torch.full((3,), 4.0)}
        >>> figure = plot.adaptation(source, target)
        >>> figure.axes[0].get_title()
        'Mean shift, source → target: |source mean - target mean| / target std'
    """
    return _draw_moves(_moves(source, target, eps), axes, before="source", after="target")


def convergence(
    info: RunInfo | Trace,
    *,
    tol: float | None = None,
    highlight: int = HIGHLIGHT,
    ax: Axes | None = None,
) -> Figure:
    """Each layer's largest relative standard error against the batches folded, log-log.

    One line per layer through the points of ``info.trace``: at every pooling point (every
    16 batches, and at the end) the largest over the layer's channels of
    ``stderr(mean) / std`` and ``stderr(var) / var``, the figure ``tol=`` compares. Errors
    shrink as ``1 / sqrt(batches)``, a slope of -1/2, drawn as a dotted guide through the
    worst layer's first point. The ``highlight`` layers with the largest final error are
    drawn in colour and named in the legend, the others in grey, so that a model with many
    layers stays readable. With ``tol``, a dashed line at ``tol``: a run with ``tol=``
    stops at the first pooling point where every layer's line is at or below it.

    Args:
        info: the `precisebn.RunInfo` of a run with ``return_info=True`` or ``tol=``, or
            its ``trace`` (a mapping from layer name to ``(batches, error)`` points).
        tol: the tolerance to draw (default: none).
        highlight: how many of the worst layers to draw in colour (default: 5).
        ax: the axes to draw into; default: a new figure.

    Returns:
        The figure drawn into.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the trace holds no finite positive error (a run without
            ``return_info=True`` or ``tol=`` has an empty one), ``tol`` is not positive,
            or ``highlight`` is negative.

    Example:
        >>> from precisebn import RunInfo, plot
        >>> info = RunInfo(
        ...     num_batches=32, num_samples=2048, converged=True, stderr={}, n_eff={},
        ...     trace={"conv.bn": ((16, 0.014), (32, 0.0099)),
        ...            "head.bn": ((16, 0.004), (32, 0.003))},
        ... )
        >>> figure = plot.convergence(info, tol=0.01)
        >>> labels = [line.get_label() for line in figure.axes[0].get_lines()]
        >>> labels
        ['conv.bn', 'head.bn', '∝ 1/√batches', 'tol = 0.01']
    """
    if tol is not None and not 0 < tol < math.inf:
        raise ValueError(f"tol must be a positive number, got {tol}")
    if highlight < 0:
        raise ValueError(f"highlight must be a non-negative number of layers, got {highlight}")
    points = _finite_points(info.trace if isinstance(info, RunInfo) else info)
    if not points:
        raise ValueError(
            "the trace holds no finite standard error to draw: pass the RunInfo of a run "
            "with return_info=True or tol="
        )
    if ax is None:
        ax = _new_figure(width=6.4, height=4.2).add_subplot()
    worst = sorted(points, key=lambda layer: -points[layer][-1][1])[:highlight]
    grey = [layer for layer in points if layer not in worst]
    for index, layer in enumerate(grey):
        batches, errors = zip(*points[layer], strict=True)
        label = "other layers" if index == 0 else "_nolegend_"
        ax.plot(batches, errors, color=_GREY, lw=0.9, zorder=1, label=label)
    for rank, layer in enumerate(worst):
        batches, errors = zip(*points[layer], strict=True)
        ax.plot(batches, errors, color=f"C{rank}", lw=1.6, marker="o", ms=3, label=_name(layer))
    first_batches, first_error = points[worst[0] if worst else grey[0]][0]
    last = max(b for layer_points in points.values() for b, _ in layer_points)
    if last > first_batches:
        guide = [first_error * math.sqrt(first_batches / b) for b in (first_batches, last)]
        ax.plot((first_batches, last), guide, color="0.4", ls=":", lw=1, label="∝ 1/√batches")
    if tol is not None:
        ax.axhline(tol, color="black", ls="--", lw=1, label=f"tol = {tol:g}")
    ax.set_xscale("log", base=2)  # pooling points fall on multiples of 16
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(_plain())
    ax.set_xlabel("batches folded")
    ax.set_ylabel("largest relative standard error")
    ax.set_title("Standard error against batches, per layer", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    legend_title = f"worst {len(worst)} of {len(points)} layers" if grey else None
    _legend_outside(ax, title=legend_title)
    return _figure_of(ax)


def report(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    *,
    info: RunInfo | None = None,
    eps: float | Mapping[str, float] = DEFAULT_EPS,
    tol: float | None = None,
    highlight: int = HIGHLIGHT,
) -> Figure:
    """The picture of `precisebn.report`: `shifts`, and `convergence` below it.

    A new figure of two panels (mean shift, log variance ratio), and a third with the
    standard errors against batches when ``info`` holds a trace. This is what
    ``precisebn recompute --plot OUT.png`` writes.

    Args:
        old: the buffers before, as in `shifts`.
        new: the recomputed buffers.
        info: the run's `precisebn.RunInfo`, for the convergence panel (none without it,
            or when its trace is empty).
        eps: each layer's ``eps``, as in `shifts`.
        tol: the tolerance line of the convergence panel.
        highlight: how many layers the convergence panel draws in colour.

    Returns:
        The new figure.

    Raises:
        ImportError: matplotlib is not installed.
        KeyError, ValueError: as `shifts` and `convergence`.

    Example:
        >>> import torch
        >>> from precisebn import plot
        >>> old = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
        >>> new = {"bn.running_mean": torch.ones(2), "bn.running_var": torch.ones(2)}
        >>> len(plot.report(old, new).axes)
        2
    """
    moves = _moves(old, new, eps)
    points = _finite_points(info.trace) if info is not None else {}
    count = len(moves.layers)
    figure = _new_figure(width=_width(count), height=5.6 + (3.6 if points else 0.0))
    rows = 3 if points else 2
    grid = figure.add_gridspec(rows, 1, height_ratios=[1.0, 1.0, 1.3][:rows])
    top = figure.add_subplot(grid[0])
    middle = figure.add_subplot(grid[1], sharex=top)
    _draw_moves(moves, (top, middle), before="old", after="new")
    if points:
        assert info is not None
        convergence(info, tol=tol, highlight=highlight, ax=figure.add_subplot(grid[2]))
    if info is not None:
        figure.suptitle(
            f"{count} BatchNorm layers recomputed over {info.num_batches} batches "
            f"({info.num_samples} samples)"
        )
    return figure


def save(figure: Figure, path: str | os.PathLike[str], *, dpi: float = DPI) -> None:
    """``figure.savefig(path)``, atomically: ``path`` is the old file or the whole new one.

    The image is drawn in memory, written to a hidden temporary file ``.NAME.XXXXXXXX.tmp``
    in the same directory, flushed to disk, and renamed to ``path`` with ``os.replace``; any
    exception removes the temporary file. The format comes from the suffix (``.png``,
    ``.svg``, ``.pdf``, ...). A PNG carries no software version or date: two runs that
    draw the same figure with the same matplotlib write the same bytes.

    Args:
        figure: the figure, e.g. from `shifts`.
        path: the file to write (replaced if it exists).
        dpi: the resolution of raster formats.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the suffix names no format matplotlib writes.
        OSError: the file cannot be written.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from precisebn import plot
        >>> new = {"bn.running_mean": torch.ones(2), "bn.running_var": torch.ones(2)}
        >>> figure = plot.shifts({**new, "bn.running_var": torch.full((2,), 2.0)}, new)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot.save(figure, Path(tmp) / "shifts.png")
        ...     (Path(tmp) / "shifts.png").read_bytes()[:4]
        b'\\x89PNG'
    """
    path = Path(path)
    data = _render(figure, _image_format(path), dpi=dpi)
    write_atomically(path, lambda file: file.write(data))


def _image_format(path: str | os.PathLike[str]) -> str:
    """The image format `save` writes to ``path``, from its suffix; checks that matplotlib
    is installed and writes that format.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the suffix names no format matplotlib writes.

    Example:
        >>> _image_format("out.PNG")
        'png'
    """
    _figure_class()
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in supported:
        raise ValueError(
            f"{path}: {'no' if not suffix else 'unknown'} image format"
            f"{'' if not suffix else f' {suffix!r}'}: end the name with one of "
            + ", ".join(f".{name}" for name in sorted(supported))
        )
    return suffix


# ----------------------------------------------------------------------------- internals


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_MISSING) from error
    return Figure


def _new_figure(*, width: float, height: float) -> Figure:
    return _figure_class()(figsize=(width, height), layout="constrained")


def _figure_of(ax: Axes) -> Figure:
    """The figure ``ax`` is in: the root one, when ``ax`` lies in a subfigure."""
    return ax.figure.figure


def _plain() -> Formatter:
    """Tick labels as plain numbers (16, 32, 64), not powers."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def _width(layers: int) -> float:
    """Inches: room for a column of dots per layer, and the legend on the right."""
    return min(max(6.4, 3.2 + 0.26 * layers), 22.0)


def _name(layer: str) -> str:
    return layer or "<model>"


def _legend_outside(ax: Axes, *, title: str | None = None) -> None:
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        title=title,
        title_fontsize="small",
        frameon=False,
    )


def _moves(
    before: Mapping[str, Tensor], after: Mapping[str, Tensor], eps: float | Mapping[str, float]
) -> _Moves:
    moves = channel_moves(before, after, eps=eps)  # the table's figures, and its errors
    if not moves:
        raise ValueError("no BatchNorm buffers to draw: no '<layer>.running_mean' key")
    return _Moves(
        [m.layer for m in moves],
        [m.shift.reshape(-1) for m in moves],
        [m.ratio.log2().reshape(-1) for m in moves],
    )


def _draw_moves(moves: _Moves, axes: Sequence[Axes] | None, *, before: str, after: str) -> Figure:
    if axes is None:
        figure = _new_figure(width=_width(len(moves.layers)), height=5.6)
        top = figure.add_subplot(2, 1, 1)
        axes = (top, figure.add_subplot(2, 1, 2, sharex=top))
    if len(axes) != 2:
        raise ValueError(f"axes: give two axes (mean shift, variance ratio), got {len(axes)}")
    shift_ax, ratio_ax = axes
    _strip(shift_ax, moves.shift, low=False)
    shift_ax.set_ylim(bottom=0.0)
    shift_ax.set_ylabel("mean shift (std)")
    shift_ax.set_title(
        f"Mean shift, {before} → {after}: |{before} mean - {after} mean| / {after} std",
        fontsize="medium",
    )
    ratio_ax.axhline(0.0, color="0.5", lw=0.8, zorder=0)
    _strip(ratio_ax, moves.log_ratio, low=True)
    ratio_ax.set_ylabel("log₂ var ratio")
    ratio_ax.set_title(
        f"Variance ratio, {before} → {after}: log₂({before} var / {after} var)",
        fontsize="medium",
    )
    ratio_ax.set_xlabel("BatchNorm layer")
    names = [_name(layer) for layer in moves.layers]
    rotation = 0 if _fits_flat(ratio_ax, names) else 90
    if shift_ax.get_shared_x_axes().joined(shift_ax, ratio_ax):
        shift_ax.tick_params(labelbottom=False)
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=rotation, fontsize="small")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(alpha=0.3, axis="y")
        _legend_outside(ax)
    return _figure_of(shift_ax)


def _fits_flat(ax: Axes, names: Sequence[str]) -> bool:
    """Whether the layer names fit side by side under ``ax`` (about 6 points a character)."""
    inches = ax.get_position().width * _figure_of(ax).get_figwidth()
    return max(len(name) for name in names) + 2 <= inches * 72 / 6 / len(names)


def _strip(ax: Axes, values: list[Tensor], *, low: bool) -> None:
    """Every channel a grey dot in its layer's column, the median a bar, the extremes
    triangles; non-finite values left out."""
    generator = torch.Generator().manual_seed(0)  # the same picture every time
    xs: list[float] = []
    ys: list[float] = []
    median, largest, smallest = [], [], []
    for position, channels in enumerate(values):
        finite = channels[channels.isfinite()]
        jitter = (torch.rand(len(finite), generator=generator, dtype=torch.float64) - 0.5) * 0.5
        xs.extend((jitter + position).tolist())
        ys.extend(finite.tolist())
        empty = len(finite) == 0
        median.append(math.nan if empty else finite.median().item())
        largest.append(math.nan if empty else finite.max().item())
        smallest.append(math.nan if empty else finite.min().item())
    size = 6.0 if len(xs) < 2000 else 3.0
    ax.scatter(xs, ys, s=size, color=_GREY, alpha=0.6, lw=0, zorder=1, label="channels")
    positions = range(len(values))
    ax.plot(positions, median, ls="none", marker="_", ms=12, mew=2, color="black", label="median")
    ax.plot(positions, largest, ls="none", marker="^", ms=5, color="tab:red", label="largest")
    if low:
        ax.plot(
            positions, smallest, ls="none", marker="v", ms=5, color="tab:blue", label="smallest"
        )


def _finite_points(trace: Trace) -> dict[str, list[tuple[int, float]]]:
    """The trace's points that a log-log plot can show, per layer that has any."""
    points = {
        layer: [(int(b), float(e)) for b, e in pairs if b > 0 and 0 < e < math.inf]
        for layer, pairs in trace.items()
    }
    return {layer: pairs for layer, pairs in points.items() if pairs}


def _render(figure: Figure, image: str, *, dpi: float = DPI) -> bytes:
    """The image file's bytes, drawn in memory."""
    buffer = io.BytesIO()
    metadata = {"Software": None} if image == "png" else None
    figure.savefig(buffer, format=image, dpi=dpi, metadata=metadata)
    return buffer.getvalue()
