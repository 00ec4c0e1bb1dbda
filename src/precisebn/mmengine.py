"""An mmengine hook that recomputes BatchNorm statistics exactly: `PreciseBNHook`.

A drop-in for mmpretrain's ``PreciseBNHook(num_samples=..., interval=...)``. Install with
``pip install 'precisebn[mmengine]'``. Importing ``precisebn`` does not import mmengine;
importing this module does, and registers the hook in mmengine's ``HOOKS`` registry as
``"PreciseBNHook"``, so a config names it once its ``custom_imports`` import this module.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import optree
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from precisebn._batches import Forward, leading_size
from precisebn._buffers import RunInfo, apply_bn_buffers
from precisebn._distributed import reduce_run, reduction_group
from precisebn._refresh import refresh, training_layers

_TORCH_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"

if TYPE_CHECKING:
    Hook = object
    HOOKS: Any
    DefaultSampler: Any
    EMAHook: Any
    EpochBasedTrainLoop: Any
    IterBasedTrainLoop: Any
    Runner: Any
    is_model_wrapper: Any
else:
    try:
        with warnings.catch_warnings():
            # mmengine imports torch.distributed.optim, which newer torch releases warn
            # about at import (torch.jit.script): not the user's code, and not actionable.
            warnings.filterwarnings("ignore", _TORCH_JIT_DEPRECATED, DeprecationWarning)
            from mmengine.dataset import DefaultSampler
            from mmengine.hooks import EMAHook, Hook
            from mmengine.model import is_model_wrapper
            from mmengine.registry import HOOKS
            from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, Runner
    except ImportError:
        raise ImportError(
            "precisebn.mmengine needs mmengine: pip install 'precisebn[mmengine]'"
        ) from None

__all__ = ["PreciseBNHook"]


class PreciseBNHook(Hook):
    """Recompute the model's BatchNorm statistics exactly during training, and apply them.

    Every ``interval`` epochs (with an ``EpochBasedTrainLoop``, after the epoch's last
    iteration) or every ``interval`` iterations (with an ``IterBasedTrainLoop``), the hook
    reads about ``num_samples`` samples of the runner's train dataloader (or
    ``dataloader``) and writes the exact statistics of the current weights into the BN
    buffers: the pooled mean and unbiased variance of every value each layer received, as
    `precisebn.recompute_bn_buffers` computes them. Validation and the checkpoint of that
    epoch then see precise statistics.

    Each batch goes through ``model.data_preprocessor(batch, preprocess_training)`` and
    then ``model(**data, mode="tensor")``, the model unwrapped from
    ``MMDistributedDataParallel`` or another wrapper. The hook's priority is
    ``"ABOVE_NORMAL"``: on the same event it runs before ``EMAHook`` (``"NORMAL"``) and
    ``CheckpointHook`` (``"VERY_LOW"``). When an ``EMAHook`` copies the model's buffers
    rather than averaging them (``update_buffers=False``, its default), the new statistics
    are copied into its averaged model too, as that hook does at every iteration, so that
    the checkpoint it writes holds them.

    Only BN layers in training mode are recomputed; layers that the model keeps in eval
    mode (``norm_eval=True``, frozen stages) keep their buffers, as in mmpretrain. During a
    recompute the rest of the model runs in eval mode (dropout and drop-path off), since the
    statistics are for evaluation; the flags are restored afterwards. ``eval_mode=False``
    keeps the modules as the runner left them.

    An epoch-based loop has finished its pass over the train dataloader, which the hook
    then reads again; an iteration-based loop is in the middle of one (its
    ``InfiniteSampler`` draws from one generator, persistent workers serve one iterator),
    so there the hook reads a dataloader of its own: the same dataset, batching, collate
    function and workers, with a ``DefaultSampler`` shuffling as the train sampler does.

    Under distributed training each rank reads ``ceil(num_samples / (batch_size *
    world_size))`` batches of its own shard, the statistics are pooled over all ranks, and
    every rank ends with the same buffers.

    Each recompute logs a line through ``runner.logger``, records
    ``precisebn/num_batches`` (summed over the ranks), ``precisebn/max_shift`` (the
    largest shift of a layer's mean, in units of its new standard deviation) and, with
    ``tol``, ``precisebn/converged`` in ``runner.message_hub``, and sends them to the
    visualizer's backends at the current iteration; ``last`` holds the run's
    `precisebn.RunInfo`.

    Args:
        num_samples: about how many samples (over all ranks) each recompute reads; the
            number of batches is rounded up, and a shorter dataloader is read whole.
        interval: recompute every this many epochs (epoch-based loop) or iterations
            (iteration-based loop).
        tol: stop a recompute early once every channel is known to ``tol`` (see
            `precisebn.recompute_bn_buffers`).
        eval_mode: run the rest of the model in eval mode during a recompute.
        preprocess_training: the ``training`` flag passed to the data preprocessor;
            ``True`` also applies its training-time batch augments (mixup, cutmix), whose
            blended images the evaluated model never sees. mmpretrain passes ``False``.
        dataloader: batches to use instead of the train dataloader: a ``DataLoader``, or a
            dataloader config, built by ``Runner.build_dataloader`` when training starts.

    Example:
        In a config (``custom_imports`` registers the hook):

        ```python
        custom_imports = dict(imports=["precisebn.mmengine"], allow_failed_imports=False)
        custom_hooks = [dict(type="PreciseBNHook", num_samples=8192, interval=1)]
        ```

        Or built directly:

        >>> from precisebn.mmengine import PreciseBNHook
        >>> hook = PreciseBNHook(num_samples=1024, interval=2)
        >>> hook.num_samples, hook.interval, hook.priority
        (1024, 2, 'ABOVE_NORMAL')
    """

    priority = "ABOVE_NORMAL"

    def __init__(
        self,
        num_samples: int = 8192,
        interval: int = 1,
        *,
        tol: float | None = None,
        eval_mode: bool = True,
        preprocess_training: bool = False,
        dataloader: Iterable[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (("num_samples", num_samples), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_samples = num_samples
        self.interval = interval
        self.tol = tol
        self.eval_mode = eval_mode
        self.preprocess_training = preprocess_training
        self.dataloader = dataloader
        self.last: RunInfo | None = None
        """What the last recompute used, and whether it converged."""
        self._own: DataLoader[Any] | None = None  # for a loop that never ends an epoch

    # ------------------------------------------------------------------- the hooks

    def before_train(self, runner: Any) -> None:
        """Build ``dataloader`` from its config."""
        self._loader(runner)

    def after_train_epoch(self, runner: Any) -> None:
        """Recompute every ``interval`` epochs of an epoch-based loop."""
        if isinstance(runner.train_loop, EpochBasedTrainLoop) and _due(runner.epoch, self):
            self.recompute(runner)

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> None:
        """Recompute every ``interval`` iterations of an iteration-based loop."""
        if isinstance(runner.train_loop, IterBasedTrainLoop) and _due(runner.iter, self):
            self.recompute(runner, step=runner.iter + 1)  # the loop counts it afterwards

    # ------------------------------------------------------------------ the work

    def recompute(
        self, runner: Any, *, step: int | None = None
    ) -> tuple[dict[str, Tensor], RunInfo] | None:
        """Recompute and apply the statistics now; return the buffers and the run's info,
        or ``None`` (with a warning in the log) when no BN layer is in training mode.

        ``step`` is the iteration the figures are logged at (default: ``runner.iter``,
        the training iterations done)."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        layers = training_layers(model)
        if not layers:
            runner.logger.warning(
                "PreciseBNHook: the model has no BatchNorm layer in training mode that tracks "
                "running statistics; nothing was recomputed"
            )
            return None
        loader = self._loader(runner)
        counted = _Counted(loader)
        new, info, shift = refresh(
            model,
            counted,
            num_batches=self.num_batches(loader),
            tol=self.tol,
            forward=_preprocessed_forward(self.preprocess_training),
            eval_mode=self.eval_mode,
            layers=layers,
        )
        info = info._replace(num_samples=counted.total())
        _mirror_into_ema(runner, model, new)
        self.last = info
        self._log(runner, info, shift, step=runner.iter if step is None else step)
        return new, info

    def num_batches(self, loader: Iterable[Any]) -> int:
        """The batches each rank reads: ``ceil(num_samples / (batch_size * world_size))``.

        Raises:
            ValueError: the loader says nothing of its batch size.
        """
        size = getattr(loader, "batch_size", None)
        if size is None:  # a DataLoader given a batch sampler
            size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if not isinstance(size, int) or size < 1:
            raise ValueError(
                f"PreciseBNHook cannot tell the batch size of {type(loader).__name__}: it "
                "needs a DataLoader whose batch_size (or batch_sampler.batch_size) is set"
            )
        return math.ceil(self.num_samples / (size * _world_size()))

    def _loader(self, runner: Any) -> Iterable[Any]:
        if self.dataloader is None:
            loader = runner.train_loop.dataloader
            if isinstance(runner.train_loop, EpochBasedTrainLoop):
                return loader  # type: ignore[no-any-return]
            # An iteration-based loop is inside an epoch of its dataloader, whose iterator
            # it shares (persistent workers) and whose InfiniteSampler draws from one
            # generator: reading it would reorder or end the loop's batches.
            if self._own is None:
                self._own = _same_batches(loader, seed=runner.seed)
            return self._own
        if isinstance(self.dataloader, Mapping):  # a config: built once
            config = dict(self.dataloader)
            self.dataloader = Runner.build_dataloader(config, seed=runner.seed)
        return self.dataloader

    def _log(self, runner: Any, info: RunInfo, shift: float, *, step: int) -> None:
        metrics = {"precisebn/num_batches": float(info.num_batches), "precisebn/max_shift": shift}
        if info.converged is not None:
            metrics["precisebn/converged"] = float(info.converged)
        for key, value in metrics.items():
            runner.message_hub.update_scalar(key, value)
        runner.visualizer.add_scalars(metrics, step=step)
        runner.logger.info(
            f"PreciseBNHook: recomputed the BN statistics over {info.num_batches} batches "
            f"({info.num_samples} samples); largest shift {shift:.3g} std"
        )


def _same_batches(loader: DataLoader[Any], *, seed: int | None) -> DataLoader[Any]:
    """A dataloader of its own over ``loader``'s dataset, batched and collated alike, with
    a ``DefaultSampler`` (one pass, this rank's shard) that shuffles as ``loader``'s
    sampler does."""
    sampler = DefaultSampler(
        loader.dataset,
        shuffle=getattr(loader.sampler, "shuffle", True),
        seed=getattr(loader.sampler, "seed", seed),
    )
    batches: Any = loader.batch_sampler
    try:  # torch's BatchSampler and mmengine's take (sampler, batch_size, drop_last)
        batch_sampler = type(batches)(sampler, batches.batch_size, batches.drop_last)
    except (AttributeError, TypeError) as error:
        raise TypeError(
            f"PreciseBNHook cannot make a dataloader like the train dataloader, whose batch "
            f"sampler is {type(batches).__name__}: pass PreciseBNHook(dataloader=...)"
        ) from error
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def _due(count: int, hook: PreciseBNHook) -> bool:
    """Whether the epoch or iteration ``count`` (0-based, ending now) ends an interval."""
    return (count + 1) % hook.interval == 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@functools.cache  # one function per flag: a compiled run finds its graph again
def _preprocessed_forward(training: bool) -> Forward:
    """The forward of an mmengine ``BaseModel`` in tensor mode, after its data
    preprocessor, as ``BaseModel.val_step`` feeds a batch."""

    def forward(model: Any, batch: Any) -> Any:
        data = model.data_preprocessor(batch, training)
        if isinstance(data, Mapping):
            return model(**data, mode="tensor")
        if isinstance(data, (list, tuple)):
            return model(*data, mode="tensor")
        raise TypeError(
            "PreciseBNHook: the data preprocessor returned a "
            f"{type(data).__name__}, not a dict, tuple or list of the model's inputs"
        )

    return forward


class _Counted:
    """The batches of ``loader``, counting the samples of those read: mmengine's collate
    makes a batch ``{"inputs": [one tensor per sample], ...}``, whose first tensor's leading
    dimension (what `precisebn.RunInfo` counts) is a sample's channels."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.samples = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            inputs = batch.get("inputs") if isinstance(batch, Mapping) else None
            if isinstance(inputs, (list, tuple, Tensor)):
                self.samples += len(inputs)
            else:
                self.samples += leading_size(optree.tree_leaves(batch, none_is_leaf=True))
            yield batch

    def total(self) -> int:
        """The samples read, summed over the ranks when precisebn pools them."""
        group = reduction_group()
        if group is None:
            return self.samples
        return reduce_run({}, batches=0, samples=self.samples, group=group).samples


def _mirror_into_ema(runner: Any, model: nn.Module, new: Mapping[str, Tensor]) -> None:
    """Copy the new buffers into the averaged model of each ``EMAHook`` that copies the
    model's buffers rather than averaging them: what it does at every training iteration."""
    for hook in getattr(runner, "hooks", ()):
        if not isinstance(hook, EMAHook) or getattr(hook, "src_model", None) is not model:
            continue
        averaged = getattr(hook, "ema_model", None)
        if averaged is not None and not averaged.update_buffers:
            apply_bn_buffers(averaged.module, new)


if not TYPE_CHECKING:
    HOOKS.register_module(module=PreciseBNHook)
