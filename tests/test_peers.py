"""Where the usual tools disagree with the exact answer, and precisebn does not."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

import precisebn

from models import tabular
from reference import assert_matches, pooled_inputs


def seed_equal_weight_average(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """The seed helper's algorithm: equal-weight averages of batch mean and mean square."""
    twin = copy.deepcopy(model).train()
    layers = {n: m for n, m in twin.named_modules() if isinstance(m, nn.BatchNorm1d)}
    means = {n: torch.zeros_like(m.running_mean) for n, m in layers.items()}
    squares = {n: torch.zeros_like(m.running_var) for n, m in layers.items()}
    for m in layers.values():
        m.momentum = 1.0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            twin(batch)
            for n, m in layers.items():
                means[n] += (m.running_mean - means[n]) / (i + 1)
                squares[n] += (m.running_var + m.running_mean**2 - squares[n]) / (i + 1)
    out = {}
    for n in layers:
        out[f"{n}.running_mean"] = means[n]
        out[f"{n}.running_var"] = squares[n] - means[n] ** 2
    return out


def torch_update_bn(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    twin = copy.deepcopy(model)
    update_bn(batches, twin)
    return {k: v for k, v in twin.state_dict().items() if "running_" in k}


def worst_var_error(result: dict[str, Tensor], pooled: dict[str, Tensor]) -> float:
    errors = []
    for name, values in pooled.items():
        truth = values.var(dim=1)
        got = result[f"{name}.running_var"].double()
        errors.append(((got - truth).abs() / truth).max().item())
    return max(errors)


def test_small_batches_bias_the_equal_weight_estimators() -> None:
    torch.manual_seed(0)
    model = tabular()
    gen = torch.Generator().manual_seed(1)
    # Batches of 2 whose means wander: the between-batch variance is large.
    batches = [
        torch.randn(2, 6, generator=gen) + torch.randn(1, 6, generator=gen) for _ in range(64)
    ]
    pooled = pooled_inputs(model, batches)
    exact = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(exact, pooled)
    assert worst_var_error(exact, pooled) < 1e-5
    assert worst_var_error(torch_update_bn(model, batches), pooled) > 0.1
    assert worst_var_error(seed_equal_weight_average(model, batches), pooled) > 0.01


def test_float32_mean_square_formula_fails_on_large_offsets() -> None:
    torch.manual_seed(2)
    model = tabular()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 6, generator=gen) + 1e4 for _ in range(8)]
    pooled = pooled_inputs(model, batches, layers=["0"])
    exact = precisebn.recompute_bn_buffers(model, batches, layers=["0"])
    assert worst_var_error(exact, pooled) < 1e-3
    assert worst_var_error(seed_equal_weight_average(model, batches), pooled) > 1.0
