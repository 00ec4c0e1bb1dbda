"""Run batches statelessly and record the per-call moments of every recomputed BN input.

The model runs under one `torch.func.functional_call` per run, which binds three kinds of
private tensors and nothing else:

- each recomputed layer's ``running_mean`` and ``running_var``: *tags*
  (`precisebn._tags`) that hold a copy of the caller's values and intercept the layer's
  batch-norm call;
- every norm layer's ``num_batches_tracked``: a counter on the CPU (for a recomputed
  layer, one entry of `Runner.calls`, which so counts the layer's calls);
- every other buffer: a *guard* (`precisebn._guard`), which copies it on the forward's
  first write.

Parameters are the caller's (or the ``params=`` given) and are read only. When the run
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
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from precisebn._batches import Forward, default_forward
from precisebn._guard import Protection
from precisebn._layers import STAT_NAMES, LayerSelector, buffer_key, find_bn_layers
from precisebn._moments import Moments, Stats, flatten, from_batch, merge_layer, unflatten
from precisebn._tags import Call, Sink, Tag, checking_torch_function, make_tag
from precisebn._vmap import check_unbatched, is_transformed, per_member, split_weights, weights

_FULL_WIDTH = (torch.float32, torch.float64)
logger = logging.getLogger("precisebn")


class Record:
    """One intercepted call: the call, and the rows its kernel wrote the batch moments into."""

    __slots__ = ("call", "mean", "var")

    def __init__(self, call: Call, mean: Tensor, var: Tensor) -> None:
        self.call, self.mean, self.var = call, mean, var


class RecordList:
    """The plain sink: fresh rows per call, every call kept as a `Record`."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.degenerate_calls: list[tuple[Call, tuple[int, ...]]] = []

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        mean, var = torch.zeros(2, len(call.span), dtype=dtype, device=device).unbind(0)
        self.records.append(Record(call, mean, var))
        return mean, var

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        self.degenerate_calls.append((call, shape))


def collect(records: list[Record]) -> Stats:
    """Per-layer moments of one batch's records (a reused layer's calls pooled).

    A call over a slice of a layer's channels gives counts per channel: its count on the
    channels it covers and 0 elsewhere.
    """
    stats: Stats = {}
    for r in records:
        call = r.call
        moments = from_batch(call.count, r.mean, r.var, span=call.span, size=call.size)
        old = stats.get(call.layer)
        stats[call.layer] = moments if old is None else merge_layer(old, moments)
    return stats


T = TypeVar("T")
Step = Callable[[Any], Any]
"""``step(batch) -> output``: one batch through the bound model."""


