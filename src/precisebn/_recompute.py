"""recompute_bn_buffers: a loop over recorders, then a reduction, then new buffers.

One pass over the loader serves every model of a run: each batch is fetched once, placed
once per device, and run through each model's recorder into that model's fold. With
several models, batches are held up to a pooling point (or `HOLD_BYTES`) and run model by
model, so that each model's weights stay in the cache. `recompute_bn_buffers` is the run
of one model, and under ``torch.func.vmap`` the run of the members of a stack of weights.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from precisebn._batches import Forward, Placed, leading_size, place
from precisebn._binding import Resolved, Weights, bind
from precisebn._buffers import RunInfo
from precisebn._compiled import Compiled, cached, unsupported
from precisebn._converge import (
    Stopper,
    check_tol,
    reached,
    warn_not_converged,
    worst,
)
from precisebn._distributed import (
    GroupError,
    ModelPart,
    abandon,
    reduce_models,
    reduction_group,
    tagged,
)
from precisebn._fold import BLOCK, Fold
from precisebn._layers import LayerSelector
from precisebn._moments import Stats, finalize, from_batch, init
from precisebn._recorder import Recorder, check_followed
from precisebn._stderr import standard_errors
from precisebn._vmap import check_unbatched, is_transformed, per_member, split_weights
from precisebn._vmap import weights as weights_of

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "HOLD_BYTES",
    "Result",
    "recompute_bn_buffers",
    "recompute_bn_buffers_many",
    "run_model",
    "run_models",
    "run_options",
]

logger = logging.getLogger("precisebn")

HOLD_BYTES = 64 * 2**20
"""With several models, the most bytes of batches held before they are run model by model."""


Result = tuple[dict[str, Tensor], RunInfo]


@overload
def recompute_bn_buffers(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int = ...,
    tol: float | None = ...,
    layers: LayerSelector = ...,
    forward: Forward | None = ...,
    params: Mapping[str, Tensor] | None = ...,
    buffers: Mapping[str, Tensor] | None = ...,
    progress: bool = ...,
    process_group: ProcessGroup | None = ...,
    distributed: bool = ...,
    compile: bool | Mapping[str, Any] | None = ...,
    return_info: Literal[False] = ...,
) -> dict[str, Tensor]: ...


@overload
def recompute_bn_buffers(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int = ...,
    tol: float | None = ...,
    layers: LayerSelector = ...,
    forward: Forward | None = ...,
    params: Mapping[str, Tensor] | None = ...,
    buffers: Mapping[str, Tensor] | None = ...,
    progress: bool = ...,
    process_group: ProcessGroup | None = ...,
    distributed: bool = ...,
    compile: bool | Mapping[str, Any] | None = ...,
    return_info: Literal[True],
) -> Result: ...


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
    compile: bool | Mapping[str, Any] | None = None,
    return_info: bool = False,
) -> dict[str, Tensor] | Result:
    """Recompute BatchNorm running statistics exactly, returning new buffers.

    Runs up to ``num_batches`` batches of ``loader`` through ``model`` statelessly
    (`torch.func.functional_call`, no autograd) and, for each recomputed layer,
    pools every value that reached it over every call as if the whole run were one batch:
    ``running_mean`` is the mean and ``running_var`` the unbiased variance ``N/(N-1)``,
    where ``N`` counts batch times spatial (or sequence) positions. Every batch-norm call
    is intercepted, so ``N`` is read from the input each call really received. During the
    run each recomputed layer normalises with batch statistics, as in training mode,
    whatever its ``training`` flag says; other modules (dropout, ...) run as the caller
    left them.

    The model is never changed: not its parameters, buffers, flags or hooks, also not
    when the loader or the forward raises. Apply the result with
    ``model.load_state_dict(new, strict=False)``, `precisebn.apply_bn_buffers`, or
    pass it to ``torch.func.functional_call``.

    Args:
        model: the model; BN layers are subclasses of ``torch.nn.modules.batchnorm._BatchNorm``
            with ``track_running_stats=True``.
        loader: any iterable of batches, read once.
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
        compile: run the batches through one ``torch.compile``d graph that returns only
            the statistics (see *How a run works*): ``None`` (the default) when the model
            or one of its submodules is compiled, ``True`` always, a mapping for the
            keyword arguments of ``torch.compile`` (``backend``, ``mode``, ...), ``False``
            never. Counts are read from the shapes each graph computes with; a forward the
            graph cannot stand for (a slice of the statistics, a read of them outside the
            batch-norm call, a graph break) runs eagerly from that batch on, with one info
            log saying why. Graphs are kept per model, layers and forward function, so a
            repeated run compiles once. Compiled runs need torch 2.8 or newer; older
            releases run eagerly, with an info log.
        return_info: also return a `RunInfo`: how many batches and samples were used,
            whether ``tol`` was reached, and the standard errors.

    Returns:
        A ``dict`` keyed ``"<layer>.running_mean"`` and ``"<layer>.running_var"``, each
        with the dtype, device and shape of the buffer it replaces, sharing no storage with
        it; with ``return_info``, the pair ``(buffers, info)``. A layer no batch reached
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
            raises its own error; no rank waits for it); or the forward wrote into the
            model's parameters in place.

    Under ``torch.func.vmap`` over stacked weights (``params``/``buffers`` from
    ``torch.func.stack_module_state``, batched in whole or in part), the call runs every
    member of the stack in one pass over ``loader`` and returns the buffers stacked
    (``[K, C]`` outside ``vmap``), each member's those of a call of its own. With
    ``return_info`` the info is the stack's, not batched (``vmap(..., out_dims=(0, None))``):
    its ``stderr`` holds the members' errors stacked, ``converged`` says whether every
    member converged, and ``n_eff`` is empty. `precisebn.recompute_bn_buffers_many` does the same
    for a list of models, of different architectures too.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> loader = [torch.randn(32, 3) + 5 for _ in range(10)]
        >>> new, info = precisebn.recompute_bn_buffers(model, loader, return_info=True)
        >>> sorted(new), info.num_batches, info.num_samples
        (['1.running_mean', '1.running_var'], 10, 320)
        >>> model[1].running_mean.abs().max().item()  # the model is untouched
        0.0
        >>> _ = model.load_state_dict(new, strict=False)
    """
    options = run_options(
        num_batches=num_batches,
        tol=tol,
        layers=layers,
        forward=forward,
        progress=progress,
        process_group=process_group,
        distributed=distributed,
        compile=compile,
        return_info=return_info,
    )
    result = run_model(model, loader, Weights(params, buffers), options)
    return result if return_info else result[0]


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
    compile: bool | Mapping[str, Any] | None = None,
    return_info: bool = False,
) -> list[dict[str, Tensor]] | list[Result]:
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
        loader: any iterable of batches, read once.
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
        compile: as for `precisebn.recompute_bn_buffers`, per model.
        return_info: return ``(buffers, info)`` per model (see `precisebn.RunInfo`).

    Returns:
        One buffer dict (or ``(buffers, info)`` pair) per model, in order.

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
        >>> small["1.running_var"].shape, large["1.running_var"].shape
        (torch.Size([4]), torch.Size([8]))
    """
    models = list(models)
    if not models:
        raise ValueError("models is empty: pass at least one model")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{i}] is a {type(model).__name__}, not a torch.nn.Module")
    per_params = _per_model("params", params, len(models))
    per_buffers = _per_model("buffers", buffers, len(models))
    options = run_options(
        num_batches=num_batches,
        tol=tol,
        layers=layers,
        forward=forward,
        progress=progress,
        process_group=process_group,
        distributed=distributed,
        compile=compile,
        return_info=return_info,
    )
    specs = [(m, Weights(p, b)) for m, p, b in zip(models, per_params, per_buffers, strict=True)]
    results = run_models(specs, loader, options)
    return results if return_info else [new for new, _ in results]


