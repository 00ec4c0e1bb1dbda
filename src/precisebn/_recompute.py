"""recompute_bn_buffers: find layers, run batches statelessly, fold moments, produce buffers."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from precisebn._batches import (
    BatchLayoutError,
    Forward,
    integer_leaves,
    leading_size,
    place,
    to_device,
)
from precisebn._buffers import BNBuffers, ErrorsLater
from precisebn._capture import (
    RecordList,
    Runner,
    Step,
    check_followed,
    collect,
    one_value_message,
)
from precisebn._converge import Stopper, check_tol, warn_not_converged, worst
from precisebn._direct import (
    Known,
    Signatures,
    Verifier,
    known_from,
    mismatch,
    verify,
    watch_values,
)
from precisebn._distributed import GroupError, abandon, reduce_run, reduction_group
from precisebn._fold import BlockFold
from precisebn._layers import LayerSelector
from precisebn._moments import Stats, finalize, init, merge
from precisebn._stderr import MIN_BATCHES, Spreads, standard_errors

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
    (the state is returned unchanged).

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> stats = precisebn.init(precisebn.bn_buffers(model))
        >>> for batch in torch.randn(5, 10, 3):
        ...     stats = precisebn.update(stats, model, batch)
        >>> stats["1"].count.item()
        50.0
    """
    runner = Runner(model, layers=list(stats), params=params, buffers=buffers, forward=forward)
    with torch.no_grad():
        sink = RecordList()
        runner.within(lambda step: _checked_step(runner, step, batch, index=0), sink=sink)
    check_followed(runner.reads, {r.call.layer for r in sink.records})
    if sink.degenerate_calls:
        call, shape = sink.degenerate_calls[0]
        warnings.warn(
            f"the batch was skipped: {one_value_message(call, shape)}", UserWarning, stacklevel=2
        )
        return dict(stats)
    return merge(stats, collect(sink.records))


def _checked_step(runner: Runner, step: Step, batch: Any, *, index: int) -> Any:
    """Move ``batch`` to the model's device and run it; explain integer-input failures."""
    return _run_step(runner, step, to_device(batch, runner.device), index=index)


def _run_step(runner: Runner, step: Step, batch: Any, *, index: int) -> Any:
    """Run ``batch`` (on the model's device); explain integer-input failures."""
    try:
        return step(batch)
    except BatchLayoutError:
        raise
    except (RuntimeError, TypeError) as error:
        ints = integer_leaves(batch)
        if ints and runner.floating_params:
            raise TypeError(
                f"batch {index}: the forward failed on non-floating inputs "
                f"({sorted(set(map(str, ints)))}) while the model's parameters are floating "
                "point; convert the inputs (e.g. forward=lambda model, b: model(b[0].float())). "
                f"Original error: {error}"
            ) from error
        raise


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
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    tol = check_tol(tol)
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    group = reduction_group(process_group) if distributed else None
    stopper = Stopper(tol, group=group) if tol is not None else None
    try:
        run = _accumulate(
            runner,
            loader,
            num_batches=num_batches,
            progress=progress,
            direct=direct,
            stopper=stopper,
        )
    except Exception as error:
        # The other ranks raise too, instead of waiting for this one; unless the error is
        # the group's own (a check under tol= found another rank failed): all ranks have it.
        if group is not None and not isinstance(error, GroupError):
            abandon(init(runner.bn_buffers), group=group)
        raise
    stats, spreads, used, samples = run.stats, run.spreads, run.batches, run.samples
    if group is not None:
        reduced = reduce_run(stats, batches=used, samples=samples, group=group, spreads=spreads)
        stats, spreads, used, samples = reduced[:4]
    if used == 0:
        where = " on any rank" if group else ""
        if run.skipped:
            raise ValueError(f"every batch was skipped{where}: {run.skipped[0][1]}")
        raise ValueError(f"the loader yielded no batches{where}")
    logger.info(
        "recomputed %d BatchNorm layers over %d batches (%d samples)", len(stats), used, samples
    )
    new = finalize(stats, like=runner.bn_buffers)
    devices = {key: t.device for key, t in runner.bn_buffers.items()}
    converged = None
    if tol is not None:
        found = worst(stats, spreads)
        converged = used >= MIN_BATCHES and found is not None and found.error <= tol
        if not converged:
            warn_not_converged(found, tol=tol, batches=used)
    result = BNBuffers(new, num_batches=used, num_samples=samples, converged=converged)
    result._errors = ErrorsLater(compute=lambda: standard_errors(stats, spreads, devices=devices))
    return result


