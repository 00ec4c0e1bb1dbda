"""Direct batches: when they are used, when they are not, and that they change no number."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import precisebn
from precisebn._direct import Known, Signatures, watch_values

from models import ReusedBN, SmallCNN
from reference import assert_matches, assert_same, pooled_inputs, snapshot


def batches_of(sizes: list[int], shape: tuple[int, ...], *, offset: float = 0.0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(len(sizes) * 7 + sum(sizes))
    return [torch.randn(n, *shape, generator=gen) * 2 + offset for n in sizes]


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, None])
def test_direct_batches_match_reference_and_intercepted_run(
    momentum: float | None, direct_batches: list[int]
) -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
    batches = batches_of([8] * 10 + [3], (3, 10, 10), offset=1.0)
    new = precisebn.recompute_bn_buffers(model, batches)
    # Two intercepted batches per shape, then direct; the ragged last one is intercepted.
    assert len(direct_batches) == 8
    assert_matches(new, pooled_inputs(model, batches))
    slow = precisebn.recompute_bn_buffers(model, batches, direct=False)
    assert len(direct_batches) == 8  # direct=False intercepts every batch
    for key, value in new.items():
        torch.testing.assert_close(value, slow[key], rtol=1e-6, atol=1e-7)


def test_direct_batches_keep_float64_precision(direct_batches: list[int]) -> None:
    torch.manual_seed(1)
    model = SmallCNN().double().train()
    batches = [b.double() for b in batches_of([6] * 9, (3, 8, 8), offset=3.0)]
    new = precisebn.recompute_bn_buffers(model, batches)
    assert len(direct_batches) == 7
    assert_matches(new, pooled_inputs(model, batches), rtol_mean=1e-12, rtol_var=1e-12)


class MaskedBN(nn.Module):
    """BatchNorm1d over the rows whose first feature is positive: sizes depend on values."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x[x[:, 0] > 0])


