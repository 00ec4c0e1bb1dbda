"""Copy on write for the model's buffers: a forward may update them, the model never sees it.

Every buffer a run binds, other than the recomputed layers' statistics and the
``num_batches_tracked`` counters (which have bindings of their own), is bound as a
*guard*: an alias of the caller's tensor (the same storage, its own version counter) of a
tensor subclass whose ``__torch_function__`` runs each call that involves it under a
dispatch mode. The mode reads every operator's schema. The first time an operator would
write into the storage of a caller's tensor (``add_``, ``copy_``, ``resize_``, an ``out=``
argument, a kernel's mutable argument such as BatchNorm's running statistics), that
storage is cloned, and that operator and every later one that touches the storage work on
the clone. The forward so sees its own writes, batch after batch, as a deep copy of the
model would (spectral norm's power iteration, a quantisation observer's range, a counter),
while the model keeps its values. A buffer that is only read is never copied, so a large
lookup table costs no second copy; its reads cost one Python call each.

Tensors made from a guard that share its storage (views, ``.data``, ``.detach()``) are
guards too, so writes through them are caught as well. Schemas are taken at their word: an
operator whose schema marks an argument as written (BatchNorm in eval mode does) clones it
even if the kernel leaves it alone.

Storages can also be *forbidden*: a write into one raises `ForbiddenWriteError` before it
happens. The recomputed layers' statistics are forbidden outside their batch-norm call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ForbiddenWriteError",
    "Guard",
    "Protection",
    "storage_id",
]

Rebind = Callable[[str, Tensor], None]
"""``rebind(key, tensor)``: bind ``tensor`` as the buffer ``key`` for the rest of the run."""


class ForbiddenWriteError(Exception):
    """An operator was about to write into a forbidden storage (nothing was written)."""

    def __init__(self, operator: str) -> None:
        super().__init__(operator)
        self.operator = operator


def storage_id(tensor: Tensor) -> int:
    """An identity of the storage behind ``tensor``, shared by all its views."""
    return int(tensor.untyped_storage()._cdata)


def has_storage(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a plain strided tensor with a storage of its own (not a
    ``torch.func`` transform's wrapper, a sparse or a meta tensor)."""
    return (
        tensor.layout == torch.strided
        and not tensor.is_meta
        and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )


def alias(tensor: Tensor, storage: torch.UntypedStorage) -> Tensor:
    """A tensor with ``tensor``'s geometry over ``storage``, with a version counter of its own."""
    with torch.no_grad():
        out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return out.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())


class _Bound(NamedTuple):
    key: str
    tensor: Tensor  # the caller's
    guard: Tensor


