"""Intercepting a recomputed layer's batch-norm call: the kernel computes what the call saw.

Each recomputed layer's ``running_mean`` and ``running_var`` are bound to *tags*: tensors
of a private subclass that hold a copy of the caller's values and whose
``__torch_function__`` sees every call that involves them.

- **The batch-norm call** (``torch.nn.functional.batch_norm`` or ``torch.batch_norm`` with
  the layer's tags as running statistics) becomes a training-mode call with momentum 1 on
  rows that the run's sink provides, so the kernel itself leaves the batch mean and
  unbiased variance there; the tag reads the number of values per channel from the input's
  shape. The output is the one the model's own training-mode call gives, bit for bit: the
  call passes the caller's weight and bias as they are and rows of the buffers' dtype.
  Half-precision buffers get a second, float32 call for the statistics.
- **Slices** ``running_mean[a:b:s]`` (or ``narrow``) give tags of the channels they cover,
  so slimmable and once-for-all layers that normalise the first ``c`` channels are
  recorded channel by channel.
- **Any other use** reads the statistics outside the batch-norm call (a fused conv-bn
  module scales its weight by ``running_var``): it sees the caller's values, is reported to
  the owner (such a run is never run directly), and must not write them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_leaves

from precisebn._guard import ForbiddenWriteError, Guard, Protection

__all__ = ["Call", "Entry", "Sink", "Tag", "TagOwner", "checking_torch_function", "make_tag"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_F_BATCH_NORM = inspect.signature(F.batch_norm)
_ATEN_ORDER = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum")
_F_ORDER = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum")
_METADATA = frozenset(
    [
        Tensor.size,
        Tensor.dim,
        Tensor.numel,
        Tensor.nelement,
        Tensor.stride,
        Tensor.storage_offset,
        Tensor.is_contiguous,
        Tensor.is_floating_point,
        Tensor.is_complex,
        Tensor.element_size,
        Tensor.get_device,
        Tensor.__len__,
        *(
            getattr(Tensor, name).__get__
            for name in (
                "shape",
                "dtype",
                "device",
                "ndim",
                "layout",
                "requires_grad",
                "is_cuda",
                "is_meta",
                "is_sparse",
                "is_quantized",
            )
        ),
    ]
)
MEAN, VAR = "running_mean", "running_var"

Entry: TypeAlias = int | tuple[int, range]
"""What one batch gave one layer: values per channel (0: not reached), with the channels
covered when a call covered only some."""


class Call(NamedTuple):
    """One intercepted batch-norm call of a recomputed layer."""

    layer: str
    count: int  # type: ignore[assignment]  # shadows tuple.count, as the maths names it
    """Values per channel: the input's size over its channel dimension."""
    span: range
    """The layer's channels the call covers (all of them unless the buffers were sliced)."""
    full: bool
    """Whether ``span`` is every channel of the layer."""
    size: int
    """The layer's number of channels."""
    factor: float
    """The momentum argument: the factor a kernel would update the buffers with."""
    training: bool
    """The call's own training flag (the interception runs it in training mode anyway)."""

    @property
    def entry(self) -> Entry:
        """The call's counts as a batch's entry for its layer."""
        return self.count if self.full else (self.count, self.span)


class Sink(Protocol):
    """Where intercepted calls put their batch moments."""

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Zeroed or stale ``(mean, var)`` vectors of ``len(call.span)`` for the kernel."""
        ...

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        """Note a call with fewer than two values per channel (its batch cannot count)."""
        ...


class TagOwner(Protocol):
    """What a tag needs from the run it belongs to."""

    sink: Sink
    cudnn: bool
    protection: Protection

    def note_read(self, layer: str, operator: str) -> None:
        """Note that ``layer``'s statistics were used outside its batch-norm call."""
        ...

    def note_call(self, call: Call) -> None:
        """Note a batch-norm call of a checked direct batch."""
        ...


class Tag(Guard):
    """A recomputed layer's bound ``running_mean`` or ``running_var`` (see the module doc).

    A subclass of `Guard`, so that in a call with both, the tag's handler runs.
    """

    layer: str
    stat: str
    span: range
    full: bool
    """Whether the tag covers all of the layer's channels (it is not a slice)."""
    num_channels: int
    buffer_dtype: torch.dtype
    """The buffer's dtype, kept as an attribute: reading ``.dtype`` would call the handler."""
    owner: TagOwner

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        bound = _bound_batch_norm(func, args, kwargs)
        if bound is not None:
            return _batch_norm(*bound)
        return _other(func, args, kwargs, outside=_outside)


