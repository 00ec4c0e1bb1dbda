"""Run batches statelessly and record the per-call moments of every recomputed BN input.

The model runs under `torch.func.functional_call` with each recomputed layer's
``running_mean`` replaced by a private *tag* tensor. A tag is a tensor subclass whose
``__torch_function__`` sees only the calls that involve it: the layer's
``torch.nn.functional.batch_norm`` call is replaced by a training-mode call on scratch
buffers with momentum 1, so the kernel itself leaves the batch mean and unbiased variance
in them. No other operation of the forward is intercepted, no extra pass is made over the
activations, and nothing the caller owns is written to.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from precisebn._batches import Forward, default_forward
from precisebn._direct import direct_momenta
from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers
from precisebn._moments import Moments, Stats, from_batch, merge_layer

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BATCH_NORM = inspect.signature(F.batch_norm)
_NO_TORCH_FUNCTION = torch._C._disabled_torch_function_impl


class Record:
    """One intercepted call: the layer, its values per channel, its batch mean and variance."""

    __slots__ = ("count", "layer", "mean", "var")

    def __init__(self, layer: str, count: int, mean: Tensor, var: Tensor) -> None:
        self.layer, self.count, self.mean, self.var = layer, count, mean, var


Rows = tuple[Tensor, Tensor]
"""Zeroed ``(mean, var)`` vectors for the BN kernel to write one call's statistics into."""


class Sink(Protocol):
    """Where intercepted calls put their batch moments."""

    def rows(
        self, layer: str, count: int, channels: int, dtype: torch.dtype, device: torch.device
    ) -> Rows:
        """Rows for one call of ``layer`` over ``count`` values per channel, kept as its record."""
        ...


