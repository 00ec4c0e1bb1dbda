"""How far recomputation moved each BatchNorm layer's statistics: `report`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from precisebn._buffers import RunInfo
from precisebn._layers import MEAN, VAR, buffer_key, layers_of

DEFAULT_EPS = 1e-5
"""The ``eps`` of a layer that ``eps=`` does not name: PyTorch's default."""

_LEGEND = (
    "  shift: |old mean - new mean| / new std, per channel (0: unchanged)",
    "  var ratio: old var / new var, per channel (1: unchanged)",
    "  rel. error: the worst channel's standard error, relative to the new std (mean) "
    "or var (variance)",
    "  n_eff: effective number of independent values per channel (median over channels)",
    "  *: moved most (the largest shift or |log var ratio|)",
)


@dataclass(frozen=True)
class LayerMove:
    """How far one layer's statistics moved, summarised over its channels.

    Attributes:
        layer: the module name (``""`` for a model that is itself a BN layer).
        channels: the number of channels.
        shift_mean: mean over channels of ``|old mean - new mean| / sqrt(new var + eps)``.
        shift_max: the largest such shift.
        ratio_min: the smallest ``(old var + eps) / (new var + eps)``.
        ratio_max: the largest such ratio.
        rel_error: the worst channel's relative standard error of the new statistics, the
            largest of ``stderr(mean) / sqrt(new var + eps)`` and
            ``stderr(var) / (new var + eps)``; ``None`` without standard errors.
        n_eff: the effective number of independent values per channel behind the new
            ``running_mean``; ``None`` when unknown.
    """

    layer: str
    channels: int
    shift_mean: float
    shift_max: float
    ratio_min: float
    ratio_max: float
    rel_error: float | None = None
    n_eff: float | None = None

    @property
    def score(self) -> float:
        """How much the layer moved: the largest of ``shift_max`` and ``|ln ratio|``.

        Infinite when a figure is NaN or a ratio is not positive.
        """
        figures = (self.shift_max, _abs_log(self.ratio_min), _abs_log(self.ratio_max))
        return math.inf if any(math.isnan(f) for f in figures) else max(figures)


def _abs_log(ratio: float) -> float:
    return abs(math.log(ratio)) if ratio > 0 else math.inf


