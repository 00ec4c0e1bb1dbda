"""Compiled runs: one graph per model that returns only the statistics, exact and pure."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import precisebn

from models import ReusedBN, Slimmable, SmallCNN
from reference import assert_matches, assert_same, pooled_inputs, snapshot

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch._dynamo's own imports
]
compiles = pytest.mark.skipif(
    precisebn._compiled.unsupported() is not None,
    reason=str(precisebn._compiled.unsupported()),
)
FAST = {"backend": "aot_eager"}  # dynamo's tracing and checks, without a compiler's wait


def batches(sizes: list[int], *, seed: int = 0, shape: tuple[int, ...] = (3, 8, 8)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * 2 + 1 for n in sizes]


class Graphs:
    """A backend that keeps every graph dynamo hands it, and runs it as it is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, inputs: Any) -> Any:
        self.graphs.append(gm)
        return gm.forward


@compiles
def test_a_compiled_model_runs_compiled_exact_and_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the default compiler: what a user who compiled for speed gets."""
    torch.manual_seed(0)
    model = torch.compile(SmallCNN().train())
    before = snapshot(model)
    data = batches([8, 8, 8, 5])
    with caplog.at_level(logging.INFO, logger="precisebn"):
        new = precisebn.recompute_bn_buffers(model, data)
    assert "eagerly" not in caplog.text
    assert_same(before, snapshot(model))
    reference = pooled_inputs(model._orig_mod, data)
    assert_matches({k.removeprefix("_orig_mod."): v for k, v in new.items()}, reference)


@compiles
def test_compiles_once_for_repeated_runs() -> None:
    model = SmallCNN().train()
    graphs = Graphs()
    data = batches([6, 6, 6])
    first = precisebn.recompute_bn_buffers(model, data, compile={"backend": graphs})
    again = precisebn.recompute_bn_buffers(model, data, compile={"backend": graphs})
    assert len(graphs.graphs) == 1
    for key, value in first.items():
        assert torch.equal(again[key], value)
    assert_matches(first, pooled_inputs(model, data))


class Classifier(nn.Module):
    """A backbone with BN layers, then a head with none."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@compiles
def test_the_graph_leaves_out_what_the_statistics_do_not_need() -> None:
    model = Classifier().train()
    graphs = Graphs()
    data = batches([4, 4])
    new = precisebn.recompute_bn_buffers(model, data, compile={"backend": graphs})
    assert_matches(new, pooled_inputs(model, data))
    (graph,) = graphs.graphs
    traced = {str(node.target) for node in graph.graph.nodes}
    assert any("linear" in t for t in traced)  # the forward ran whole while traced...
    graph.graph.eliminate_dead_code()  # ...and what a compiler keeps of it:
    kept = {str(node.target) for node in graph.graph.nodes}
    assert any("conv2d" in t for t in kept)
    assert not any("linear" in t for t in kept), kept  # the head feeds no statistic


@pytest.mark.parametrize("momentum", [0.1, None])
def test_reused_layers_and_momentum_none(momentum: float | None) -> None:
    model = ReusedBN().train()
    model.bn.momentum = momentum
    data = batches([4, 5, 4], shape=(3, 10, 10))
    with pytest.warns(UserWarning, match="'unused'"):
        new = precisebn.recompute_bn_buffers(model, data, compile=FAST)
    assert_matches(new, pooled_inputs(model, data))


def test_frozen_layers_and_a_batch_of_one() -> None:
    torch.manual_seed(1)
    model = SmallCNN().train()
    model.bn2.eval()  # frozen: reads its buffers, is not recomputed
    before = snapshot(model)
    data = [*batches([8, 8]), torch.randn(1, 3, 8, 8)]
    with pytest.warns(UserWarning, match="batch 2: BatchNorm layer 'bn_head' got 1 value"):
        new = precisebn.recompute_bn_buffers(model, data, layers=["bn1", "bn_head"], compile=FAST)
    assert_matches(new, pooled_inputs(model, data[:2], layers=["bn1", "bn_head"]))
    assert "bn2.running_var" not in new
    assert_same(before, snapshot(model))


def test_what_the_graph_cannot_follow_runs_eagerly_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Slimmable().train()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 4, generator=gen) + 3, c) for c in (4, 2, 4, 3)]
    before = snapshot(model)
    with caplog.at_level(logging.INFO, logger="precisebn"):
        new = precisebn.recompute_bn_buffers(model, data, forward=lambda m, b: m(b), compile=FAST)
    (record,) = [r for r in caplog.records if "eagerly" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert_same(before, snapshot(model))
    for channel in range(4):
        values = torch.cat([x[:, channel] for x, c in data if channel < c]).double()
        torch.testing.assert_close(
            new["bn.running_var"][channel].double(), values.var(), rtol=1e-5, atol=0
        )


def test_compile_false_runs_a_compiled_model_eagerly() -> None:
    model = SmallCNN().train()
    compiled = torch.compile(model, backend="aot_eager")
    data = batches([6, 6])
    new = precisebn.recompute_bn_buffers(compiled, data, compile=False)
    plain = {k.removeprefix("_orig_mod."): v for k, v in new.items()}
    assert_matches(plain, pooled_inputs(model, data))


def test_a_torch_that_cannot_compile_runs_eagerly_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precisebn._compiled, "COMPILES_FROM", (99, 0))
    model = SmallCNN().train()
    compiled = torch.compile(model, backend="aot_eager")
    data = batches([6, 6])
    with caplog.at_level(logging.INFO, logger="precisebn"):
        new = precisebn.recompute_bn_buffers(compiled, data)
    (record,) = [r for r in caplog.records if "eagerly" in r.getMessage()]
    assert "compiled runs need torch>=99.0" in record.getMessage()
    plain = {k.removeprefix("_orig_mod."): v for k, v in new.items()}
    assert_matches(plain, pooled_inputs(model, data))


def test_bad_compile_option() -> None:
    with pytest.raises(TypeError, match="compile must be None, a bool or a mapping"):
        precisebn.recompute_bn_buffers(SmallCNN(), batches([4]), compile="yes")  # type: ignore[call-overload]
