"""Binding a model statelessly: what a run binds in place of the model's own tensors.

A `Binding` is worked out once per model (which layers, which buffers, which counters)
and opens a *session* per run. One `torch.func.functional_call` covers a session, however
many batches it runs, and binds three kinds of private tensors and nothing else:

- each recomputed layer's ``running_mean`` and ``running_var``: *tags*
  (`precisebn._tags`) over a private copy of the caller's values, refreshed at the start
  of every session, which intercept the layer's batch-norm call;
- every norm layer's ``num_batches_tracked``: a counter on the CPU (``momentum=None``
  reads it back with ``float()``, which on a device tensor would synchronise): a copy of
  the caller's, or a fresh one for a recomputed layer, whose value the run does not use;
- every other buffer: a *guard* (`precisebn._guard`), which copies it on the forward's
  first write.

Parameters are the caller's (or the ``params=`` given) and are read only. When a session
ends, also on error, the model's own tensors are back in place, attributes the forward
set on its modules are restored, and the version counters of the model's tensors are
checked: a write that went around every binding is reported, never passed over.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from precisebn._guard import Protection, has_storage, storage_id
from precisebn._layers import STAT_NAMES, buffer_key, parse_key
from precisebn._layout import Layout
from precisebn._tags import Call, Sink, make_tag

__all__ = ["Binding", "Resolved", "Weights", "bind"]

logger = logging.getLogger("precisebn")
T = TypeVar("T")


class Weights(NamedTuple):
    """The tensors to run a model with in place of some of its own (``None``: its own)."""

    params: Mapping[str, Tensor] | None = None
    buffers: Mapping[str, Tensor] | None = None


class Resolved(NamedTuple):
    """Every parameter and buffer a session runs on, by name: the model's, or the
    ``weights`` given in their place."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    weights: Weights
    owned: bool = False
    """Whether the buffers are the run's own copies: bound as they are (what the forward
    writes lands in them, run after run) and not watched."""

    @property
    def device(self) -> torch.device:
        """Where batches go: the device of the first parameter (or buffer)."""
        for tensors in (self.params, self.buffers):
            for tensor in tensors.values():
                return tensor.device
        return torch.device("cpu")


class _NoSink:
    """The sink outside a session: a batch-norm call on a tag there is a bug."""

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        raise RuntimeError("a precisebn tag was used outside its run")

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        raise RuntimeError("a precisebn tag was used outside its run")

    def output(
        self, call: Call, out: Tensor, input: Tensor, weight: Any, bias: Any, eps: float
    ) -> Tensor:
        raise RuntimeError("a precisebn tag was used outside its run")


class TagState:
    """What a binding's tags report to (`precisebn._tags.TagOwner`): the current session's
    sink, whether cuDNN is on, its copy-on-write protection, and the layers whose
    statistics the forward read outside their batch-norm call.

    It holds no tag, so tags and their binding form no reference cycle: a binding made
    for one call is freed as soon as the call ends, without waiting for the collector.
    """

    __slots__ = ("cudnn", "protection", "reads", "sink")

    def __init__(self) -> None:
        self.sink: Sink = _IDLE_SINK
        self.cudnn = torch.backends.cudnn.enabled
        self.protection = _IDLE_PROTECTION
        self.reads: dict[str, str] = {}

    def note_read(self, layer: str, operator: str) -> None:
        self.reads.setdefault(layer, operator)


_IDLE_SINK = _NoSink()
_IDLE_PROTECTION = Protection()  # between sessions: guards no storage, forbids none


