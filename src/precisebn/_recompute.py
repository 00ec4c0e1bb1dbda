"""recompute_bn_buffers: find layers, run batches statelessly, fold moments, produce buffers."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from precisebn._batches import Forward, integer_leaves, leading_size, place, to_device
from precisebn._buffers import BNBuffers
from precisebn._capture import RecordList, Runner, Step, collect
from precisebn._direct import Known, Signatures, watch_values
from precisebn._distributed import abandon, reduce_run, reduction_group
from precisebn._fold import BlockFold
from precisebn._layers import LayerSelector
from precisebn._moments import Stats, finalize, init, merge

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
    run without autograd; see `precisebn.capture` for the forward's semantics.

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
    return merge(stats, collect(sink.records))


def _checked_step(runner: Runner, step: Step, batch: Any, *, index: int) -> Any:
    """Move ``batch`` to the model's device and run it; explain integer-input failures."""
    return _run_step(runner, step, to_device(batch, runner.device), index=index)


def _run_step(runner: Runner, step: Step, batch: Any, *, index: int) -> Any:
    """Run ``batch`` (on the model's device); explain integer-input failures."""
    try:
        return step(batch)
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
            run checks this on the first two batches of each shape, watches for sizes
            read from tensor values, and checks which layers every direct batch ran.
            Pass ``False`` for a forward that changes a layer's input size between batches
            of equal shapes on its own, for instance by a random resize drawn with Python's
            ``random`` module.

    Returns:
        BNBuffers: a ``dict`` keyed ``"<layer>.running_mean"`` and
        ``"<layer>.running_var"``, each with the dtype, device and shape of the buffer it
        replaces, sharing no storage with it; ``.num_batches`` and ``.num_samples`` say how
        much data was used (summed over the ranks when pooled). A layer no batch reached
        keeps its buffers (with a warning; when pooled, the same on every rank).

    Raises:
        TypeError: ``loader`` is not iterable, or inputs are integers where floats are needed.
        ValueError: no batches, no BN layers to recompute, a lazy BN layer, or a layer that
            sees a single value per channel.
        RuntimeError: when pooling, another rank's loader or forward raised (that rank
            raises its own error; no rank waits for it).

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
    runner = Runner(model, layers=layers, params=params, buffers=buffers, forward=forward)
    group = reduction_group(process_group) if distributed else None
    try:
        stats, used, samples = _accumulate(
            runner, loader, num_batches=num_batches, progress=progress, direct=direct
        )
    except Exception:
        if group is not None:  # the other ranks raise too, instead of waiting for this one
            abandon(init(runner.bn_buffers), group=group)
        raise
    if group is not None:
        stats, used, samples = reduce_run(stats, batches=used, samples=samples, group=group)
    if used == 0:
        raise ValueError("the loader yielded no batches" + (" on any rank" if group else ""))
    logger.info(
        "recomputed %d BatchNorm layers over %d batches (%d samples)", len(stats), used, samples
    )
    return BNBuffers(finalize(stats, like=runner.bn_buffers), num_batches=used, num_samples=samples)


def _accumulate(
    runner: Runner, loader: Iterable[Any], *, num_batches: int, progress: bool, direct: bool
) -> tuple[Stats, int, int]:
    """Fold up to ``num_batches`` batches of ``loader``: the state, batches and samples used."""
    try:
        batches = iter(loader)
    except TypeError:
        raise TypeError(
            f"loader must be an iterable of batches, got {type(loader).__name__}"
        ) from None
    expected = _expected_batches(loader, num_batches)
    chosen: Iterator[Any] = itertools.islice(batches, num_batches)
    if progress:
        chosen = _progress_bar(chosen, total=expected)
    fold = BlockFold(
        list(runner.layers),
        runner.bn_buffers,
        max_batches=max(expected, 1),
        momenta=runner.momenta,
    )
    signatures = Signatures(enabled=direct and runner.momenta is not None)
    live, calls = runner.live, runner.calls

    def loop(step: Step) -> tuple[int, int]:
        used = samples = 0
        for index, raw in enumerate(chosen):
            batch, leaves, spec = place(raw, runner.device)
            used, samples = index + 1, samples + leading_size(leaves)
            key, known = signatures.lookup(leaves, spec)
            if known is not None and live is not None:
                # Direct: the kernels update the zeroed live buffers themselves.
                live.zero_()
                calls.zero_()
                runner.intercept(False)  # on again for the next intercepted batch
                _run_step(runner, step, batch, index=index)
                if torch.equal(calls, known.calls):
                    fold.end_direct(live, known.counts)
                    continue
                signatures.reject(key)  # a layer skipped or reused: run it intercepted
            runner.intercept(True)
            calls.zero_()
            if signatures.watching(key):
                with watch_values(runner.counters) as watch:
                    _run_step(runner, step, batch, index=index)
                dependent = watch.found is not None
            else:
                _run_step(runner, step, batch, index=index)
                dependent = False
            signatures.observe(key, Known(tuple(fold.counts), calls), value_dependent=dependent)
            fold.end_batch()
        return used, samples

    with torch.no_grad():
        used, samples = runner.within(loop, sink=fold)
    return fold.result(), used, samples


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