def checking_torch_function(
    cls: type[Tag],
    func: Callable[..., Any],
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """The handler of a *checked* direct batch: batch-norm calls run as in a direct batch,
    on the private statistics, and only report what they saw (`TagOwner.note_call`)."""
    kwargs = kwargs or {}
    bound = _bound_batch_norm(func, args, kwargs)
    if bound is not None:
        input, running_mean, running_var, weight, bias, training, momentum, eps = bound
        mean_tag = _pair(running_mean, running_var)
        call = _call(mean_tag, input, training, momentum)
        mean_tag.owner.note_call(call)
        if call.count < 2:  # the check fails; the stock call would raise
            return _output_only(
                input, weight, bias, mean_tag.buffer_dtype, eps, mean_tag.owner.cudnn
            )
    else:
        result = _other(func, args, kwargs, outside=_note_outside)
        if result is not _NOT_HANDLED:
            return result
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


_NOT_HANDLED = object()
Bound = tuple[Tensor, Any, Any, Any, Any, bool, float, float]
"""A batch-norm call's ``(input, running_mean, running_var, weight, bias, training,
momentum, eps)``."""


def _bound_batch_norm(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Bound | None:
    """The arguments of a batch-norm call, or ``None`` for any other call."""
    if func is F.batch_norm:
        if len(args) == 3:  # how F.batch_norm dispatches
            get = kwargs.get
            return (
                *args,
                get("weight"),
                get("bias"),
                get("training", False),
                get("momentum", 0.1),
                get("eps", 1e-5),
            )
        call = _F_BATCH_NORM.bind(*args, **kwargs)
        call.apply_defaults()
        return tuple(call.arguments.values())
    if func is torch.batch_norm:
        named = dict(zip((*_ATEN_ORDER, "eps"), args, strict=False)) | kwargs
        return tuple(named[k] for k in (*_F_ORDER, "eps"))
    return None


def _other(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, outside: Callable[..., Any]
) -> Any:
    """A call that is not a batch-norm call: metadata, a slice, or a read."""
    if func in _METADATA:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    sliced = _slice(func, args, kwargs)
    if sliced is not None:
        return sliced
    return outside(func, args, kwargs)


def make_tag(
    tag_type: type[Tag], data: Tensor, *, layer: str, stat: str, span: range, owner: TagOwner
) -> Tag:
    """A tag of ``tag_type`` over ``data`` (a view of the run's private statistics)."""
    dtype = data.dtype
    tag = data.as_subclass(tag_type)
    assert isinstance(tag, Tag)
    tag.layer, tag.stat, tag.span, tag.owner = layer, stat, span, owner
    tag.full, tag.num_channels, tag.buffer_dtype = True, len(span), dtype
    return tag


def _batch_norm(
    input: Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> Tensor:
    mean_tag = _pair(running_mean, running_var)
    owner = mean_tag.owner
    call = _call(mean_tag, input, training, momentum)
    buffers_dtype = mean_tag.buffer_dtype
    if call.count < 2:
        owner.sink.degenerate(call, tuple(input.shape))
        return _output_only(input, weight, bias, buffers_dtype, eps, owner.cudnn)
    stats_dtype = buffers_dtype if buffers_dtype not in _LOW_PRECISION else torch.float32
    mean, var = owner.sink.rows(call, stats_dtype, input.device)
    if stats_dtype == buffers_dtype:
        # The op under F.batch_norm, in training mode with momentum 1: the kernel leaves the
        # batch mean and unbiased variance in the rows.
        return torch.batch_norm(input, weight, bias, mean, var, True, 1.0, eps, owner.cudnn)
    torch.batch_norm(input, None, None, mean, var, True, 1.0, eps, owner.cudnn)
    return _output_only(input, weight, bias, buffers_dtype, eps, owner.cudnn)


def _call(mean_tag: Tag, input: Tensor, training: bool, momentum: float | None) -> Call:
    """What one batch-norm call on ``mean_tag``'s channels sees."""
    span, shape = mean_tag.span, input.shape
    channels = shape[1] if len(shape) >= 2 else 0
    if channels != len(span):
        raise ValueError(
            f"BatchNorm layer '{mean_tag.layer or '<model>'}': the input has "
            f"{channels} channels (shape {tuple(shape)}) but the running statistics "
            f"passed cover {len(span)}"
        )
    return Call(
        mean_tag.layer,
        input.numel() // channels,
        span,
        mean_tag.full,
        mean_tag.num_channels,
        float(momentum or 0.0),
        bool(training),
    )


def _output_only(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dtype: torch.dtype,
    eps: float,
    cudnn: bool,
) -> Tensor:
    """The training-mode output of a call with buffers of ``dtype`` (statistics dropped)."""
    scratch = torch.zeros(2, input.shape[1], dtype=dtype, device=input.device)
    return torch.batch_norm(input, weight, bias, scratch[0], scratch[1], True, 0.0, eps, cudnn)


def _pair(running_mean: Any, running_var: Any) -> Tag:
    """The mean tag of a batch-norm call, after checking both buffers belong together."""
    if (
        isinstance(running_mean, Tag)
        and isinstance(running_var, Tag)
        and running_mean.stat == MEAN
        and running_var.stat == VAR
        and running_mean.layer == running_var.layer
        and running_mean.span == running_var.span
    ):
        return running_mean
    tag = running_mean if isinstance(running_mean, Tag) else running_var
    raise ValueError(
        f"BatchNorm layer '{tag.layer or '<model>'}': a batch_norm call passed "
        f"{_describe(running_mean)} as running_mean and {_describe(running_var)} as "
        "running_var; precisebn records calls that pass a layer's own running_mean and "
        "running_var, or the same slice of both (running_mean[:c], running_var[:c])"
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tag):
        part = "" if value.full else f" channels {_span_text(value.span)} of"
        return f"{part} layer '{value.layer}''s {value.stat}".strip()
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} that is not a layer's buffer"
    return repr(value)


def _span_text(span: range) -> str:
    step = f":{span.step}" if span.step != 1 else ""
    return f"{span.start}:{span.stop}{step}"


def _slice(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tag | None:
    """A tag of the channels a basic slice of a tag covers, or ``None`` for other calls."""
    if not args or not isinstance(args[0], Tag) or kwargs:
        return None
    tag: Tag = args[0]
    if func is Tensor.__getitem__ and len(args) == 2:
        index = args[1]
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if not isinstance(index, slice) or not all(
            part is None or (isinstance(part, int) and not isinstance(part, bool))
            for part in (index.start, index.stop, index.step)
        ):
            return None
        span = tag.span[index]
    elif func in (Tensor.narrow, torch.narrow) and len(args) == 4:
        dim, start, length = args[1:]
        if dim not in (0, -1) or not all(isinstance(v, int) for v in (start, length)):
            return None
        span = tag.span[start : start + length]
    else:
        return None
    with torch._C.DisableTorchFunctionSubclass():
        view = func(*args)
    sliced = make_tag(type(tag), view, layer=tag.layer, stat=tag.stat, span=span, owner=tag.owner)
    sliced.num_channels, sliced.full = tag.num_channels, span == range(tag.num_channels)
    return sliced


def _note_outside(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """In a checked direct batch, a read outside the batch-norm call is only noted (the
    run starts again: earlier direct batches let such reads see the kernels' updates)."""
    for tag in tree_leaves((args, kwargs)):
        if isinstance(tag, Tag):
            tag.owner.note_read(tag.layer, _name(func))
    return _NOT_HANDLED


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


def _outside(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Any other call: a read of the caller's values, which must not write them."""
    tags = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tag)]
    name = _name(func)
    for tag in tags:
        tag.owner.note_read(tag.layer, name)
    try:
        return tags[0].owner.protection.run(func, args, kwargs)
    except ForbiddenWriteError as error:
        layers = sorted({repr(t.layer or "<model>") for t in tags})
        raise ValueError(
            f"BatchNorm layer(s) {', '.join(layers)}: the forward writes the running statistics "
            f"with {name} ({error.operator}) outside a batch_norm call; precisebn records "
            "batch statistics from torch.nn.functional.batch_norm calls and keeps the "
            "layers' buffers unchanged during a run, so it cannot follow a layer that "
            "updates them by hand"
        ) from None