class Runner:
    """Everything one model needs to run batches statelessly, worked out once."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSelector = None,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
        forward: Forward | None = None,
    ) -> None:
        self.layers = find_bn_layers(model, layers)
        self.forward = forward or default_forward
        named_params = dict(model.named_parameters())
        named_buffers = dict(model.named_buffers())
        _check_names("params", params, named_params)
        _check_names("buffers", buffers, named_buffers)
        self._params = dict(params or {})
        self._buffers = {**named_buffers, **(buffers or {})}
        state = {**named_params, **self._params, **self._buffers}
        self.bn_buffers = {
            buffer_key(name, s): state[buffer_key(name, s)]
            for name in self.layers
            for s in STAT_NAMES
        }
        self.device = next(iter(state.values())).device if state else torch.device("cpu")
        self.floating_params = any(t.is_floating_point() for t in state.values())
        self._watched = state  # every tensor of the caller's that the run may read
        self._overrides = bool(params or buffers)
        self.sink: Sink = RecordList()
        self.cudnn = torch.backends.cudnn.enabled
        self.protection = Protection()
        self.reads: dict[str, str] = {}
        """Layers whose statistics the forward used outside their batch-norm call, and how."""
        # Each recomputed layer's num_batches_tracked, bound as a view of one CPU counter.
        self.calls = torch.zeros(len(self.layers), dtype=torch.long)
        self._counters = _counters(model, state, self.layers, self.calls)
        self.counters = [self.calls, *self._counters.values()]
        # The tags of this runner only: their interception is switched off in direct batches.
        self._tag_type: type[Tag] = type("_RunTag", (Tag,), {})
        self._mode = "intercept"
        self.checked: list[Call] = []
        """Batch-norm calls of the current checked direct batch."""
        self.live, self._stat_tensors = self._private_statistics()
        self._caller_values = None if self.live is None else self.live.clone()
        self._tags = self._make_tags()
        self._target, self._prefix = _unwrap_ddp(model)
        self._compiled = _has_compiled_parts(model)
        # Only under an initialised process group would SyncBatchNorm sync (or raise).
        syncing = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._sync_bn = [
            m for m in self.layers.values() if syncing and isinstance(m, nn.SyncBatchNorm)
        ]

    def _private_statistics(self) -> tuple[Tensor | None, list[Tensor]]:
        """The run's copies of the recomputed layers' statistics, behind the tags.

        Where the buffers share one float32 or float64 dtype and a device, one ``[2, C]``
        tensor (``live``) holds them end to end, which direct batches let the kernels
        update; otherwise one copy per buffer, and ``live`` is ``None``.
        """
        means = [self.bn_buffers[buffer_key(name, STAT_NAMES[0])] for name in self.layers]
        kinds = {(m.dtype, m.device) for m in means}
        if len(kinds) == 1 and means[0].dtype in _FULL_WIDTH:
            rows = [
                torch.cat(
                    [self.bn_buffers[buffer_key(n, s)].detach().flatten() for n in self.layers]
                )
                for s in STAT_NAMES
            ]
            live = torch.stack(rows)
            return live, [live]
        copies = [t.detach().clone() for t in self.bn_buffers.values()]
        return None, copies

    def _make_tags(self) -> dict[str, Tensor]:
        """Tags over the private statistics, keyed like the buffers they stand for."""
        if self.live is not None:
            sizes = [self.bn_buffers[buffer_key(n, STAT_NAMES[0])].numel() for n in self.layers]
            parts = [torch.split(row, sizes) for row in self.live.unbind(0)]
            data = {
                buffer_key(n, s): parts[j][i]
                for i, n in enumerate(self.layers)
                for j, s in enumerate(STAT_NAMES)
            }
        else:
            data = dict(zip(self.bn_buffers, self._stat_tensors, strict=True))
        tags: dict[str, Tensor] = {}
        for name in self.layers:
            for stat in STAT_NAMES:
                key = buffer_key(name, stat)
                view = data[key].view_as(self.bn_buffers[key])
                span = range(view.numel())
                tags[key] = make_tag(
                    self._tag_type, view, layer=name, stat=stat, span=span, owner=self
                )
        return tags

    def note_read(self, layer: str, operator: str) -> None:
        self.reads.setdefault(layer, operator)

    def _refill(self) -> None:
        """Put the caller's values back behind the tags (after direct batches used them)."""
        if self.live is not None and self._caller_values is not None:
            self.live.copy_(self._caller_values)

    def statistics_version(self) -> int:
        """Sum of the version counters of the tensors behind the tags: it moves on any write
        through an operator that declares it (the kernels of batch norm do not)."""
        if self.live is not None:
            return int(self.live._version)
        return sum(t._version for t in self._stat_tensors)

    def written_layers(self) -> list[str]:
        """The recomputed layers whose values behind the tags differ from the caller's."""
        out = []
        for name in self.layers:
            keys = [buffer_key(name, stat) for stat in STAT_NAMES]
            with torch._C.DisableTorchFunctionSubclass():
                same = all(torch.equal(self._tags[k], self.bn_buffers[k].detach()) for k in keys)
            if not same:
                out.append(name)
        return out

    def note_call(self, call: Call) -> None:
        self.checked.append(call)

    def intercept(self, mode: str) -> None:
        """Set how this runner's tags handle calls: ``"intercept"`` (the default),
        ``"direct"`` (not at all) or ``"check"`` (as direct, noting each batch-norm call).

        Direct and checked batches let the kernels write the private statistics, so going
        back to ``"intercept"`` puts the caller's values back behind the tags: in that mode
        they always hold them.
        """
        if mode == self._mode:
            return
        if self._mode != "intercept":
            delattr(self._tag_type, "__torch_function__")
            self._refill()
        if mode == "direct":
            # How torch marks a subclass whose calls need no dispatch to Python.
            setattr(self._tag_type, "__torch_function__", torch._C._disabled_torch_function_impl)  # noqa: B010
        elif mode == "check":
            setattr(self._tag_type, "__torch_function__", classmethod(checking_torch_function))  # noqa: B010
        self._mode = mode

    def within(self, loop: Callable[[Step], T], *, sink: Sink) -> T:
        """Call ``loop(step)`` with the stateless state bound; return what it returns.

        ``step(batch) -> output`` runs one batch; every recomputed BN call puts its batch
        moments into ``sink``. One ``functional_call`` covers the whole loop (binding per
        batch costs about as much as a small model's forward); the model's own tensors are
        back in place when it returns, also on error.
        """
        return within_all([self], lambda steps: loop(steps[0]), sinks=[sink])

    @contextlib.contextmanager
    def session(self, *, sink: Sink) -> Iterator[dict[str, Tensor]]:
        """Prepare a run around one binding: yield the tensors to bind (names relative to
        the bound module); afterwards restore attributes and check the caller's tensors."""
        accessor = NamedMemberAccessor(self._target)
        protection = Protection(rebind=lambda key, t: accessor.set_tensor(key, t))
        protection.forbid(self._stat_tensors)
        swap: dict[str, Tensor] = dict(self._params)
        for key, tensor in self._buffers.items():
            if key not in self._tags and key not in self._counters:
                swap[key] = protection.guard(key.removeprefix(self._prefix), tensor)
        swap.update(self._counters)
        swap.update(self._tags)
        if self._prefix:
            swap = {k.removeprefix(self._prefix): v for k, v in swap.items()}
        self.sink, self.cudnn, self.protection = sink, torch.backends.cudnn.enabled, protection
        self.intercept("intercept")
        attributes = _attributes(self._target)
        versions = {key: t._version for key, t in self._watched.items()}
        try:
            with _local_sync_bn(self._sync_bn), _eager(self._compiled):
                yield swap
        finally:
            self.sink = RecordList()
            self.intercept("intercept")
            _restore_attributes(attributes)
            if protection.copied:
                logger.debug(
                    "buffers the forward wrote, copied on write: %s (%d bytes)",
                    protection.copied,
                    protection.copied_bytes,
                )
            _check_versions(self._watched, versions)

    def run(self, batch: Any) -> tuple[Any, Stats]:
        """Run ``batch`` through the model; return its output and the batch moments per layer."""
        sink = RecordList()
        out = self.within(lambda step: step(batch), sink=sink)
        check_followed(self.reads, {r.call.layer for r in sink.records})
        if sink.degenerate_calls:
            call, shape = sink.degenerate_calls[0]
            raise ValueError(one_value_message(call, shape))
        return out, collect(sink.records)


