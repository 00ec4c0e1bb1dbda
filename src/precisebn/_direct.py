"""Direct batches: no interception at all, once a batch's per-layer counts are known.

Intercepting a BN call costs a Python call (the tag's ``__torch_function__``), which on a
small, BN-heavy model is a tenth of the forward. It is only needed for one number the
kernel does not leave behind: how many values per channel the call saw. Everything else
the kernel can write itself. In a *direct* batch the tags' interception is switched off,
and each recomputed layer's stock training-mode forward updates the private running
buffers bound for the run, which are zeroed before the batch: with its own momentum
``m`` they then hold ``m`` times the batch mean and unbiased variance (``momentum=None``
gives factor 1, as its ``num_batches_tracked`` counter is zeroed too), and the fold
divides by ``m`` in float64.

The counts of a direct batch are those that intercepted batches of the same *signature*
(tree structure, tensor shapes, dtypes and devices, other leaves by value) showed, which
holds when a layer's input size is a function of the batch's shapes. A signature runs
directly only after two intercepted batches of it agreed on every layer's count and number
of calls, each layer called at most once, and the second of them ran under a watch for
sizes that depend on values: an operator that PyTorch tags as having a data-dependent
output (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``.item()``,
``bool()`` of a tensor, a tensor used as an index) or a copy out to Python
(``tolist``, ``numpy``). Such a forward stays intercepted; the check costs one batch run
under two Python modes, once per signature.

Every direct batch is checked as well: the counters bound as each layer's
``num_batches_tracked`` say how often each layer ran. A batch whose calls differ (a layer
skipped or reused) is run again intercepted, and its signature is not run directly again.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

MAX_SIGNATURES = 64
"""Signatures tracked per run; batches of further new shapes are intercepted."""

_DATA_DEPENDENT = frozenset({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output})
_COPIES_OUT = frozenset({Tensor.tolist, Tensor.numpy, Tensor.__array__})
_SCALAR = torch.ops.aten._local_scalar_dense.default


def direct_momenta(layers: Mapping[str, _BatchNorm]) -> list[float] | None:
    """Each layer's update factor in a direct batch, or ``None`` if some layer rules it out.

    Direct batches need every recomputed layer to run the stock ``_BatchNorm.forward`` in
    training mode (so that its kernel updates the running buffers, with a known factor)
    and a non-zero momentum. The runner also needs float32 or float64 buffers of one
    dtype and device, to lay them end to end.
    """
    momenta: list[float] = []
    for layer in layers.values():
        if type(layer).forward is not _BatchNorm.forward or not layer.training:
            return None
        momentum = layer.momentum
        if momentum is None:
            momenta.append(1.0)  # factor 1/num_batches_tracked, and the counter is reset
        elif isinstance(momentum, numbers.Real) and not isinstance(momentum, bool):
            if momentum == 0:
                return None
            momenta.append(float(momentum))
        else:
            return None
    return momenta


class Known(NamedTuple):
    """What the intercepted batches of one signature showed."""

    counts: tuple[int, ...]
    """Values per channel per layer (0: not reached)."""
    calls: Tensor
    """Calls per layer, as the ``num_batches_tracked`` counters count them."""


class Signatures:
    """Per batch signature: what intercepted batches showed, and whether it runs directly.

    Args:
        enabled: ``False`` where direct batches are ruled out: every batch is intercepted.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._seen: dict[Hashable, Known | None] = {}
        self._ready: dict[Hashable, Known] = {}

    def lookup(
        self, leaves: list[Any], spec: optree.PyTreeSpec
    ) -> tuple[Hashable | None, Known | None]:
        """A batch's signature (``None`` if a leaf is unhashable) and, if it may run
        directly, what its direct batches assume."""
        if not self.enabled:
            return None, None
        key = (
            spec,
            *[(x.shape, x.dtype, x.device) if isinstance(x, Tensor) else x for x in leaves],
        )
        try:
            return key, self._ready.get(key)
        except TypeError:
            return None, None

    def watching(self, key: Hashable | None) -> bool:
        """Whether the next intercepted batch of ``key`` is to run under `ValueWatch`."""
        return key is not None and self._seen.get(key) is not None

    def observe(self, key: Hashable | None, known: Known, *, value_dependent: bool) -> None:
        """Record an intercepted batch of signature ``key`` (watched if `watching` said so)."""
        if key is None or key in self._ready:
            return
        if key not in self._seen:
            if len(self._seen) < MAX_SIGNATURES:
                self._seen[key] = Known(known.counts, known.calls.clone())
            return
        first = self._seen[key]
        if first is None:  # already ruled out
            return
        agreed = first.counts == known.counts and torch.equal(first.calls, known.calls)
        if agreed and int(known.calls.max()) <= 1 and not value_dependent:
            self._ready[key] = first
        else:
            self._seen[key] = None

    def reject(self, key: Hashable | None) -> None:
        """A direct batch of this signature called its layers otherwise: stop running it so."""
        if key is None:
            return
        self._ready.pop(key, None)
        self._seen[key] = None


class ValueWatch:
    """Notes whether the forward run under `watch_values` may size tensors by values.

    Reading one of ``counters`` (``momentum=None`` reads ``num_batches_tracked``) is not
    counted. ``found`` names the first operator seen, or is ``None``.
    """

    def __init__(self, counters: Iterable[Tensor]) -> None:
        self.found: str | None = None
        self._counters = {t.untyped_storage().data_ptr() for t in counters}

    def note(self, func: Any, args: tuple[Any, ...]) -> None:
        if self.found is None:
            if func is _SCALAR and args[0].untyped_storage().data_ptr() in self._counters:
                return
            self.found = str(func)


@contextlib.contextmanager
def watch_values(counters: Iterable[Tensor]) -> Iterator[ValueWatch]:
    """Run the body under a `ValueWatch` (a function mode and a dispatch mode)."""
    watch = ValueWatch(counters)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_Escapes(watch))
        stack.enter_context(_Dependent(watch))
        yield watch


class _Escapes(TorchFunctionMode):
    """Copies of tensor values out to Python, which the dispatcher does not see."""

    def __init__(self, watch: ValueWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _COPIES_OUT:
            self.watch.note(func, args)
        return func(*args, **(kwargs or {}))


class _Dependent(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Operators tagged as having an output whose size or value is read from the data."""

    def __init__(self, watch: ValueWatch) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.watch = watch

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ to keep torch.compile out of it, and the
        # wrapper imports torch._dynamo on its first call: about 2 s, for nothing here.
        return False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if not _DATA_DEPENDENT.isdisjoint(func.tags):
            self.watch.note(func, args)
        return func(*args, **(kwargs or {}))
