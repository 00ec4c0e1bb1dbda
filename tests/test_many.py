"""Many models in one pass: recompute_bn_buffers_many, and torch.func.vmap over stacked weights."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state, vmap

import precisebn

from reference import assert_matches, assert_same, pooled_inputs, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(width: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 3),
        nn.BatchNorm1d(3),
    ).train()


def cnn(width: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 5),
        nn.BatchNorm1d(5),
    ).train()


class Counted:
    """A list of batches that counts how often it is iterated."""

    def __init__(self, batches: list[Tensor]) -> None:
        self.batches = batches
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tensor]:
        self.passes += 1
        return iter(self.batches)


def vectors(count: int, size: int = 16, seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 4, generator=gen) * 2 + 1 for _ in range(count)]


def images(count: int, size: int = 8, seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=gen) + 1 for _ in range(count)]


def member_params(stacked: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    return {k: v[i] for k, v in stacked.items()}


# ------------------------------------------------------------------------------ vmap


def ensemble(
    k: int, build: Any = mlp
) -> tuple[list[nn.Module], dict[str, Tensor], dict[str, Tensor]]:
    members = [build(seed=s) for s in range(k)]
    params, buffers = stack_module_state(members)
    return members, params, buffers


def test_vmap_recomputes_every_member_in_one_pass() -> None:
    members, params, buffers = ensemble(4)
    base = copy.deepcopy(members[0])
    before = snapshot(base)
    loader = Counted(vectors(20))
    new, info = vmap(
        lambda p, b: precisebn.recompute_bn_buffers(
            base, loader, params=p, buffers=b, return_info=True
        ),
        out_dims=(0, None),  # the info is the stack's, its errors stacked already
    )(params, buffers)
    assert loader.passes == 1
    assert_same(before, snapshot(base))
    assert type(new) is dict
    assert info.num_batches == 20
    for i, member in enumerate(members):
        alone, alone_info = precisebn.recompute_bn_buffers(member, loader.batches, return_info=True)
        for key, value in alone.items():
            assert new[key].shape == (4, *value.shape)
            torch.testing.assert_close(new[key][i], value, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(info.stderr[key][i], alone_info.stderr[key])
    # ...and each member is exact against the float64 reference of its own weights.
    for i, member in enumerate(members):
        pooled = pooled_inputs(member, loader.batches)
        for layer, values in pooled.items():
            torch.testing.assert_close(
                new[f"{layer}.running_var"][i].double(), values.var(dim=1), rtol=1e-5, atol=0
            )


def test_vmap_over_some_weights_shares_the_others() -> None:
    members, params, _ = ensemble(3, cnn)
    base = members[0]
    data = images(10)
    own_buffers = dict(base.named_buffers())
    new = vmap(
        lambda p, b: precisebn.recompute_bn_buffers(base, data, params=p, buffers=b),
        in_dims=(0, None),
    )(params, own_buffers)
    for i in range(len(members)):
        alone = precisebn.recompute_bn_buffers(base, data, params=member_params(params, i))
        for key, value in alone.items():
            torch.testing.assert_close(new[key][i], value, rtol=1e-5, atol=1e-7)


def test_vmap_with_tol_converges_when_every_member_does() -> None:
    _, params, buffers = ensemble(3)
    base = mlp()
    data = vectors(64, size=256)
    _, info = vmap(
        lambda p, b: precisebn.recompute_bn_buffers(
            base, data, params=p, buffers=b, tol=0.05, num_batches=64, return_info=True
        ),
        out_dims=(0, None),
    )(params, buffers)
    assert info.converged is True
    assert info.num_batches % 16 == 0
    assert info.num_batches < 64


def test_vmap_composes_with_update_and_capture() -> None:
    members, params, buffers = ensemble(3)
    base = members[0]
    data = vectors(5)
    stats = vmap(precisebn.init)({k: v for k, v in buffers.items() if "running" in k})
    step = vmap(
        lambda p, b, s, x: precisebn.update(s, base, x, params=p, buffers=b),
        in_dims=(0, 0, 0, None),
    )
    for batch in data:
        stats = step(params, buffers, stats, batch)
    out, moments = vmap(lambda p, b: precisebn.capture(base, data[0], params=p, buffers=b))(
        params, buffers
    )
    for i, member in enumerate(members):
        alone = precisebn.init(precisebn.bn_buffers(member))
        for batch in data:
            alone = precisebn.update(alone, member, batch)
        for layer, m in alone.items():
            assert stats[layer].count[i].item() == m.count.item()
            torch.testing.assert_close(stats[layer].mean[i], m.mean)
            torch.testing.assert_close(stats[layer].m2[i], m.m2)
        want_out, want_moments = precisebn.capture(member, data[0])
        torch.testing.assert_close(out[i], want_out)
        for layer, m in want_moments.items():
            torch.testing.assert_close(moments[layer].mean[i], m.mean)


# --------------------------------------------------------------------- a list of models


def test_many_models_of_different_widths_in_one_pass() -> None:
    models = [cnn(width) for width in (2, 4, 8)] + [mlp()]
    snapshots = [snapshot(m) for m in models]

    def feed(model: nn.Module, batch: Tensor) -> Tensor:
        if isinstance(model[0], nn.Linear):
            return model(batch.mean(dim=(2, 3))[:, :3].repeat(1, 2)[:, :4])
        return model(batch)

    loader = Counted(images(24))
    results = precisebn.recompute_bn_buffers_many(models, loader, forward=feed, return_info=True)
    assert loader.passes == 1
    for model, before, (new, info) in zip(models, snapshots, results, strict=True):
        assert_same(before, snapshot(model))
        alone, alone_info = precisebn.recompute_bn_buffers(
            model, loader.batches, forward=feed, return_info=True
        )
        assert info.num_batches == alone_info.num_batches == 24
        for key, value in alone.items():
            assert torch.equal(new[key], value), key  # the same folds, bit for bit
            assert torch.equal(info.stderr[key], alone_info.stderr[key])


def test_one_model_with_several_weight_sets() -> None:
    model = mlp()
    before = snapshot(model)
    paths = [{k: v.detach() * (1 + 0.1 * t) for k, v in model.named_parameters()} for t in range(4)]
    data = vectors(12)
    results = precisebn.recompute_bn_buffers_many([model] * 4, data, params=paths)
    assert_same(before, snapshot(model))
    for p, new in zip(paths, results, strict=True):
        alone = precisebn.recompute_bn_buffers(model, data, params=p)
        for key, value in alone.items():
            assert torch.equal(new[key], value), key
    assert not torch.equal(results[0]["1.running_var"], results[3]["1.running_var"])


def test_warnings_name_the_model() -> None:
    data = [*vectors(4), torch.randn(1, 4)]  # a last batch of one sample
    with pytest.warns(UserWarning, match="batch 4: ") as caught:
        precisebn.recompute_bn_buffers_many([mlp(), mlp(seed=1)], data)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    for i, message in enumerate(messages):
        assert message.startswith(f"model {i}: 1 batch(es) skipped (batch 4: ")


class HiddenResize(nn.Module):
    """Crops the input on the batches listed in ``cropped``: a rule no watch sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cropped: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        if x.data_ptr() in self.cropped:
            x = x[:, :, :, :3]
        return self.bn(F.relu(self.conv(x)))


