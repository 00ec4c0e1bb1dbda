"""Exactness: each method's BN statistics against a float64 pooled reference.

The reference runs the same float32 model in training mode (so every BN layer sees the
same inputs as under every method), records each BN layer's input with a forward
pre-hook, and pools all of them in float64: the mean and the unbiased variance
``N/(N-1)`` of every value that reached the layer. Errors therefore measure the
statistics each method computes, not float32 rounding in the layers before BN.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.methods import METHODS, bn_layers

MEAN_BOUND = 1e-5
"""precisebn's bound on the mean error, in units of ``|mean| + std`` (float32)."""
VAR_BOUND = 1e-5
"""precisebn's bound on the relative variance error (float32)."""
VAR_BOUND_SHIFTED = 1e-4
"""precisebn's bound on the relative variance error when ``|mean| = 1e3 * std``."""


def reference(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """Float64 pooled mean and unbiased variance of every BN layer's input over all batches."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list[Tensor]] = {name: [] for name in bn_layers(model)}
    handles = []
    for name, layer in bn_layers(model).items():

        def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().to(torch.float64)
            seen[name].append(x.transpose(0, 1).reshape(x.shape[1], -1))

        handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    out = {}
    for name, parts in seen.items():
        values = torch.cat(parts, dim=1)
        mean = values.mean(dim=1)
        out[f"{name}.running_mean"] = mean
        out[f"{name}.running_var"] = (values - mean[:, None]).square().sum(1) / (
            values.shape[1] - 1
        )
    return out


@dataclass(frozen=True)
class Errors:
    """Worst error over every layer and channel."""

    mean: float
    """max |mean - ref| / (|ref mean| + ref std)."""
    var: float
    """max |var - ref| / ref var."""


def errors(result: dict[str, Tensor], ref: dict[str, Tensor]) -> Errors:
    """The worst mean and variance errors of ``result`` against ``ref``."""
    worst_mean = worst_var = 0.0
    for key in ref:
        if not key.endswith(".running_mean"):
            continue
        var_key = key[: -len("mean")] + "var"
        ref_mean, ref_var = ref[key], ref[var_key]
        mean = result[key].to(torch.float64)
        var = result[var_key].to(torch.float64)
        scale = ref_mean.abs() + ref_var.sqrt()
        worst_mean = max(worst_mean, ((mean - ref_mean).abs() / scale).max().item())
        worst_var = max(worst_var, ((var - ref_var).abs() / ref_var).max().item())
    return Errors(worst_mean, worst_var)


def all_errors(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Errors]:
    """Errors of every estimator (not the floor) on ``batches``, each on a fresh copy."""
    ref = reference(model, batches)
    return {
        name: errors(method(copy.deepcopy(model), batches), ref)
        for name, method in METHODS.items()
        if name != "floor"
    }