Transform = Callable[[Mapping[str, Tensor], Stats, int], Stats]
"""``transform(buffers, stats, samples) -> stats``: the model's current buffers, the pooled
statistics, and how many samples they come from."""


class _Options(NamedTuple):
    num_batches: int
    tol: float | None
    layers: LayerSelector
    forward: Forward | None
    progress: bool
    group: ProcessGroup | None
    errors: bool
    """Whether the run estimates standard errors (for ``tol`` or the info)."""
    compile: bool | Mapping[str, Any] | None
    transform: Transform | None = None
    """What becomes of each model's pooled statistics before they are buffers (the source
    prior of test-time adaptation)."""


def run_options(
    *,
    num_batches: int,
    tol: float | None,
    layers: LayerSelector,
    forward: Forward | None,
    progress: bool,
    process_group: ProcessGroup | None,
    distributed: bool,
    compile: bool | Mapping[str, Any] | None,
    return_info: bool,
) -> _Options:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    tol = check_tol(tol)
    group = reduction_group(process_group) if distributed else None
    errors = return_info or tol is not None
    if not (compile is None or isinstance(compile, bool | Mapping)):
        raise TypeError(f"compile must be None, a bool or a mapping, got {compile!r}")
    return _Options(num_batches, tol, layers, forward, progress, group, errors, compile)


