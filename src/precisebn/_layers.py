"""Which modules count as BatchNorm layers, and how the caller chooses among them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import TypeAlias

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

LayerSelector: TypeAlias = Iterable[str] | Callable[[str, nn.Module], bool] | None
"""Which BN layers: ``None`` (all), names, or a ``(name, module) -> bool`` predicate."""

MEAN, VAR = STAT_NAMES = ("running_mean", "running_var")
"""The running statistics precisebn recomputes, by their buffer names."""


def buffer_key(layer: str, stat: str) -> str:
    """The ``named_buffers()`` key of ``stat`` in the layer called ``layer``."""
    return f"{layer}.{stat}" if layer else stat


def parse_key(key: str) -> tuple[str, str] | None:
    """``(layer, stat)`` of a running-statistics buffer key, ``None`` for any other key.

    Example:
        >>> parse_key("block.bn.running_var"), parse_key("running_mean"), parse_key("fc.weight")
        (('block.bn', 'running_var'), ('', 'running_mean'), None)
    """
    layer, _, stat = key.rpartition(".")
    return (layer, stat) if stat in STAT_NAMES else None


def layers_of(buffers: Iterable[str]) -> list[str]:
    """The layers whose ``running_mean`` key is among ``buffers``, in their order."""
    return [p[0] for p in map(parse_key, buffers) if p is not None and p[1] == MEAN]


def tracks_stats(module: nn.Module) -> bool:
    """True for a BatchNorm layer whose running statistics can be recomputed."""
    return isinstance(module, _BatchNorm) and module.running_mean is not None


def find_bn_layers(model: nn.Module, layers: LayerSelector = None) -> dict[str, _BatchNorm]:
    """The BatchNorm layers of ``model`` to recompute, keyed by module name, in module order.

    Raises:
        ValueError: no layer qualifies, a named layer is missing or is not a
            BatchNorm layer that tracks statistics, or a layer is still lazy.
    """
    modules = dict(model.named_modules())
    candidates = {name: m for name, m in modules.items() if tracks_stats(m)}
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = {name: m for name, m in candidates.items() if layers(name, m)}
    else:
        chosen = _by_name(modules, candidates, layers)
    if not chosen:
        raise ValueError(_nothing_found(modules, candidates, selected=layers is not None))
    lazy = [name or "<model>" for name, m in chosen.items() if _is_lazy(m)]
    if lazy:
        raise ValueError(
            f"BatchNorm layers {lazy} are lazy and not yet initialised; run one forward pass "
            "through the model first so that their shapes are known"
        )
    return chosen


def _by_name(
    modules: dict[str, nn.Module], candidates: dict[str, nn.Module], names: Iterable[str]
) -> dict[str, nn.Module]:
    if isinstance(names, str):
        raise TypeError("layers= takes an iterable of layer names, not a single string")
    wanted = list(names)
    problems = []
    for name in wanted:
        if name in candidates:
            continue
        module = modules.get(name)
        if module is None:
            problems.append(f"'{name}' is not a submodule of the model")
        elif isinstance(module, _NormBase) and not isinstance(module, _BatchNorm):
            problems.append(
                f"'{name}' is {type(module).__name__}: only BatchNorm statistics are recomputed "
                "(instance-norm running statistics estimate per-sample moments, not population "
                "ones)"
            )
        else:
            problems.append(
                f"'{name}' is {type(module).__name__}, not a BatchNorm layer that tracks "
                "running statistics"
            )
    if problems:
        raise ValueError("layers= names layers that cannot be recomputed: " + "; ".join(problems))
    return {name: candidates[name] for name in candidates if name in set(wanted)}


def _is_lazy(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _nothing_found(
    modules: dict[str, nn.Module], candidates: dict[str, nn.Module], *, selected: bool
) -> str:
    if selected and candidates:
        return (
            f"layers= selected none of the model's {len(candidates)} BatchNorm layers "
            f"(available: {sorted(candidates)[:8]}{' ...' if len(candidates) > 8 else ''})"
        )
    found: Counter[str] = Counter()
    for m in modules.values():
        if isinstance(m, _BatchNorm):
            found[f"{type(m).__name__} with track_running_stats=False"] += 1
        elif isinstance(m, (_NormBase, nn.LayerNorm, nn.GroupNorm)):
            found[type(m).__name__] += 1
    what = (
        ", ".join(f"{n} {kind}" for kind, n in sorted(found.items())) or "no normalisation layers"
    )
    return f"the model has no BatchNorm layers that track running statistics (found: {what})"
