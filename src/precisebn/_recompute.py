"""recompute_bn_buffers: find layers, run batches statelessly, fold moments, produce buffers.

One or several models: `recompute_bn_buffers` is the pass of `recompute_bn_buffers_many`
over one model, and under ``torch.func.vmap`` over the members of a stack of weights.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from precisebn._batches import Forward, to_device
from precisebn._buffers import BNBuffers, ErrorsLater
from precisebn._capture import RecordList, Runner, Step, check_followed, collect, one_value_message
from precisebn._converge import (
    Stopper,
    check_tol,
    reached,
    tagged,
    untagged,
    warn_not_converged,
    worst,
)
from precisebn._distributed import GroupError, abandon, reduce_run, reduction_group
from precisebn._layers import LayerSelector
from precisebn._loop import Outcome, accumulate, run_step
from precisebn._moments import Stats, finalize, flatten, init, merge, unflatten
from precisebn._stderr import Spreads, standard_errors
from precisebn._vmap import check_unbatched, is_transformed, per_member, split_weights, weights

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger("precisebn")


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

    Records the layers that ``stats`` holds. The batch is moved to the model's device and
    run without autograd; see `precisebn.capture` for the forward's semantics. A batch in
    which a recomputed layer sees a single value per channel is skipped with a warning
    (the state is returned unchanged). Under ``torch.func.vmap`` over stacked weights
    (and a stacked state), each member folds the batch into its own moments.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> stats = precisebn.init(precisebn.bn_buffers(model))
        >>> for batch in torch.randn(5, 10, 3):
        ...     stats = precisebn.update(stats, model, batch)
        >>> stats["1"].count.item()
        50.0
    """
    layers = list(stats)
    if is_transformed(params, buffers):
        moments, skipped = _batch_moments_transformed(
            model, batch, layers, params, buffers, forward
        )
    else:
        moments, skipped = _batch_moments(model, batch, layers, params, buffers, forward)
    if skipped is not None:
        warnings.warn(f"the batch was skipped: {skipped}", UserWarning, stacklevel=2)
        return dict(stats)
    return merge(stats, moments)


def _batch_moments(
    model: nn.Module,
    batch: Any,
    layers: list[str],
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
    forward: Forward | None,
) -> tuple[Stats, str | None]:
    """One batch's moments per layer it reached, or why it is skipped."""
    check_unbatched(torch.utils._pytree.tree_leaves(batch))
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    with torch.no_grad():
        sink = RecordList()
        runner.within(lambda step: _checked_step(runner, step, batch), sink=sink)
    check_followed(runner.reads, {r.call.layer for r in sink.records})
    if sink.degenerate_calls:
        call, shape = sink.degenerate_calls[0]
        return {}, one_value_message(call, shape)
    return collect(sink.records), None