Spec = tuple[nn.Module, Weights]
"""A model of a run, with the parameters and buffers to use instead of its own."""


class _ModelPass:
    """One model's part of a pass: its recorder, the weights it runs on, and its fold.

    A compiled pass runs its batches through the model's compiled graph (`precisebn._compiled`)
    on private copies of its buffers; from a batch the graph cannot stand for on, it runs
    each batch eagerly, in a binding of its own over those copies.
    """

    def __init__(
        self,
        recorder: Recorder,
        weights: Weights,
        *,
        expected: int,
        errors: bool,
        compile: bool | Mapping[str, Any] | None = False,
    ) -> None:
        self.recorder = recorder
        binding = recorder.binding
        self.resolved: Resolved = binding.resolve(weights)
        self.device = self.resolved.device
        rows = min(BLOCK, expected)
        self.fold = recorder.fold(self.resolved, rows=rows, errors=errors, start=None, check=True)
        self.used = self.samples = 0
        self.skipped: list[tuple[int, str]] = []
        self.compiled: Compiled | None = None
        if compile or (compile is None and binding.compiled_parts):
            why = unsupported()
            if why is not None:
                logger.info("precise BN runs eagerly: %s", why)
            else:
                options = compile if isinstance(compile, Mapping) else {}
                self.compiled = cached(binding, recorder.forward, options)
                self.state = self.compiled.state(self.resolved)
        self.reads: dict[str, str] = {}
        """Reads of the statistics outside a batch-norm call in the eager batches of a
        compiled pass."""

    def run(self, model: nn.Module | None, placed: Placed, index: int) -> None:
        why: str | None
        if self.compiled is not None:
            out = self.compiled.run(self.state, placed.batch)
            if isinstance(out, str):
                logger.info("precise BN runs eagerly from batch %d on: %s", index, out)
                self.compiled = None
            elif out.degenerate is None:
                extras = [(i, from_batch(n, m[0], m[1])) for i, m, n in out.extras]
                self.fold.add_row(out.row, out.counts, extras, index)
        if self.compiled is not None:
            why = out.degenerate  # type: ignore[union-attr]
        elif model is None:
            why = self._alone(placed.batch, index)
        else:
            _, why = self.recorder.run_batch(model, placed.batch, self.fold, index=index)
        if why is not None:
            self.skipped.append((index, why))
            return
        self.used += 1
        self.samples += leading_size(placed.leaves)

    def _alone(self, batch: Any, index: int) -> str | None:
        """One batch eagerly, bound over the compiled pass's private buffers (which so go on
        holding what the forward wrote, as a copy of the model would)."""
        binding = self.recorder.binding
        weights = Weights(self.resolved.weights.params, self.state.buffers)
        resolved = binding.resolve(weights, owned=True)

        def body(models: list[nn.Module]) -> str | None:
            return self.recorder.run_batch(models[0], batch, self.fold, index=index)[1]

        why = bind([(binding, resolved, self.fold)], body)
        self.reads.update(binding.reads)
        return why

    def folded(self) -> ModelPart:
        """What this model's part of the pass folded (standard-error sums if it keeps them)."""
        spreads = self.fold.spreads() if self.fold.errors else None
        return ModelPart(self.fold.result(), spreads, self.used, self.samples)


