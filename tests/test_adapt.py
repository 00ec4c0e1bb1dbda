"""Test-time adaptation: the source prior merged exactly, offline and batch by batch."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import precisebn
from precisebn._adapt import Prior, prior_of, with_prior
from precisebn._moments import Moments

from models import Seq1d, SmallCNN
from reference import assert_matches, assert_same, pooled_inputs, snapshot

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def two_groups(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    """Source pseudo-values and target values, ``[C, N]`` and ``[C, n]``, float64."""
    channels = draw(st.integers(1, 4))
    sizes = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    groups = []
    for size in sizes:
        scale, offset = draw(st.floats(1e-2, 1e2)), draw(st.floats(-1e3, 1e3))
        groups.append(
            torch.randn(channels, size, generator=gen, dtype=torch.float64) * scale + offset
        )
    return groups[0], groups[1]


def moments(values: Tensor) -> Moments:
    mean = values.mean(dim=1)
    m2 = (values - mean[:, None]).square().sum(dim=1)
    return Moments(torch.tensor(float(values.shape[1]), dtype=torch.float64), mean, m2)


@SETTINGS
@given(two_groups())
def test_the_prior_merge_is_pooling_the_source_pseudo_sample(groups: tuple[Tensor, Tensor]) -> None:
    source, target = groups
    n_source = source.shape[1]
    # The buffers of the pseudo-sample: its mean and its mean square deviation.
    mean_s, var_s = source.mean(dim=1), source.var(dim=1, correction=0)
    got = with_prior((mean_s, var_s), moments(target), Prior(n_source=n_source), 1.0)
    want = moments(torch.cat([source, target], dim=1))
    scale = want.mean.abs() + (want.m2 / want.count).sqrt()
    assert torch.allclose(got.count.expand_as(got.mean), want.count.expand_as(want.mean))
    assert ((got.mean - want.mean).abs() <= 1e-12 * scale).all()
    assert ((got.m2 - want.m2).abs() <= 1e-10 * want.m2 + 1e-9 * scale.square()).all()


@SETTINGS
@given(two_groups(), st.floats(0.0, 0.95))
def test_linear_mixing_misses_exactly_the_between_group_term(
    groups: tuple[Tensor, Tensor], weight: float
) -> None:
    source, target = groups
    mean_s, var_s = source.mean(dim=1), source.var(dim=1, correction=0)
    target_m = moments(target)
    got = with_prior((mean_s, var_s), target_m, Prior(weight=weight), 1.0)
    mean_t, var_t = target_m.mean, target_m.m2 / target_m.count
    pooled_var = got.m2 / got.count  # the pooled values' mean square deviation
    linear = weight * var_s + (1 - weight) * var_t
    between = weight * (1 - weight) * (mean_s - mean_t).square()
    scale = (var_s + var_t + between + (mean_s - mean_t).square()).clamp_min(1e-300)
    assert ((pooled_var - (linear + between)).abs() <= 1e-10 * scale).all()
    assert torch.allclose(got.mean, weight * mean_s + (1 - weight) * mean_t, rtol=1e-12, atol=1e-9)


def shifted(sizes: list[int], *, seed: int = 0, shape: tuple[int, ...] = (3, 8, 8)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * 3 + 2 for n in sizes]


def reference(model: nn.Module, batches: list[Tensor], *, weight: float) -> dict[str, Tensor]:
    """The adapted buffers, in float64 from every value each layer saw and the source's."""
    out = {}
    for layer, values in pooled_inputs(model, batches).items():
        bn = model.get_submodule(layer)
        mean_s, var_s = bn.running_mean.double(), bn.running_var.double()
        n = values.shape[1]
        count = n * weight / (1 - weight)
        mean_t, var_t = values.mean(dim=1), values.var(dim=1, correction=0)
        mean = weight * mean_s + (1 - weight) * mean_t
        pooled = (
            weight * var_s + (1 - weight) * var_t + weight * (1 - weight) * (mean_s - mean_t) ** 2
        )
        out[f"{layer}.running_mean"] = mean
        out[f"{layer}.running_var"] = pooled * (count + n) / (count + n - 1)
    return out


def source_model() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn_head):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize(("kwargs", "weight"), [({"prior": 0.3}, 0.3), ({"alpha": 0.25}, 0.75)])
def test_adapt_matches_a_float64_reference_and_leaves_the_model(
    kwargs: dict[str, float], weight: float
) -> None:
    model = source_model()
    before = snapshot(model)
    batches = shifted([8, 8, 5])
    new = precisebn.adapt(model, batches, **kwargs)
    assert_same(before, snapshot(model))
    want = reference(model, batches, weight=weight)
    for key, value in want.items():
        torch.testing.assert_close(new[key].double(), value, rtol=2e-6, atol=1e-6)


def test_full_adaptation_is_recompute_on_the_target() -> None:
    model = source_model()
    batches = shifted([8, 8, 5], seed=1)
    full = precisebn.adapt(model, batches)
    for key, value in precisebn.recompute_bn_buffers(model, batches).items():
        torch.testing.assert_close(full[key], value, rtol=1e-6, atol=1e-7)


def test_n_source_counts_samples() -> None:
    model = source_model()
    batches = shifted([8, 8], seed=2)
    # 16 source samples against 16 target samples: the source is half of every layer.
    by_samples = precisebn.adapt(model, batches, n_source=16)
    want = reference(model, batches, weight=0.5)
    for key, value in want.items():
        torch.testing.assert_close(by_samples[key].double(), value, rtol=2e-6, atol=1e-6)


