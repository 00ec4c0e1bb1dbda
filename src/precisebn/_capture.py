"""Run one batch statelessly and return the per-layer moments of every BN input.

The model runs under :func:`torch.func.functional_call`. A :class:`~torch.overrides.TorchFunctionMode`
sees each ``torch.nn.functional.batch_norm`` call; a call that belongs to a recomputed layer
(recognised by its ``running_mean`` tensor) is replaced by a training-mode call on scratch
buffers with momentum 1, so the kernel itself leaves the batch mean and unbiased variance in
them: no extra pass over the activations, and nothing the caller owns is written to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode

from precisebn._batches import Forward, default_forward
from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers
from precisebn._moments import Moments, Stats, from_batch, merge_layer

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: tuple[Any, ...] = (None, None, False, 0.1, 1e-5)


class _Record:
    """One intercepted call: the layer, its values per channel, and the batch moments."""

    __slots__ = ("count", "layer", "mean", "var")

    def __init__(self, layer: str, count: int, mean: Tensor, var: Tensor) -> None:
        self.layer, self.count, self.mean, self.var = layer, count, mean, var


class _Interceptor(TorchFunctionMode):
    def __init__(self, tags: Mapping[int, str]) -> None:
        super().__init__()
        self.tags = tags
        self.records: list[_Record] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _bind(args, kwargs)
            layer = self.tags.get(id(bound[1]))
            if layer is not None:
                return self._batch_norm(layer, *bound)
        return func(*args, **kwargs)

    def _batch_norm(
        self, layer: str, x: Tensor, _m: Any, _v: Any, weight: Tensor | None,
        bias: Tensor | None, _t: Any, _mom: Any, eps: float,
    ) -> Tensor:  # fmt: skip
        channels = x.shape[1]
        count = x.numel() // channels
        if count < 2:
            raise ValueError(
                f"BatchNorm layer '{layer or '<model>'}' got {count} value per channel "
                f"(input shape {tuple(x.shape)}); batch statistics need at least 2: use "
                "batches of 2 or more samples"
            )
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.dtype in _LOW_PRECISION:
            # Mixed-precision kernel: half/bfloat16 input, float32 affine and statistics.
            weight = weight.float() if weight is not None else None
            bias = bias.float() if bias is not None else None
        mean = torch.zeros(channels, dtype=stat_dtype, device=x.device)
        var = torch.zeros(channels, dtype=stat_dtype, device=x.device)
        out = F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)
        self.records.append(_Record(layer, count, mean, var))
        return out


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if not kwargs and len(args) == len(_BN_ARGS):
        return args
    full = list(args) + [None] * (len(_BN_ARGS) - len(args))
    for i, name in enumerate(_BN_ARGS):
        if name in kwargs:
            full[i] = kwargs[name]
        elif i >= len(args) and i >= 3:
            full[i] = _BN_DEFAULTS[i - 3]
    return tuple(full)


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
        self.model = model
        self.layers = find_bn_layers(model, layers)
        self.forward = forward or default_forward
        state: dict[str, Tensor] = dict(model.named_parameters())
        state.update(model.named_buffers())
        state.update(params or {})
        state.update(buffers or {})
        self.bn_buffers = {
            buffer_key(name, s): state[buffer_key(name, s)] for name in self.layers for s in STAT_NAMES
        }
        self.tags = {id(self.bn_buffers[buffer_key(n, STAT_NAMES[0])]): n for n in self.layers}
        self.state = state
        self.device = next(iter(state.values())).device if state else torch.device("cpu")
        self.floating_params = any(t.is_floating_point() for t in state.values())
        self._writable = _writable_buffers(model, state, self.layers)

    def run(self, batch: Any) -> tuple[Any, Stats]:
        """Run ``batch`` through the model; return its output and the batch moments per layer."""
        # Every buffer a forward might write to is swapped for a private copy.
        state = {**self.state, **{k: v.clone() for k, v in self._writable.items()}}
        mode = _Interceptor(self.tags)

        def stateless(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self.model, state, args, kwargs, strict=False)

        with mode:
            out = self.forward(stateless, batch)
        return out, _collect(mode.records)


def _writable_buffers(
    model: nn.Module, state: Mapping[str, Tensor], chosen: Mapping[str, nn.Module]
) -> dict[str, Tensor]:
    """Buffers that a training-mode forward of a norm layer updates in place.

    ``num_batches_tracked`` always (momentum=None reads it back with ``float()``, so the
    copy lives on the CPU to keep that read free of a device sync); running statistics
    of norm layers that are not recomputed (their own forward updates them).
    """
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, _NormBase) or not module.track_running_stats:
            continue
        key = buffer_key(name, "num_batches_tracked")
        if key in state:
            out[key] = state[key].detach().cpu()
        if name not in chosen:
            for stat in STAT_NAMES:
                out[buffer_key(name, stat)] = state[buffer_key(name, stat)]
    return out


def _collect(records: list[_Record]) -> Stats:
    stats: Stats = {}
    for r in records:
        moments = from_batch(r.count, r.mean, r.var)
        stats[r.layer] = merge_layer(stats[r.layer], moments) if r.layer in stats else moments
    return stats


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
        its :class:`Moments` (all calls of a reused layer pooled).

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
        >>> out, moments = precisebn.capture(model, torch.randn(8, 3))
        >>> out.shape, moments["1"].count.item()
        (torch.Size([8, 4]), 8.0)
    """
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    return runner.run(inputs)