def test_value_dependent_sizes_stay_intercepted(direct_batches: list[int]) -> None:
    model = MaskedBN().train()
    gen = torch.Generator().manual_seed(3)
    # The first two batches keep every row, so their counts agree; later ones do not.
    batches = [torch.rand(16, 4, generator=gen) + 0.1 for _ in range(2)]
    batches += [torch.randn(16, 4, generator=gen) for _ in range(6)]
    new = precisebn.recompute_bn_buffers(model, batches)
    assert direct_batches == []
    rows = torch.cat([b[b[:, 0] > 0] for b in batches]).double()
    torch.testing.assert_close(new["bn.running_mean"].double(), rows.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(new["bn.running_var"].double(), rows.var(0), rtol=1e-5, atol=0)


class SkipsOnce(nn.Module):
    """Skips its second BN layer on one call, decided by a Python counter, not by values."""

    def __init__(self, skip_call: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(3)
        self.bn2 = nn.BatchNorm1d(3)
        self.calls = 0
        self.skip_call = skip_call

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        x = self.bn1(x)
        return x if self.calls == self.skip_call else self.bn2(x)


def test_a_direct_batch_that_skips_a_layer_restarts_the_run_intercepted(
    direct_batches: list[int],
) -> None:
    model = SkipsOnce(skip_call=5).train()
    batches = batches_of([10] * 8, (3,), offset=2.0)
    with pytest.warns(UserWarning, match=r"in batch 4, BatchNorm layer 'bn2' ran 0 time\(s\)"):
        new = precisebn.recompute_bn_buffers(model, batches)
    # Batches 2 and 3 ran directly; batch 4 skipped bn2, so the run started again with
    # every batch intercepted. The forward's counter is the model's attribute: it counted
    # from 0 again in the second attempt, and is restored afterwards.
    assert len(direct_batches) == 2
    assert model.calls == 0
    reference = SkipsOnce(skip_call=5).train()
    reference.load_state_dict(model.state_dict())
    assert_matches(new, pooled_inputs(reference, batches))
    with pytest.raises(RuntimeError, match=r"cannot be read again.*direct=False"):
        precisebn.recompute_bn_buffers(model, iter(batches))


def test_no_direct_batches_where_layers_rule_them_out(direct_batches: list[int]) -> None:
    batches = batches_of([6] * 6, (3, 8, 8))
    reused = ReusedBN().train()  # a layer called three times per batch
    with pytest.warns(UserWarning, match="saw no batch"):  # its unused layer
        precisebn.recompute_bn_buffers(reused, batches)
    frozen = SmallCNN().eval()  # eval mode: the kernel would not update the buffers
    precisebn.recompute_bn_buffers(frozen, batches)
    still = SmallCNN().train()
    still.bn1.momentum = 0.0  # a zero momentum: the kernel writes nothing
    new = precisebn.recompute_bn_buffers(still, batches)
    half = SmallCNN().half().train()  # float16 buffers: statistics stay float32 rows
    precisebn.recompute_bn_buffers(half, [b.half() for b in batches])
    assert direct_batches == []
    assert_matches(new, pooled_inputs(still, batches))


def test_direct_run_leaves_model_untouched_also_when_forward_raises(
    direct_batches: list[int],
) -> None:
    model = SmallCNN().train()
    before = snapshot(model)
    batches = batches_of([4] * 6, (3, 8, 8))

    def loader() -> Iterator[Tensor]:
        yield from batches
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        precisebn.recompute_bn_buffers(model, loader())
    assert len(direct_batches) == 4
    assert_same(before, snapshot(model))
    # The tags intercept again afterwards: capture still records every layer.
    _, moments = precisebn.capture(model, batches[0])
    assert set(moments) == {"bn1", "bn2", "bn_head"}


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("boolean index", lambda x: x[x > 0]),
        ("nonzero", lambda x: x.nonzero()),
        ("item", lambda x: x.sum().item()),
        ("branch on a value", lambda x: bool(x.sum() > 0)),
        ("tensor as a size", lambda x: x[: x.shape[0] - int(x[0, 0] > 0)]),
        ("tolist", lambda x: x[0].tolist()),
        ("unique", lambda x: torch.unique(x.round())),
    ],
)
def test_value_watch_notes_value_dependent_operations(name: str, body) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(5, 3)
    with watch_values([]) as watch:
        body(x)
    assert watch.found is not None, name


def test_value_watch_ignores_shape_only_work_and_counters() -> None:
    counter = torch.zeros((), dtype=torch.long)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    model.train()
    with torch.no_grad(), watch_values([counter]) as watch:
        torch.func.functional_call(
            model, {"1.num_batches_tracked": counter}, (torch.randn(2, 3, 6, 6),)
        )
        float(counter)
    assert watch.found is None
    with watch_values([]) as other:
        float(counter)
    assert other.found is not None


def test_signatures_need_two_agreeing_unwatched_batches() -> None:
    batch = torch.zeros(4, 3)
    leaves, spec = [batch], precisebn._batches.place(batch, batch.device).spec
    once = Known((4,), (0.1,), torch.ones(1, dtype=torch.long))
    signatures = Signatures()
    key, known = signatures.lookup(leaves, spec)
    assert key is not None
    assert known is None
    assert not signatures.watching(key)
    signatures.observe(key, once, value_dependent=False)
    assert signatures.watching(key)
    signatures.observe(key, once, value_dependent=False)
    assert signatures.lookup(leaves, spec)[1] == once

    for second in (
        Known((5,), once.factors, once.calls),  # counts differ
        Known((4,), (0.2,), once.calls),  # the update factor differs
        None,  # a batch that rules direct batches out
    ):
        fresh = Signatures()
        fresh.observe(key, once, value_dependent=False)
        fresh.observe(key, second, value_dependent=False)
        assert fresh.lookup(leaves, spec)[1] is None
    watched = Signatures()
    watched.observe(key, once, value_dependent=False)
    watched.observe(key, once, value_dependent=True)
    assert watched.lookup(leaves, spec)[1] is None
    unhashable = Signatures().lookup([batch, [1]], spec)
    assert unhashable == (None, None)
