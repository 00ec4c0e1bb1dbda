"""The recorder: a model's BatchNorm layers bound once, with pure ``init``, ``update`` and
``finalize`` over a statistics state, and ``capture`` for a forward that returns moments.

Every batch-norm call of every batch is intercepted (`precisebn._tags`), so each count is
read from the shape of the input the layer really received. `precisebn.recompute_bn_buffers`
is a loop over a recorder; `precisebn.update` and `precisebn.capture` build one per call.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, cast

import optree
import torch
from torch import Tensor, nn

from precisebn._batches import (
    BatchLayoutError,
    Forward,
    default_forward,
    integer_leaves,
    to_device,
)
from precisebn._binding import Binding, Resolved, Weights, bind
from precisebn._fold import Fold
from precisebn._layers import LayerSelector, find_bn_layers
from precisebn._moments import Stats, finalize, init, merge
from precisebn._tags import one_value_message
from precisebn._vmap import check_unbatched, is_transformed, per_member, split_weights
from precisebn._vmap import weights as weights_of

__all__ = ["Recorder", "capture", "check_followed", "recorder", "update"]


class Recorder:
    """A model's BatchNorm layers, bound once for stateless runs.

    Built with `precisebn.recorder`. The methods are pure: each returns new values and
    none changes the model, its tensors or the state passed in. What is worked out here
    (which layers, which buffers, how they are bound) holds for the model's structure;
    its tensors are read afresh on every call, so a model trained in place, moved or
    cast between calls is recorded as it is then. Build a new recorder after adding or
    removing modules.

    Attributes:
        layers: the names of the recomputed layers, in module order.
        forward: ``forward(stateless_model, batch) -> output``.
    """

    def __init__(
        self, model: nn.Module, *, layers: LayerSelector = None, forward: Forward | None = None
    ) -> None:
        self.binding = Binding(model, find_bn_layers(model, layers))
        self.layers = list(self.binding.layers)
        self.forward: Forward = forward or default_forward
        self._weights: dict[Any, Any] = {}  # per device, per-channel weights of counts seen
        self._scratch: dict[tuple[torch.dtype, torch.device], Fold] = {}  # `update`'s folds

    def __repr__(self) -> str:
        return f"Recorder({len(self.layers)} layers of {type(self.binding.model).__name__})"

    def init(self, *, buffers: Mapping[str, Tensor] | None = None) -> Stats:
        """An empty state (count 0) for every recomputed layer, in float64 on its device.

        Args:
            buffers: buffers to use instead of the module's own (their devices count).
        """
        return init(self.bn_buffers(buffers=buffers))

    def update(
        self,
        state: Stats,
        batch: Any,
        *,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> Stats:
        """Fold one batch into ``state``: a new state; nothing is mutated.

        The batch is moved to the model's device and run without autograd; see
        `capture` for the forward's semantics. A batch in which a recomputed layer sees
        a single value per channel is skipped with a warning (the state is returned
        unchanged). Under ``torch.func.vmap`` over stacked weights (and a stacked state),
        each member folds the batch into its own moments.

        Raises:
            ValueError: ``state`` holds other layers than the recorder's.
        """
        return self._update(state, batch, Weights(params, buffers), stacklevel=3)

    def _update(self, state: Stats, batch: Any, weights: Weights, *, stacklevel: int) -> Stats:
        _check_state(state, self.layers)
        check_unbatched(optree.tree_leaves(batch, none_is_leaf=True))
        with torch.no_grad():
            if is_transformed(*weights):
                _, moments, skipped = self._transformed(batch, weights, fill=True)
                state = dict(state) if skipped else merge(state, moments)
            else:
                _, moments, skipped = self._one(batch, weights, start=state)
                state = dict(state) if skipped else moments
        if skipped:
            warnings.warn(f"the batch was skipped: {skipped}", UserWarning, stacklevel=stacklevel)
        return state

    def capture(
        self,
        batch: Any,
        *,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> tuple[Any, Stats]:
        """Run one batch statelessly; return the output and each reached layer's moments.

        See `precisebn.capture`.
        """
        check_unbatched(optree.tree_leaves(batch, none_is_leaf=True))
        if is_transformed(params, buffers):
            output, moments, skipped = self._transformed(
                batch, Weights(params, buffers), fill=False
            )
        else:
            output, moments, skipped = self._one(batch, Weights(params, buffers), start=None)
        if skipped:
            raise ValueError(skipped)
        return output, moments

    def finalize(
        self, state: Stats, *, buffers: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The BN buffers of ``state``, in the dtype and on the device of the model's
        buffers (or ``buffers``); see `precisebn.finalize`."""
        return finalize(state, like=self.bn_buffers(buffers=buffers))

    def bn_buffers(self, *, buffers: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The recomputed layers' current running statistics (``buffers`` where given)."""
        return self.binding.bn_buffers(self.binding.resolve(Weights(None, buffers)))

    # ------------------------------------------------------------------ the runs

    def fold(
        self, resolved: Resolved, *, rows: int, errors: bool, start: Stats | None, check: bool
    ) -> Fold:
        """A fold for a run on ``resolved`` weights: statistics in the buffers' dtype (float64
        when any is float64, else float32), on the first buffer's device."""
        dtype, device = self.binding.rows_home(resolved)
        return Fold(
            self.binding.layout,
            dtype=dtype,
            device=device,
            rows=rows,
            errors=errors,
            start=start,
            check=check,
            cache=self._weights.setdefault(device, {}),
        )

    def _one_row(self, resolved: Resolved, start: Stats | None) -> Fold:
        """A fold of one row, reset to ``start``: made once per statistics dtype and device
        and reused by every call (a recorder runs one call at a time). Inside a
        ``torch.func`` transform (``capture`` under ``grad``) a fold of its own: a transform
        refuses writes into tensors made outside it."""
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return self.fold(resolved, rows=1, errors=False, start=start, check=False)
        key = self.binding.rows_home(resolved)
        fold = self._scratch.get(key)
        if fold is None:
            fold = self.fold(resolved, rows=1, errors=False, start=start, check=False)
            self._scratch[key] = fold
        else:
            fold.reset(start)
        return fold

    def run_batch(
        self, model: nn.Module, batch: Any, fold: Fold, *, index: int
    ) -> tuple[Any, str | None]:
        """Run one placed batch through the bound ``model`` into ``fold``; return the output
        and, for a batch that cannot count, why it was skipped (nothing of it is folded).

        Raises:
            ValueError: the forward wrote the statistics outside a batch-norm call.
            TypeError: the forward failed on integer inputs of a floating-point model.
        """
        binding = self.binding
        version = binding.statistics_version()
        try:
            output = self.forward(model, batch)
        except BatchLayoutError:
            raise
        except (RuntimeError, TypeError) as error:
            _explain_integers(error, batch, model, index=index)
            raise
        if binding.statistics_version() != version:
            raise ValueError(_written_message(binding.written_layers() or list(binding.reads)))
        if fold.degenerate_call is not None:
            call, shape = fold.degenerate_call
            fold.discard_batch()
            return output, one_value_message(call.layer, call.count, shape)
        fold.end_batch(index)
        return output, None

    def _one(
        self, batch: Any, weights: Weights, *, start: Stats | None
    ) -> tuple[Any, Stats, str | None]:
        """One batch in a session of its own: the output, the moments (``start`` and the
        batch's, or the reached layers' batch moments alone) and why it was skipped."""
        resolved = self.binding.resolve(weights)
        fold = self._one_row(resolved, start)
        placed = to_device(batch, resolved.device)

        def body(models: list[nn.Module]) -> tuple[Any, str | None]:
            return self.run_batch(models[0], placed, fold, index=0)

        output, skipped = bind([(self.binding, resolved, fold)], body)
        check_followed(self.binding.reads, fold.recorded)
        moments = fold.result()
        if start is None:
            moments = {name: m for name, m in moments.items() if name in fold.recorded}
        return output, moments, skipped

    def _transformed(
        self, batch: Any, weights: Weights, *, fill: bool
    ) -> tuple[Any, Stats, str | None]:
        """`_one` for every member of a stack of weights (see `precisebn._vmap`), batched:
        the outputs (without ``fill``) and the moments (with ``fill``, of every layer, count
        0 where the batch did not reach it), and why the first skipped member was skipped."""
        skipped: list[str] = []
        spec: list[optree.PyTreeSpec] = []

        def many(members: list[dict[str, Tensor]]) -> list[list[Tensor]]:
            outs = []
            for p, b in [split_weights(m) for m in members]:
                out, moments, why = self._one(batch, Weights(p, b), start=None)
                if why is not None:
                    skipped.append(why)
                if fill:
                    out, moments = None, {**self.init(buffers=b), **moments}
                leaves: list[Any]
                leaves, tree = optree.tree_flatten((out, moments))  # type: ignore[arg-type]
                if not all(isinstance(leaf, Tensor) for leaf in leaves):
                    raise TypeError(
                        "under torch.func.vmap, capture returns the members' outputs stacked, "
                        "so every leaf of the output must be a tensor"
                    )
                spec[:] = [tree]
                outs.append([leaf.detach() for leaf in leaves])
            return outs

        flat = per_member(many, weights_of(weights.params, weights.buffers))
        out, moments = optree.tree_unflatten(spec[0], flat)
        return out, cast(Stats, moments), (skipped[0] if skipped else None)


def recorder(
    model: nn.Module, *, layers: LayerSelector = None, forward: Forward | None = None
) -> Recorder:
    """Bind ``model``'s BatchNorm layers once, for pure ``init``/``update``/``finalize`` calls.

    The optax-style form of precise BN for loops of your own: ``state = rec.init()``,
    ``state = rec.update(state, batch)`` for each batch, then ``rec.finalize(state)``
    gives the buffers. `precisebn.recompute_bn_buffers` runs the same recorder over a
    loader (and adds standard errors, early stopping and distributed pooling).

    Args:
        model: the model; BN layers are subclasses of
            ``torch.nn.modules.batchnorm._BatchNorm`` with ``track_running_stats=True``.
        layers: which BN layers to record (default: all that track running statistics).
        forward: ``forward(stateless_model, batch) -> output`` for batches the default
            handling does not fit (the default passes a tensor batch, or the first
            element of a tuple or list).

    Raises:
        ValueError: no BN layer qualifies, or ``layers`` names one that does not.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> rec = precisebn.recorder(model)
        >>> state = rec.init()
        >>> for batch in torch.randn(5, 10, 3) + 2:
        ...     state = rec.update(state, batch)
        >>> new = rec.finalize(state)
        >>> state["1"].count.item(), sorted(new)
        (50.0, ['1.running_mean', '1.running_var'])
    """
    return Recorder(model, layers=layers, forward=forward)


def update(
    stats: Stats,
    model: nn.Module,
    batch: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    forward: Forward | None = None,
) -> Stats:
    """Fold one batch into ``stats``: a new state; nothing is mutated.

    Records the layers that ``stats`` holds; ``precisebn.recorder(model).update`` does
    the same with the binding worked out once, for loops. The batch is moved to the
    model's device and run without autograd; see `precisebn.capture` for the forward's
    semantics. A batch in which a recomputed layer sees a single value per channel is
    skipped with a warning (the state is returned unchanged). Under ``torch.func.vmap``
    over stacked weights (and a stacked state), each member folds the batch into its own
    moments.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> stats = precisebn.init(precisebn.bn_buffers(model))
        >>> for batch in torch.randn(5, 10, 3):
        ...     stats = precisebn.update(stats, model, batch)
        >>> stats["1"].count.item()
        50.0
    """
    rec = Recorder(model, layers=list(stats), forward=forward)
    return rec._update(stats, batch, Weights(params, buffers), stacklevel=3)


def capture(
    model: nn.Module,
    inputs: Any,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    forward: Forward | None = None,
    layers: LayerSelector = None,
) -> tuple[Any, Stats]:
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
        inputs: the batch (moved to the model's device).
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
    rec = Recorder(model, layers=layers, forward=forward)
    return rec.capture(inputs, params=params, buffers=buffers)


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


def _check_state(state: Stats, layers: list[str]) -> None:
    if list(state) != layers:
        missing = [name for name in layers if name not in state]
        extra = [name for name in state if name not in layers]
        raise ValueError(
            "the state does not hold the recorder's layers"
            + (f"; missing: {missing[:5]}" if missing else "")
            + (f"; not recorded: {extra[:5]}" if extra else "")
            + ("; same layers in another order" if not missing and not extra else "")
            + ": start from recorder.init()"
        )


def _explain_integers(error: Exception, batch: Any, model: nn.Module, *, index: int) -> None:
    """Raise a clearer error when the forward failed on integer inputs of a float model."""
    ints = integer_leaves(batch)
    if ints and any(p.is_floating_point() for p in model.parameters()):
        raise TypeError(
            f"batch {index}: the forward failed on non-floating inputs "
            f"({sorted(set(map(str, ints)))}) while the model's parameters are floating "
            "point; convert the inputs (e.g. forward=lambda model, b: model(b[0].float())). "
            f"Original error: {error}"
        ) from error


def _written_message(layers: list[str]) -> str:
    named = ", ".join(repr(name or "<model>") for name in layers) or "(unknown)"
    return (
        f"the running statistics of BatchNorm layer(s) {named} were written outside their "
        "batch_norm call, through a tensor derived from them that precisebn could not "
        "follow (for instance running_mean.view(...) passed to batch_norm); precisebn follows "
        "batch_norm calls on a layer's own running_mean and running_var or on basic slices "
        "of them (running_mean[:c])"
    )
