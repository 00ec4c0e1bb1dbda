"""Property tests of the variance identity: the fold equals the pooled statistics."""

from __future__ import annotations

import optree
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import precisebn
from precisebn import Moments

SETTINGS = settings(max_examples=40, deadline=None)


def moments_of(values: Tensor) -> Moments:
    """Direct float64 moments of a ``[C, N]`` matrix (the test's own two-pass formula)."""
    mean = values.mean(dim=1)
    m2 = ((values - mean[:, None]) ** 2).sum(dim=1)
    return Moments(torch.tensor(float(values.shape[1]), dtype=torch.float64), mean, m2)


@st.composite
def partitioned(draw: st.DrawFn) -> tuple[Tensor, list[int]]:
    """A float64 ``[C, N]`` matrix with random scale and offset, and a partition of N."""
    channels = draw(st.integers(1, 6))
    parts = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-3, 1e3))
    offset = draw(st.floats(-1e4, 1e4))
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(channels, sum(parts), generator=gen, dtype=torch.float64)
    return values * scale + offset, parts


def chunks(values: Tensor, parts: list[int]) -> list[dict[str, Moments]]:
    return [{"bn": moments_of(c)} for c in values.split(parts, dim=1)]


EPS = torch.finfo(torch.float64).eps


def var_atol(mean: Tensor, var: Tensor) -> Tensor:
    """The variance's conditioning: centred values carry ``eps * |mean|`` absolute error,
    so the variance carries about ``2 eps |mean| std`` (relative ``2 eps |mean| / std``)."""
    return 1e-10 * var + 16 * EPS * mean.abs() * var.sqrt()


def assert_close(a: Moments, b: Moments) -> None:
    assert torch.equal(a.count, b.count)
    var = b.m2 / b.count
    assert ((a.mean - b.mean).abs() <= 1e-12 * (b.mean.abs() + var.sqrt())).all()
    assert ((a.m2 - b.m2).abs() <= var_atol(b.mean, var) * b.count).all()


@SETTINGS
@given(partitioned())
def test_fold_equals_pooled_statistics(case: tuple[Tensor, list[int]]) -> None:
    values, parts = case
    state = precisebn.init({"bn.running_mean": torch.zeros(values.shape[0])})
    for piece in chunks(values, parts):
        state = precisebn.merge(state, piece)
    assert_close(state["bn"], moments_of(values))


@SETTINGS
@given(partitioned(), partitioned(), partitioned())
def test_merge_is_associative_and_commutative(a_case, b_case, c_case) -> None:
    width = min(a_case[0].shape[0], b_case[0].shape[0], c_case[0].shape[0])
    a, b, c = ({"bn": moments_of(v[:width])} for v, _ in (a_case, b_case, c_case))
    left = precisebn.merge(precisebn.merge(a, b), c)
    right = precisebn.merge(a, precisebn.merge(b, c))
    assert_close(left["bn"], right["bn"])
    assert_close(precisebn.merge(a, b)["bn"], precisebn.merge(b, a)["bn"])


@SETTINGS
@given(partitioned())
def test_finalize_of_merge_equals_fold_over_both_parts(case: tuple[Tensor, list[int]]) -> None:
    values, parts = case
    if values.shape[1] < 2:
        return
    cut = max(1, len(parts) // 2)
    first, second = chunks(values, parts)[:cut], chunks(values, parts)[cut:]
    fold = {}
    for piece in first + second:
        fold = precisebn.merge(fold, piece)
    halves = [{}, {}]
    for i, part in enumerate((first, second)):
        for piece in part:
            halves[i] = precisebn.merge(halves[i], piece)
    merged = precisebn.finalize(precisebn.merge(*halves))
    direct = precisebn.finalize(fold)
    mean, var = values.mean(dim=1), values.var(dim=1)
    for new in (merged, direct):
        assert ((new["bn.running_mean"] - mean).abs() <= 1e-12 * (mean.abs() + var.sqrt())).all()
        assert ((new["bn.running_var"] - var).abs() <= var_atol(mean, var)).all()


@SETTINGS
@given(
    channels=st.integers(1, 5),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    spatial=st.tuples(st.integers(1, 4), st.integers(2, 4)),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_capture_path_equals_pooled_float64(channels, sizes, spatial, offset, seed) -> None:
    """Through the model: BatchNorm2d in float64, size-1 batches allowed when H*W > 1."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.BatchNorm2d(channels).double()
    batches = [
        torch.randn(n, channels, *spatial, generator=gen, dtype=torch.float64) + offset
        for n in sizes
    ]
    new = precisebn.recompute_bn_buffers(model, batches)
    pooled = torch.cat([b.transpose(0, 1).reshape(channels, -1) for b in batches], dim=1)
    scale = pooled.mean(1).abs() + pooled.std(1)
    assert ((new["running_mean"] - pooled.mean(1)).abs() <= 1e-12 * scale).all()
    assert torch.allclose(new["running_var"], pooled.var(1), rtol=1e-10, atol=0)


def test_state_is_an_optree_pytree() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    stats = precisebn.update(precisebn.init(precisebn.bn_buffers(model)), model, torch.randn(6, 3))
    leaves, spec = optree.tree_flatten(stats)
    assert len(leaves) == 2 * 3
    assert all(isinstance(leaf, Tensor) for leaf in leaves)
    doubled = optree.tree_unflatten(spec, [leaf * 2 for leaf in leaves])
    assert isinstance(doubled["1"], Moments)
    assert torch.equal(doubled["2"].m2, stats["2"].m2 * 2)


def test_finalize_of_an_empty_state_is_empty() -> None:
    assert precisebn.finalize({}) == {}