def check_followed(reads: Mapping[str, str], recorded: set[str]) -> None:
    """Raise for a layer whose statistics were used but whose batch-norm call was not seen.

    Such a layer passes its buffers to the kernel in a form that the tags cannot follow
    (an index tensor, ``index_select``, a copy), so its batches would be silently missing.
    """
    lost = [(layer, how) for layer, how in reads.items() if layer not in recorded]
    if lost:
        named = ", ".join(f"'{layer or '<model>'}' (used by {how})" for layer, how in lost[:5])
        raise ValueError(
            f"BatchNorm layer(s) {named}: the forward used the running statistics, but no "
            "batch_norm call on them was seen. precisebn follows torch.nn.functional."
            "batch_norm and torch.batch_norm calls that pass a layer's running_mean and "
            "running_var, or the same basic slice of both (running_mean[:c]); pass such "
            "views, or leave the layer out with layers="
        )


def one_value_message(call: Call, shape: tuple[int, ...]) -> str:
    """Why a call with fewer than two values per channel gives no batch statistics."""
    return (
        f"BatchNorm layer '{call.layer or '<model>'}' got {call.count} value per channel "
        f"(input shape {shape}); batch statistics need at least 2"
    )


def within_all(
    runners: Sequence[Runner], loop: Callable[[list[Step]], T], *, sinks: Sequence[Sink]
) -> T:
    """Call ``loop(steps)`` with every runner's state bound, one ``step`` per runner; return
    what it returns.

    One ``functional_call`` binds all models at once, as children of one holder, so the
    loop runs at the same stack depth whatever their number. The models must be distinct
    module objects.
    """
    with contextlib.ExitStack() as stack:
        swaps = [
            stack.enter_context(r.session(sink=s)) for r, s in zip(runners, sinks, strict=True)
        ]

        def body(models: Sequence[nn.Module]) -> T:
            return loop(
                [
                    functools.partial(_step, runner, model)
                    for runner, model in zip(runners, models, strict=True)
                ]
            )

        holder = _Holder([r._target for r in runners], body)
        bound = {
            f"models.{i}.{key}": tensor
            for i, swap in enumerate(swaps)
            for key, tensor in swap.items()
        }
        result: T = torch.func.functional_call(
            holder,
            bound,
            (),
            strict=False,
            # Only the caller's tensors can stand for tied ones; working out the ties
            # costs a walk over every tensor of the models.
            tie_weights=any(r._overrides for r in runners),
        )
        return result


