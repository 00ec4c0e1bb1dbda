"""Hypothesis: for random models of buffer-writing modules, a run leaves the model as it was.

Each drawn model mixes BatchNorm layers (some in eval mode, some left out with
``layers=``) with modules whose training-mode forward writes their own buffers: both kinds
of spectral norm, a quantisation observer, a counter and a moving average, and a table
that is only read. The loader may raise at a drawn batch. Whatever happens, the model's
``state_dict()``, attributes and hooks are bit-identical afterwards, and a run that
completes matches the float64 reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import precisebn

from reference import assert_matches, assert_same, pooled_inputs, snapshot

WIDTH = 4


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        return x


class MovingAverage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("average", torch.zeros(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        self.average.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.average


class Table(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(64, WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.table[: x.shape[0]]


def observer() -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        return torch.ao.quantization.MovingAverageMinMaxObserver()


def batch_norm(train: bool, momentum: float | None) -> nn.Module:
    return nn.BatchNorm1d(WIDTH, momentum=momentum).train(train)


BLOCKS: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(WIDTH, WIDTH),
    "spectral": lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH)),
    "old_spectral": lambda: nn.utils.spectral_norm(nn.Linear(WIDTH, WIDTH)),
    "counter": Counter,
    "average": MovingAverage,
    "table": Table,
    "observer": observer,
}


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, list[str]]:
    """A random stack of blocks with at least one recomputed BN layer."""
    layers: list[nn.Module] = []
    recomputed: list[str] = []
    for i in range(draw(st.integers(2, 6))):
        if draw(st.booleans()):
            layers.append(batch_norm(draw(st.booleans()), draw(st.sampled_from([0.1, None]))))
            if draw(st.booleans()) or not recomputed:
                recomputed.append(str(i))
        else:
            layers.append(BLOCKS[draw(st.sampled_from(sorted(BLOCKS)))]())
    layers.append(batch_norm(True, 0.1))
    recomputed.append(str(len(layers) - 1))
    return nn.Sequential(*layers).train(), recomputed


@settings(max_examples=30, deadline=None)
@given(
    drawn=models(),
    num_batches=st.integers(1, 7),
    raise_at=st.one_of(st.none(), st.integers(0, 6)),
    loop=st.sampled_from(["recompute", "recorder"]),
    seed=st.integers(0, 2**16),
)
def test_state_dict_bit_identical_after_any_run(
    drawn: tuple[nn.Module, list[str]],
    num_batches: int,
    raise_at: int | None,
    loop: str,
    seed: int,
) -> None:
    model, recomputed = drawn
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(8, WIDTH, generator=gen) * 2 + 1 for _ in range(num_batches)]
    before = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loader() -> Iterator[Tensor]:
        for i, batch in enumerate(batches):
            if i == raise_at:
                raise OSError("the loader broke")
            yield batch

    def run() -> dict[str, Tensor]:
        if loop == "recompute":
            return precisebn.recompute_bn_buffers(model, loader(), layers=recomputed)
        recorder = precisebn.recorder(model, layers=recomputed)
        stats = recorder.init()
        for batch in loader():
            stats = recorder.update(stats, batch)
        return recorder.finalize(stats)

    fails = raise_at is not None and raise_at < num_batches
    if fails:
        with pytest.raises(OSError, match="the loader broke"):
            run()
    else:
        new = run()
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert_same(before, snapshot(model))
    if fails:
        return
    if loop == "recompute":  # one run: the forward sees its own writes, batch after batch
        assert_matches(new, pooled_inputs(model, batches, layers=recomputed))
    else:  # each update is a function of the caller's model: writes do not carry over
        per_batch = [pooled_inputs(model, [b], layers=recomputed) for b in batches]
        pooled = {k: torch.cat([p[k] for p in per_batch], dim=1) for k in per_batch[0]}
        assert_matches(new, pooled)