class _Run(NamedTuple):
    stats: Stats
    spreads: Spreads
    batches: int
    samples: int
    skipped: list[tuple[int, str]]
    """Batches skipped for one value per channel: loader index and why."""


class _RestartError(Exception):
    """A check of direct batches failed: the attempt's statistics cannot be trusted."""


def _accumulate(
    runner: Runner,
    loader: Iterable[Any],
    *,
    num_batches: int,
    progress: bool,
    direct: bool,
    stopper: Stopper | None,
) -> _Run:
    """Fold up to ``num_batches`` batches of ``loader``, starting again if direct batches
    turn out to be unsafe."""
    batches = _iterate(loader)
    expected = _expected_batches(loader, num_batches)
    try:
        run = _attempt(
            runner, batches, expected=expected, progress=progress, direct=direct, stopper=stopper
        )
    except _RestartError as failed:
        if batches is loader:  # an iterator: what was read is gone
            raise RuntimeError(
                f"a check of direct batches failed: {failed}. The loader is an iterator that "
                "cannot be read again, so the run cannot start over with every batch "
                "intercepted: pass direct=False (or a loader that can be iterated twice, "
                "such as a list or a DataLoader)"
            ) from None
        warnings.warn(
            f"a check of direct batches failed: {failed}. The run started again with every "
            "batch intercepted; pass direct=False to skip the first attempt",
            UserWarning,
            stacklevel=3,
        )
        run = _attempt(
            runner,
            _iterate(loader),
            expected=expected,
            progress=progress,
            direct=False,
            stopper=stopper,
        )
    if run.skipped:
        shown = "; ".join(f"batch {i}: {why}" for i, why in run.skipped[:3])
        more = f" and {len(run.skipped) - 3} more" if len(run.skipped) > 3 else ""
        warnings.warn(
            f"{len(run.skipped)} batch(es) skipped ({shown}{more}); their values are not "
            "pooled, because later layers would have seen degenerate inputs. A last batch "
            "of one sample is the usual cause: drop_last=True avoids it",
            UserWarning,
            stacklevel=3,
        )
    return run


def _iterate(loader: Iterable[Any]) -> Iterator[Any]:
    try:
        return iter(loader)
    except TypeError:
        raise TypeError(
            f"loader must be an iterable of batches, got {type(loader).__name__}"
        ) from None