class RecordList:
    """The plain sink: fresh rows per call, every call kept as a `Record`."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def rows(
        self, layer: str, count: int, channels: int, dtype: torch.dtype, device: torch.device
    ) -> Rows:
        mean, var = torch.zeros(2, channels, dtype=dtype, device=device).unbind(0)
        self.records.append(Record(layer, count, mean, var))
        return mean, var


class _Tag(Tensor):
    """A recomputed layer's stand-in ``running_mean``: intercepts that layer's BN call."""

    layer: str
    owner: Runner

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            if len(args) == 3 and isinstance(args[1], _Tag):  # how F.batch_norm dispatches
                get = kwargs.get
                return _record_batch_norm(
                    args[1], args[0], get("weight"), get("bias"), get("eps", 1e-5)
                )
            bound = _BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            call = bound.arguments
            if isinstance(call["running_mean"], _Tag):
                return _record_batch_norm(
                    call["running_mean"], call["input"], call["weight"], call["bias"], call["eps"]
                )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _record_batch_norm(
    tag: _Tag, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    channels = x.shape[1]
    count = x.numel() // channels
    if count < 2:
        raise ValueError(
            f"BatchNorm layer '{tag.layer or '<model>'}' got {count} value per channel "
            f"(input shape {tuple(x.shape)}); batch statistics need at least 2: use "
            "batches of 2 or more samples"
        )
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.dtype in _LOW_PRECISION:
        # Mixed-precision kernel: half/bfloat16 input, float32 affine and statistics.
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    mean, var = tag.owner.sink.rows(tag.layer, count, channels, stat_dtype, x.device)
    # The op under F.batch_norm, whose own checks (the count above) were done here. The
    # kernel leaves the batch mean and unbiased variance in the rows (momentum 1).
    return torch.batch_norm(x, weight, bias, mean, var, True, 1.0, eps, tag.owner.cudnn)


T = TypeVar("T")
Step = Callable[[Any], Any]
"""``step(batch) -> output``: one batch through the bound model."""


class Runner:
    """Everything one model needs to run batches statelessly, worked out once."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSelector = None,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
        forward: Forward | None = None,
    ) -> None:
        self.layers = find_bn_layers(model, layers)
        self.forward = forward or default_forward
        named_params = dict(model.named_parameters())
        named_buffers = dict(model.named_buffers())
        _check_names("params", params, named_params)
        _check_names("buffers", buffers, named_buffers)
        state = {**named_params, **(params or {}), **named_buffers, **(buffers or {})}
        self.bn_buffers = {
            buffer_key(name, s): state[buffer_key(name, s)]
            for name in self.layers
            for s in STAT_NAMES
        }
        self.device = next(iter(state.values())).device if state else torch.device("cpu")
        self.floating_params = any(t.is_floating_point() for t in state.values())
        self.sink: Sink = RecordList()
        self.cudnn = torch.backends.cudnn.enabled
        # Each recomputed layer's num_batches_tracked, bound as a view of one CPU counter.
        self.calls = torch.zeros(len(self.layers), dtype=torch.long)
        # The tags of this runner only: their interception is switched off in direct batches.
        self._tag_type: type[_Tag] = type("_RunTag", (_Tag,), {})
        self._intercepting = True
        self.live = self._live_buffers()
        full_width = self.live is not None and self.live.dtype in (torch.float32, torch.float64)
        self.momenta = direct_momenta(self.layers) if full_width else None
        # Bound for the whole run: the caller's overrides, the tags, and private copies of
        # every buffer a forward might write to.
        self._swap = {**(params or {}), **(buffers or {})}
        self._overrides = bool(self._swap)
        writable = _writable_buffers(model, state, self.layers, self.calls)
        self._swap.update(writable)
        self.counters = [self.calls] + [
            t for k, t in writable.items() if k.endswith("num_batches_tracked")
        ]
        self._swap.update(self._tags())
        self._target, self._prefix = _unwrap_ddp(model)
        # Only under an initialised process group would SyncBatchNorm sync (or raise).
        syncing = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._sync_bn = [
            m for m in self.layers.values() if syncing and isinstance(m, nn.SyncBatchNorm)
        ]

    def _live_buffers(self) -> Tensor | None:
        """One ``[2, C]`` tensor behind every recomputed layer's bound running statistics.

        Written by the kernels in direct batches only; ``None`` where the layers' buffers do
        not share one dtype and device.
        """
        means = [self.bn_buffers[buffer_key(name, STAT_NAMES[0])] for name in self.layers]
        if len({(m.dtype, m.device) for m in means}) != 1:
            return None
        size = sum(m.numel() for m in means)
        return torch.zeros(2, size, dtype=means[0].dtype, device=means[0].device)

    def _tags(self) -> dict[str, Tensor]:
        """The tags (as ``running_mean``) and their ``running_var`` partners."""
        keys = [tuple(buffer_key(name, s) for s in STAT_NAMES) for name in self.layers]
        if self.live is not None:
            sizes = [self.bn_buffers[mean_key].numel() for mean_key, _ in keys]
            means, variances = (torch.split(row, sizes) for row in self.live.unbind(0))
        else:
            means = tuple(torch.zeros_like(self.bn_buffers[k]) for k, _ in keys)
            variances = tuple(torch.zeros_like(self.bn_buffers[k]) for _, k in keys)
        tags: dict[str, Tensor] = {}
        for name, (mean_key, var_key), mean, var in zip(
            self.layers, keys, means, variances, strict=True
        ):
            tag = mean.view_as(self.bn_buffers[mean_key]).as_subclass(self._tag_type)
            assert isinstance(tag, _Tag)
            tag.layer, tag.owner = name, self
            tags[mean_key] = tag
            tags[var_key] = var.view_as(self.bn_buffers[var_key])
        return tags

    def intercept(self, on: bool) -> None:
        """Switch this runner's tags' interception on (the default) or off (direct batches)."""
        if on == self._intercepting:
            return
        self._intercepting = on
        if on:
            delattr(self._tag_type, "__torch_function__")
        else:
            # How torch marks a subclass whose calls need no dispatch to Python.
            setattr(self._tag_type, "__torch_function__", _NO_TORCH_FUNCTION)  # noqa: B010

    def within(self, loop: Callable[[Step], T], *, sink: Sink) -> T:
        """Call ``loop(step)`` with the stateless state bound; return what it returns.

        ``step(batch) -> output`` runs one batch; every recomputed BN call puts its batch
        moments into ``sink``. One ``functional_call`` covers the whole loop (binding per
        batch costs about as much as a small model's forward); the model's own tensors are
        back in place when it returns, also on error.
        """
        swap = self._swap
        if self._prefix:
            swap = {k.removeprefix(self._prefix): v for k, v in swap.items()}

        def body(model: nn.Module) -> T:
            return loop(lambda batch: self.forward(model, batch))

        holder = _Holder(self._target, body)
        self.sink, self.cudnn = sink, torch.backends.cudnn.enabled
        self.intercept(True)
        try:
            with _local_sync_bn(self._sync_bn):
                result: T = torch.func.functional_call(
                    holder,
                    {f"model.{k}": v for k, v in swap.items()},
                    (),
                    strict=False,
                    # Only the caller's tensors can stand for tied ones; working out the
                    # ties costs a walk over every tensor of the model.
                    tie_weights=self._overrides,
                )
        finally:
            self.sink = RecordList()
            self.intercept(True)
        return result

    def run(self, batch: Any) -> tuple[Any, Stats]:
        """Run ``batch`` through the model; return its output and the batch moments per layer."""
        sink = RecordList()
        out = self.within(lambda step: step(batch), sink=sink)
        return out, collect(sink.records)