def _step(runner: Runner, model: nn.Module, batch: Any) -> Any:
    return runner.forward(model, batch)


class _Holder(nn.Module):
    """Holds the models as ``models`` so that one ``functional_call`` spans a whole loop."""

    def __init__(self, models: list[nn.Module], body: Callable[[Sequence[nn.Module]], Any]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.body = body

    def forward(self) -> Any:
        return self.body(list(self.models))


def _check_names(
    what: str, given: Mapping[str, Tensor] | None, known: Mapping[str, Tensor]
) -> None:
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        raise ValueError(f"{what}= has names the model does not: {unknown[:8]}")


def _counters(
    model: nn.Module, state: Mapping[str, Tensor], chosen: Mapping[str, nn.Module], calls: Tensor
) -> dict[str, Tensor]:
    """Private CPU counters for every norm layer's ``num_batches_tracked``.

    On the CPU because ``momentum=None`` reads the counter back with ``float()``, which on a
    device tensor would synchronise. A recomputed layer's counter is its entry of
    ``calls``, zeroed before every batch, so that it counts the layer's calls (and a
    momentum of ``None`` gives factor 1); another layer's starts at the caller's value
    and counts on, as a copy of the model would.
    """
    out = {}
    index = {name: i for i, name in enumerate(chosen)}
    for name, module in model.named_modules():
        if not isinstance(module, _NormBase) or not module.track_running_stats:
            continue
        key = buffer_key(name, "num_batches_tracked")
        if key in state:
            if name in index:
                out[key] = calls[index[name]]
            else:
                out[key] = state[key].detach().to("cpu", copy=True)
    return out


def _unwrap_ddp(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to run and the prefix its names carry in ``model``'s names.

    A ``DistributedDataParallel`` wrapper's forward broadcasts buffers (a collective per
    call, writing into the wrapped module's buffers) and prepares gradient reduction; the
    wrapped module is run instead, while names stay those of the wrapper (``module.``...).
    """
    if isinstance(model, DistributedDataParallel):
        return model.module, "module."
    return model, ""


_Attributes = list[tuple[nn.Module, dict[str, Any]]]


def _attributes(model: nn.Module) -> _Attributes:
    """Every module's attribute dictionary, shallowly copied."""
    return [(m, dict(vars(m))) for m in model.modules()]


def _restore_attributes(saved: _Attributes) -> None:
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


def _check_versions(tensors: Mapping[str, Tensor], versions: Mapping[str, int]) -> None:
    """Report tensors of the model that were written in place during the run.

    Buffers are bound as guards, which copy on write, so this catches what goes around
    them: a parameter written in place, a buffer written through another reference.
    """
    changed = [key for key, t in tensors.items() if t._version != versions[key]]
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
    """Run ``torch.compile``d parts eagerly during the run.

    Compiled code would trace the tags' Python handlers and recompile for every new
    guard value; the eager forward computes the same function, and precise BN needs no
    graph. Needs ``torch.compiler.set_stance`` (torch 2.6 or newer); older versions
    compile as usual.
    """
    stance = getattr(torch.compiler, "set_stance", None)
    if not compiled or stance is None:
        yield
        return
    with stance("force_eager"):
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
    training = [m for m in layers if m.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def capture(
    model: nn.Module,
    inputs: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    forward: Forward | None = None,
    layers: LayerSelector = None,
) -> tuple[Any, dict[str, Moments]]:
    """Run one batch statelessly; return the model output and each BN layer's batch moments.

    Every recomputed layer normalises with the batch statistics, as in training mode,
    whatever its ``training`` flag; the output equals the model's own training-mode
    forward bit for bit. Other modules run as the caller left them. Nothing is written to
    the model or to ``params``/``buffers``: buffers the forward updates (spectral norm,
    quantisation observers, counters) are copied on write. Autograd is left as the caller
    has it, so the output can be differentiated; the moments are detached. Non-finite
    values are returned as they are (`precisebn.finalize` refuses them).

    Args:
        model: the module whose structure is run.
        inputs: the batch, already on the model's device.
        params: parameters to use instead of the module's own (``functional_call`` names).
        buffers: buffers to use instead of the module's own.
        forward: ``forward(stateless_model, batch)``; the default takes a tensor, or the
            first element of a tuple or list.
        layers: which BN layers to record (default: all that track running statistics).

    Returns:
        ``(output, moments)`` where ``moments`` maps each layer that the batch reached to
        its `Moments` (all calls of a reused layer pooled; a call over a slice of the
        channels gives counts per channel).

    Raises:
        ValueError: a recomputed layer got a single value per channel.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
        >>> out, moments = precisebn.capture(model, torch.randn(8, 3))
        >>> out.shape, moments["1"].count.item()
        (torch.Size([8, 4]), 8.0)
    """
    check_unbatched(torch.utils._pytree.tree_leaves(inputs))
    if is_transformed(params, buffers):
        return _capture_transformed(model, inputs, params, buffers, forward, layers)
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    return runner.run(inputs)


def _capture_transformed(
    model: nn.Module,
    inputs: Any,
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
    forward: Forward | None,
    layers: LayerSelector,
) -> tuple[Any, dict[str, Moments]]:
    """`capture` for every member of a stack of weights (see `precisebn._vmap`)."""
    shape: list[tuple[Any, list[str]]] = []  # the output's structure, the layers reached

    def many(members: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        outs = []
        for member in members:
            p, b = split_weights(member)
            runner = Runner(model, layers=layers, params=p, buffers=b, forward=forward)
            out, moments = runner.run(inputs)
            leaves, spec = torch.utils._pytree.tree_flatten(out)
            if not all(isinstance(leaf, Tensor) for leaf in leaves):
                raise TypeError(
                    "under torch.func.vmap, capture returns the members' outputs stacked, so "
                    "every leaf of the output must be a tensor"
                )
            if not shape:
                shape.append((spec, list(moments)))
            outs.append([leaf.detach() for leaf in leaves] + flatten(moments, shape[0][1]))
        return outs

    flat = per_member(many, weights(params, buffers))
    spec, reached = shape[0]
    outputs = flat[: spec.num_leaves]
    moments = unflatten(flat[spec.num_leaves :], reached)
    return torch.utils._pytree.tree_unflatten(outputs, spec), moments