class Binding:
    """One model's stateless binding, worked out once; `bind` opens its sessions."""

    def __init__(self, model: nn.Module, layers: Mapping[str, _BatchNorm]) -> None:
        self.model = model
        self.target, self.prefix = _unwrap(model)
        self.layers = dict(layers)
        self.layout = Layout({name: m.num_features for name, m in self.layers.items()})
        self.stat_keys = [buffer_key(name, stat) for name in self.layers for stat in STAT_NAMES]
        self._tree = _Tree(model, self.prefix)
        self._counters = _counter_keys(model, self.layers)
        self.compiled_parts = _has_compiled_parts(model)
        self._compiled = _has_compiled_parts(self.target)  # submodules still run compiled
        self._sync_bn = [m for m in self.layers.values() if isinstance(m, nn.SyncBatchNorm)]
        self._copies: list[Tensor] = []
        self._callers: list[Tensor] = []
        self._forbidden: frozenset[int] = frozenset()
        self._tags: dict[str, Tensor] = {}
        self._made_for: list[tuple[torch.dtype, torch.device, torch.Size]] = []
        self.holder = _Holder([self.target])
        self.state = TagState()

    @property
    def reads(self) -> dict[str, str]:
        """Layers whose statistics the last session's forward used outside their
        batch-norm call, and how."""
        return self.state.reads

    def resolve(self, weights: Weights, *, owned: bool = False) -> Resolved:
        """The parameters and buffers a session with ``weights`` runs on; with ``owned``,
        ``weights.buffers`` are the run's own copies of every buffer (see `Resolved`).

        Raises:
            ValueError: ``weights`` names tensors the model does not have.
        """
        params, buffers = self._tree.tensors()
        _check_names("params", weights.params, params)
        _check_names("buffers", weights.buffers, buffers)
        params.update(weights.params or {})
        buffers.update(weights.buffers or {})
        return Resolved(params, buffers, weights, owned)

    def bn_buffers(self, resolved: Resolved) -> dict[str, Tensor]:
        """The recomputed layers' current running statistics, keyed like the model's buffers.

        Raises:
            ValueError: the model lost a layer since the binding was made.
        """
        missing = [key for key in self.stat_keys if key not in resolved.buffers]
        if missing:
            raise ValueError(
                f"the model no longer has the buffers {missing[:4]} of the layers it was "
                "recorded with: build a new recorder after changing the model's structure"
            )
        return {key: resolved.buffers[key] for key in self.stat_keys}

    def rows_home(self, resolved: Resolved) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of a run's batch rows: float64 when any recomputed buffer is
        float64, else float32 (the kernels write float32 for half-precision buffers), on
        the first recomputed buffer's device."""
        stats = self.bn_buffers(resolved)
        wide = any(t.dtype == torch.float64 for t in stats.values())
        return (torch.float64 if wide else torch.float32), next(iter(stats.values())).device

    def counter_keys(self, *, recomputed: bool) -> list[str]:
        """The ``num_batches_tracked`` keys of the recomputed norm layers (or of the others)."""
        return [key for key, is_recomputed in self._counters.items() if is_recomputed == recomputed]

    def statistics_version(self) -> int:
        """Sum of the version counters of the private copies behind the tags: it moves on
        any write through an operator that declares it (the batch-norm kernels do not)."""
        return sum(t._version for t in self._copies)

    def written_layers(self) -> list[str]:
        """The recomputed layers whose private copies differ from the caller's statistics."""
        out = []
        callers = dict(zip(self.stat_keys, self._callers, strict=True))
        with torch._C.DisableTorchFunctionSubclass():
            for name in self.layers:
                keys = [buffer_key(name, stat) for stat in STAT_NAMES]
                if not all(torch.equal(self._tags[k], callers[k].detach()) for k in keys):
                    out.append(name)
        return out

    def _refresh_tags(self, buffers: Mapping[str, Tensor]) -> None:
        """Put the caller's current statistics behind the tags (made anew when a buffer's
        dtype, device or shape changed since the last session)."""
        values = [buffers[key] for key in self.stat_keys]
        self._callers = values
        made_for = [(v.dtype, v.device, v.shape) for v in values]
        if made_for != self._made_for:
            self._copies = [v.detach().clone() for v in values]
            self._tags = {}
            for key, copy in zip(self.stat_keys, self._copies, strict=True):
                layer, stat = parse_key(key) or ("", "")
                span = range(copy.numel())
                self._tags[key] = make_tag(
                    copy, layer=layer, stat=stat, span=span, owner=self.state
                )
            self._made_for = made_for
            self._forbidden = frozenset(storage_id(t) for t in self._copies if has_storage(t))
        elif values:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, values)

    @contextlib.contextmanager
    def session(self, resolved: Resolved, *, sink: Sink) -> Iterator[dict[str, Tensor]]:
        """Prepare a run: yield the tensors to bind (names relative to the bound module);
        afterwards restore attributes and check the caller's tensors, also on error."""
        buffers, weights = resolved.buffers, resolved.weights
        self._refresh_tags(buffers)
        rebind = functools.partial(_set_tensor, self.target)
        protection = Protection(rebind=rebind, forbidden=self._forbidden)
        swap: dict[str, Tensor] = dict(weights.params or {})
        counters = self._counter_tensors(buffers)
        for key, tensor in buffers.items():
            if key in self._tags or key in counters:
                continue
            name = key.removeprefix(self.prefix)
            swap[key] = tensor if resolved.owned else protection.guard(name, tensor)
        swap.update(counters)
        swap.update(self._tags)
        if self.prefix:
            swap = {k.removeprefix(self.prefix): v for k, v in swap.items()}
        state = self.state
        state.sink, state.cudnn, state.protection = sink, torch.backends.cudnn.enabled, protection
        state.reads = {}
        try:
            with self.watch(resolved):
                if self._sync_bn or self._compiled:
                    with _local_sync_bn(self._sync_bn), _eager(self._compiled):
                        yield swap
                else:
                    yield swap
        finally:
            state.sink, state.protection = _IDLE_SINK, _IDLE_PROTECTION
            if protection.copied:
                logger.debug(
                    "buffers the forward wrote, copied on write: %s (%d bytes)",
                    protection.copied,
                    protection.copied_bytes,
                )
            protection.close()

    @contextlib.contextmanager
    def watch(self, resolved: Resolved) -> Iterator[None]:
        """Afterwards, also on error: undo attributes the forward set on its modules, and
        report a write into the caller's tensors that went around every binding."""
        watched = resolved.params if resolved.owned else {**resolved.params, **resolved.buffers}
        tensors = list(watched.values())
        versions = [t._version for t in tensors]
        attributes = [(m, dict(vars(m))) for m in self._tree.run]
        try:
            yield
        finally:
            _restore_attributes(attributes)
            if [t._version for t in tensors] != versions:
                _report_writes(watched, versions)

    def _counter_tensors(self, buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fresh = iter(torch.zeros(len(self._counters), dtype=torch.long).unbind(0))
        out = {}
        for key, recomputed in self._counters.items():
            if key in buffers:
                caller = buffers[key]
                out[key] = next(fresh) if recomputed else caller.detach().to("cpu", copy=True)
        return out


def bind(
    bindings: Sequence[tuple[Binding, Resolved, Sink]], body: Callable[[list[nn.Module]], T]
) -> T:
    """Call ``body(models)`` with every binding's session open, one bound module per
    binding; return what it returns.

    One ``functional_call`` binds all models at once, as children of one holder, so the
    body runs at the same stack depth whatever their number. The models must be distinct
    module objects.
    """
    with contextlib.ExitStack() as stack:
        swaps = [stack.enter_context(b.session(r, sink=s)) for b, r, s in bindings]
        if len(bindings) == 1:  # the common case: one holder per binding, made once
            holder = bindings[0][0].holder
            holder.body = body
        else:
            holder = _Holder([b.target for b, _, _ in bindings], body)
        bound = {
            f"models.{i}.{key}": tensor
            for i, swap in enumerate(swaps)
            for key, tensor in swap.items()
        }
        try:
            result: T = torch.func.functional_call(
                holder,
                bound,
                (),
                strict=False,
                # Only the caller's tensors can stand for tied ones; working out the ties
                # costs a walk over every tensor of the models.
                tie_weights=any(r.weights.params or r.weights.buffers for _, r, _ in bindings),
            )
        finally:
            holder.body = None
        return result


class _Holder(nn.Module):
    """Holds the models as ``models`` so that one ``functional_call`` spans a whole run."""

    def __init__(
        self, models: list[nn.Module], body: Callable[[list[nn.Module]], Any] | None = None
    ) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.body = body

    def forward(self) -> Any:
        assert self.body is not None
        return self.body(list(self.models))


def _set_tensor(target: nn.Module, key: str, tensor: Tensor) -> None:
    """Bind ``tensor`` as the buffer ``key`` of ``target`` for the rest of the session (a
    clone of a buffer the forward wrote)."""
    NamedMemberAccessor(target).set_tensor(key, tensor)


def _same_children(entry: tuple[str, nn.Module, tuple[nn.Module | None, ...]]) -> bool:
    _, module, children = entry
    now = module._modules.values()
    return len(children) == len(now) and all(map(operator.is_, children, now))


class _Tree:
    """A model's modules by name, walked once: `tensors` reads their current tensors and
    walks anew only when a module's children changed (a submodule replaced, added or
    removed anywhere), which it checks on every call. ``run`` is the modules a session
    runs: those of the module under ``prefix`` (the model's, unwrapped)."""

    def __init__(self, model: nn.Module, prefix: str) -> None:
        self.model, self.prefix = model, prefix
        self._walk()

    def _walk(self) -> None:
        self.modules = [
            (prefix + "." if prefix else "", module, tuple(module._modules.values()))
            for prefix, module in self.model.named_modules()
        ]
        self.run = [m for dot, m, _ in self.modules if dot.startswith(self.prefix)]

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``dict(model.named_parameters())`` and ``dict(model.named_buffers())``."""
        if not all(map(_same_children, self.modules)):
            self._walk()
        params: dict[str, Tensor] = {}
        buffers: dict[str, Tensor] = {}
        seen: set[int] = set()
        for dot, module, _ in self.modules:
            for out, members in ((params, module._parameters), (buffers, module._buffers)):
                for name, tensor in members.items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        out[dot + name] = tensor
        return params, buffers


def _check_names(
    what: str, given: Mapping[str, Tensor] | None, known: Mapping[str, Tensor]
) -> None:
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        raise ValueError(f"{what}= has names the model does not: {unknown[:8]}")


def _counter_keys(model: nn.Module, recomputed: Mapping[str, nn.Module]) -> dict[str, bool]:
    """Every norm layer's ``num_batches_tracked`` key, and whether the layer is recomputed."""
    return {
        buffer_key(name, "num_batches_tracked"): name in recomputed
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats
    }


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to run and the prefix its names carry in ``model``'s names.

    A ``DistributedDataParallel`` wrapper's forward broadcasts buffers (a collective per
    call, writing into the wrapped module's buffers) and prepares gradient reduction; a
    ``torch.compile`` wrapper (``OptimizedModule``) would compile the forward with the
    run's bindings in it. The wrapped module is run instead, while names stay those of the
    wrapper (``module.``, ``_orig_mod.``...).
    """
    if isinstance(model, DistributedDataParallel):
        inner, prefix = _unwrap(model.module)
        return inner, "module." + prefix
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        inner, prefix = _unwrap(original)
        return inner, "_orig_mod." + prefix
    return model, ""


def _restore_attributes(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo attributes the forward set, added or deleted on its modules.

    A forward may keep state in plain attributes (spectral norm's ``weight``, a cache);
    a copy of the model would keep it, the caller's model must not. Contents of mutable
    attributes (a list appended to) are not restored.
    """
    for module, before in saved:
        now = vars(module)
        # Same keys in the same order and the same objects: nothing to undo (dicts keep
        # insertion order, so a changed key set shows up as a changed length or order).
        if (
            len(now) == len(before)
            and all(map(operator.is_, now.values(), before.values()))
            and all(map(operator.eq, now, before))
        ):
            continue
        for key in [k for k in now if k not in before]:
            del now[key]
        now.update(before)


def _report_writes(tensors: Mapping[str, Tensor], versions: list[int]) -> None:
    """Report tensors of the model that were written in place during the run.

    Buffers are bound as guards, which copy on write, so this catches what goes around
    them: a parameter written in place, a buffer written through another reference.
    """
    changed = [
        key for (key, t), v in zip(tensors.items(), versions, strict=True) if t._version != v
    ]
    if changed:
        raise RuntimeError(
            f"the forward wrote into the model's own tensor(s) {changed[:8]} in place during "
            "the run, through a reference precisebn does not bind (precisebn copies buffers "
            "on write, but parameters are read as they are): the model HAS changed. Make "
            "the forward leave them alone, or pass copies with params= / buffers="
        )


def _has_compiled_parts(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


@contextlib.contextmanager
def _eager(compiled: bool) -> Iterator[None]:
    """Run ``torch.compile``d submodules eagerly during an eager run.

    Compiled code would trace the tags' Python handlers and recompile for every new
    guard value; the eager forward computes the same function.
    """
    if not compiled:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


@contextlib.contextmanager
def _local_sync_bn(layers: list[nn.SyncBatchNorm]) -> Iterator[None]:
    """Run recomputed ``SyncBatchNorm`` layers on local batch statistics, without syncing.

    Under an initialised process group, ``SyncBatchNorm.forward`` in training mode
    all-reduces batch statistics on every call (and raises on CPU inputs). With its
    ``training`` flag off it calls ``F.batch_norm``, which its tag runs in training mode
    anyway, so the output is unchanged; the statistics are reduced once at the end of the
    run instead. The flags are restored on exit, also on error.
    """
    syncing = torch.distributed.is_available() and torch.distributed.is_initialized()
    training = [m for m in layers if m.training] if syncing else []
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True
