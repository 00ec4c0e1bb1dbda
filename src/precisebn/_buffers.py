"""Reading BN buffers out of a model as a pytree, and writing recomputed ones back."""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optree
import optree.registry
import torch
import torch.utils._pytree as torch_pytree
from optree.utils import total_order_sorted
from torch import Tensor, nn

from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers, tracks_stats

# How many offending keys an error message names before summarising the rest.
_KEYS_SHOWN = 5


class BNBuffers(dict[str, Tensor]):
    """Recomputed buffers, keyed like ``model.named_buffers()``, plus what produced them.

    A plain ``dict`` of tensors to every consumer: ``load_state_dict``, ``functional_call``,
    optree and ``torch.utils._pytree`` (registered as pytree nodes that flatten like a dict
    and rebuild a `BNBuffers`), and ``torch.save``. On disk it is a plain
    ``collections.OrderedDict`` of tensors, what ``state_dict()`` itself saves, so
    ``torch.load(f)`` (``weights_only=True``) loads it without precisebn installed. The
    attributes live in memory only: ``pickle`` and ``torch.save`` drop them, while
    ``copy.copy`` and ``copy.deepcopy`` keep them.

    Attributes:
        num_batches: batches run through the model.
        num_samples: sum of the leading dimension of each batch's first tensor.
        stderr: the estimated standard error of each value, keyed and shaped like the
            buffers (float64, on the buffers' devices), from the spread of the batches'
            moments: see *How many batches?* in the docs. Empty when not estimated.
        n_eff: per layer, the effective number of independent values behind its
            ``running_mean`` (the median over its channels of ``var / stderr(mean)**2``):
            about the number of values when they are independent, below it when
            neighbouring positions of one image are correlated, and above it when the
            values of one batch are negatively correlated (a layer behind another BN layer,
            which normalises every batch to the same mean). It is an estimate from the
            batches' spread, with the noise of ``B - 1`` degrees of freedom.
        converged: with ``tol=``, whether every recomputed channel reached it; ``None``
            when no tolerance was asked for.

    Example:
        >>> import io, optree, torch, precisebn
        >>> new = precisebn.BNBuffers(
        ...     {"1.running_mean": torch.zeros(4), "1.running_var": torch.ones(4)},
        ...     num_batches=3,
        ...     num_samples=48,
        ... )
        >>> doubled = optree.tree_map(lambda t: t * 2, new)
        >>> doubled, doubled["1.running_var"].tolist()
        (BNBuffers(1 layers, num_batches=3, num_samples=48), [2.0, 2.0, 2.0, 2.0])
        >>> f = io.BytesIO()
        >>> torch.save(new, f)
        >>> _ = f.seek(0)
        >>> type(torch.load(f)).__name__
        'OrderedDict'
    """

    num_batches: int
    num_samples: int
    converged: bool | None

    def __init__(
        self,
        buffers: Mapping[str, Tensor],
        *,
        num_batches: int,
        num_samples: int,
        stderr: Mapping[str, Tensor] | None = None,
        n_eff: Mapping[str, float] | None = None,
        converged: bool | None = None,
    ) -> None:
        super().__init__(buffers)
        self.num_batches = num_batches
        self.num_samples = num_samples
        self._errors = ErrorsLater(stderr=stderr, n_eff=n_eff)
        self.converged = converged

    @property
    def stderr(self) -> dict[str, Tensor]:
        return self._errors.stderr

    @property
    def n_eff(self) -> dict[str, float]:
        return self._errors.n_eff

    def _like(self, buffers: Mapping[str, Tensor]) -> BNBuffers:
        """New buffers with this result's attributes (sharing its errors, computed once)."""
        out = BNBuffers(
            buffers,
            num_batches=self.num_batches,
            num_samples=self.num_samples,
            converged=self.converged,
        )
        out._errors = self._errors
        return out

    def __repr__(self) -> str:
        return (
            f"BNBuffers({len(self) // 2} layers, num_batches={self.num_batches}, "
            f"num_samples={self.num_samples})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exactly what ``OrderedDict(self)`` reduces to, so the pickle names only
        # ``collections.OrderedDict``: a global the weights-only unpickler allows.
        return (collections.OrderedDict, (), None, None, iter(self.items()))

    def __copy__(self) -> BNBuffers:
        return self._like(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> BNBuffers:
        out = self._like({})
        memo[id(self)] = out
        for key, value in self.items():
            out[key] = copy.deepcopy(value, memo)
        out._errors = ErrorsLater(stderr=copy.deepcopy(self.stderr, memo), n_eff=self.n_eff)
        return out


class ErrorsLater:
    """A result's standard errors and ``n_eff``, computed on first use: evaluating them costs
    a few hundred microseconds per run, which a run whose caller never reads them (or
    reads them once for several copies of the result) need not pay."""

    def __init__(
        self,
        *,
        stderr: Mapping[str, Tensor] | None = None,
        n_eff: Mapping[str, float] | None = None,
        compute: Callable[[], tuple[dict[str, Tensor], dict[str, float]]] | None = None,
    ) -> None:
        self._stderr = dict(stderr) if stderr is not None else {}
        self._n_eff = dict(n_eff) if n_eff is not None else {}
        self._compute = compute

    def _resolve(self) -> None:
        if self._compute is not None:
            self._stderr, self._n_eff = self._compute()
            self._compute = None

    @property
    def stderr(self) -> dict[str, Tensor]:
        self._resolve()
        return self._stderr

    @property
    def n_eff(self) -> dict[str, float]:
        self._resolve()
        return self._n_eff


def bn_buffers(model: nn.Module, *, layers: LayerSelector = None) -> dict[str, Tensor]:
    """The running statistics of the model's BatchNorm layers, as a flat dict pytree.

    Args:
        model: any module.
        layers: which BN layers (default: all that track running statistics); see
            `precisebn.recompute_bn_buffers`.

    Returns:
        ``{"<layer>.running_mean": tensor, "<layer>.running_var": tensor, ...}``: the
        model's own tensors (not copies), keyed like ``model.named_buffers()``.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> sorted(precisebn.bn_buffers(model))
        ['1.running_mean', '1.running_var']
    """
    chosen = find_bn_layers(model, layers)
    named = dict(model.named_buffers())
    return {buffer_key(name, s): named[buffer_key(name, s)] for name in chosen for s in STAT_NAMES}


def apply_bn_buffers(model: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    """Copy recomputed buffers into ``model`` in place, after checking every one first.

    Each key must name the ``running_mean`` or ``running_var`` of a BatchNorm layer
    that tracks statistics, with the buffer's shape. Values are cast to the buffer's
    dtype and device. Nothing is written unless every entry is valid.

    Raises:
        KeyError: a key names no BN running-statistics buffer of ``model``.
        ValueError: a shape differs from the buffer's, or a value holds NaN or infinity.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> new = precisebn.recompute_bn_buffers(model, [torch.randn(16, 3)])
        >>> precisebn.apply_bn_buffers(model, new)
        >>> torch.equal(model[1].running_var, new["1.running_var"])
        True
    """
    targets = _bn_stat_buffers(model)
    unknown = sorted(set(buffers) - set(targets))
    if unknown:
        raise KeyError(f"not BatchNorm running-statistics buffers of the model: {unknown}")
    for key, value in buffers.items():
        if value.shape != targets[key].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not match the buffer's "
                f"{tuple(targets[key].shape)}"
            )
    nonfinite = _nonfinite_keys(buffers)
    if nonfinite:
        shown = ", ".join(nonfinite[:_KEYS_SHOWN])
        more = len(nonfinite) - _KEYS_SHOWN
        raise ValueError(
            f"non-finite (NaN or infinite) values in {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; non-finite statistics usually come from fp16/bf16 overflow or NaN inputs. "
            "Nothing was written to the model."
        )
    with torch.no_grad():
        for key, value in buffers.items():
            targets[key].copy_(value)


def _bn_stat_buffers(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, module in model.named_modules():
        if tracks_stats(module):
            for stat in STAT_NAMES:
                out[buffer_key(name, stat)] = getattr(module, stat)
    return out


def _nonfinite_keys(buffers: Mapping[str, Tensor]) -> list[str]:
    """Keys whose value holds a NaN or infinity, with one host sync per device."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in buffers.items():
        by_device.setdefault(value.device, []).append(key)
    bad: set[str] = set()
    for keys in by_device.values():
        finite = torch.stack([torch.isfinite(buffers[k]).all() for k in keys]).tolist()
        bad.update(k for k, ok in zip(keys, finite, strict=True) if not ok)
    return [key for key in buffers if key in bad]


# --- pytree registration -------------------------------------------------------------------
#
# Neither library looks through dict subclasses (both dispatch on the exact type), so a
# BNBuffers would be one leaf. Each registration flattens it the way that library flattens
# a dict, and unflattening rebuilds a BNBuffers with the same attributes. The attributes
# are part of the tree structure: two results with different counts do not match.


class _Extras:
    """The standard errors and convergence of a result, carried through pytree operations
    as they are (``stderr`` is not mapped). Every holder compares equal, also to none (a
    structure loaded from its dumped form), so two results' tree structures match whatever
    their errors, as they do whatever their values."""

    def __init__(self, buffers: BNBuffers) -> None:
        self.errors, self.converged = buffers._errors, buffers.converged

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, _Extras)

    def __hash__(self) -> int:
        return 0

    def build(self, buffers: Mapping[str, Tensor], num_batches: int, num_samples: int) -> BNBuffers:
        out = BNBuffers(
            buffers, num_batches=num_batches, num_samples=num_samples, converged=self.converged
        )
        out._errors = self.errors
        return out


@dataclasses.dataclass(frozen=True)
class _OptreeNode:
    """optree metadata: compares like optree's dict node (on sorted keys) plus the counts.

    ``order`` (insertion order) restores the original key order on unflattening, as
    optree does for a dict, and like there takes no part in equality.
    """

    keys: tuple[str, ...]
    num_batches: int
    num_samples: int
    order: tuple[str, ...] = dataclasses.field(compare=False, repr=False)
    extras: _Extras | None = dataclasses.field(default=None, compare=False, repr=False)


def _optree_flatten(
    buffers: BNBuffers,
) -> tuple[list[Tensor], _OptreeNode, tuple[str, ...]]:
    keys = tuple(total_order_sorted(buffers))
    node = _OptreeNode(
        keys,
        buffers.num_batches,
        buffers.num_samples,
        order=tuple(buffers),
        extras=_Extras(buffers),
    )
    return [buffers[key] for key in keys], node, keys


def _optree_unflatten(node: _OptreeNode, children: Iterable[Tensor]) -> BNBuffers:
    by_key = dict(zip(node.keys, children, strict=True))
    ordered = {key: by_key[key] for key in node.order}
    if node.extras is None:
        return BNBuffers(ordered, num_batches=node.num_batches, num_samples=node.num_samples)
    return node.extras.build(ordered, node.num_batches, node.num_samples)


# torch's context: (keys in insertion order, num_batches, num_samples, extras), as torch's
# dict plus the attributes. The dumpable form (torch.export) keeps the counts only.
_TorchContext = tuple[tuple[str, ...], int, int, _Extras | None]


def _torch_flatten(buffers: BNBuffers) -> tuple[list[Tensor], _TorchContext]:
    context = (tuple(buffers), buffers.num_batches, buffers.num_samples, _Extras(buffers))
    return list(buffers.values()), context


def _torch_flatten_with_keys(
    buffers: BNBuffers,
) -> tuple[list[tuple[torch_pytree.KeyEntry, Tensor]], _TorchContext]:
    values, context = _torch_flatten(buffers)
    keys = context[0]
    keyed: list[tuple[torch_pytree.KeyEntry, Tensor]] = [
        (torch_pytree.MappingKey(k), v) for k, v in zip(keys, values, strict=True)
    ]
    return keyed, context


def _torch_unflatten(values: Any, context: _TorchContext) -> BNBuffers:
    keys, num_batches, num_samples, extras = context
    buffers = dict(zip(keys, values, strict=True))
    if extras is None:
        return BNBuffers(buffers, num_batches=num_batches, num_samples=num_samples)
    return extras.build(buffers, num_batches, num_samples)


def _torch_to_dumpable(context: _TorchContext) -> list[Any]:
    keys, num_batches, num_samples, _ = context
    return [list(keys), num_batches, num_samples]


def _torch_from_dumpable(dumped: list[Any]) -> _TorchContext:
    keys, num_batches, num_samples = dumped
    return tuple(keys), int(num_batches), int(num_samples), None


# optree keeps its global namespace (the one ``tree_map`` uses when given none) behind a
# private sentinel, which its own dataclasses and functools integrations import.
_OPTREE_GLOBAL_NAMESPACE: str = getattr(optree.registry, "__GLOBAL_NAMESPACE", "precisebn")

# optree types a node as ``Collection[T]`` with children ``T``: for a dict, T would be the
# key type, so the value-typed functions below need the ignores.
optree.register_pytree_node(
    BNBuffers,
    _optree_flatten,  # type: ignore[arg-type]
    _optree_unflatten,  # type: ignore[arg-type]
    path_entry_type=optree.MappingEntry,
    namespace=_OPTREE_GLOBAL_NAMESPACE,
)
torch_pytree.register_pytree_node(
    BNBuffers,
    _torch_flatten,
    _torch_unflatten,
    serialized_type_name="precisebn.BNBuffers",
    to_dumpable_context=_torch_to_dumpable,
    from_dumpable_context=_torch_from_dumpable,
    flatten_with_keys_fn=_torch_flatten_with_keys,
)
