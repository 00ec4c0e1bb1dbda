"""Drop-in replacements for the precise-BN functions of other libraries.

Change one import line and keep the call:

- ``from torch.optim.swa_utils import update_bn`` becomes
  ``from precisebn.compat import update_bn``;
- ``from fvcore.nn import update_bn_stats`` (detectron2, SlowFast, ClassyVision,
  pytorchvideo) becomes ``from precisebn.compat import update_bn_stats``.

Both update the model's BN buffers in place, as the originals do, with the exact pooled
statistics of `precisebn.recompute_bn_buffers`. Where the numbers differ from the
originals, precisebn's are the exact ones:

- ``running_var`` is the unbiased variance of every value the layer saw, pooled over
  the batches. ``update_bn`` averages per-batch statistics with equal weights, so that
  batches of other sizes (a short last batch) count wrongly. fvcore's
  ``update_bn_stats`` averages per-batch *unbiased* variances, which leaves out the
  spread between batch means, and so is too small.
- a layer called several times per batch pools all its calls (the originals take one
  running average over calls).
- under ``torch.distributed`` the statistics are pooled over every rank, so every rank
  ends with the same buffers (the originals keep each rank's own).

Unlike the originals, no flag, momentum or hook of the model is touched: only
``running_mean``, ``running_var`` and ``num_batches_tracked`` of the recomputed layers
change, and nothing changes when the loader or the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from precisebn._batches import Forward
from precisebn._buffers import RunInfo, apply_bn_buffers
from precisebn._layers import MEAN, LayerSelector, parse_key, tracks_stats
from precisebn._recompute import recompute_bn_buffers
from precisebn._refresh import training_layers

__all__ = ["update_bn", "update_bn_stats"]

_EVERY_BATCH = 2**62  # "as many batches as the loader has"


def update_bn(
    loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None
) -> None:
    """``torch.optim.swa_utils.update_bn``, exact: recompute the BN statistics over the
    whole ``loader`` and write them into ``model``.

    Batches are read as the original reads them: a tensor is the input; of a list or
    tuple, the first element is. With ``device``, each input is moved there first.
    A model without BatchNorm layers is left as it is.

    Unlike the original, the model's training flags and the layers' momentum are not
    touched (the original leaves the model in ``train()`` mode if it was), and
    ``num_batches_tracked`` becomes the number of batches used, as the original's
    cumulative average leaves it.

    Args:
        loader: the batches, read once to the end.
        model: the model; its BN buffers are updated in place.
        device: where to move each input before the forward (default: where it is).

    Example:
        >>> import torch
        >>> from precisebn.compat import update_bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> loader = [(torch.randn(8, 3) + 2, torch.zeros(8)) for _ in range(5)]
        >>> update_bn(loader, model)
        >>> int(model[1].num_batches_tracked)
        5
    """
    if not any(tracks_stats(m) for m in model.modules()):
        return

    def forward(net: Callable[..., Any], batch: Any) -> Any:
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        if device is not None and isinstance(inputs, Tensor):
            inputs = inputs.to(device)
        return net(inputs)

    _apply(model, _recompute(model, loader, num_batches=_EVERY_BATCH, forward=forward))


def update_bn_stats(
    model: nn.Module,
    data_loader: Iterable[Any],
    num_iters: int = 200,
    progress: str | None = None,
) -> None:
    """fvcore's ``update_bn_stats``, exact: recompute the statistics of the BN layers that
    are in training mode over ``num_iters`` batches and write them into ``model``.

    As in the original, each item of ``data_loader`` is passed to the model as it is
    (``model(inputs)``), only the BN layers in training mode are recomputed (layers in
    eval mode are frozen and keep their buffers), and a loader that runs out before
    ``num_iters`` batches is an error.

    Args:
        model: the model; the buffers of its training-mode BN layers are updated in place.
        data_loader: the batches; an endless iterator (``itertools.cycle``) is fine.
        num_iters: how many batches to use.
        progress: ``"tqdm"`` for a progress bar, ``None`` for none.

    Raises:
        AssertionError: the loader ran out before ``num_iters`` batches (as the original
            raises; the error is also a ``ValueError``). The model is left unchanged.

    Example:
        >>> import itertools, torch
        >>> from precisebn.compat import update_bn_stats
        >>> model = torch.nn.BatchNorm2d(3).train()
        >>> batches = [torch.randn(4, 3, 5, 5) + 1 for _ in range(2)]
        >>> update_bn_stats(model, itertools.cycle(batches), num_iters=10)
        >>> int(model.num_batches_tracked)
        10
    """
    if progress not in (None, "tqdm"):
        raise ValueError(f"progress must be None or 'tqdm', got {progress!r}")
    layers = training_layers(model)
    if not layers:
        return
    result = _recompute(
        model,
        data_loader,
        num_batches=num_iters,
        forward=lambda net, batch: net(batch),
        layers=layers,
        progress=progress == "tqdm",
    )
    if result[1].num_batches < num_iters:
        raise TooFewBatchesError(
            f"update_bn_stats is meant to run for {num_iters} iterations, but the data "
            f"loader stopped at {result[1].num_batches} iterations; the model is unchanged"
        )
    _apply(model, result)


class TooFewBatchesError(ValueError, AssertionError):
    """The loader ran out: an ``AssertionError``, as fvcore raises, and a ``ValueError``."""


def _recompute(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int,
    forward: Forward,
    layers: LayerSelector = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], RunInfo]:
    return recompute_bn_buffers(
        model,
        loader,
        num_batches=num_batches,
        layers=layers,
        forward=forward,
        progress=progress,
        return_info=True,
    )


def _apply(model: nn.Module, result: tuple[dict[str, Tensor], RunInfo]) -> None:
    """Write the statistics, and set each layer's counter to the batches used."""
    new, info = result
    apply_bn_buffers(model, new)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in new:
            parsed = parse_key(key)
            if parsed is not None and parsed[1] == MEAN:
                counter = getattr(modules[parsed[0]], "num_batches_tracked", None)
                if isinstance(counter, Tensor):
                    counter.fill_(info.num_batches)
