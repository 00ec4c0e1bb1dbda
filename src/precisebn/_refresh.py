"""What the trainer callbacks do at their hooks: recompute in eval mode, apply, report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from precisebn._batches import Forward
from precisebn._buffers import RunInfo, apply_bn_buffers, bn_buffers
from precisebn._layers import tracks_stats
from precisebn._recompute import recompute_bn_buffers
from precisebn._report import eps_by_layer, report

__all__ = ["refresh", "training_layers"]


def training_layers(model: nn.Module) -> list[str]:
    """The BN layers in training mode: those a hook that honours frozen layers recomputes.
    A layer in eval mode is frozen (``norm_eval``, a frozen backbone) and keeps its
    buffers."""
    return [name for name, m in model.named_modules() if tracks_stats(m) and m.training]


def refresh(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int,
    tol: float | None,
    forward: Forward | None,
    eval_mode: bool,
    layers: list[str] | None = None,
) -> tuple[dict[str, Tensor], RunInfo, float]:
    """Recompute the statistics of ``model``'s BN layers (or of ``layers``) and write them
    into it; return the buffers, what the run used, and the largest shift of a layer's
    mean, in units of its new standard deviation.

    With ``eval_mode`` the rest of the model runs in eval mode (dropout off) during the
    recompute; every module's flag is restored afterwards, also on error.
    """
    old = {k: v.detach().clone() for k, v in bn_buffers(model, layers=layers).items()}
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        new, info = recompute_bn_buffers(
            model,
            loader,
            num_batches=num_batches,
            tol=tol,
            layers=layers,
            forward=forward,
            return_info=True,
        )
    finally:
        for module, training in modes:
            module.training = training
    apply_bn_buffers(model, new)
    moved = report(old, new, eps=eps_by_layer(model))
    return new, info, max((row.shift_max for row in moved), default=0.0)
