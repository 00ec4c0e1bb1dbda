"""Intercepting a recomputed layer's batch-norm call: the kernel computes what the call saw.

Each recomputed layer's ``running_mean`` and ``running_var`` are bound to *tags*: tensors
of a private subclass that hold a copy of the caller's values and whose
``__torch_function__`` sees every call that involves them.

- **The batch-norm call** (``torch.nn.functional.batch_norm`` or ``torch.batch_norm`` with
  the layer's tags as running statistics) becomes a training-mode call with momentum 1 on
  rows that the run's sink provides, so the kernel itself leaves the batch mean and
  unbiased variance there. The number of values per channel is read from the input's
  shape, on every call. The output is the one the model's own training-mode call gives,
  bit for bit: the call passes the caller's weight and bias as they are and rows of the
  buffers' dtype. Half-precision buffers get a second, float32 call for the statistics.
- **Slices** ``running_mean[a:b:s]`` (or ``narrow``) give tags of the channels they cover,
  so slimmable and once-for-all layers that normalise the first ``c`` channels are
  recorded channel by channel.
- **Any other use** reads the statistics outside the batch-norm call (a fused conv-bn
  module scales its weight by ``running_var``): it sees the caller's values, is reported to
  the owner, and must not write them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from precisebn._guard import ForbiddenWriteError, Guard, Protection
from precisebn._layers import MEAN, VAR

__all__ = [
    "Call",
    "Sink",
    "Tag",
    "TagOwner",
    "batch_norm_arguments",
    "make_tag",
    "one_value_message",
    "operator_name",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_F_ORDER = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_ORDER = (
    "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn"
)  # fmt: skip
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


class Call(NamedTuple):
    """One intercepted batch-norm call of a recomputed layer."""

    layer: str
    count: int  # type: ignore[assignment]  # shadows tuple.count, as the maths names it
    """Values per channel: the input's size over its channel dimension."""
    span: range
    """The layer's channels the call covers (all of them unless the buffers were sliced)."""
    full: bool
    """Whether ``span`` is every channel of the layer."""


class Sink(Protocol):
    """Where intercepted calls put their batch moments."""

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mean, var)`` vectors of ``len(call.span)`` for the kernel to write."""
        ...

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        """Note a call with fewer than two values per channel (its batch cannot count)."""
        ...

    def output(
        self, call: Call, out: Tensor, input: Tensor, weight: Any, bias: Any, eps: float
    ) -> Tensor:
        """What the call returns: ``out``, the training-mode output (a recompute's sink), or
        the input normalised otherwise (test-time adaptation's)."""
        ...


class TagOwner(Protocol):
    """What a tag needs from the run it belongs to."""

    sink: Sink
    cudnn: bool
    protection: Protection

    def note_read(self, layer: str, operator: str) -> None:
        """Note that ``layer``'s statistics were used outside its batch-norm call."""
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
        if func is F.batch_norm:
            if len(args) == 3 and kwargs is not None:  # how F.batch_norm dispatches
                get = kwargs.get
                input, mean, var = args
                return _batch_norm(input, mean, var, get("weight"), get("bias"), get("eps", 1e-5))
            return _batch_norm_named(batch_norm_arguments(func, args, kwargs))
        if func is torch.batch_norm:
            return _batch_norm_named(batch_norm_arguments(func, args, kwargs))
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        sliced = _slice(func, args, kwargs)
        if sliced is not None:
            return sliced
        return _outside(func, args, kwargs)


def make_tag(data: Tensor, *, layer: str, stat: str, span: range, owner: TagOwner) -> Tag:
    """A tag over ``data`` (the run's private copy of a buffer, or a view of one)."""
    dtype = data.dtype
    tag = data.as_subclass(Tag)
    assert isinstance(tag, Tag)
    tag.layer, tag.stat, tag.span, tag.owner = layer, stat, span, owner
    tag.full, tag.num_channels, tag.buffer_dtype = True, len(span), dtype
    return tag


def batch_norm_arguments(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """The arguments of a ``F.batch_norm`` or ``torch.batch_norm`` call by name (plain
    Python, which dynamo traces too); ``weight``, ``bias`` and ``eps`` default as there."""
    order = _F_ORDER if func is F.batch_norm else _ATEN_ORDER
    named = dict(zip(order, args, strict=False))
    return {"weight": None, "bias": None, "eps": 1e-5} | named | (kwargs or {})


def _batch_norm_named(named: dict[str, Any]) -> Tensor:
    input, mean, var = named["input"], named["running_mean"], named["running_var"]
    return _batch_norm(input, mean, var, named["weight"], named["bias"], named["eps"])


def _batch_norm(
    input: Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """A recomputed layer's call: the kernel writes the batch moments into the sink's rows."""
    mean_tag = _pair(running_mean, running_var)
    owner = mean_tag.owner
    shape = input.shape
    channels = shape[1] if len(shape) >= 2 else 0
    if channels != len(mean_tag.span):
        raise ValueError(
            f"BatchNorm layer '{mean_tag.layer or '<model>'}': the input has "
            f"{channels} channels (shape {tuple(shape)}) but the running statistics "
            f"passed cover {len(mean_tag.span)}"
        )
    call = Call(mean_tag.layer, input.numel() // channels, mean_tag.span, mean_tag.full)
    dtype, sink = mean_tag.buffer_dtype, owner.sink
    if call.count < 2:
        sink.degenerate(call, tuple(shape))
        out = _output_only(input, weight, bias, dtype, eps, owner.cudnn)
    elif dtype not in _LOW_PRECISION:
        # The op under F.batch_norm, in training mode with momentum 1: the kernel leaves the
        # batch mean and unbiased variance in the rows.
        mean, var = sink.rows(call, dtype, input.device)
        out = torch.batch_norm(input, weight, bias, mean, var, True, 1.0, eps, owner.cudnn)
    else:
        mean, var = sink.rows(call, torch.float32, input.device)
        torch.batch_norm(input, None, None, mean, var, True, 1.0, eps, owner.cudnn)
        out = _output_only(input, weight, bias, dtype, eps, owner.cudnn)
    return sink.output(call, out, input, weight, bias, eps)


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
    sliced = make_tag(view, layer=tag.layer, stat=tag.stat, span=span, owner=tag.owner)
    sliced.num_channels, sliced.full = tag.num_channels, span == range(tag.num_channels)
    return sliced


def operator_name(func: Any) -> str:
    """How an error names a torch function: its qualified name where it has one."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


def one_value_message(layer: str, count: int, shape: tuple[int, ...]) -> str:
    """Why a call of ``layer`` with ``count`` (< 2) values per channel gives no batch
    statistics."""
    return (
        f"BatchNorm layer '{layer or '<model>'}' got {count} value per channel "
        f"(input shape {shape}); batch statistics need at least 2"
    )


def _outside(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Any other call: a read of the caller's values, which must not write them."""
    leaves: list[Any] = optree.tree_leaves((args, kwargs))  # type: ignore[arg-type]
    tags = [t for t in leaves if isinstance(t, Tag)]
    name = operator_name(func)
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
