"""The compared methods, each as ``method(model, batches) -> BN buffers``.

Peers that mutate the model (fvcore, torch, the seed) get a model the caller has already
deep-copied; every method returns the BN ``running_mean``/``running_var`` it produced,
keyed like ``model.named_buffers()`` (the floor returns nothing).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import precisebn

Method = Callable[[nn.Module, Sequence[Tensor]], dict[str, Tensor]]
STATS = ("running_mean", "running_var")


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers that track running statistics, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }


def read_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the BN running statistics, keyed like ``model.named_buffers()``."""
    out = {}
    for name, layer in bn_layers(model).items():
        for stat in STATS:
            out[f"{name}.{stat}"] = getattr(layer, stat).detach().clone()
    return out


def floor(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """The floor: bare training-mode forward passes under ``torch.no_grad()``."""
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return {}


def run_precisebn(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """``precisebn.recompute_bn_buffers`` over every batch."""
    return dict(precisebn.recompute_bn_buffers(model, batches, num_batches=len(batches)))


def run_fvcore(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """fvcore's ``update_bn_stats`` (the model must be in training mode; it is mutated)."""
    model.train()
    fvcore_update_bn_stats()(model, batches, num_iters=len(batches))
    return read_buffers(model)


def fvcore_update_bn_stats() -> Callable[..., None]:
    """fvcore's ``update_bn_stats``, imported without its import-time deprecation warnings.

    ``fvcore.nn`` runs ``torch.jit.script`` at import, which recent torch deprecates.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn.precise_bn import update_bn_stats
    return update_bn_stats  # type: ignore[no-any-return]


def run_torch(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """``torch.optim.swa_utils.update_bn`` (cumulative average; the model is mutated)."""
    torch.optim.swa_utils.update_bn(batches, model)
    return read_buffers(model)


def run_seed(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """The seed helper's algorithm, re-implemented: momentum 1.0, then equal-weight
    running averages of each batch's mean and of its mean square ``var + mean**2``;
    the variance is the averaged mean square minus the squared averaged mean.
    Run under ``torch.no_grad()`` like the peers; the model is mutated.
    """
    layers = list(bn_layers(model).values())
    momenta = [layer.momentum for layer in layers]
    avg_mean = [torch.zeros_like(layer.running_mean) for layer in layers]
    avg_square = [torch.zeros_like(layer.running_var) for layer in layers]
    model.train()
    for layer in layers:
        layer.momentum = 1.0
    with torch.no_grad():
        for seen, batch in enumerate(itertools.islice(batches, len(batches)), start=1):
            model(batch)
            for layer, mean, square in zip(layers, avg_mean, avg_square, strict=True):
                mean += (layer.running_mean - mean) / seen
                square += (layer.running_var + layer.running_mean**2 - square) / seen
    for layer, mean, square, momentum in zip(layers, avg_mean, avg_square, momenta, strict=True):
        layer.running_mean = mean
        layer.running_var = square - mean**2
        layer.momentum = momentum
    return read_buffers(model)


METHODS: dict[str, Method] = {
    "floor": floor,
    "precisebn": run_precisebn,
    "fvcore": run_fvcore,
    "torch update_bn": run_torch,
    "seed": run_seed,
}
"""Every compared method, the floor first."""

ESTIMATORS = [name for name in METHODS if name != "floor"]