def test_mean_only_and_variance_only() -> None:
    model = source_model()
    batches = shifted([8, 8], seed=3)
    both = precisebn.adapt(model, batches, prior=0.4)
    mean_only = precisebn.adapt(model, batches, prior=0.4, adapts="mean")
    var_only = precisebn.adapt(model, batches, prior=0.4, adapts="var")
    source = precisebn.bn_buffers(model)
    for layer in ("bn1", "bn2", "bn_head"):
        mean, var = f"{layer}.running_mean", f"{layer}.running_var"
        torch.testing.assert_close(mean_only[mean], both[mean])
        torch.testing.assert_close(mean_only[var], source[var])
        torch.testing.assert_close(var_only[mean], source[mean])
        # About the source's mean, the values spread more than about their own.
        assert (var_only[var] >= both[var] * (1 - 1e-6)).all()


def test_every_layer_kind_and_bad_settings() -> None:
    torch.manual_seed(4)
    model = Seq1d().eval()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 4, 8, generator=gen) * 2 - 1 for n in (6, 3, 7)]
    full = precisebn.adapt(model, batches)
    assert_matches(full, pooled_inputs(model, batches))
    with pytest.raises(ValueError, match="at most one of n_source, prior and alpha"):
        precisebn.adapt(model, batches, prior=0.5, alpha=0.5)
    bad = [
        ({"prior": 1.0}, "prior must be in"),
        ({"alpha": 0.0}, "alpha must be in"),
        ({"n_source": -1}, "n_source must be"),
        ({"adapts": "scale"}, "adapts must be"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            precisebn.adapt(model, batches, **kwargs)  # type: ignore[arg-type]


class ReferenceAdaptedBN(nn.Module):
    """A BN layer that normalises with the exact prior merge, written out in float64."""

    def __init__(self, bn: nn.BatchNorm2d | nn.BatchNorm1d, weight: float) -> None:
        super().__init__()
        self.bn, self.weight = bn, weight

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        x64 = x.double()
        n = x64.numel() // x64.shape[1]
        mean_t, var_t = x64.mean(dims), x64.var(dims, correction=0)
        w, mean_s, var_s = self.weight, self.bn.running_mean.double(), self.bn.running_var.double()
        count = n * w / (1 - w)
        mean = w * mean_s + (1 - w) * mean_t
        var = (
            (w * var_s + (1 - w) * var_t + w * (1 - w) * (mean_s - mean_t) ** 2)
            * (count + n)
            / (count + n - 1)
        )
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x64 - mean.view(shape)) / (var.view(shape) + self.bn.eps).sqrt()
        return (y * self.bn.weight.double().view(shape) + self.bn.bias.double().view(shape)).float()


def test_episodic_predictions_normalise_with_the_exact_merge() -> None:
    model = source_model()
    twin = copy.deepcopy(model)
    twin.bn1 = ReferenceAdaptedBN(twin.bn1, 0.6)
    twin.bn2 = ReferenceAdaptedBN(twin.bn2, 0.6)
    twin.bn_head = ReferenceAdaptedBN(twin.bn_head, 0.6)  # affine=False in SmallCNN's head
    twin.bn_head.bn.weight = nn.Parameter(torch.ones(5))
    twin.bn_head.bn.bias = nn.Parameter(torch.zeros(5))
    tta = precisebn.adapter(model, prior=0.6)
    before = snapshot(model)
    for x in shifted([8, 8], seed=6):
        out, state = tta.predict(tta.init(), x)
        with torch.no_grad():
            torch.testing.assert_close(out, twin(x), rtol=1e-4, atol=1e-5)
        assert state["bn1"].count.item() == 8 * 64
    assert_same(before, snapshot(model))


def test_online_state_carries_the_target_seen_so_far() -> None:
    model = source_model()
    tta = precisebn.adapter(model, n_source=8)
    state = tta.init()
    batches = shifted([4, 4, 4], seed=7)
    for x in batches:
        _, state = tta.predict(state, x)
    pooled = pooled_inputs(model, batches)
    assert state["bn1"].count.item() == pooled["bn1"].shape[1]
    torch.testing.assert_close(state["bn1"].mean, pooled["bn1"].mean(dim=1), rtol=1e-6, atol=1e-6)


def test_a_batch_of_one_normalises_with_the_source_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    tta = precisebn.adapter(model, prior=0.5)
    x = torch.randn(1, 3)
    out, state = tta.predict(tta.init(), x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))  # eval mode: the source's statistics
    assert state["1"].count.item() == 0.0


def test_predictions_can_be_differentiated() -> None:
    model = source_model()
    tta = precisebn.adapter(model, alpha=0.5)
    out, _ = tta.predict(tta.init(), shifted([4])[0])
    out.sum().backward()
    assert model.conv1.weight.grad is not None


class ZeroesAView(nn.Module):
    """Zeroes a view of its running mean, then calls the layer as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        self.bn.running_mean.view(-1).detach().zero_()
        return self.bn(x)


def test_predict_refuses_writes_outside_the_batch_norm_call() -> None:
    model = ZeroesAView().eval()
    before = snapshot(model)
    tta = precisebn.adapter(model, prior=0.5)
    with pytest.raises(ValueError, match=r"'bn' were written outside their batch_norm call"):
        tta.predict(tta.init(), torch.randn(8, 3) + 2)
    assert_same(before, snapshot(model))


def test_prior_of_presets() -> None:
    assert prior_of(prior=0.25) == Prior(weight=0.25)
    assert prior_of(alpha=0.25) == Prior(weight=0.75)
    assert prior_of(n_source=3, adapts="mean") == Prior(n_source=3.0, adapts="mean")
