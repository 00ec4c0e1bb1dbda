"""An independent float64 reference: record every BN input with hooks and pool them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedTensorMixin


def pooled_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    run: Callable[[nn.Module, Any], Any] | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Every value each BN layer received, as a float64 ``[C, N]`` matrix per layer name.

    Runs a deep copy of the model with the recorded BN layers switched to training mode
    (so they normalise with batch statistics) and momentum 0 (so that their buffers, which
    a forward may read, keep the caller's values), and the rest as the caller left them.
    Every other module of the copy updates its own state as the forward does.
    """
    twin = copy.deepcopy(model)
    names = set(layers) if layers is not None else None
    seen: dict[str, list[Tensor]] = {}
    for name, module in twin.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            if names is not None and name not in names:
                continue
            module.train()
            module.momentum = 0.0
            module.register_forward_pre_hook(_recorder(seen.setdefault(name, [])))
    with torch.no_grad():
        for batch in batches:
            (run or _first)(twin, batch)
    return {name: torch.cat(chunks, dim=1) for name, chunks in seen.items() if chunks}


def _first(model: nn.Module, batch: Any) -> Any:
    return model(batch if isinstance(batch, Tensor) else batch[0])


def _recorder(store: list[Tensor]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().to("cpu", torch.float64)
        store.append(x.transpose(0, 1).reshape(x.shape[1], -1))

    return hook


def assert_matches(
    new: dict[str, Tensor],
    pooled: dict[str, Tensor],
    *,
    rtol_var: float = 1e-5,
    rtol_mean: float = 1e-5,
) -> None:
    """Check mean within ``rtol_mean * (|mean| + std)`` and variance within ``rtol_var``."""
    assert pooled, "the reference recorded no layer"
    for name, values in pooled.items():
        prefix = f"{name}." if name else ""
        mean, var = values.mean(dim=1), values.var(dim=1)
        got_mean = new[prefix + "running_mean"].to("cpu", torch.float64)
        got_var = new[prefix + "running_var"].to("cpu", torch.float64)
        mean_err = ((got_mean - mean).abs() / (mean.abs() + var.sqrt())).max().item()
        var_err = ((got_var - var).abs() / var.clamp_min(1e-30)).max().item()
        assert mean_err <= rtol_mean, f"{name}: mean error {mean_err:.3g} > {rtol_mean:g}"
        assert var_err <= rtol_var, f"{name}: variance error {var_err:.3g} > {rtol_var:g}"


def snapshot(model: nn.Module) -> list[tuple[str, Any]]:
    """Everything about a module tree that precisebn promises not to change."""
    out: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        hooks = [
            tuple(getattr(module, h).keys())
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        ]
        out.append((name, (type(module), module.training, repr(attrs), hooks)))
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                if t is None or isinstance(t, UninitializedTensorMixin):
                    out.append((f"{name}.{key}", type(t)))
                else:
                    out.append(
                        (f"{name}.{key}", (t.data_ptr(), t.dtype, t.shape, t.detach().clone()))
                    )
    return out


def assert_same(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    assert [k for k, _ in before] == [k for k, _ in after]
    for (key, a), (_, b) in zip(before, after, strict=True):
        if isinstance(a, tuple) and len(a) == 4 and isinstance(a[3], Tensor):
            assert a[:3] == b[:3], key
            assert torch.equal(a[3], b[3]), f"{key} changed"
        else:
            assert a == b, f"{key} changed"