def _batch_moments_transformed(
    model: nn.Module,
    batch: Any,
    layers: list[str],
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
    forward: Forward | None,
) -> tuple[Stats, str | None]:
    """`_batch_moments` of every member of a stack of weights (see `precisebn._vmap`): the
    moments of every layer (count 0 where the batch did not reach it), batched."""
    skipped: list[str] = []

    def many(members: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        outs = []
        for p, b in [split_weights(m) for m in members]:
            moments, why = _batch_moments(model, batch, layers, p, b, forward)
            if why is not None:
                skipped.append(why)
            unreached = init({**dict(model.named_buffers()), **b})
            outs.append(flatten({**unreached, **moments}, layers))
        return outs

    flat = per_member(many, weights(params, buffers))
    if skipped:
        return {}, skipped[0]
    return unflatten(flat, layers), None


def _checked_step(runner: Runner, step: Step, batch: Any) -> Any:
    """Move ``batch`` to the model's device and run it; explain integer-input failures."""
    return run_step(runner, step, to_device(batch, runner.device), index=0)


def recompute_bn_buffers(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int = 200,
    tol: float | None = None,
    layers: LayerSelector = None,
    forward: Forward | None = None,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    process_group: ProcessGroup | None = None,
    distributed: bool = True,
    direct: bool = True,
) -> BNBuffers:
    """Recompute BatchNorm running statistics exactly, returning new buffers.

    Runs up to ``num_batches`` batches of ``loader`` through ``model`` statelessly
    (`torch.func.functional_call`, no autograd) and, for each recomputed layer,
    pools every value that reached it over every call as if the whole run were one batch:
    ``running_mean`` is the mean and ``running_var`` the unbiased variance ``N/(N-1)``,
    where ``N`` counts batch times spatial (or sequence) positions. During the run each
    recomputed layer normalises with batch statistics, as in training mode, whatever its
    ``training`` flag says; other modules (dropout, ...) run as the caller left them.

    The model is never changed: not its parameters, buffers, flags or hooks, also not
    when the loader or the forward raises. Apply the result with
    ``model.load_state_dict(new, strict=False)``, `precisebn.apply_bn_buffers`, or
    pass it to ``torch.func.functional_call``.

    Args:
        model: the model; BN layers are subclasses of ``torch.nn.modules.batchnorm._BatchNorm``
            with ``track_running_stats=True``.
        loader: any iterable of batches.
        num_batches: the most batches to use; a shorter loader is fine.
        tol: stop early, at the first pooling point (every 16 batches, from batch 16 on)
            where every recomputed channel's standard errors are within ``tol`` of its
            statistics: ``stderr(mean) / std <= tol`` and ``stderr(var) / var <= tol``.
            ``num_batches`` stays the cap; reaching it first warns, naming the least
            precise layer. The errors assume exchangeable batches: shuffle the loader.
            ``None`` (the default) runs every batch.
        layers: which BN layers to recompute: ``None`` for all, an iterable of module names,
            or a predicate ``(name, module) -> bool``. The others keep their buffers and run
            as the caller left them (a frozen layer in eval mode uses its running statistics).
        forward: ``forward(stateless_model, batch) -> output`` for batches the default
            handling does not fit (dicts, several inputs). The default passes a tensor
            batch, or the first element of a tuple or list.
        params: parameters to use instead of the module's own (e.g. SWA/EMA weights), keyed
            like ``model.named_parameters()``.
        buffers: buffers to use instead of the module's own.
        progress: show a progress bar (needs the optional ``tqdm`` package:
            ``pip install precisebn[progress]``).
        process_group: under ``torch.distributed``, the group whose ranks pool their
            statistics (default: the default group). Every rank of it must call this
            function; each runs its own ``loader``.
        distributed: when ``torch.distributed`` is initialised with more than one rank,
            pool the statistics of every rank of ``process_group`` exactly (float64
            counts, means and second moments, three all-reduces per run), so every rank
            returns the same buffers, those of one process running the union of all
            ranks' batches. ``False`` keeps each rank's own statistics. Without a process
            group there is nothing to pool and this flag has no effect.
        direct: run batches whose shapes were seen before without intercepting BN calls
            (see *How a run works* in the docs): the same numbers, with no Python call per
            BN call. It needs the per-layer counts to follow from the batch's shapes; the
            run checks this on the first two batches of each shape, watches for sizes read
            from tensor values, checks which layers every direct batch ran, and runs one
            direct batch in eight with its counts checked. When a check fails,
            the run starts again with every batch intercepted, with a warning (a loader
            that cannot be iterated twice raises instead). ``False`` intercepts every batch
            from the start.

    Returns:
        BNBuffers: a ``dict`` keyed ``"<layer>.running_mean"`` and
        ``"<layer>.running_var"``, each with the dtype, device and shape of the buffer it
        replaces, sharing no storage with it; ``.num_batches`` and ``.num_samples`` say how
        much data was used (summed over the ranks when pooled). ``.stderr`` holds the
        standard error of every value (keyed and shaped like the buffers), ``.n_eff`` the
        effective number of independent values per layer, and ``.converged`` whether
        ``tol`` was reached (``None`` without ``tol``). A layer no batch reached
        keeps its buffers (with a warning; when pooled, the same on every rank). A batch in
        which a recomputed layer sees a single value per channel (a last batch of one
        sample) is skipped with a warning and not counted.

    Raises:
        TypeError: ``loader`` is not iterable, inputs are integers where floats are
            needed, or the default input handling finds no input in a batch (a dict).
        ValueError: no batches (or every batch skipped), no BN layers to recompute, a lazy
            BN layer, NaN or infinity reaching a recomputed layer (the message names the
            layers and the batches), or a forward that uses the running statistics in a
            way precisebn cannot follow.
        RuntimeError: when pooling, another rank's loader or forward raised (that rank
            raises its own error; no rank waits for it); a check of direct batches failed
            on a loader that cannot be iterated again; or the forward wrote into the
            model's parameters in place.

    Under ``torch.func.vmap`` over stacked weights (``params``/``buffers`` from
    ``torch.func.stack_module_state``, batched in whole or in part), the call runs every
    member of the stack in one pass over ``loader`` and returns the buffers stacked
    (``[K, C]`` outside ``vmap``), each member's those of a call of its own;
    ``.stderr`` holds the members' errors stacked, ``.converged`` whether every member
    converged, and ``.n_eff`` is empty. `precisebn.recompute_bn_buffers_many` does the same
    for a list of models, of different architectures too.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> loader = [torch.randn(32, 3) + 5 for _ in range(10)]
        >>> new = precisebn.recompute_bn_buffers(model, loader)
        >>> sorted(new), new.num_batches, new.num_samples
        (['1.running_mean', '1.running_var'], 10, 320)
        >>> model[1].running_mean.abs().max().item()  # the model is untouched
        0.0
        >>> _ = model.load_state_dict(new, strict=False)
    """
    options = _options(
        num_batches=num_batches,
        tol=tol,
        layers=layers,
        forward=forward,
        progress=progress,
        process_group=process_group,
        distributed=distributed,
        direct=direct,
    )
    if is_transformed(params, buffers):
        return _recompute_transformed(model, loader, params, buffers, options)
    return _recompute_models([(model, params, buffers)], loader, options)[0]


def recompute_bn_buffers_many(
    models: Sequence[nn.Module],
    loader: Iterable[Any],
    *,
    num_batches: int = 200,
    tol: float | None = None,
    layers: LayerSelector = None,
    forward: Forward | None = None,
    params: Sequence[Mapping[str, Tensor] | None] | None = None,
    buffers: Sequence[Mapping[str, Tensor] | None] | None = None,
    progress: bool = False,
    process_group: ProcessGroup | None = None,
    distributed: bool = True,
    direct: bool = True,
) -> list[BNBuffers]:
    """Recompute the BatchNorm statistics of several models in one pass over the data.

    Each batch of ``loader`` is fetched once, moved once to each device the models live
    on, and run through every model in turn; each model's statistics are folded as
    `precisebn.recompute_bn_buffers` folds them, so each result equals that of a call of
    its own (the same numbers, the same purity, the same warnings, prefixed with the
    model's index). The models may differ in architecture (subnets of a supernet, say);
    one model may appear several times with different ``params``. With ``tol=`` the run
    stops when every model has converged; under ``torch.distributed`` the ranks reduce
    every model's statistics in one reduction.

    Args:
        models: the models, at least one.
        loader: any iterable of batches, read once (twice when a check of direct batches
            fails, as in `precisebn.recompute_bn_buffers`).
        params: one mapping (or ``None``) per model: parameters to use instead of its own.
        buffers: one mapping (or ``None``) per model: buffers to use instead of its own.
        num_batches: the most batches to use.
        tol: stop when every model's channels are known to ``tol`` (see
            `precisebn.recompute_bn_buffers`).
        layers: which BN layers to recompute, applied to each model in turn.
        forward: ``forward(stateless_model, batch)``, called for each model in turn.
        progress: show one progress bar for the pass.
        process_group: as for `precisebn.recompute_bn_buffers`.
        distributed: as for `precisebn.recompute_bn_buffers`; every model's statistics go
            in one reduction.
        direct: as for `precisebn.recompute_bn_buffers`, per model: a failed check runs
            only that model again, every batch intercepted.

    Returns:
        One `BNBuffers` per model, in order.

    Raises:
        ValueError: no models, or ``params``/``buffers`` of another length; and the errors
            of `precisebn.recompute_bn_buffers`.
        TypeError: an entry of ``models`` is not a ``torch.nn.Module``.

    Example:
        >>> import torch, precisebn
        >>> def net(width):
        ...     return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width))
        >>> loader = [torch.randn(32, 3) for _ in range(10)]
        >>> small, large = precisebn.recompute_bn_buffers_many([net(4), net(8)], loader)
        >>> small["1.running_var"].shape, large["1.running_var"].shape, large.num_batches
        (torch.Size([4]), torch.Size([8]), 10)
    """
    models = list(models)
    if not models:
        raise ValueError("models is empty: pass at least one model")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{i}] is a {type(model).__name__}, not a torch.nn.Module")
    per_params = _per_model("params", params, len(models))
    per_buffers = _per_model("buffers", buffers, len(models))
    options = _options(
        num_batches=num_batches,
        tol=tol,
        layers=layers,
        forward=forward,
        progress=progress,
        process_group=process_group,
        distributed=distributed,
        direct=direct,
    )
    specs = list(zip(models, per_params, per_buffers, strict=True))
    return _recompute_models(specs, loader, options)


