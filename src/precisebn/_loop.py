"""The pass over the loader: each batch is fetched and placed once, then run through every
model of the run (one `Member` each), directly or intercepted, into that model's fold.

A check of direct batches that fails takes only its model out of the pass; the models
whose checks failed run again, every batch intercepted, in a second pass over the loader.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from precisebn._batches import BatchLayoutError, integer_leaves, leading_size, place
from precisebn._capture import Runner, Step, check_followed, one_value_message, within_all
from precisebn._converge import Progress, Stopper
from precisebn._direct import (
    Known,
    Signatures,
    Verifier,
    known_from,
    mismatch,
    verify,
    watch_values,
)
from precisebn._fold import BLOCK, BlockFold
from precisebn._moments import Stats
from precisebn._stderr import Spreads
from precisebn._vmap import check_unbatched

__all__ = ["HOLD_BYTES", "Outcome", "accumulate", "run_step"]

HOLD_BYTES = 64 * 2**20
"""With several models, batches are held (up to a pooling point, or this many bytes) and
run model by model, so that each model's weights stay in the cache across batches; one
model runs each batch as it comes."""

Placed = tuple[Any, list[Any], Any]
"""A batch on one device: the batch, its leaves and its structure (`place`)."""


class Outcome(NamedTuple):
    """What one model's pass folded."""

    stats: Stats
    spreads: Spreads
    batches: int
    samples: int
    skipped: list[tuple[int, str]]
    """Batches skipped for one value per channel: loader index and why."""


class RestartError(Exception):
    """A check of direct batches failed: the model's statistics cannot be trusted."""


def run_step(runner: Runner, step: Step, batch: Any, *, index: int) -> Any:
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


class Member:
    """One model of a pass: its runner, its fold, and what its direct batches know."""

    def __init__(self, runner: Runner, *, expected: int, direct: bool) -> None:
        self.runner = runner
        self.fold = BlockFold(list(runner.layers), runner.bn_buffers, max_batches=max(expected, 1))
        self.signatures = Signatures(enabled=direct and runner.live is not None)
        self.verifier = Verifier()
        self.used = self.samples = 0
        self.skipped: list[tuple[int, str]] = []
        self.failed: str | None = None
        """Why a check of its direct batches failed, if one did."""
        runner.reads.clear()

    def run(self, step: Step, batch: Any, leaves: list[Any], spec: Any, index: int) -> None:
        """Run one placed batch, directly when its signature allows; raises `RestartError`."""
        runner, fold = self.runner, self.fold
        key, known = self.signatures.lookup(leaves, spec)
        if known is not None and runner.live is not None:
            _direct_batch(runner, step, batch, known, index=index, check=self.verifier.due())
            fold.end_direct(runner.live, known.entries, known.factors, index)
        else:
            why = self._intercepted(step, batch, key, known, index)
            if why is not None:
                self.skipped.append((index, why))
                return
        self.used += 1
        self.samples += leading_size(leaves)

    def _intercepted(
        self, step: Step, batch: Any, key: Any, known: Known | None, index: int
    ) -> str | None:
        """Run a batch with every BN call intercepted; why it was skipped, if it was."""
        runner, fold, signatures = self.runner, self.fold, self.signatures
        runner.intercept("intercept")  # the tags hold the caller's values again
        runner.calls.zero_()
        version = runner.statistics_version()
        if signatures.watching(key) and known is None:
            with watch_values(runner.counters) as watch:
                run_step(runner, step, batch, index=index)
            dependent = watch.found is not None
        else:
            run_step(runner, step, batch, index=index)
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
            signatures.observe(key, known_from(observed, runner.calls), value_dependent=dependent)
        return None

    def outcome(self) -> Outcome:
        return Outcome(
            self.fold.result(), self.fold.spreads(), self.used, self.samples, self.skipped
        )


def accumulate(
    runners: Sequence[Runner],
    loader: Iterable[Any],
    *,
    num_batches: int,
    progress: bool,
    direct: bool,
    stopper: Stopper | None,
) -> list[Outcome]:
    """Fold up to ``num_batches`` batches of ``loader`` into each runner's statistics, in one
    pass; models whose direct batches turned out to be unsafe run again, intercepted."""
    batches = _iterate(loader)
    expected = _expected_batches(loader, num_batches)
    members = [Member(r, expected=expected, direct=direct) for r in runners]
    _pass(members, batches, expected=expected, progress=progress, stopper=stopper)
    failed = [i for i, m in enumerate(members) if m.failed is not None]
    if failed:
        why = members[failed[0]].failed
        which = "" if len(runners) == 1 else f" (model(s) {failed})"
        if batches is loader:  # an iterator: what was read is gone
            raise RuntimeError(
                f"a check of direct batches failed{which}: {why}. The loader is an iterator "
                "that cannot be read again, so the run cannot start over with every batch "
                "intercepted: pass direct=False (or a loader that can be iterated twice, "
                "such as a list or a DataLoader)"
            )
        warnings.warn(
            f"a check of direct batches failed{which}: {why}. The run started again with "
            "every batch intercepted; pass direct=False to skip the first attempt",
            UserWarning,
            stacklevel=4,
        )
        again = [Member(runners[i], expected=expected, direct=False) for i in failed]
        _pass(again, _iterate(loader), expected=expected, progress=progress, stopper=stopper)
        for i, member in zip(failed, again, strict=True):
            members[i] = member
    for i, member in enumerate(members):
        _warn_skipped(member.skipped, model=None if len(members) == 1 else i)
    return [m.outcome() for m in members]


