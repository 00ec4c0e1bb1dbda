"""A Lightning callback that recomputes BatchNorm statistics exactly: `PreciseBN`.

Install with ``pip install 'precisebn[lightning]'``. Importing ``precisebn`` does not import
Lightning; importing this module does (``lightning.pytorch``, or the older
``pytorch_lightning`` package when that is the one installed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from precisebn._batches import Forward
from precisebn._buffers import RunInfo
from precisebn._refresh import refresh

if TYPE_CHECKING:
    Callback = object
else:
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the standalone package of Lightning before 2.0
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError(
                "precisebn.lightning needs Lightning: pip install 'precisebn[lightning]'"
            ) from None

__all__ = ["PreciseBN"]

logger = logging.getLogger("precisebn")

_WHEN = ("train_epoch_end", "fit_end")


class PreciseBN(Callback):
    """Recompute the model's BatchNorm statistics exactly during ``Trainer.fit``, and apply them.

    With ``on="train_epoch_end"`` (the default) the statistics are recomputed every
    ``every_n_epochs`` epochs, before that epoch's validation if it has one, else at its
    end. Validation and the checkpoints written after it then see precise statistics.
    With ``on="fit_end"`` they are recomputed once, when fitting ends: after Lightning's
    ``StochasticWeightAveraging`` has put the averaged weights into the model.

    Each recompute reads ``num_batches`` batches of the trainer's train dataloader (or
    ``dataloader``) and writes the exact pooled statistics into the BN buffers. Under a
    distributed strategy every rank reads its own shard, the statistics are pooled over
    all ranks, and every rank ends with the same buffers.

    During a recompute the rest of the model runs in eval mode (dropout off), since the
    statistics are for evaluation and should not depend on dropout's random draws; the BN
    layers always normalise with batch statistics. The flags are restored afterwards.
    ``eval_mode=False`` keeps the modules as the trainer left them.

    Batches: a tensor, or a tuple or list whose first element is the input, is fed to the
    module's ``forward``. For other batches (dicts), pass ``forward=`` or define a method
    ``precisebn_forward(self, batch)`` on the LightningModule: it is called as the
    forward of each batch. ``forward`` wins when both are there.

    Each recompute logs ``precisebn/num_batches``, ``precisebn/max_shift`` (the largest
    shift of a layer's mean, in units of its new standard deviation) and, with ``tol``,
    ``precisebn/converged`` to the trainer's loggers; ``last`` holds the last run's
    `precisebn.RunInfo`.

    Args:
        num_batches: the most batches per recompute.
        tol: stop a recompute early once every channel is known to ``tol`` (see
            `precisebn.recompute_bn_buffers`).
        every_n_epochs: with ``on="train_epoch_end"``, recompute every this many epochs.
        on: ``"train_epoch_end"`` or ``"fit_end"``.
        forward: ``forward(stateless_module, batch) -> output``.
        dataloader: batches to use instead of the trainer's train dataloader.
        eval_mode: run the rest of the model in eval mode during a recompute.

    Example:
        >>> from precisebn.lightning import PreciseBN
        >>> callback = PreciseBN(num_batches=100, on="fit_end")
        >>> callback.on
        'fit_end'
    """

    def __init__(
        self,
        num_batches: int = 200,
        tol: float | None = None,
        every_n_epochs: int = 1,
        on: str = "train_epoch_end",
        forward: Forward | None = None,
        dataloader: Iterable[Any] | None = None,
        eval_mode: bool = True,
    ) -> None:
        if on not in _WHEN:
            raise ValueError(f"on must be one of {_WHEN}, got {on!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.num_batches = num_batches
        self.tol = tol
        self.every_n_epochs = every_n_epochs
        self.on = on
        self.forward = forward
        self.dataloader = dataloader
        self.eval_mode = eval_mode
        self.last: RunInfo | None = None
        """What the last recompute used, and whether it converged."""
        self._step: int | None = None  # the trainer's global step at the last recompute

    # ------------------------------------------------------------------- the hooks

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "train_epoch_end" and not trainer.sanity_checking and _fitting(trainer):
            self._when_due(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "train_epoch_end":
            self._when_due(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "fit_end":
            self.recompute(trainer, pl_module)

    def _when_due(self, trainer: Any, pl_module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._step == trainer.global_step:  # done since the last training step
            return
        self.recompute(trainer, pl_module)

    # ------------------------------------------------------------------ the work

    def recompute(self, trainer: Any, pl_module: nn.Module) -> tuple[dict[str, Tensor], RunInfo]:
        """Recompute and apply the statistics now; return the buffers and the run's info."""
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise RuntimeError(
                "PreciseBN found no batches: the trainer has no train dataloader yet; pass "
                "PreciseBN(dataloader=...)"
            )
        new, info, shift = refresh(
            pl_module,
            loader,
            num_batches=self.num_batches,
            tol=self.tol,
            forward=self._forward(pl_module),
            eval_mode=self.eval_mode,
        )
        self._step = trainer.global_step
        self.last = info
        self._log(trainer, shift, info)
        return new, info

    def _forward(self, pl_module: nn.Module) -> Forward | None:
        if self.forward is not None:
            return self.forward
        if callable(getattr(pl_module, "precisebn_forward", None)):
            return _module_hook
        return None

    def _log(self, trainer: Any, shift: float, info: RunInfo) -> None:
        metrics = {"precisebn/num_batches": float(info.num_batches), "precisebn/max_shift": shift}
        if info.converged is not None:
            metrics["precisebn/converged"] = float(info.converged)
        for sink in getattr(trainer, "loggers", []):
            sink.log_metrics(metrics, step=trainer.global_step)
        logger.info(
            "PreciseBN: recomputed over %d batches; largest shift %.3g std", info.num_batches, shift
        )


def _module_hook(module: Any, batch: Any) -> Any:
    """Feed ``batch`` through the LightningModule's own ``precisebn_forward``."""
    return module.precisebn_forward(batch)


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn)) == "fit"