def test_a_model_whose_sizes_change_by_a_hidden_rule_is_exact_in_one_pass() -> None:
    data = images(40)
    odd = HiddenResize()
    odd.cropped = {b.data_ptr() for i, b in enumerate(data) if i >= 2 and i % 3 == 0}
    plain = cnn()
    loader = Counted(data)
    results = precisebn.recompute_bn_buffers_many([plain, odd], iter(loader))
    assert loader.passes == 1
    assert_matches(results[1], pooled_inputs(odd, data))
    for key, value in precisebn.recompute_bn_buffers(plain, data).items():
        assert torch.equal(results[0][key], value)


def test_tol_stops_when_every_model_has_converged() -> None:
    data = vectors(96, size=256)
    easy, hard = mlp(), mlp(width=12, seed=3)
    results = precisebn.recompute_bn_buffers_many(
        [easy, hard], data, tol=0.03, num_batches=96, return_info=True
    )
    assert all(info.converged for _, info in results)
    alone = [
        precisebn.recompute_bn_buffers(m, data, tol=0.03, return_info=True)[1] for m in (easy, hard)
    ]
    used = [info.num_batches for _, info in results]
    assert used[0] == used[1] == max(a.num_batches for a in alone)


def test_hundreds_of_models() -> None:
    models = [nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)) for _ in range(300)]
    results = precisebn.recompute_bn_buffers_many(models, vectors(3))
    assert len(results) == 300
    want = precisebn.recompute_bn_buffers(models[-1], vectors(3))
    assert torch.equal(results[-1]["1.running_var"], want["1.running_var"])


