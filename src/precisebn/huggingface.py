"""A HuggingFace ``transformers.Trainer`` callback that recomputes BatchNorm statistics
exactly: `PreciseBNCallback`.

Install with ``pip install 'precisebn[huggingface]'`` (``transformers`` and ``accelerate``,
which ``Trainer`` needs). Importing ``precisebn`` does not import transformers; importing
this module does.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from precisebn._batches import Forward, default_forward
from precisebn._buffers import RunInfo
from precisebn._refresh import refresh

if TYPE_CHECKING:
    TrainerCallback = object
else:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(
            "precisebn.huggingface needs transformers: pip install 'precisebn[huggingface]'"
        ) from None

__all__ = ["PreciseBNCallback"]

logger = logging.getLogger("precisebn")

_LABELS = ("labels", "label", "label_ids")


class PreciseBNCallback(TrainerCallback):
    """Recompute the model's BatchNorm statistics exactly when training ends, and apply them.

    At the end of ``Trainer.train`` (and, with ``every_epoch=True``, at the end of every
    epoch, before that epoch's evaluation and checkpoint) the callback reads
    ``num_batches`` batches of the trainer's train dataloader (or ``dataloader``) and
    writes the exact pooled statistics into the model's BN buffers. Under distributed
    training every process reads its own shard, the statistics are pooled over all
    processes, and every process ends with the same buffers.

    During a recompute the rest of the model runs in eval mode (dropout off, as for
    evaluation); the BN layers always normalise with batch statistics. The flags are
    restored afterwards; ``eval_mode=False`` keeps them as the trainer left them.

    Batches are dicts, as the trainer's collator makes them: the model is called as
    ``model(**inputs)`` with the labels (``args.label_names``, ``labels``, ``label``,
    ``label_ids``) and any key its ``forward`` does not take left out. Pass
    ``forward(model, batch)`` for anything else.

    Each recompute adds ``precisebn/num_batches`` and ``precisebn/max_shift`` (the largest
    shift of a layer's mean, in units of its new standard deviation) to
    ``trainer.state.log_history``; ``last`` holds the last run's `precisebn.RunInfo`.

    Args:
        num_batches: the most batches per recompute.
        tol: stop a recompute early once every channel is known to ``tol`` (see
            `precisebn.recompute_bn_buffers`).
        every_epoch: also recompute at the end of every epoch.
        forward: ``forward(stateless_model, batch) -> output``.
        dataloader: batches to use instead of the trainer's train dataloader.
        eval_mode: run the rest of the model in eval mode during a recompute.

    Example:
        >>> from precisebn.huggingface import PreciseBNCallback
        >>> callback = PreciseBNCallback(num_batches=100, every_epoch=True)
        >>> callback.every_epoch
        True
    """

    def __init__(
        self,
        num_batches: int = 200,
        tol: float | None = None,
        every_epoch: bool = False,
        forward: Forward | None = None,
        dataloader: Iterable[Any] | None = None,
        eval_mode: bool = True,
    ) -> None:
        self.num_batches = num_batches
        self.tol = tol
        self.every_epoch = every_epoch
        self.forward = forward
        self.dataloader = dataloader
        self.eval_mode = eval_mode
        self.last: RunInfo | None = None
        """What the last recompute used, and whether it converged."""
        self._step: int | None = None
        self._shift = 0.0

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_epoch:
            self._recompute(args, state, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step != state.global_step:  # not done since the last training step
            self._recompute(args, state, kwargs)

    def _recompute(self, args: Any, state: Any, kwargs: Mapping[str, Any]) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError("PreciseBNCallback: the trainer passed no model to the callback")
        loader = self.dataloader if self.dataloader is not None else kwargs.get("train_dataloader")
        if loader is None:
            raise RuntimeError(
                "PreciseBNCallback found no batches: the trainer passed no train dataloader; "
                "pass PreciseBNCallback(dataloader=...)"
            )
        labels = {*(getattr(args, "label_names", None) or ()), *_LABELS}
        _, info = self.recompute(model, loader, labels=labels)
        self._step = state.global_step
        state.log_history.append(
            {
                "precisebn/num_batches": info.num_batches,
                "precisebn/max_shift": self._shift,
                "epoch": state.epoch,
                "step": state.global_step,
            }
        )

    def recompute(
        self, model: nn.Module, loader: Iterable[Any], *, labels: Iterable[str] = _LABELS
    ) -> tuple[dict[str, Tensor], RunInfo]:
        """Recompute and apply the statistics of ``model`` over ``loader`` now; return the
        buffers and the run's info."""
        new, info, self._shift = refresh(
            model,
            loader,
            num_batches=self.num_batches,
            tol=self.tol,
            forward=self.forward or _inputs_forward(frozenset(labels)),
            eval_mode=self.eval_mode,
        )
        self.last = info
        logger.info(
            "PreciseBNCallback: recomputed over %d batches; largest shift %.3g std",
            info.num_batches,
            self._shift,
        )
        return new, info


@functools.cache  # one function per set of label names: a compiled run finds its graph again
def _inputs_forward(labels: frozenset[str]) -> Forward:
    """``model(**inputs)`` for dict batches, without the labels and the keys ``forward``
    does not take; other batches as `precisebn.recompute_bn_buffers` feeds them."""

    def forward(model: Any, batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            return default_forward(model, batch)
        accepted = _accepted(model)
        inputs = {
            key: value
            for key, value in batch.items()
            if key not in labels and (accepted is None or key in accepted)
        }
        return model(**inputs)

    return forward


def _accepted(model: Any) -> set[str] | None:
    """The keyword arguments ``model.forward`` takes; ``None`` when it takes any."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}