class _Options(NamedTuple):
    num_batches: int
    tol: float | None
    layers: LayerSelector
    forward: Forward | None
    progress: bool
    group: ProcessGroup | None
    direct: bool


def _options(
    *,
    num_batches: int,
    tol: float | None,
    layers: LayerSelector,
    forward: Forward | None,
    progress: bool,
    process_group: ProcessGroup | None,
    distributed: bool,
    direct: bool,
) -> _Options:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    group = reduction_group(process_group) if distributed else None
    return _Options(num_batches, check_tol(tol), layers, forward, progress, group, direct)


Spec = tuple[nn.Module, Mapping[str, Tensor] | None, Mapping[str, Tensor] | None]
"""A model of a run, with the parameters and buffers to use instead of its own."""


def _recompute_models(
    specs: list[Spec], loader: Iterable[Any], options: _Options
) -> list[BNBuffers]:
    """One pass over ``loader`` for every model of ``specs``; a result per model."""
    runners = [
        Runner(model, layers=options.layers, params=p, buffers=b, forward=options.forward)
        for model, p, b in _bindable(specs)
    ]
    group = options.group
    stopper = Stopper(options.tol, group=group) if options.tol is not None else None
    try:
        outcomes = accumulate(
            runners,
            loader,
            num_batches=options.num_batches,
            progress=options.progress,
            direct=options.direct,
            stopper=stopper,
        )
    except Exception as error:
        # The other ranks raise too, instead of waiting for this one; unless the error is
        # the group's own (a check under tol= found another rank failed): all ranks have it.
        if group is not None and not isinstance(error, GroupError):
            abandon(tagged([init(r.bn_buffers) for r in runners]), group=group)
        raise
    pooled = [(o.stats, o.spreads, o.batches, o.samples) for o in outcomes]
    if group is not None:
        reduced = reduce_run(
            tagged([o.stats for o in outcomes]),
            batches=sum(o.batches for o in outcomes),
            samples=sum(o.samples for o in outcomes),
            group=group,
            spreads=tagged([o.spreads for o in outcomes]),
            models=[(o.batches, o.samples) for o in outcomes],
        )
        count = len(outcomes)
        pooled = [
            (stats, spreads, used, samples)
            for stats, spreads, (used, samples) in zip(
                untagged(reduced.stats, count),
                untagged(reduced.spreads, count),
                reduced.models,
                strict=True,
            )
        ]
    results = []
    for i, (runner, outcome, (stats, spreads, used, samples)) in enumerate(
        zip(runners, outcomes, pooled, strict=True)
    ):
        with _warnings_of(None if len(runners) == 1 else i):
            results.append(_result(runner, outcome, stats, spreads, used, samples, options=options))
    return results