@dataclass(frozen=True)
class Report(Sequence[LayerMove]):
    """What `report` returns: one `LayerMove` per layer, a table as ``str(report)``.

    A sequence of rows in the order of the new buffers. ``str()`` gives an aligned table
    that flags with ``*`` the ``top`` layers that moved most; `to_dict` gives plain values
    for loggers.

    Attributes:
        rows: the rows, one per layer.
        top: how many layers the table flags; ``None``: 3, but at most a quarter of the
            layers (at least one).
    """

    rows: tuple[LayerMove, ...] = ()
    top: int | None = None

    @overload
    def __getitem__(self, index: int) -> LayerMove: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LayerMove, ...]: ...

    def __getitem__(self, index: int | slice) -> LayerMove | tuple[LayerMove, ...]:
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerMove]:
        return iter(self.rows)

    def flagged(self) -> list[str]:
        """The names of the layers the table flags, those that moved most, in table order."""
        most = self._flagged()
        return [row.layer for i, row in enumerate(self.rows) if i in most]

    def _flagged(self) -> set[int]:
        top = min(3, max(1, len(self.rows) // 4)) if self.top is None else self.top
        order = sorted(range(len(self.rows)), key=lambda i: -self.rows[i].score)
        return set(order[:top])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"channels": ..., "shift_mean": ..., ...}}``: plain ``int``, ``float``
        and ``None`` values, ready for ``json.dumps`` or a metrics logger."""
        return {
            row.layer: {
                "channels": row.channels,
                "shift_mean": row.shift_mean,
                "shift_max": row.shift_max,
                "ratio_min": row.ratio_min,
                "ratio_max": row.ratio_max,
                "rel_error": row.rel_error,
                "n_eff": row.n_eff,
            }
            for row in self.rows
        }

    def __str__(self) -> str:
        headers = (
            "layer",
            "ch",
            "shift avg",
            "shift max",
            "var ratio min",
            "var ratio max",
            "rel. error",
            "n_eff",
        )
        cells = [
            (
                row.layer or "<model>",
                f"{row.channels}",
                f"{row.shift_mean:.3f}",
                f"{row.shift_max:.3f}",
                f"{row.ratio_min:.3f}",
                f"{row.ratio_max:.3f}",
                "-" if row.rel_error is None else f"{row.rel_error:.1e}",
                "-" if row.n_eff is None else f"{row.n_eff:.1e}",
            )
            for row in self.rows
        ]
        minimum = (0, 5, 0, 0, 0, 0, 0, 7)
        widths = [
            max(least, len(header), *(len(line[i]) for line in cells))
            for i, (header, least) in enumerate(zip(headers, minimum, strict=True))
        ]

        def line(values: Sequence[str]) -> str:
            first = f"{values[0]:<{widths[0]}}"
            rest = (f"{v:>{w}}" for v, w in zip(values[1:], widths[1:], strict=True))
            return "  " + "  ".join([first, *rest])

        header = line(headers)
        lines = [header, "  " + "-" * (len(header) - 2)]
        flagged = self._flagged()
        for i, values in enumerate(cells):
            lines.append(line(values) + ("  *" if i in flagged else ""))
        lines.extend(_LEGEND)
        return "\n".join(lines)


def report(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    *,
    info: RunInfo | None = None,
    eps: float | Mapping[str, float] = DEFAULT_EPS,
    top: int | None = None,
) -> Report:
    """How far each BatchNorm layer's statistics moved from ``old`` to ``new``.

    Per channel, the shift of the mean is measured in new standard deviations,
    ``|old mean - new mean| / sqrt(new var + eps)``, and the change of the variance as the
    ratio ``(old var + eps) / (new var + eps)``; each row summarises one layer over its
    channels. With the `RunInfo` of the run (``return_info=True``), each row also gives
    the worst channel's relative standard error and the effective number of independent
    values. All figures are computed in float64 on the CPU.

    Args:
        old: the buffers before, keyed ``"<layer>.running_mean"`` and
            ``"<layer>.running_var"``: e.g. a copy of `bn_buffers` taken before applying the
            new ones, or a checkpoint's state dict (other keys are ignored).
        new: the recomputed buffers, e.g. from `recompute_bn_buffers`, or any mapping with
            such keys. Its layers, in its order, are the rows.
        info: the run's `RunInfo`, for the standard errors and ``n_eff``.
        eps: each layer's ``eps``: one value for all, or a mapping from layer name to
            ``eps`` (a name missing from it gets 1e-5).
        top: how many of the layers that moved most ``str()`` flags with ``*``
            (default: 3, but at most a quarter of the layers, at least one).

    Returns:
        A `Report`: a sequence of one row per layer, with ``layer``, ``channels``,
        ``shift_mean``, ``shift_max``, ``ratio_min``, ``ratio_max``, ``rel_error``,
        ``n_eff`` and ``score``; ``str(report)`` is an aligned table with a legend and
        ``report.to_dict()`` a JSON-ready dict.

    Raises:
        KeyError: a layer of ``new`` is missing from ``old``, or ``new`` lacks a layer's
            ``running_var``.
        ValueError: a layer's old and new buffers differ in shape, or ``top`` is negative.

    Example:
        >>> import torch, precisebn
        >>> old = {
        ...     "bn.running_mean": torch.tensor([2.0, 0.0]),
        ...     "bn.running_var": torch.tensor([4.0, 1.0]),
        ...     "bn.num_batches_tracked": torch.tensor(100),
        ... }
        >>> new = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
        >>> info = precisebn.RunInfo(
        ...     num_batches=10,
        ...     num_samples=640,
        ...     converged=None,
        ...     stderr={
        ...         "bn.running_mean": torch.full((2,), 0.01),
        ...         "bn.running_var": torch.full((2,), 0.05),
        ...     },
        ...     n_eff={"bn": 640.0},
        ... )
        >>> rep = precisebn.report(old, new, info=info, eps=0.0)
        >>> rep[0].shift_mean, rep[0].shift_max, rep[0].ratio_max
        (1.0, 2.0, 4.0)
        >>> print(rep)  # doctest: +ELLIPSIS
          layer     ch  shift avg  shift max  var ratio min  var ratio max  rel. error    n_eff
          -------------------------------------------------------------------------------------
          bn         2      1.000      2.000          1.000          4.000     5.0e-02  6.4e+02  *
          shift: |old mean - new mean| / new std, per channel (0: unchanged)
          var ratio: old var / new var, per channel (1: unchanged)
          rel. error: the worst channel's standard error, relative to the new std (mean) or ...
          n_eff: effective number of independent values per channel (median over channels)
          *: moved most (the largest shift or |log var ratio|)
        >>> row = rep.to_dict()["bn"]
        >>> row["n_eff"], precisebn.report(old, new)[0].rel_error
        (640.0, None)
    """
    if top is not None and top < 0:
        raise ValueError(f"top must be a non-negative number of layers, got {top}")
    stderr: Mapping[str, Tensor] = info.stderr if info is not None else {}
    n_eff: Mapping[str, float] = info.n_eff if info is not None else {}
    rows = []
    for move in channel_moves(old, new, eps=eps):
        keys = buffer_key(move.layer, MEAN), buffer_key(move.layer, VAR)
        relative = [
            (_float64(stderr[key]) / divisor).reshape(-1)
            for key, divisor in zip(keys, (move.scale.sqrt(), move.scale), strict=True)
            if key in stderr
        ]
        layer_n_eff = n_eff.get(move.layer)
        rows.append(
            LayerMove(
                layer=move.layer,
                channels=move.shift.numel(),
                shift_mean=move.shift.mean().item(),
                shift_max=move.shift.max().item(),
                ratio_min=move.ratio.min().item(),
                ratio_max=move.ratio.max().item(),
                rel_error=torch.cat(relative).max().item() if relative else None,
                n_eff=None if layer_n_eff is None else float(layer_n_eff),
            )
        )
    return Report(tuple(rows), top=top)


class ChannelMoves(NamedTuple):
    """One layer's move, per channel (float64 on the CPU)."""

    layer: str
    shift: Tensor
    """``|old mean - new mean| / sqrt(new var + eps)``."""
    ratio: Tensor
    """``(old var + eps) / (new var + eps)``."""
    scale: Tensor
    """``new var + eps``."""


