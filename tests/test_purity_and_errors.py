"""The model is never changed, and bad input gets a clear error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import precisebn

from models import SmallCNN, tabular
from reference import assert_matches, assert_same, pooled_inputs, snapshot


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(4, 3, 8, 8) for _ in range(n)]


def hooked_model(*, train: bool) -> nn.Module:
    model = SmallCNN().train(train)
    model.bn1.momentum = None
    model.bn2.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        model.bn1.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("train", [True, False])
def test_model_unchanged_after_a_run(train: bool) -> None:
    model = hooked_model(train=train)
    before = snapshot(model)
    precisebn.recompute_bn_buffers(model, batches())
    assert_same(before, snapshot(model))


def test_frozen_layers_in_training_mode_are_not_written() -> None:
    model = hooked_model(train=True)
    before = snapshot(model)
    precisebn.recompute_bn_buffers(model, batches(), layers=["bn2"])
    assert_same(before, snapshot(model))


def raising_loader(after: int) -> Iterator[torch.Tensor]:
    for i, batch in enumerate(batches(5)):
        if i == after:
            raise OSError("disk went away")
        yield batch


@pytest.mark.parametrize("train", [True, False])
def test_model_unchanged_when_the_loader_raises(train: bool) -> None:
    model = hooked_model(train=train)
    before = snapshot(model)
    with pytest.raises(OSError, match="disk went away"):
        precisebn.recompute_bn_buffers(model, raising_loader(2))
    assert_same(before, snapshot(model))


def test_model_unchanged_when_the_forward_raises() -> None:
    model = hooked_model(train=True)
    before = snapshot(model)
    good, bad = batches(1)[0], torch.randn(4, 5, 8, 8)
    with pytest.raises(RuntimeError, match="channels"):
        precisebn.recompute_bn_buffers(model, [good, good, bad])
    assert_same(before, snapshot(model))


def test_functional_pieces_do_not_mutate() -> None:
    model = hooked_model(train=True)
    before = snapshot(model)
    stats = precisebn.init(precisebn.bn_buffers(model))
    copies = {k: (m.count.clone(), m.mean.clone(), m.m2.clone()) for k, m in stats.items()}
    out, moments = precisebn.capture(model, batches(1)[0])
    new_stats = precisebn.update(stats, model, batches(1)[0])
    precisebn.finalize(precisebn.merge(new_stats, moments), like=precisebn.bn_buffers(model))
    assert_same(before, snapshot(model))
    for key, m in stats.items():
        assert all(torch.equal(a, b) for a, b in zip(m, copies[key], strict=True))
    assert out.shape == (4, 5)


def test_empty_loader() -> None:
    with pytest.raises(ValueError, match="no batches"):
        precisebn.recompute_bn_buffers(tabular(), [])


def test_not_iterable() -> None:
    with pytest.raises(TypeError, match="loader must be an iterable of batches, got int"):
        precisebn.recompute_bn_buffers(tabular(), 42)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_batches", [0, -1, 2.5, True])
def test_bad_num_batches(num_batches: object) -> None:
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        precisebn.recompute_bn_buffers(tabular(), [], num_batches=num_batches)  # type: ignore[arg-type]


def test_no_bn_layers_says_what_was_found() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.LayerNorm(4),
        nn.InstanceNorm1d(4, track_running_stats=True),
    )
    with pytest.raises(ValueError, match="no BatchNorm layers") as info:
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)])
    message = str(info.value)
    assert "1 BatchNorm1d with track_running_stats=False" in message
    assert "1 InstanceNorm1d" in message
    assert "1 LayerNorm" in message
    with pytest.raises(ValueError, match="no normalisation layers"):
        precisebn.recompute_bn_buffers(nn.Linear(2, 2), [torch.randn(4, 2)])


def test_a_batch_of_one_sample_is_skipped_with_a_warning() -> None:
    model = tabular()
    before = snapshot(model)
    batches = [torch.randn(4, 6), torch.randn(5, 6), torch.randn(1, 6)]
    with pytest.warns(UserWarning, match=r"batch 2: BatchNorm layer '0' got 1 value per channel"):
        new, info = precisebn.recompute_bn_buffers(model, batches, return_info=True)
    assert_same(before, snapshot(model))
    assert (info.num_batches, info.num_samples) == (2, 9)
    assert_matches(new, pooled_inputs(model, batches[:2]))
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(ValueError, match="every batch was skipped: BatchNorm layer '0' got 1 value"),
    ):
        precisebn.recompute_bn_buffers(model, [torch.randn(1, 6)])
    assert_same(before, snapshot(model))


def test_capture_refuses_and_update_skips_a_batch_of_one() -> None:
    model = tabular()
    with pytest.raises(ValueError, match=r"'0' got 1 value per channel \(input shape \(1, 6\)\)"):
        precisebn.capture(model, torch.randn(1, 6))
    stats = precisebn.init(precisebn.bn_buffers(model))
    with pytest.warns(UserWarning, match="the batch was skipped"):
        same = precisebn.update(stats, model, torch.randn(1, 6))
    assert all(same[k].count.item() == 0 for k in stats)


def test_integer_inputs_for_a_float_model() -> None:
    with pytest.raises(TypeError, match=r"batch 1: .*non-floating inputs \(\['torch.int64'\]\)"):
        precisebn.recompute_bn_buffers(tabular(), [torch.randn(4, 6), torch.randint(0, 9, (4, 6))])


def test_unknown_and_wrong_layer_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.InstanceNorm1d(4))
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)], layers=["nope"])
    with pytest.raises(ValueError, match="'0' is Linear, not a BatchNorm layer"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)], layers=["0"])
    with pytest.raises(ValueError, match="'2' is InstanceNorm1d: only BatchNorm"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)], layers=["2"])
    with pytest.raises(TypeError, match="not a single string"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)], layers="1")
    with pytest.raises(ValueError, match="selected none"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)], layers=lambda n, m: False)


def test_uninitialised_lazy_layer() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['1'\] are lazy and not yet initialised"):
        precisebn.recompute_bn_buffers(model, [torch.randn(4, 3)])
    assert_same(before, snapshot(model))


def test_dict_batch_says_so_first_and_shows_forward() -> None:
    model = tabular()
    batch = {"pixel_values": torch.randn(4, 6), "labels": torch.randint(0, 3, (4,))}
    with pytest.raises(TypeError) as info:
        precisebn.recompute_bn_buffers(model, [batch])
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("the batch is a dict")
    assert "non-floating" not in str(info.value)
    example = "forward=lambda model, batch: model(batch['pixel_values'])"
    assert example in first_line
    _, run = precisebn.recompute_bn_buffers(
        model, [batch], forward=lambda model, batch: model(batch["pixel_values"]), return_info=True
    )
    assert run.num_batches == 1
    with pytest.raises(TypeError, match=r"model\(\*\*\{k: v for k, v in batch.items\(\)"):
        precisebn.recompute_bn_buffers(model, [{"a": torch.randn(4, 6), "b": torch.randn(4, 6)}])
    with pytest.raises(TypeError, match="batch of type int"):
        precisebn.recompute_bn_buffers(model, [3])


def test_unknown_param_names() -> None:
    with pytest.raises(ValueError, match=r"params= has names the model does not: \['head.w'\]"):
        precisebn.recompute_bn_buffers(
            tabular(), [torch.randn(4, 6)], params={"head.w": torch.zeros(1)}
        )