def _result(
    runner: Runner,
    outcome: Outcome,
    stats: Stats,
    spreads: Spreads,
    used: int,
    samples: int,
    *,
    options: _Options,
) -> BNBuffers:
    """One model's buffers from its (reduced) statistics."""
    if used == 0:
        where = " on any rank" if options.group else ""
        if outcome.skipped:
            raise ValueError(f"every batch was skipped{where}: {outcome.skipped[0][1]}")
        raise ValueError(f"the loader yielded no batches{where}")
    logger.info(
        "recomputed %d BatchNorm layers over %d batches (%d samples)", len(stats), used, samples
    )
    new = finalize(stats, like=runner.bn_buffers)
    devices = {key: t.device for key, t in runner.bn_buffers.items()}
    converged = None
    tol = options.tol
    if tol is not None:
        found = worst(stats, spreads)
        converged = reached(found, used=used, tol=tol)
        if not converged:
            warn_not_converged(found, tol=tol, batches=used)
    result = BNBuffers(new, num_batches=used, num_samples=samples, converged=converged)
    result._errors = ErrorsLater(compute=lambda: standard_errors(stats, spreads, devices=devices))
    return result


@contextlib.contextmanager
def _warnings_of(model: int | None) -> Iterator[None]:
    """Prefix the warnings raised inside with the model's index (none: no prefix)."""
    if model is None:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        warnings.warn(f"model {model}: {warning.message}", warning.category, stacklevel=5)