def channel_moves(
    old: Mapping[str, Tensor], new: Mapping[str, Tensor], *, eps: float | Mapping[str, float]
) -> list[ChannelMoves]:
    """Per layer of ``new`` (in its order), every channel's shift and variance ratio: what
    `report` summarises and `precisebn.plot` draws.

    Raises:
        KeyError: a layer's ``running_mean`` or ``running_var`` is missing from ``old``,
            or its ``running_var`` from ``new``.
        ValueError: an old buffer's shape differs from the new one's.
    """
    out = []
    for layer in layers_of(new):
        keys = buffer_key(layer, MEAN), buffer_key(layer, VAR)
        missing = [key for key in keys if key not in old]
        if missing:
            raise KeyError(
                f"layer {layer or '<model>'!r}: {missing[0]!r} is not in the old buffers"
            )
        if keys[1] not in new:
            raise KeyError(f"layer {layer or '<model>'!r}: {keys[1]!r} is not in the new buffers")
        e = float(eps.get(layer, DEFAULT_EPS) if isinstance(eps, Mapping) else eps)
        old_mean, old_var = (_float64(old[key]) for key in keys)
        new_mean, new_var = (_float64(new[key]) for key in keys)
        for key, before, after in zip(keys, (old_mean, old_var), (new_mean, new_var), strict=True):
            if before.shape != after.shape:
                raise ValueError(
                    f"{key}: the old buffer's shape {tuple(before.shape)} differs from the "
                    f"new one's {tuple(after.shape)}"
                )
        scale = new_var + e
        shift = (old_mean - new_mean).abs() / scale.sqrt()
        out.append(ChannelMoves(layer, shift, (old_var + e) / scale, scale))
    return out


def _float64(value: Tensor) -> Tensor:
    return value.detach().to("cpu", torch.float64)


def eps_by_layer(model: nn.Module) -> dict[str, float]:
    """Each BatchNorm layer's ``eps``, keyed by module name: `report`'s ``eps=``.

    Example:
        >>> import torch
        >>> eps_by_layer(torch.nn.Sequential(torch.nn.BatchNorm1d(3, eps=1e-3)))
        {'0': 0.001}
    """
    return {name: float(m.eps) for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