def run_model(
    model: nn.Module, loader: Iterable[Any], weights: Weights, options: _Options
) -> Result:
    """One model's run: a pass of its own, or of every member of transformed weights."""
    if is_transformed(*weights):
        return run_stack(model, loader, weights, options)
    return run_models([(model, weights)], loader, options)[0]


def run_models(specs: list[Spec], loader: Iterable[Any], options: _Options) -> list[Result]:
    """One pass over ``loader`` for every model of ``specs``; a result per model."""
    passes = []
    expected = _expected_batches(loader, options.num_batches)
    for model, weights in _bindable(specs):
        recorder = Recorder(model, layers=options.layers, forward=options.forward)
        passes.append(
            _ModelPass(
                recorder,
                weights,
                expected=max(expected, 1),
                errors=options.errors,
                compile=options.compile,
            )
        )
    group = options.group
    stopper = Stopper(options.tol, group=group) if options.tol is not None else None
    try:
        _pass(
            passes, _iterate(loader), expected=expected, progress=options.progress, stopper=stopper
        )
    except Exception as error:
        # The other ranks raise too, instead of waiting for this one; unless the error is
        # the group's own (a check under tol= found another rank failed): all ranks have it.
        if group is not None and not isinstance(error, GroupError):
            abandon(
                tagged([init(p.recorder.binding.bn_buffers(p.resolved)) for p in passes]),
                group=group,
            )
        raise
    parts = [p.folded() for p in passes]
    for i, p in enumerate(passes):
        _warn_skipped(p.skipped, model=None if len(passes) == 1 else i)
    if group is not None:
        parts, _ = reduce_models(parts, group=group)
    results = []
    for i, (p, part) in enumerate(zip(passes, parts, strict=True)):
        with _warnings_of(None if len(passes) == 1 else i):
            results.append(_result(p, part, options=options))
    return results


def _pass(
    passes: list[_ModelPass],
    batches: Iterator[Any],
    *,
    expected: int,
    progress: bool,
    stopper: Stopper | None,
) -> None:
    """Up to ``expected`` batches through every model (fewer batches when ``stopper`` says
    every model's statistics are precise enough)."""
    chosen: Iterator[Any] = itertools.islice(batches, expected)
    if progress:
        chosen = _progress_bar(chosen, total=expected)
    devices = list(dict.fromkeys(p.device for p in passes))
    eager = [p for p in passes if p.compiled is None]

    def loop(models: list[nn.Module]) -> None:
        held = 0
        pending: list[tuple[int, dict[torch.device, Placed]]] = []
        bound = dict(zip(map(id, eager), models, strict=True))

        def run_pending() -> None:
            # Model by model over the held batches: each model's weights stay in the cache.
            for p in passes:
                for index, placed in pending:
                    p.run(bound.get(id(p)), placed[p.device], index)
            pending.clear()

        for index, raw in enumerate(chosen):
            placed = {device: place(raw, device) for device in devices}
            if index == 0:
                check_unbatched(next(iter(placed.values())).leaves)
            pending.append((index, placed))
            held += sum(_nbytes(p.leaves) for p in placed.values())
            read = index + 1
            if len(passes) > 1 and read % BLOCK and held <= HOLD_BYTES:
                continue  # several models: hold the batch for the next round
            run_pending()
            held = 0
            if stopper is not None and read % BLOCK == 0 and stopper.at_pool(_progress(passes)):
                break
        else:
            run_pending()
            if stopper is not None:  # under torch.distributed: until every rank stops
                stopper.finish(_progress(passes))
        for p in passes:
            reads = p.recorder.binding.reads if id(p) in bound else p.reads
            check_followed(reads, p.fold.recorded)

    with torch.no_grad(), contextlib.ExitStack() as watched:
        for p in passes:
            if p.compiled is not None:  # bound by their graphs, watched for the rest
                watched.enter_context(p.recorder.binding.watch(p.resolved))
        if eager:
            bind([(p.recorder.binding, p.resolved, p.fold) for p in eager], loop)
        else:
            loop([])


def _progress(passes: list[_ModelPass]) -> list[tuple[Fold, int, int]]:
    return [(p.fold, p.used, p.samples) for p in passes]


