"""recompute_bn_buffers against the float64 hook reference, on every layer kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precisebn

from models import ReusedBN, Seq1d, SmallCNN, bn_names, tabular
from reference import assert_matches, pooled_inputs


def ragged(shape: tuple[int, ...], sizes: list[int], *, scale: float = 1.0, offset: float = 0.0):
    gen = torch.Generator().manual_seed(sum(sizes) + len(shape))
    return [torch.randn(n, *shape, generator=gen) * scale + offset for n in sizes]


@pytest.mark.parametrize("train", [True, False])
def test_cnn_ragged_batches_match_reference(train: bool) -> None:
    torch.manual_seed(0)
    model = SmallCNN().train(train)
    batches = ragged((3, 12, 12), [16, 16, 16, 5], scale=2.0, offset=1.0)
    new, info = precisebn.recompute_bn_buffers(model, batches, return_info=True)
    assert_matches(new, pooled_inputs(model, batches))
    assert info.num_batches == 4
    assert info.num_samples == 53


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None])
def test_every_momentum_gives_the_same_exact_statistics(momentum: float | None) -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
    batches = ragged((3, 10, 10), [8] * 10 + [3], scale=2.0, offset=1.0)
    assert_matches(precisebn.recompute_bn_buffers(model, batches), pooled_inputs(model, batches))


def test_result_keys_dtypes_and_fresh_storage() -> None:
    model = SmallCNN()
    new = precisebn.recompute_bn_buffers(model, ragged((3, 8, 8), [4, 4]))
    buffers = dict(model.named_buffers())
    expected = {f"{n}.{s}" for n in bn_names(model) for s in ("running_mean", "running_var")}
    assert set(new) == expected
    for key, value in new.items():
        old = buffers[key]
        assert (value.dtype, value.device, value.shape) == (old.dtype, old.device, old.shape)
        assert value.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()


def test_other_layer_kinds_match_reference() -> None:
    torch.manual_seed(1)
    model = Seq1d().eval()
    batches = ragged((4, 8), [6, 3, 7], scale=3.0, offset=-2.0)
    new = precisebn.recompute_bn_buffers(model, batches)
    pooled = pooled_inputs(model, batches)
    assert set(pooled) == {"bn1d", "custom", "bn3d", "sync"}
    assert_matches(new, pooled)


def test_num_batches_caps_the_run() -> None:
    model = tabular()
    batches = ragged((6,), [8] * 10)
    new, info = precisebn.recompute_bn_buffers(model, batches, num_batches=3, return_info=True)
    assert info.num_batches == 3
    assert_matches(new, pooled_inputs(model, batches[:3]))


def test_reused_layer_pools_every_call_and_unreached_layer_keeps_buffers() -> None:
    torch.manual_seed(2)
    model = ReusedBN()
    with torch.no_grad():
        model.unused.running_mean.fill_(3.0)
    batches = ragged((3, 10, 10), [4, 5])
    with pytest.warns(UserWarning, match="'unused'"):
        new = precisebn.recompute_bn_buffers(model, batches)
    pooled = pooled_inputs(model, batches)
    assert pooled["bn"].shape[1] == 9 * (8 * 8 + 6 * 6 + 8 * 8)
    assert_matches(new, pooled)
    assert torch.equal(new["unused.running_mean"], model.unused.running_mean)
    assert new["unused.running_mean"].data_ptr() != model.unused.running_mean.data_ptr()


@pytest.mark.parametrize(("offset", "rtol_var"), [(1e3, 1e-4), (1e4, 1e-3)])
def test_large_feature_offsets(offset: float, rtol_var: float) -> None:
    torch.manual_seed(3)
    model = tabular()
    batches = ragged((6,), [64] * 8, scale=1.0, offset=offset)
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(new, pooled_inputs(model, batches), rtol_var=rtol_var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    model = tabular().to(dtype)
    batches = [b.to(dtype) for b in ragged((6,), [32, 32, 17], scale=2.0, offset=5.0)]
    new = precisebn.recompute_bn_buffers(model, batches)
    pooled = pooled_inputs(model, batches)
    # The first BN sees the raw input: exact up to rounding the result to the buffer dtype.
    eps = torch.finfo(dtype).eps
    assert_matches({k: v for k, v in new.items() if k.startswith("0.")}, {"0": pooled["0"]},
                   rtol_var=eps, rtol_mean=eps)  # fmt: skip
    # Deeper layers see activations computed in low precision (ulp differences in the
    # normalised output propagate); agreement is at the dtype's resolution.
    assert_matches(new, pooled, rtol_var=8 * eps, rtol_mean=8 * eps)
    assert all(v.dtype == dtype for v in new.values())


def test_autocast_forward() -> None:
    torch.manual_seed(5)
    model = SmallCNN()
    batches = ragged((3, 8, 8), [8, 8])

    def forward(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(batch)

    new = precisebn.recompute_bn_buffers(model, batches, forward=forward)
    pooled = pooled_inputs(model, batches, run=forward)
    assert_matches(new, pooled, rtol_var=2e-2, rtol_mean=2e-2)
    assert all(v.dtype == torch.float32 for v in new.values())


def test_layers_selection_keeps_frozen_layers() -> None:
    torch.manual_seed(6)
    model = SmallCNN().eval()
    batches = ragged((3, 8, 8), [8, 8])
    by_name = precisebn.recompute_bn_buffers(model, batches, layers=["bn2", "bn_head"])
    by_rule = precisebn.recompute_bn_buffers(model, batches, layers=lambda name, m: name != "bn1")
    assert (
        set(by_name)
        == set(by_rule)
        == {f"{n}.{s}" for n in ("bn2", "bn_head") for s in ("running_mean", "running_var")}
    )
    # bn1 stays frozen (eval mode, running statistics) during the run, as the reference does.
    assert_matches(by_name, pooled_inputs(model, batches, layers=["bn2", "bn_head"]))
    for key in by_name:
        assert torch.equal(by_name[key], by_rule[key])


def test_params_and_buffers_override_the_module() -> None:
    torch.manual_seed(7)
    model = tabular()
    other = tabular()
    batches = ragged((6,), [16, 16])
    new = precisebn.recompute_bn_buffers(
        model, batches, params=dict(other.named_parameters()), buffers=dict(other.named_buffers())
    )
    assert_matches(new, pooled_inputs(other, batches))


def test_result_applies_three_ways() -> None:
    torch.manual_seed(8)
    model = SmallCNN().eval()
    batches = ragged((3, 8, 8), [8, 8])
    new = precisebn.recompute_bn_buffers(model, batches)
    x = batches[0]
    state = {**dict(model.named_parameters()), **dict(model.named_buffers()), **new}
    functional = torch.func.functional_call(model, state, (x,))
    loaded = SmallCNN().eval()
    loaded.load_state_dict(model.state_dict())
    loaded.load_state_dict(new, strict=False)
    applied = SmallCNN().eval()
    applied.load_state_dict(model.state_dict())
    precisebn.apply_bn_buffers(applied, new)
    with torch.no_grad():
        assert torch.equal(loaded(x), functional)
        assert torch.equal(applied(x), functional)


def test_apply_validates_before_writing() -> None:
    model = tabular()
    before = model.state_dict()
    good = {"0.running_mean": torch.ones(6)}
    with pytest.raises(KeyError, match=r"3\.running_max"):
        precisebn.apply_bn_buffers(model, {**good, "3.running_max": torch.ones(16)})
    with pytest.raises(ValueError, match=r"3.running_var: shape \(4,\)"):
        precisebn.apply_bn_buffers(model, {**good, "3.running_var": torch.ones(4)})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_untracked_layers_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.BatchNorm1d(4))  # fmt: skip
    new = precisebn.recompute_bn_buffers(model, [torch.randn(8, 3)])
    assert set(new) == {"2.running_mean", "2.running_var"}


def test_root_module_is_a_bn_layer() -> None:
    model = nn.BatchNorm1d(3)
    batches = ragged((3,), [5, 9], offset=2.0)
    new = precisebn.recompute_bn_buffers(model, batches)
    assert set(new) == {"running_mean", "running_var"}
    assert_matches(new, pooled_inputs(model, batches))


def test_list_input_in_first_place_is_one_argument() -> None:
    class TwoPathway(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.slow, self.fast = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, pathways: list[torch.Tensor]) -> torch.Tensor:
            return self.slow(pathways[0]).mean() + self.fast(pathways[1]).mean()

    model = TwoPathway()
    batches = [([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8) + 1], torch.zeros(2))] * 2
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(new, pooled_inputs(model, batches))


def test_dict_batches_with_custom_forward() -> None:
    model = tabular()
    batches = [{"x": t, "y": torch.zeros(len(t))} for t in ragged((6,), [7, 9])]
    new, info = precisebn.recompute_bn_buffers(
        model, batches, forward=lambda m, b: m(b["x"]), return_info=True
    )
    assert_matches(new, pooled_inputs(model, batches, run=lambda m, b: m(b["x"])))
    assert info.num_samples == 16


def test_generator_loader_and_lazy_layer_after_first_call() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    model(torch.randn(2, 3))
    batches = ragged((3,), [5, 6])
    new = precisebn.recompute_bn_buffers(model, (b for b in batches))
    assert_matches(new, pooled_inputs(model, batches))


def test_many_batches_span_several_pooled_blocks() -> None:
    """More batches than one block holds, ragged, with a reused and an unreached layer."""
    torch.manual_seed(9)
    model = ReusedBN()
    sizes = [3 + (i * 7) % 5 for i in range(37)]
    batches = ragged((3, 6, 6), sizes, scale=3.0, offset=-4.0)
    with pytest.warns(UserWarning, match="'unused'"):
        new, info = precisebn.recompute_bn_buffers(model, batches, return_info=True)
    assert info.num_batches == 37
    assert_matches(new, pooled_inputs(model, batches))


def test_float64_model_folds_to_float64_precision() -> None:
    torch.manual_seed(10)
    model = SmallCNN().double()
    batches = [b.double() for b in ragged((3, 6, 6), [5] * 20 + [2], offset=100.0)]
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(new, pooled_inputs(model, batches), rtol_var=1e-12, rtol_mean=1e-12)
