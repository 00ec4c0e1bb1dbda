"""Standard errors, n_eff and tol=: against a float64 reference and against known truth."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import precisebn
from precisebn._moments import Moments
from precisebn._stderr import MIN_BATCHES, accumulate, evaluate, recenter, terms

from models import Slimmable
from reference import pooled_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_errors(model: nn.Module, batches: list[Any], **kwargs: Any) -> dict[str, Tensor]:
    """Batch-means standard errors straight from every value each layer saw, in float64:
    ``sqrt(B / (B - 1) * Σ_k (y_k - r n_k)**2) / N`` for the mean (``y_k`` the batch's sum)
    and for the variance (``y_k`` the batch's sum of squared deviations from the pooled
    mean, ``r = M2 / N``), the latter scaled by ``N / (N - 1)``."""
    per_batch = [pooled_inputs(model, [batch], **kwargs) for batch in batches]
    out = {}
    for layer in per_batch[0]:
        chunks = [values[layer] for values in per_batch if layer in values]
        x = torch.cat(chunks, dim=1)
        n_all, count = x.shape[1], len(chunks)
        mu = x.mean(dim=1, keepdim=True)
        r = (x - mu).square().sum(dim=1) / n_all
        y = torch.stack([(c - mu).sum(dim=1) for c in chunks])
        z = torch.stack([(c - mu).square().sum(dim=1) - r * c.shape[1] for c in chunks])
        factor = count / (count - 1)
        out[f"{layer}.running_mean"] = (factor * y.square().sum(0)).sqrt() / n_all
        out[f"{layer}.running_var"] = (
            (factor * z.square().sum(0)).sqrt() / n_all * n_all / (n_all - 1)
        )
    return out


class Net(nn.Module):
    def __init__(self, *, reuse: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.reuse = reuse

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        if self.reuse:  # the same layer twice in one batch: one draw of the batch
            h = torch.relu(self.bn(self.conv(h[:, :3] * 2 + 1)))
        return self.bn1(self.fc(h.mean(dim=(2, 3))))


def batches(count: int, *, seed: int, sizes: tuple[int, ...] = (8,)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(sizes[i % len(sizes)], 3, 6, 6, generator=gen) * 2 + 3 for i in range(count)
    ]


def assert_errors_match(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key].double(), value, rtol=rtol, atol=0.0, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "reused-layer"])
def test_errors_match_a_float64_reference(reuse: bool) -> None:
    torch.manual_seed(0)
    model = Net(reuse=reuse)
    data = batches(40, seed=1, sizes=(8, 8, 5))  # unequal batches, more than two blocks
    new, info = precisebn.recompute_bn_buffers(model, data, return_info=True)
    assert set(info.stderr) == set(new)
    for key, value in info.stderr.items():
        assert value.shape == new[key].shape
        assert value.dtype == torch.float64
    assert_errors_match(info.stderr, reference_errors(model, data), rtol=2e-4)


def test_errors_of_a_float64_model_are_exact_to_float64_rounding() -> None:
    torch.manual_seed(0)
    model = Net().double()
    data = [b.double() for b in batches(37, seed=2, sizes=(8, 3))]
    _new, info = precisebn.recompute_bn_buffers(model, data, return_info=True)
    assert_errors_match(info.stderr, reference_errors(model, data), rtol=1e-9)


def test_one_batch_has_no_error_estimate_and_cannot_converge() -> None:
    model = Net()
    _, info = precisebn.recompute_bn_buffers(model, batches(1, seed=3), return_info=True)
    assert all(torch.isinf(v).all() for v in info.stderr.values())
    with pytest.warns(UserWarning, match="tol=0.5 was not reached: it used 1 batch"):
        _new, info = precisebn.recompute_bn_buffers(
            model, batches(1, seed=3), tol=0.5, return_info=True
        )
    assert info.converged is False


def test_a_constant_channel_is_known_exactly() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight[1] = 0.0  # channel 1 is the bias, whatever the input
    data = [torch.randn(32, 4) for _ in range(MIN_BATCHES)]
    _new, info = precisebn.recompute_bn_buffers(model, data, tol=0.5, return_info=True)
    assert info.stderr["1.running_var"][1].item() == 0.0
    assert info.stderr["1.running_mean"][1].item() == 0.0
    assert info.converged is True


# --------------------------------------------------------------------- calibration


class Gaussian:
    """Inputs ``mu + A z`` through a fixed ``Linear`` + ``BatchNorm1d``: the BN input's
    population mean ``W mu + b`` and variance ``diag(W A A^T W^T)`` are known."""

    def __init__(self, *, features: int = 8, channels: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(features, channels), nn.BatchNorm1d(channels))
        with torch.no_grad():
            self.model[0].weight.copy_(torch.randn(channels, features, generator=gen))
            self.model[0].bias.copy_(torch.randn(channels, generator=gen) * 3)
        self.mu = torch.randn(features, dtype=torch.float64, generator=gen) * 2
        self.a = torch.randn(features, features, dtype=torch.float64, generator=gen) * 0.5
        w = self.model[0].weight.detach().double()
        self.mean = w @ self.mu + self.model[0].bias.detach().double()
        self.var = torch.einsum("ci,ij,cj->c", w @ self.a, torch.eye(features).double(), w @ self.a)

    def batch(self, size: int, gen: torch.Generator) -> Tensor:
        z = torch.randn(size, self.mu.numel(), dtype=torch.float64, generator=gen)
        return (self.mu + z @ self.a.T).float()

    def endless(self, size: int, *, seed: int) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(size, gen)


def coverage(errors: list[Tensor], stderrs: list[Tensor]) -> float:
    err, se = torch.stack(errors), torch.stack(stderrs)
    return (err.abs() <= 1.96 * se).double().mean().item()


def test_calibrated_on_iid_data_with_a_known_population() -> None:
    case = Gaussian()
    gen = torch.Generator().manual_seed(1)
    mean_err, var_err, mean_se, var_se, n_eff = [], [], [], [], []
    for _ in range(150):
        new, info = precisebn.recompute_bn_buffers(
            case.model, [case.batch(64, gen) for _ in range(20)], return_info=True
        )
        mean_err.append(new["1.running_mean"].double() - case.mean)
        var_err.append(new["1.running_var"].double() - case.var)
        mean_se.append(info.stderr["1.running_mean"])
        var_se.append(info.stderr["1.running_var"])
        n_eff.append(info.n_eff["1"])
    assert 0.90 <= coverage(mean_err, mean_se) <= 0.98
    assert 0.90 <= coverage(var_err, var_se) <= 0.98
    # Independent values: about one effective value per value (20 batches of 64).
    assert 0.8 * 1280 <= sorted(n_eff)[len(n_eff) // 2] <= 1.25 * 1280


def smooth_fields(count: int, gen: torch.Generator, *, size: int = 12) -> Tensor:
    """Stationary random fields correlated over a few pixels: white noise blurred by a
    5x5 box, plus a constant offset."""
    noise = torch.randn(count, 1, size + 4, size + 4, dtype=torch.float64, generator=gen)
    return nn.functional.avg_pool2d(noise, 5, stride=1) * 5 + 2


def test_calibrated_on_spatially_correlated_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # the truth: a long float64 run, 100 times the data of a run
        long = model[0].double()(smooth_fields(32_000, gen)).transpose(0, 1).reshape(4, -1)
    model[0].float()
    true_mean, true_var = long.mean(dim=1), long.var(dim=1)
    mean_err, var_err, mean_se, var_se, n_eff = [], [], [], [], []
    for _ in range(100):
        new, info = precisebn.recompute_bn_buffers(
            model, [smooth_fields(16, gen).float() for _ in range(20)], return_info=True
        )
        mean_err.append(new["1.running_mean"].double() - true_mean)
        var_err.append(new["1.running_var"].double() - true_var)
        mean_se.append(info.stderr["1.running_mean"])
        var_se.append(info.stderr["1.running_var"])
        n_eff.append(info.n_eff["1"])
    assert 0.90 <= coverage(mean_err, mean_se) <= 0.98
    assert 0.90 <= coverage(var_err, var_se) <= 0.98
    values = 20 * 16 * 10 * 10  # batches times images times positions
    assert max(n_eff) < 0.25 * values  # neighbouring pixels are far from independent


# ----------------------------------------------------------------------------- tol=


def test_tol_stops_early_with_the_promised_precision() -> None:
    case = Gaussian(channels=32)
    tol = 1e-2
    within, used = [], []
    for seed in range(4):
        new, info = precisebn.recompute_bn_buffers(
            case.model, case.endless(256, seed=seed), num_batches=2000, tol=tol, return_info=True
        )
        assert info.converged is True
        assert info.num_batches % 16 == 0
        assert info.num_batches < 2000
        used.append(info.num_batches)
        rel_mean = (new["1.running_mean"].double() - case.mean).abs() / case.var.sqrt()
        rel_var = (new["1.running_var"].double() - case.var).abs() / case.var
        within.append(torch.maximum(rel_mean, rel_var) <= 2.5 * tol)
        rel = torch.maximum(
            info.stderr["1.running_mean"] / new["1.running_var"].double().sqrt(),
            info.stderr["1.running_var"] / new["1.running_var"].double(),
        )
        assert rel.max().item() <= tol
    assert torch.cat(within).double().mean().item() >= 0.95
    # sqrt(2 / N) <= 1e-2 needs about 20 000 values of a Gaussian channel: ~80 batches.
    assert all(48 <= n <= 160 for n in used), used


def test_tol_out_of_reach_runs_to_the_cap_and_warns() -> None:
    case = Gaussian()
    with pytest.warns(UserWarning, match=r"tol=0.0001 was not reached: after 40 batches") as rec:
        _new, info = precisebn.recompute_bn_buffers(
            case.model, case.endless(64, seed=0), num_batches=40, tol=1e-4, return_info=True
        )
    assert "of layer '1'" in str(rec[0].message)
    assert "batches would reach it" in str(rec[0].message)
    assert info.converged is False
    assert info.num_batches == 40


def test_tol_stops_at_a_pooling_point_on_a_list_too() -> None:
    case = Gaussian()
    gen = torch.Generator().manual_seed(0)
    data = [case.batch(512, gen) for _ in range(100)]
    new, info = precisebn.recompute_bn_buffers(case.model, data, tol=0.05, return_info=True)
    assert info.converged is True
    assert info.num_batches == MIN_BATCHES
    _whole, whole_info = precisebn.recompute_bn_buffers(case.model, data, return_info=True)
    assert whole_info.converged is None
    assert whole_info.num_batches == 100
    first, first_info = precisebn.recompute_bn_buffers(
        case.model, data[:MIN_BATCHES], return_info=True
    )
    for key in new:  # the early result is exactly the result of its batches
        assert torch.equal(new[key], first[key])
        assert torch.equal(info.stderr[key], first_info.stderr[key])


@pytest.mark.parametrize("tol", [0, -1.0, math.nan, math.inf, True, "0.1"])
def test_bad_tol_is_rejected(tol: Any) -> None:
    with pytest.raises(ValueError, match="tol must be a positive number"):
        precisebn.recompute_bn_buffers(Net(), batches(2, seed=0), tol=tol)


def test_the_info_is_a_pytree_of_the_run() -> None:
    case = Gaussian()
    gen = torch.Generator().manual_seed(0)
    new, info = precisebn.recompute_bn_buffers(
        case.model, [case.batch(64, gen) for _ in range(MIN_BATCHES)], tol=0.5, return_info=True
    )
    doubled = optree.tree_map(lambda t: t * 2 if isinstance(t, Tensor) else t, (new, info))
    assert type(doubled[0]) is dict
    assert isinstance(doubled[1], precisebn.RunInfo)
    assert doubled[1].converged is True
    assert doubled[1].n_eff == info.n_eff
    assert torch.equal(doubled[1].stderr["1.running_var"], 2 * info.stderr["1.running_var"])
    assert torch.equal(doubled[0]["1.running_var"], 2 * new["1.running_var"])


# ------------------------------------------------------------------------ the sums


def _moments(draw: Any, channels: int) -> Moments:
    count = draw(st.integers(2, 50))
    center = draw(st.floats(-1e3, 1e3))
    values = torch.tensor(
        draw(st.lists(st.floats(-3, 3), min_size=channels * count, max_size=channels * count)),
        dtype=torch.float64,
    ).reshape(channels, count)
    values = values + center
    mean = values.mean(dim=1)
    return Moments(
        torch.tensor(float(count), dtype=torch.float64),
        mean,
        (values - mean[:, None]).square().sum(dim=1),
    )


@st.composite
def runs(draw: Any) -> tuple[list[Moments], list[int]]:
    batches = draw(st.lists(st.builds(lambda: None), min_size=3, max_size=9))
    moments = [_moments(draw, 2) for _ in batches]
    cuts = sorted(draw(st.sets(st.integers(1, len(moments) - 1), max_size=3)))
    return moments, cuts


def _fold(moments: list[Moments]) -> tuple[Moments, Any]:
    total = moments[0]
    spread = terms(moments[0], moments[0].mean)
    for m in moments[1:]:
        total = precisebn.merge({"l": total}, {"l": m})["l"]
        spread = accumulate(spread, terms(m, moments[0].mean))
    return total, spread


@settings(max_examples=60, deadline=None)
@given(runs())
def test_the_sums_merge_associatively(run: tuple[list[Moments], list[int]]) -> None:
    moments, cuts = run
    whole_m, whole_s = _fold(moments)
    bounds = [0, *cuts, len(moments)]
    parts = [_fold(moments[a:b]) for a, b in itertools.pairwise(bounds)]
    merged_m, merged_s = parts[-1]  # merged right to left, each part about its own center
    for m, s in reversed(parts[:-1]):
        merged_m = precisebn.merge({"l": m}, {"l": merged_m})["l"]
        merged_s = accumulate(s, merged_s)
    want, got = evaluate(whole_m, whole_s), evaluate(merged_m, merged_s)
    moved = evaluate(whole_m, recenter(whole_s, whole_s.center + 1.0))
    for a, b, c in zip(want, got, moved, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(c, a, rtol=1e-7, atol=1e-12)
    # ...and both are the batch-means formula, evaluated directly.
    n, mu = whole_m.count, whole_m.mean
    factor = len(moments) / (len(moments) - 1)
    y = torch.stack([m.count * (m.mean - mu) for m in moments])
    torch.testing.assert_close(
        want.mean, (factor * y.square().sum(0)).sqrt() / n, rtol=1e-7, atol=1e-12
    )
    r = whole_m.m2 / n
    z = torch.stack([m.m2 + m.count * (m.mean - mu).square() - r * m.count for m in moments])
    torch.testing.assert_close(
        want.var,
        (factor * z.square().sum(0)).sqrt() / n * n / (n - 1),
        rtol=1e-6,
        atol=1e-10,
    )


def test_no_warning_without_tol() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _new, info = precisebn.recompute_bn_buffers(Net(), batches(3, seed=0), return_info=True)
    assert info.converged is None


def test_channels_first_reached_late_keep_exact_errors_far_from_zero() -> None:
    """A slimmable layer whose last channels no batch of the first block covers, with
    features around 1e4: their sums must not be taken about 0."""
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(32, 4, dtype=torch.float64, generator=gen) + 1e4, 2 if i < 20 else 4)
        for i in range(40)
    ]
    _new, info = precisebn.recompute_bn_buffers(
        Slimmable().double(), data, forward=lambda model, batch: model(batch), return_info=True
    )
    for channel in range(4):
        chunks = [x[:, channel] for x, c in data if channel < c]
        values = torch.cat(chunks)
        n, count, mu = values.numel(), len(chunks), values.mean()
        factor = count / (count - 1)
        y = torch.stack([(c - mu).sum() for c in chunks])
        r = (values - mu).square().sum() / n
        z = torch.stack([(c - mu).square().sum() - r * c.numel() for c in chunks])
        want_mean = (factor * y.square().sum()).sqrt() / n
        want_var = (factor * z.square().sum()).sqrt() / n * n / (n - 1)
        got = info.stderr["bn.running_mean"][channel], info.stderr["bn.running_var"][channel]
        torch.testing.assert_close(got[0], want_mean, rtol=1e-9, atol=0)
        torch.testing.assert_close(got[1], want_var, rtol=1e-9, atol=0)


def test_the_trace_ends_on_the_final_errors_and_shrinks_with_the_batches() -> None:
    case = Gaussian()
    gen = torch.Generator().manual_seed(4)
    new, info = precisebn.recompute_bn_buffers(
        case.model, [case.batch(64, gen) for _ in range(70)], num_batches=70, return_info=True
    )
    ((layer, points),) = info.trace.items()
    assert [b for b, _ in points] == [16, 32, 48, 64, 70]
    var = new["1.running_var"].double()
    final = torch.maximum(
        info.stderr["1.running_mean"] / var.sqrt(), info.stderr["1.running_var"] / var
    )
    assert points[-1][1] == pytest.approx(final.max().item(), rel=1e-6)
    assert points[-1][1] < points[0][1]  # errors shrink as 1 / sqrt(batches)
    _, plain = precisebn.recompute_bn_buffers(case.model, [case.batch(8, gen)], return_info=True)
    assert plain.trace[layer] == ((1, math.inf),)  # one batch: no spread to estimate from