def _attempt(
    runner: Runner,
    batches: Iterator[Any],
    *,
    expected: int,
    progress: bool,
    direct: bool,
    stopper: Stopper | None,
) -> _Run:
    """One pass over up to ``expected`` batches (fewer when ``stopper`` says the statistics
    are precise enough); raises `_RestartError` when a check of direct batches fails."""
    chosen: Iterator[Any] = itertools.islice(batches, expected)
    if progress:
        chosen = _progress_bar(chosen, total=expected)
    fold = BlockFold(list(runner.layers), runner.bn_buffers, max_batches=max(expected, 1))
    signatures = Signatures(enabled=direct and runner.live is not None)
    verifier = Verifier()
    live, calls = runner.live, runner.calls
    runner.reads.clear()

    def intercepted(
        step: Step, batch: Any, key: Any, known: Known | None, index: int
    ) -> str | None:
        """Run a batch with every BN call intercepted; why it was skipped, if it was."""
        runner.intercept("intercept")  # the tags hold the caller's values again
        calls.zero_()
        version = runner.statistics_version()
        if signatures.watching(key) and known is None:
            with watch_values(runner.counters) as watch:
                _run_step(runner, step, batch, index=index)
            dependent = watch.found is not None
        else:
            _run_step(runner, step, batch, index=index)
            dependent = False
        if runner.statistics_version() != version:
            raise ValueError(_written_message(runner.written_layers() or list(runner.reads)))
        if fold.degenerate_call is not None:
            call, shape = fold.degenerate_call
            fold.discard_batch()
            return one_value_message(call, shape)
        observed = fold.end_batch(index)
        if runner.reads:
            signatures.enabled = False
        if key is not None:
            signatures.observe(key, known_from(observed, calls), value_dependent=dependent)
        return None

    def loop(step: Step) -> _Run:
        used = samples = 0
        skipped: list[tuple[int, str]] = []
        for index, raw in enumerate(chosen):
            batch, leaves, spec = place(raw, runner.device)
            key, known = signatures.lookup(leaves, spec)
            if known is not None and live is not None:
                _direct_batch(runner, step, batch, known, index=index, check=verifier.due())
                fold.end_direct(live, known.entries, known.factors, index)
            else:
                why = intercepted(step, batch, key, known, index)
                if why is not None:
                    skipped.append((index, why))
                    continue
            used, samples = used + 1, samples + leading_size(leaves)
            pooled = stopper is not None and fold.k == 0
            if pooled and stopper.at_pool(fold, batches=used, samples=samples):  # type: ignore[union-attr]
                break
        else:
            if stopper is not None:  # under torch.distributed: until every rank stops
                stopper.finish(fold, batches=used, samples=samples)
        check_followed(runner.reads, fold.recorded)
        return _Run({}, {}, used, samples, skipped)

    with torch.no_grad():
        run = runner.within(loop, sink=fold)
    return run._replace(stats=fold.result(), spreads=fold.spreads())


def _direct_batch(
    runner: Runner, step: Step, batch: Any, known: Known, *, index: int, check: bool
) -> None:
    """Run a batch directly: the kernels update the zeroed private statistics themselves.

    Raises `_RestartError` when the layers ran otherwise than ``known`` says, or, in a
    checked batch (``check``), when a call saw other counts or read the statistics.
    """
    assert runner.live is not None
    runner.intercept("check" if check else "direct")  # "intercept" again for the next
    runner.live.zero_()
    runner.calls.zero_()
    if check:
        runner.checked.clear()
    _run_step(runner, step, batch, index=index)
    if not torch.equal(runner.calls, known.calls):
        seen = Known(known.entries, known.factors, runner.calls.clone())
        problem: str | None = mismatch(known, seen, list(runner.layers))
    elif check:
        problem = verify(known, runner.checked, list(runner.layers), runner.reads)
    else:
        return
    if problem is not None:
        raise _RestartError(f"in batch {index}, {problem}")


def _written_message(layers: list[str]) -> str:
    named = ", ".join(repr(name or "<model>") for name in layers) or "(unknown)"
    return (
        f"the running statistics of BatchNorm layer(s) {named} were written outside their "
        "batch_norm call, through a tensor derived from them that precisebn could not "
        "follow (for instance running_mean.view(...) passed to batch_norm); precisebn follows "
        "batch_norm calls on a layer's own running_mean and running_var or on basic slices "
        "of them (running_mean[:c])"
    )


def _expected_batches(loader: Iterable[Any], num_batches: int) -> int:
    try:
        return min(len(loader), num_batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches


def _progress_bar(batches: Iterable[Any], *, total: int) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True needs the tqdm package: pip install 'precisebn[progress]'"
        ) from None
    return iter(tqdm(batches, total=total, desc="precise BN", unit="batch"))