@pytest.mark.parametrize(
    ("models", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "models is empty"),
        ([nn.Linear(2, 2)], {}, ValueError, "no BatchNorm"),
        (["model"], {}, TypeError, r"models\[0\] is a str"),
        (["mlp", "mlp"], {"params": [None]}, ValueError, "one mapping"),
        (["mlp"], {"params": {}}, ValueError, "one mapping"),
    ],
)
def test_bad_input(models: list[Any], kwargs: dict[str, Any], error: type, match: str) -> None:
    built = [mlp() if m == "mlp" else m for m in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            precisebn.recompute_bn_buffers_many(built, vectors(2), **kwargs)


def test_vmap_leaves_written_buffers_and_stacks_unchanged() -> None:
    """Spectral norm writes its vectors on every training-mode forward: under vmap each
    member's write goes to a private copy, never into the stacked tensors."""

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        linear = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6))
        return nn.Sequential(linear, nn.BatchNorm1d(6)).train()

    members = [net(s) for s in range(3)]
    params, buffers = stack_module_state(members)
    before = {k: v.clone() for k, v in {**params, **buffers}.items()}
    snapshots = [snapshot(m) for m in members]
    data = vectors(6)
    new = vmap(lambda p, b: precisebn.recompute_bn_buffers(members[0], data, params=p, buffers=b))(
        params, buffers
    )
    for key, value in {**params, **buffers}.items():
        assert torch.equal(value, before[key]), key
    for member, taken in zip(members, snapshots, strict=True):
        assert_same(taken, snapshot(member))
    for i, member in enumerate(members):
        alone = precisebn.recompute_bn_buffers(member, data)
        torch.testing.assert_close(new["1.running_var"][i], alone["1.running_var"])


def test_vmap_over_the_data_or_nested_is_a_clear_error() -> None:
    members, params, buffers = ensemble(2)
    data = vectors(3)
    xs = torch.stack(data)
    with pytest.raises(ValueError, match="vmap over the weights"):
        vmap(lambda x: precisebn.recompute_bn_buffers(members[0], [x]))(xs)
    stats = precisebn.init(precisebn.bn_buffers(members[0]))
    with pytest.raises(ValueError, match="vmap over the weights"):
        vmap(lambda x: precisebn.update(stats, members[0], x))(xs)
    with pytest.raises(ValueError, match="vmap over the weights"):
        vmap(lambda x: precisebn.capture(members[0], x))(xs)
    twice = (
        {k: torch.stack([v, v]) for k, v in params.items()},
        {k: torch.stack([v, v]) for k, v in buffers.items()},
    )
    with pytest.raises(ValueError, match="nested over precisebn"):
        vmap(
            vmap(lambda p, b: precisebn.recompute_bn_buffers(members[0], data, params=p, buffers=b))
        )(*twice)