def _nbytes(leaves: list[Any]) -> int:
    return sum(leaf.nbytes for leaf in leaves if isinstance(leaf, torch.Tensor))


def _result(p: _ModelPass, part: ModelPart, *, options: _Options) -> Result:
    """One model's buffers and info from its (reduced) statistics."""
    stats, spreads, used, samples = part.stats, part.spreads or {}, part.batches, part.samples
    if used == 0:
        where = " on any rank" if options.group else ""
        if p.skipped:
            raise ValueError(f"every batch was skipped{where}: {p.skipped[0][1]}")
        raise ValueError(f"the loader yielded no batches{where}")
    logger.info(
        "recomputed %d BatchNorm layers over %d batches (%d samples)", len(stats), used, samples
    )
    like = p.recorder.binding.bn_buffers(p.resolved)
    pooled = stats if options.transform is None else options.transform(like, stats, samples)
    new = finalize(pooled, like=like)
    converged = None
    if options.tol is not None:
        found = worst(stats, spreads)
        converged = reached(found, used=used, tol=options.tol)
        if not converged:
            warn_not_converged(found, tol=options.tol, batches=used)
    stderr: dict[str, Tensor] = {}
    n_eff: dict[str, float] = {}
    if options.errors:
        devices = {key: t.device for key, t in like.items()}
        stderr, n_eff = standard_errors(stats, spreads, devices=devices)
    trace = p.fold.trace() if options.errors else {}
    return new, RunInfo(used, samples, converged, stderr, n_eff, trace)


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


def _warn_skipped(skipped: list[tuple[int, str]], *, model: int | None) -> None:
    if not skipped:
        return
    shown = "; ".join(f"batch {i}: {why}" for i, why in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    whose = "" if model is None else f"model {model}: "
    warnings.warn(
        f"{whose}{len(skipped)} batch(es) skipped ({shown}{more}); their values are not "
        "pooled, because later layers would have seen degenerate inputs. A last batch "
        "of one sample is the usual cause: drop_last=True avoids it",
        UserWarning,
        stacklevel=5,
    )


def _iterate(loader: Iterable[Any]) -> Iterator[Any]:
    try:
        return iter(loader)
    except TypeError:
        raise TypeError(
            f"loader must be an iterable of batches, got {type(loader).__name__}"
        ) from None


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


def _bindable(specs: list[Spec]) -> list[Spec]:
    """``specs`` with a module that appears again replaced by a skeleton copy: the run binds
    every model at once, and one module can hold one binding only. A skeleton has the
    module's structure, attributes and hooks, and meta tensors in place of its own, so it
    takes every parameter and buffer from the spec (the module's own where not given)."""
    seen: set[int] = set()
    out: list[Spec] = []
    for model, (params, buffers) in specs:
        if id(model) not in seen:
            seen.add(id(model))
            out.append((model, Weights(params, buffers)))
            continue
        full_params = {**dict(model.named_parameters()), **(params or {})}
        full_buffers = {**dict(model.named_buffers()), **(buffers or {})}
        out.append((_skeleton(model), Weights(full_params, full_buffers)))
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


def run_stack(
    model: nn.Module, loader: Iterable[Any], stacked: Weights, options: _Options
) -> Result:
    """`recompute_bn_buffers` for transformed weights: every member in one pass."""
    results: list[Result] = []

    def many(members: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        specs: list[Spec] = [(model, Weights(*split_weights(m))) for m in members]
        results[:] = run_models(specs, loader, options)
        return [list(new.values()) for new, _ in results]

    outputs = per_member(many, weights_of(stacked.params, stacked.buffers))
    first, info = results[0]
    converged = None if options.tol is None else all(bool(i.converged) for _, i in results)
    stderr = info.stderr
    if len(results) > 1 and stderr:
        stderr = {k: torch.stack([i.stderr[k] for _, i in results]) for k in stderr}
    n_eff = info.n_eff if len(results) == 1 else {}
    new = dict(zip(first, outputs, strict=True))
    trace = info.trace if len(results) == 1 else {}
    return new, RunInfo(info.num_batches, info.num_samples, converged, stderr, n_eff, trace)