def _bindable(specs: list[Spec]) -> list[Spec]:
    """``specs`` with a module that appears again replaced by a skeleton copy: the run binds
    every model at once, and one module can hold one binding only. A skeleton has the
    module's structure, attributes and hooks, and meta tensors in place of its own, so it
    takes every parameter and buffer from the spec (the module's own where not given)."""
    seen: set[int] = set()
    out: list[Spec] = []
    for model, params, buffers in specs:
        if id(model) not in seen:
            seen.add(id(model))
            out.append((model, params, buffers))
            continue
        full_params = {**dict(model.named_parameters()), **(params or {})}
        full_buffers = {**dict(model.named_buffers()), **(buffers or {})}
        out.append((_skeleton(model), full_params, full_buffers))
    return out


def _skeleton(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(
            f"one model appears several times, and a copy of its structure to bind the "
            f"second set of weights to failed ({type(error).__name__}: {error}); pass "
            "separate models"
        ) from error


def _per_model(
    name: str, values: Sequence[Mapping[str, Tensor] | None] | None, count: int
) -> list[Mapping[str, Tensor] | None]:
    if values is None:
        return [None] * count
    if isinstance(values, Mapping) or len(values) != count:
        raise ValueError(
            f"{name} must hold one mapping (or None) per model: {count} for {count} models"
        )
    return list(values)


# --------------------------------------------------------------------- under torch.func


def _recompute_transformed(
    model: nn.Module,
    loader: Iterable[Any],
    params: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor] | None,
    options: _Options,
) -> BNBuffers:
    """`recompute_bn_buffers` for transformed weights: every member in one pass."""
    results: list[BNBuffers] = []

    def many(members: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        specs: list[Spec] = [(model, p, b) for p, b in [split_weights(m) for m in members]]
        results[:] = _recompute_models(specs, loader, options)
        return [list(new.values()) for new in results]

    outputs = per_member(many, weights(params, buffers))
    first = results[0]
    converged = None if options.tol is None else all(bool(r.converged) for r in results)
    out = BNBuffers(
        dict(zip(first, outputs, strict=True)),
        num_batches=first.num_batches,
        num_samples=first.num_samples,
        converged=converged,
    )
    if len(results) == 1:
        out._errors = first._errors
    else:
        keys = list(first)
        out._errors = ErrorsLater(
            compute=lambda: ({k: torch.stack([r.stderr[k] for r in results]) for k in keys}, {})
        )
    return out