class Protection:
    """The caller's storages bound for one run, and private clones of those the forward wrote.

    Args:
        rebind: called once per buffer whose storage was cloned, so that later batches
            read the clone directly instead of through the guard.
        forbidden: storages (`storage_id`) into which a write raises `ForbiddenWriteError`.
    """

    def __init__(
        self, rebind: Rebind | None = None, *, forbidden: frozenset[int] = frozenset()
    ) -> None:
        self._rebind = rebind
        self._bound: dict[int, list[_Bound]] = {}
        self._clones: dict[int, torch.UntypedStorage] = {}
        # A bound guard's stand-in once its storage is cloned: always the same tensor, so
        # that changes of its shape (resize_) last, as they would on the buffer itself.
        self._stand_ins: dict[int, Tensor] = {}
        self._forbidden = forbidden
        self._pending: list[int] = []
        self.copied: list[str] = []
        """Keys of the buffers the forward wrote to, in the order of their first write."""

    def guard(self, key: str, tensor: Tensor) -> Tensor:
        """The tensor to bind as buffer ``key`` in place of the caller's ``tensor``.

        A tensor that autograd tracks, or one without a storage of its own (inside a
        ``torch.func`` transform, the transform's wrapper), is returned as it is: the
        run's final check of version counters still reports a write to it.
        """
        if tensor.requires_grad or not has_storage(tensor):
            return tensor
        guard = self._wrap(alias(tensor, tensor.untyped_storage()))
        self._bound.setdefault(storage_id(tensor), []).append(_Bound(key, tensor, guard))
        return guard

    def close(self) -> None:
        """Forget the session's guards and clones (which refer back to this protection)."""
        self._bound.clear()
        self._stand_ins.clear()
        self._clones.clear()

    @property
    def copied_bytes(self) -> int:
        """Bytes held by the clones of written buffers."""
        return sum(s.nbytes() for s in self._clones.values())

    def run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``func`` with copy on write for guarded storages; guard what it returns."""
        with torch._C.DisableTorchFunctionSubclass(), _Writes(self):
            out = func(*args, **kwargs)
        self._settle()
        return optree.tree_map(self._guard_output, out, none_is_leaf=True)

    def before_write(self, tensor: Tensor, operator: Any) -> None:
        """Called by the dispatch mode before ``operator`` writes into ``tensor``."""
        if not has_storage(tensor):
            return
        sid = storage_id(tensor)
        if sid in self._forbidden:
            raise ForbiddenWriteError(str(operator))
        bound = self._bound.get(sid)
        if bound is not None and sid not in self._clones:
            clone = self._clones[sid] = tensor.untyped_storage().clone()  # type: ignore[no-untyped-call]
            for b in bound:
                self._stand_ins[b.guard._cdata] = alias(b.tensor, clone)
            self._pending.append(sid)

    def redirect(self, value: Any) -> Any:
        """``value`` with every tensor over a cloned storage moved onto its clone."""
        if not self._clones:
            return value

        def move(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            stand_in = self._stand_ins.get(t._cdata)
            if stand_in is not None:
                return stand_in
            if not has_storage(t):
                return t
            clone = self._clones.get(storage_id(t))
            return t if clone is None else alias(t, clone)

        return optree.tree_map(move, value, none_is_leaf=True)

    def _settle(self) -> None:
        """Rebind the buffers whose storages the last call cloned."""
        while self._pending:
            for b in self._bound[self._pending.pop()]:
                self.copied.append(b.key)
                if self._rebind is not None:
                    self._rebind(b.key, self._stand_ins[b.guard._cdata])

    def _guard_output(self, t: Any) -> Any:
        if not isinstance(t, Tensor) or isinstance(t, Guard) or not has_storage(t):
            return t
        sid = storage_id(t)
        if sid in self._bound and sid not in self._clones:
            return self._wrap(t)
        return t

    def _wrap(self, t: Tensor) -> Tensor:
        guard = t.as_subclass(Guard)
        guard._protection = self  # type: ignore[attr-defined]
        return guard


class Guard(Tensor):
    """A bound alias of one of the caller's tensors: every call on it goes through `Protection`."""

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return protection_of(args, kwargs or {}).run(func, args, kwargs or {})


def protection_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Protection:
    """The `Protection` of the first guard among a call's arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Guard):
            return value._protection  # type: ignore[attr-defined, no-any-return]
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Guard):
                    return item._protection  # type: ignore[attr-defined, no-any-return]
    raise AssertionError("a guard's __torch_function__ was called without a guard")


_WRITTEN: dict[Any, tuple[tuple[int, str], ...]] = {}

# Kernels that update BatchNorm running statistics in place although their schemas do not
# say so (newer operators such as _native_batch_norm_legit mark them as written).
_UNMARKED_WRITES = {
    f"aten::{name}": ("running_mean", "running_var")
    for name in (
        "native_batch_norm",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "batch_norm_update_stats",
        "batch_norm_gather_stats",
        "batch_norm_gather_stats_with_counts",
    )
}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """Position and name of each argument the operator writes: those its schema marks as
    written (``a!``), and the running statistics of the BatchNorm kernels that update
    them unmarked."""
    found = _WRITTEN.get(func)
    if found is None:
        schema = func._schema
        unmarked = _UNMARKED_WRITES.get(schema.name, ())
        found = _WRITTEN[func] = tuple(
            (i, a.name)
            for i, a in enumerate(schema.arguments)
            if (a.alias_info is not None and a.alias_info.is_write) or a.name in unmarked
        )
    return found


class _Writes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sees every operator of one guarded call: clones before writes, moves reads to clones."""

    def __init__(self, protection: Protection) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.protection = protection

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ to keep torch.compile out of it, and the
        # wrapper imports torch._dynamo on its first call: about 2 s, for nothing here.
        return False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        for position, name in _written_arguments(func):
            value = args[position] if position < len(args) else kwargs.get(name)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, Tensor):
                    self.protection.before_write(t, func)
        args, kwargs = self.protection.redirect((args, kwargs))
        return func(*args, **kwargs)