def _pass(
    members: list[Member],
    batches: Iterator[Any],
    *,
    expected: int,
    progress: bool,
    stopper: Stopper | None,
) -> None:
    """One pass over up to ``expected`` batches, through every member (fewer batches when
    ``stopper`` says every model's statistics are precise enough)."""
    chosen: Iterator[Any] = itertools.islice(batches, expected)
    if progress:
        chosen = _progress_bar(chosen, total=expected)

    def loop(steps: list[Step]) -> None:
        held = 0
        pending: list[tuple[int, dict[torch.device, Placed]]] = []

        def run_pending() -> None:
            # Model by model over the held batches: each model's weights stay in the cache.
            for member, step in zip(members, steps, strict=True):
                for index, placed in pending:
                    if member.failed is not None:
                        break
                    try:
                        member.run(step, *placed[member.runner.device], index)
                    except RestartError as error:
                        member.failed = str(error)
            pending.clear()

        for index, raw in enumerate(chosen):
            live = [m for m in members if m.failed is None]
            placed: dict[torch.device, Placed] = {}
            for member in live:
                device = member.runner.device
                if device not in placed:
                    placed[device] = place(raw, device)
                    held += _nbytes(placed[device][1])
            if index == 0:
                check_unbatched(next(iter(placed.values()))[1])
            pending.append((index, placed))
            read = index + 1
            if len(live) > 1 and read % BLOCK and held <= HOLD_BYTES:
                continue  # several models: hold the batch for the next round
            run_pending()
            held = 0
            live = [m for m in members if m.failed is None]
            if not live:
                return
            pooling = stopper is not None and read % BLOCK == 0
            if pooling and stopper.at_pool(_progress(live)):  # type: ignore[union-attr]
                break
        else:
            run_pending()
            if stopper is not None:  # under torch.distributed: until every rank stops
                stopper.finish(_progress([m for m in members if m.failed is None]))
        for member in members:
            if member.failed is None:
                check_followed(member.runner.reads, member.fold.recorded)

    with torch.no_grad():
        within_all([m.runner for m in members], loop, sinks=[m.fold for m in members])


def _progress(members: list[Member]) -> list[Progress]:
    return [(m.fold, m.used, m.samples) for m in members]


def _nbytes(leaves: list[Any]) -> int:
    return sum(leaf.nbytes for leaf in leaves if isinstance(leaf, torch.Tensor))


def _direct_batch(
    runner: Runner, step: Step, batch: Any, known: Known, *, index: int, check: bool
) -> None:
    """Run a batch directly: the kernels update the zeroed private statistics themselves.

    Raises `RestartError` when the layers ran otherwise than ``known`` says, or, in a
    checked batch (``check``), when a call saw other counts or read the statistics.
    """
    assert runner.live is not None
    runner.intercept("check" if check else "direct")  # "intercept" again for the next
    runner.live.zero_()
    runner.calls.zero_()
    if check:
        runner.checked.clear()
    run_step(runner, step, batch, index=index)
    if not torch.equal(runner.calls, known.calls):
        seen = Known(known.entries, known.factors, runner.calls.clone())
        problem: str | None = mismatch(known, seen, list(runner.layers))
    elif check:
        problem = verify(known, runner.checked, list(runner.layers), runner.reads)
    else:
        return
    if problem is not None:
        raise RestartError(f"in batch {index}, {problem}")


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


def _written_message(layers: list[str]) -> str:
    named = ", ".join(repr(name or "<model>") for name in layers) or "(unknown)"
    return (
        f"the running statistics of BatchNorm layer(s) {named} were written outside their "
        "batch_norm call, through a tensor derived from them that precisebn could not "
        "follow (for instance running_mean.view(...) passed to batch_norm); precisebn follows "
        "batch_norm calls on a layer's own running_mean and running_var or on basic slices "
        "of them (running_mean[:c])"
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
