"""The recorder: a binding worked out once, pure init/update/finalize over it."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import Tensor, nn

import precisebn

from models import ReusedBN, SmallCNN
from reference import assert_matches, assert_same, pooled_inputs, snapshot


def batches(sizes: list[int], *, seed: int = 0, offset: float = 1.0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=gen) * 2 + offset for n in sizes]


def run(recorder: precisebn.Recorder, data: list[Tensor], **kwargs: object) -> dict[str, Tensor]:
    state = recorder.init()
    for batch in data:
        state = recorder.update(state, batch, **kwargs)  # type: ignore[arg-type]
    return recorder.finalize(state)


def test_the_update_loop_is_exact_and_matches_recompute() -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    data = batches([8, 8, 5, 8] * 5)
    new = run(precisebn.recorder(model), data)
    assert_matches(new, pooled_inputs(model, data))
    pooled = precisebn.recompute_bn_buffers(model, data)
    for key, value in pooled.items():  # one fold per batch against blocks of 16: rounding
        torch.testing.assert_close(new[key], value, rtol=1e-6, atol=1e-7)


def test_float64_models_are_exact_to_float64_rounding() -> None:
    torch.manual_seed(1)
    model = SmallCNN().double()
    data = [b.double() for b in batches([6] * 12, offset=50.0)]
    new = run(precisebn.recorder(model), data)
    assert_matches(new, pooled_inputs(model, data), rtol_mean=1e-12, rtol_var=1e-12)


def test_update_changes_neither_the_model_nor_the_state() -> None:
    model = ReusedBN().train()
    before = snapshot(model)
    recorder = precisebn.recorder(model, layers=["bn"])
    state = recorder.update(recorder.init(), batches([4])[0])
    kept = {layer: [t.clone() for t in m] for layer, m in state.items()}
    new_state = recorder.update(state, batches([5], seed=1)[0])
    assert new_state is not state
    for layer, tensors in kept.items():
        for was, now in zip(tensors, state[layer], strict=True):
            assert torch.equal(was, now)
    assert new_state["bn"].count.item() == state["bn"].count.item() + 5 * (36 + 16 + 36)
    assert_same(before, snapshot(model))


def test_each_call_reads_the_models_tensors_as_they_are_then() -> None:
    torch.manual_seed(2)
    model = SmallCNN().train()
    recorder = precisebn.recorder(model)
    x = batches([8])[0]
    first = recorder.update(recorder.init(), x)
    with torch.no_grad():  # a training step in place, as an optimiser would take it
        model.conv1.weight.mul_(2.0)
        model.bn1.running_var.fill_(9.0)
    again = recorder.update(recorder.init(), x)
    _, moments = precisebn.capture(model, x)  # a recorder of its own, built now
    assert torch.equal(again["bn1"].mean, moments["bn1"].mean)
    assert not torch.equal(again["bn1"].mean, first["bn1"].mean)
    # Layers a state never reached keep the model's current buffers.
    with pytest.warns(UserWarning, match="saw no batch and keep their current buffers"):
        kept = recorder.finalize(recorder.init())
    assert torch.equal(kept["bn1.running_var"], torch.full((8,), 9.0))


def test_a_model_cast_or_rebuilt_between_calls() -> None:
    torch.manual_seed(3)
    model = SmallCNN().train()
    recorder = precisebn.recorder(model)
    data = batches([6, 6])
    run(recorder, data)
    model.double()  # new tensors of another dtype: the binding follows them
    new = run(recorder, [b.double() for b in data])
    assert all(v.dtype == torch.float64 for v in new.values())
    assert_matches(new, pooled_inputs(model, [b.double() for b in data]), rtol_var=1e-12)
    model.bn_head = nn.Identity()  # a recorded layer gone: a clear error, not a stale binding
    with pytest.raises(ValueError, match=r"no longer has the buffers.*build a new recorder"):
        recorder.init()


class Cache(nn.Module):
    """Keeps the last batch's sum in a plain attribute (state a copy of the model keeps)."""

    def forward(self, x: Tensor) -> Tensor:
        self.last = float(x.sum())
        return x


def test_a_module_put_in_after_the_recorder_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.BatchNorm1d(4)).train()
    recorder = precisebn.recorder(model)
    model[1] = Cache()  # replaced after the binding was worked out
    data = [torch.randn(8, 3) + 1 for _ in range(2)]
    new = run(recorder, data)
    assert not hasattr(model[1], "last")  # the forward's attribute was undone
    assert_matches(new, pooled_inputs(model, data))


def test_params_per_call_for_a_functional_loop() -> None:
    torch.manual_seed(4)
    model = SmallCNN().train()
    other = SmallCNN().train()
    params = {k: v.detach().clone() for k, v in other.named_parameters()}
    data = batches([8, 8, 8])
    new = run(precisebn.recorder(model), data, params=params)
    assert_matches(new, pooled_inputs(other, data))


def test_a_state_of_other_layers_is_refused() -> None:
    model = SmallCNN()
    recorder = precisebn.recorder(model, layers=["bn1", "bn2"])
    assert recorder.layers == ["bn1", "bn2"]
    whole = precisebn.init(precisebn.bn_buffers(model))
    with pytest.raises(ValueError, match=r"not recorded: \['bn_head'\].*recorder.init\(\)"):
        recorder.update(whole, batches([4])[0])
    with pytest.raises(ValueError, match=r"missing: \['bn2'\]"):
        recorder.update({"bn1": whole["bn1"]}, batches([4])[0])


def test_a_batch_of_one_is_skipped_and_the_state_returned_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    recorder = precisebn.recorder(model)
    state = recorder.update(recorder.init(), torch.randn(6, 3))
    with pytest.warns(UserWarning, match="the batch was skipped: BatchNorm layer '1' got 1"):
        same = recorder.update(state, torch.randn(1, 3))
    assert same["1"].count.item() == 6.0


def test_no_reference_cycles_are_left_behind() -> None:
    """A call frees everything it made as it returns: nothing waits for the cycle collector,
    whose full passes cost tens of milliseconds in a process that imported torch."""
    model = SmallCNN().train()
    data = batches([4, 4])
    recorder = precisebn.recorder(model)
    state = recorder.update(recorder.init(), data[0])  # warm up
    gc.collect()
    gc.disable()
    try:
        state = recorder.update(state, data[1])
        precisebn.recompute_bn_buffers(model, data)
        precisebn.capture(model, data[0])
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_repr_names_the_layers_and_the_model() -> None:
    assert repr(precisebn.recorder(SmallCNN())) == "Recorder(3 layers of SmallCNN)"
