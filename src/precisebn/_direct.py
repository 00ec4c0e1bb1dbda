"""Direct batches: no interception at all, once a batch's per-layer counts are known.

Intercepting a BN call costs a Python call (the tag's ``__torch_function__``), which on a
small, BN-heavy model is a tenth of the forward. It is only needed for one number the
kernel does not leave behind: how many values per channel the call saw. Everything else
the kernel can write itself. In a *direct* batch the tags' interception is switched off,
and each recomputed layer's batch-norm call updates the private statistics bound for the
run, which are zeroed before the batch: with the update factor ``m`` its call passes (its
momentum; ``momentum=None`` gives 1, as its ``num_batches_tracked`` counter is zeroed
too) they then hold ``m`` times the batch mean and unbiased variance, and the fold divides
by ``m`` in float64.

The counts of a direct batch are those that intercepted batches of the same *signature*
(tree structure, tensor shapes, dtypes and devices, other leaves by value) showed, which
holds when a layer's input size is a function of the batch's shapes. A signature runs
directly only after two intercepted batches of it agreed on every layer's count, update
factor and number of calls, every call was a training-mode call with a non-zero factor
whose count the layer's ``num_batches_tracked`` counter confirmed, each layer ran at most
once, nothing read the statistics outside a batch-norm call, and the second batch ran
under a watch for sizes that may change from batch to batch: an operator that PyTorch
tags as having a data-dependent output (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``.item()``, ``bool()`` of a tensor, a tensor used as an index), a copy out to
Python (``tolist``, ``numpy``), or a draw from Python's or NumPy's global random
generator.

Two checks follow the direct batches themselves:

- every direct batch: the counters bound as each layer's ``num_batches_tracked`` say how
  often each layer ran; a batch that skipped or repeated a layer ends the attempt;
- one direct batch in every `VERIFY_EVERY`, at a random position drawn from a private
  generator, is *checked*: its tags note what each batch-norm call saw (a Python call
  per BN call, while the kernels still update the private statistics as in any direct
  batch), which must be the counts, channels and factors its signature promised.
  This catches a forward that changes sizes by itself (a crop drawn with Python's
  ``random``): with a fraction ``p`` of batches whose counts differ, a run of ``D`` direct
  batches misses it with probability about ``(1 - p / VERIFY_EVERY) ** D``.

When a check fails, the run cannot know which earlier direct batches were wrong, so
`recompute_bn_buffers` starts again with every batch intercepted (or raises, for a loader
that cannot be iterated twice).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from precisebn._fold import Observed
from precisebn._guard import EagerDispatchMode
from precisebn._tags import Call, Entry

MAX_SIGNATURES = 64
"""Signatures tracked per run; batches of further new shapes are intercepted."""

VERIFY_EVERY = 8
"""One direct batch in this many is checked: its calls report their counts (0: none)."""

_DATA_DEPENDENT = frozenset({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output})
_COPIES_OUT = frozenset({Tensor.tolist, Tensor.numpy, Tensor.__array__})
_SCALAR = torch.ops.aten._local_scalar_dense.default
_DEPENDENT_OPS: dict[Any, bool] = {}


class Known(NamedTuple):
    """What the intercepted batches of one signature showed, and direct batches assume."""

    entries: tuple[Entry, ...]
    """Values per channel per layer (0: not reached), with the channels covered if not all."""
    factors: tuple[float, ...]
    """Per layer, the factor its call updates the running buffers with."""
    calls: Tensor
    """Calls per layer, as the ``num_batches_tracked`` counters count them."""

    def agrees(self, other: Known) -> bool:
        return (
            self.entries == other.entries
            and self.factors == other.factors
            and torch.equal(self.calls, other.calls)
        )


def known_from(observed: Observed, calls: Tensor) -> Known | None:
    """What a batch may promise its signature, or ``None`` where it rules direct batches out.

    Each layer's counter must have counted exactly the calls intercepted (so that it
    checks direct batches), at most one per layer, each in training mode, in the block's
    dtype, with a non-zero update factor.
    """
    counted = tuple(calls.tolist())
    ok = (
        observed.uniform
        and counted == observed.calls
        and max(counted, default=0) <= 1
        and all(f != 0 for f, n in zip(observed.factors, counted, strict=True) if n)
    )
    return Known(observed.entries, observed.factors, calls.clone()) if ok else None


def mismatch(known: Known, seen: Known, layers: list[str]) -> str:
    """How a batch differed from what its signature promised, naming the first layer."""
    for i, name in enumerate(layers):
        label = f"BatchNorm layer '{name or '<model>'}'"
        if known.entries[i] != seen.entries[i]:
            return (
                f"{label} saw {_entry_text(seen.entries[i])} where earlier batches of the same "
                f"shapes saw {_entry_text(known.entries[i])}"
            )
        if int(known.calls[i]) != int(seen.calls[i]):
            return (
                f"{label} ran {int(seen.calls[i])} time(s) where earlier batches of the same "
                f"shapes ran it {int(known.calls[i])} time(s)"
            )
        if known.factors[i] != seen.factors[i]:
            return f"{label}'s update factor changed from {known.factors[i]} to {seen.factors[i]}"
    return "its calls differed"


def verify(
    known: Known, calls: list[Call], layers: list[str], reads: Mapping[str, str]
) -> str | None:
    """Why a checked direct batch's calls break ``known``'s promise, or ``None``.

    Each layer must have had at most one training-mode call, with the counts, channels
    and update factor that ``known`` holds, and nothing may have read the statistics
    outside a batch-norm call (earlier direct batches let such a read see the kernels'
    updates).
    """
    if reads:
        layer, how = next(iter(reads.items()))
        return (
            f"BatchNorm layer '{layer or '<model>'}''s running statistics were read outside "
            f"its batch_norm call ({how})"
        )
    index = {name: i for i, name in enumerate(layers)}
    entries: list[Entry] = [0] * len(layers)
    factors = [0.0] * len(layers)
    for call in calls:
        i = index[call.layer]
        if entries[i] or not call.training:
            return f"BatchNorm layer '{call.layer or '<model>'}' ran twice or in eval mode"
        entries[i] = call.entry
        factors[i] = call.factor
    seen = Known(tuple(entries), tuple(factors), known.calls)
    return None if known.agrees(seen) else mismatch(known, seen, layers)


def _entry_text(entry: Entry) -> str:
    if isinstance(entry, tuple):
        count, span = entry
        return f"{count} values per channel on channels {span.start}:{span.stop}"
    return f"{entry} values per channel" if entry else "no call"


class Verifier:
    """Picks one direct batch in every `VERIFY_EVERY` to check, at a random position.

    The generator is private and seeded, so a run draws nothing from Python's or torch's
    global random state (a forward that draws from them sees the same numbers as without
    precisebn) and picks the same batches every time.
    """

    def __init__(self, every: int | None = None, *, seed: int = 0) -> None:
        self.every = VERIFY_EVERY if every is None else every
        self._random = random.Random(seed)
        self._left = 0
        self._pick = -1

    def due(self) -> bool:
        """Whether the next direct batch is to be checked."""
        if self.every <= 0:
            return False
        if self._left == 0:
            self._left, self._pick = self.every, self._random.randrange(self.every)
        self._left -= 1
        return self._left == self._pick


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

    def observe(self, key: Hashable | None, known: Known | None, *, value_dependent: bool) -> None:
        """Record an intercepted batch of signature ``key`` (watched if `watching` said so);
        ``known`` is ``None`` for a batch that rules direct batches out."""
        if key is None or key in self._ready:
            return
        if key not in self._seen:
            if len(self._seen) < MAX_SIGNATURES:
                self._seen[key] = known
            return
        first = self._seen[key]
        if first is None:  # already ruled out
            return
        if known is not None and first.agrees(known) and not value_dependent:
            self._ready[key] = first
        else:
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
    """Run the body under a `ValueWatch`: a function mode, a dispatch mode, and a look at
    the states of Python's and NumPy's global random generators."""
    watch = ValueWatch(counters)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_Escapes(watch))
        stack.enter_context(_Dependent(watch))
        stack.enter_context(_draws(watch))
        yield watch


@contextlib.contextmanager
def _draws(watch: ValueWatch) -> Iterator[None]:
    """Note draws from Python's global ``random`` generator or NumPy's global one.

    A forward that draws from them can size tensors with no tensor value involved (a crop
    drawn with ``random.randint``), which no operator watch sees; their states tell,
    at no cost per call. Torch's own random operators need no such care: a size drawn
    from them reaches Python through ``item()`` or ``tolist()``. Draws from private
    generators (a ``random.Random`` of the forward's own) are left to the checks of
    direct batches.
    """
    numpy_random = getattr(sys.modules.get("numpy"), "random", None)
    before = random.getstate(), _numpy_state(numpy_random)
    yield
    if watch.found is None and random.getstate() != before[0]:
        watch.found = "a draw from Python's random module"
    elif watch.found is None and _numpy_state(numpy_random) != before[1]:
        watch.found = "a draw from numpy.random"


def _numpy_state(numpy_random: Any) -> tuple[Any, ...] | None:
    """NumPy's global generator state as a comparable tuple (``None`` without NumPy)."""
    if numpy_random is None:
        return None
    state = numpy_random.get_state(legacy=True)  # ("MT19937", keys, pos, has_gauss, gauss)
    return (state[1].tobytes(), *state[2:])


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


class _Dependent(EagerDispatchMode):  # type: ignore[no-untyped-call]
    """Operators tagged as having an output whose size or value is read from the data."""

    def __init__(self, watch: ValueWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        dependent = _DEPENDENT_OPS.get(func)
        if dependent is None:  # reading an operator's tags costs microseconds: once each
            dependent = _DEPENDENT_OPS[func] = not _DATA_DEPENDENT.isdisjoint(func.tags)
        if dependent:
            self.watch.note(func, args)
        return func(*args, **(kwargs or {}))