class _Holder(nn.Module):
    """Holds the model as ``model`` so that one ``functional_call`` spans a whole loop."""

    def __init__(self, model: nn.Module, body: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.model = model
        self.body = body

    def forward(self) -> Any:
        return self.body(self.model)


def collect(records: list[Record]) -> Stats:
    """Per-layer moments of one batch's records (a reused layer's calls pooled)."""
    stats: Stats = {}
    for r in records:
        moments = from_batch(r.count, r.mean, r.var)
        stats[r.layer] = merge_layer(stats[r.layer], moments) if r.layer in stats else moments
    return stats


def _check_names(
    what: str, given: Mapping[str, Tensor] | None, known: Mapping[str, Tensor]
) -> None:
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        raise ValueError(f"{what}= has names the model does not: {unknown[:8]}")


def _writable_buffers(
    model: nn.Module,
    state: Mapping[str, Tensor],
    chosen: Mapping[str, nn.Module],
    calls: Tensor,
) -> dict[str, Tensor]:
    """Private copies of the buffers that a training-mode forward of a norm layer updates.

    ``num_batches_tracked`` as a CPU counter: momentum=None reads it back with
    ``float()``, which on a device tensor would synchronise, and its value only scales
    updates of running statistics that are never kept (in direct batches it is zeroed
    first, so that the factor is 1). A recomputed layer's counter is its entry of
    ``calls``, which so counts the layer's calls. The running statistics of norm
    layers that are not recomputed: their own training-mode forward updates them, and
    in training mode they only write them, so one copy serves the whole run.
    """
    out = {}
    index = {name: i for i, name in enumerate(chosen)}
    for name, module in model.named_modules():
        if not isinstance(module, _NormBase) or not module.track_running_stats:
            continue
        key = buffer_key(name, "num_batches_tracked")
        if key in state:
            out[key] = calls[index[name]] if name in index else torch.zeros((), dtype=torch.long)
        if name not in chosen:
            for stat in STAT_NAMES:
                out[buffer_key(name, stat)] = state[buffer_key(name, stat)].detach().clone()
    return out


def _unwrap_ddp(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to run and the prefix its names carry in ``model``'s names.

    A ``DistributedDataParallel`` wrapper's forward broadcasts buffers (a collective per
    call, writing into the wrapped module's buffers) and prepares gradient reduction; the
    wrapped module is run instead, while names stay those of the wrapper (``module.``...).
    """
    if isinstance(model, DistributedDataParallel):
        return model.module, "module."
    return model, ""


@contextlib.contextmanager
def _local_sync_bn(layers: list[nn.SyncBatchNorm]) -> Iterator[None]:
    """Run recomputed ``SyncBatchNorm`` layers on local batch statistics, without syncing.

    Under an initialised process group, ``SyncBatchNorm.forward`` in training mode
    all-reduces batch statistics on every call (and raises on CPU inputs). With its
    ``training`` flag off it calls ``F.batch_norm``, which its tag runs in training mode
    anyway, so the output is unchanged; the statistics are reduced once at the end of the
    run instead. The flags are restored on exit, also on error.
    """
    training = [m for m in layers if m.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def capture(
    model: nn.Module,
    inputs: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    forward: Forward | None = None,
    layers: LayerSelector = None,
) -> tuple[Any, dict[str, Moments]]:
    """Run one batch statelessly; return the model output and each BN layer's batch moments.

    Every recomputed layer normalises with the batch statistics, as in training mode,
    whatever its ``training`` flag; other modules run as the caller left them. Nothing is
    written to the model or to ``params``/``buffers``. Autograd is left as the caller has
    it, so the output can be differentiated; the moments are detached.

    Args:
        model: the module whose structure is run.
        inputs: the batch, already on the model's device.
        params: parameters to use instead of the module's own (``functional_call`` names).
        buffers: buffers to use instead of the module's own.
        forward: ``forward(stateless_model, batch)``; the default takes a tensor, or the
            first element of a tuple or list.
        layers: which BN layers to record (default: all that track running statistics).

    Returns:
        ``(output, moments)`` where ``moments`` maps each layer that the batch reached to
        its `Moments` (all calls of a reused layer pooled).

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
        >>> out, moments = precisebn.capture(model, torch.randn(8, 3))
        >>> out.shape, moments["1"].count.item()
        (torch.Size([8, 4]), 8.0)
    """
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    return runner.run(inputs)
