"""The promise on forwards users really run: the model unchanged, the statistics exact.

Every exactness check is against the float64 reference of ``reference.py`` (pre-hooks on a
deep copy whose BN layers have momentum 0), or a reference written out for the case.
"""

from __future__ import annotations

import copy
import logging
import random
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import precisebn

from models import ReusedBN, SmallCNN
from reference import assert_matches, pooled_inputs


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), f"{key} changed"


# ---------------------------------------------------------------- buffers the forward writes


class Writers(nn.Module):
    """Spectral norm of both kinds, a counter, and a large table the forward only reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8))
        self.bn_a = nn.BatchNorm1d(8)
        self.b = nn.utils.spectral_norm(nn.Linear(8, 8))
        self.bn_b = nn.BatchNorm1d(8)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("table", torch.randn(4096, 8))

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        y = self.bn_a(self.a(x)) + self.table[: x.shape[0]]
        return self.bn_b(self.b(torch.relu(y)))


def writer_batches(n: int = 20) -> list[Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(16, 6, generator=gen) * 3 + 2 for _ in range(n)]


def test_buffers_the_forward_writes_are_copied_and_the_rest_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = Writers().train()
    before = state(model)
    plain_weight = model.b.weight  # the old spectral norm keeps a plain attribute
    batches = writer_batches()
    with caplog.at_level(logging.DEBUG, logger="precisebn"):
        new = precisebn.recompute_bn_buffers(model, batches)
    assert_state_unchanged(before, model)
    assert model.b.weight is plain_weight
    # The deep copy of the reference updates u, v and the counter batch after batch too.
    assert_matches(new, pooled_inputs(model, batches))
    (copied,) = [r.getMessage() for r in caplog.records if "copied on write" in r.getMessage()]
    for key in ("a.parametrizations.weight.0._u", "b.weight_u", "seen"):
        assert repr(key) in copied
    assert "table" not in copied


def test_capture_and_update_copy_on_write_too() -> None:
    torch.manual_seed(1)
    model = Writers().train()
    before = state(model)
    batch = writer_batches(1)[0]
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = 0.0
    with torch.no_grad():
        expected = twin(batch)
    out, _ = precisebn.capture(model, batch)
    assert torch.equal(out, expected)
    stats = precisebn.init(precisebn.bn_buffers(model))
    for b in writer_batches(3):
        stats = precisebn.update(stats, model, b)
    assert_state_unchanged(before, model)


@pytest.mark.parametrize("fail_at", ["loader", "forward"])
def test_writers_are_untouched_when_the_run_fails(fail_at: str) -> None:
    model = Writers().train()
    before = state(model)
    batches = writer_batches(6)

    def loader() -> Iterator[Tensor]:
        yield from batches[:4]
        if fail_at == "loader":
            raise OSError("disk went away")
        yield torch.randn(16, 5)  # the wrong number of features

    with pytest.raises((OSError, RuntimeError)):
        precisebn.recompute_bn_buffers(model, loader())
    assert_state_unchanged(before, model)


class WritesParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
        return self.bn(self.lin(x))


def test_a_parameter_written_in_place_is_reported() -> None:
    with pytest.raises(
        RuntimeError, match=r"wrote into the model's own tensor\(s\) \['lin.weight'\]"
    ):
        precisebn.recompute_bn_buffers(WritesParameter(), [torch.randn(8, 3)])


# ---------------------------------------------------------------------- quantisation aware


class QATNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.bn2(self.conv2(x)))


def qat_model(*, observers: bool) -> nn.Module:
    """What ``fuse_modules_qat`` and ``prepare_qat`` make, after two training steps."""
    torch.manual_seed(2)
    model = QATNet().train()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
        model = torch.ao.quantization.fuse_modules_qat(
            model, [["conv", "bn", "relu"], ["conv2", "bn2"]]
        )
        model = torch.ao.quantization.prepare_qat(model)
    for batch in qat_batches(2):
        model(batch)
    if not observers:
        model.apply(torch.ao.quantization.disable_observer)
    return model


def qat_batches(n: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(n + 100)
    return [torch.randn(8, 3, 10, 10, generator=gen) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize("observers", [True, False])
def test_qat_fused_conv_bn_is_exact_and_untouched(observers: bool) -> None:
    model = qat_model(observers=observers)
    assert type(model.conv).__name__ == "ConvBnReLU2d"
    before = state(model)
    batches = qat_batches(12)
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_state_unchanged(before, model)
    # The fused modules scale their weight by bn.running_var: the reference (momentum 0)
    # reads the caller's buffers throughout, as precisebn does.
    assert_matches(new, pooled_inputs(model, batches))


# ------------------------------------------------------------------- sliced statistics


class DynamicBatchNorm2d(nn.Module):
    """Once-for-all's dynamic BN: normalises the first ``c`` channels of a wider layer."""

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(max_channels)

    def forward(self, x: Tensor) -> Tensor:
        c, bn = x.shape[1], self.bn
        factor = 0.0
        if bn.training:
            bn.num_batches_tracked += 1
            momentum = bn.momentum
            factor = 1.0 / float(bn.num_batches_tracked) if momentum is None else momentum
        return F.batch_norm(
            x,
            bn.running_mean[:c],
            bn.running_var[:c],
            bn.weight[:c],
            bn.bias[:c],
            bn.training,
            factor,
            bn.eps,
        )


class SlimNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.dbn = DynamicBatchNorm2d(16)
        self.width = 16

    def forward(self, x: Tensor) -> Tensor:
        w = self.width
        return self.dbn(F.conv2d(x, self.conv.weight[:w], self.conv.bias[:w]))


def slim_forward(model: Any, batch: tuple[Tensor, int]) -> Any:
    x, width = batch
    model.width = width
    return model(x)


def slim_reference(model: SlimNet, batches: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Per channel, the float64 mean and unbiased variance over every call that reached it."""
    values: list[list[Tensor]] = [[] for _ in range(16)]
    with torch.no_grad():
        for x, w in batches:
            y = F.conv2d(x, model.conv.weight[:w], model.conv.bias[:w]).double()
            for c in range(w):
                values[c].append(y[:, c].flatten())
    mean = torch.stack([torch.cat(v).mean() if v else torch.tensor(0.0) for v in values])
    var = torch.stack([torch.cat(v).var() if v else torch.tensor(1.0) for v in values])
    return mean, var


def slim_batches(widths: list[int]) -> list[tuple[Tensor, int]]:
    gen = torch.Generator().manual_seed(len(widths))
    return [(torch.randn(4, 3, 8, 8, generator=gen) * 2 + 1, w) for w in widths]


def test_sliced_statistics_pool_each_channel_over_the_calls_that_covered_it() -> None:
    torch.manual_seed(3)
    model = SlimNet().train()
    before = state(model)
    batches = slim_batches([8, 16, 12, 8, 16, 12, 8, 8, 12, 16, 8, 12, 8, 8])
    new = precisebn.recompute_bn_buffers(model, batches, forward=slim_forward)
    assert_state_unchanged(before, model)
    mean, var = slim_reference(model, batches)
    got_mean, got_var = new["dbn.bn.running_mean"].double(), new["dbn.bn.running_var"].double()
    assert ((got_mean - mean).abs() / (mean.abs() + var.sqrt())).max() < 1e-6
    assert ((got_var - var).abs() / var).max() < 1e-5


def test_channels_no_call_covered_keep_their_buffers() -> None:
    model = SlimNet().train()
    with torch.no_grad():
        model.dbn.bn.running_mean.fill_(7.0)
    batches = slim_batches([8, 12, 8])
    with pytest.warns(UserWarning, match=r"channels that no call covered.*'dbn.bn'"):
        new = precisebn.recompute_bn_buffers(model, batches, forward=slim_forward)
    mean, var = slim_reference(model, batches)
    assert torch.equal(new["dbn.bn.running_mean"][12:], torch.full((4,), 7.0))
    assert torch.equal(new["dbn.bn.running_var"][12:], torch.ones(4))
    assert (new["dbn.bn.running_var"][:12].double() - var[:12]).abs().max() < 1e-5 * var.max()
    scale = mean[:12].abs() + var[:12].sqrt()
    assert ((new["dbn.bn.running_mean"][:12].double() - mean[:12]).abs() / scale).max() < 1e-6


def test_update_and_capture_count_sliced_channels_separately() -> None:
    model = SlimNet().train()
    stats = precisebn.init(precisebn.bn_buffers(model))
    for x, w in slim_batches([8, 12]):
        model.width = w
        stats = precisebn.update(stats, model, x)
    model.width = 16
    count = stats["dbn.bn"].count
    assert count.tolist() == [288.0] * 8 + [144.0] * 4 + [0.0] * 4  # 4 x 6 x 6 per batch
    _, moments = precisebn.capture(model, slim_batches([16])[0][0])
    assert moments["dbn.bn"].count.shape == ()


class ByIndex(nn.Module):
    """Selects channels with an index tensor: a form the tags cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.register_buffer("keep", torch.tensor([0, 2, 4]))

    def forward(self, x: Tensor) -> Tensor:
        bn, keep = self.bn, self.keep
        return F.batch_norm(x, bn.running_mean[keep], bn.running_var[keep], training=True)


class ByView(nn.Module):
    """Passes ``running_mean.view(-1)``: the stock kernel would write the private copy."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        return F.batch_norm(x, bn.running_mean.view(-1), bn.running_var.view(-1), training=True)


class ZeroesAView(nn.Module):
    """Zeroes a view of its running mean, then calls the layer as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        self.bn.running_mean.view(-1).detach().zero_()
        return self.bn(x)


class ByHand(nn.Module):
    """Updates its running mean by hand instead of through batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> Tensor:
        self.bn.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.bn(x)


class MixedSlices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        return F.batch_norm(x, bn.running_mean[:3], bn.running_var[3:], training=True)


@pytest.mark.parametrize(
    ("module", "features", "message"),
    [
        (ByIndex, 3, r"'bn' \(used by .*getitem.*\): the forward used the running statistics"),
        (ByView, 3, r"'bn' \(used by TensorBase.view\): the forward used the running"),
        (ZeroesAView, 3, r"'bn' were written outside their batch_norm call"),
        (ByHand, 3, r"'bn': the forward writes the running statistics with .*mul_"),
        (MixedSlices, 3, r"channels 0:3 of layer 'bn''s running_mean as running_mean and"),
    ],
)
def test_forms_precisebn_cannot_follow_raise_naming_the_layer(
    module: type[nn.Module], features: int, message: str
) -> None:
    model = module().train()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        precisebn.recompute_bn_buffers(model, [torch.randn(8, features) for _ in range(3)])
    assert_state_unchanged(before, model)


# ------------------------------------------------------------------------- non-finite


def test_nan_names_the_layers_and_the_batches() -> None:
    model = SmallCNN().train()
    before = state(model)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(20)]
    batches[18][1, 0, 2, 2] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"reached BatchNorm layer\(s\) 'bn1', 'bn2', 'bn_head', first in batches 16-19",
    ):
        precisebn.recompute_bn_buffers(model, batches)
    assert_state_unchanged(before, model)
    stats = precisebn.init(precisebn.bn_buffers(model))
    stats = precisebn.update(stats, model, batches[18])
    with pytest.raises(ValueError, match="non-finite values"):
        precisebn.finalize(stats, like=precisebn.bn_buffers(model))


def test_nan_in_a_reused_layer_names_its_batch() -> None:
    model = ReusedBN().train()
    batches = [torch.randn(4, 3, 10, 10) for _ in range(5)]
    batches[2][0, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"layer\(s\) 'bn', first in batches 0-4"):
        precisebn.recompute_bn_buffers(model, batches)


def test_float16_overflow_says_so() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)
    batches = [torch.full((8, 4), 100.0).half() + torch.randn(8, 4).half() for _ in range(3)]
    with pytest.raises(ValueError, match=r"'1'.*float16 tops out at 65504"):
        precisebn.recompute_bn_buffers(model, batches)


# ------------------------------------------------------------- sizes that change by themselves


class PythonRandomCrop(nn.Module):
    """Crops the input to a size drawn with Python's random module: no tensor is read."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if random.random() < self.rate:
            side = random.randint(3, 7)
            x = x[:, :, :side, :side]
        return self.bn(self.conv(x))


class HiddenCrop(nn.Module):
    """Crops every ``period``-th batch it is given, by a rule no watch can see."""

    def __init__(self, period: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.period = period

    def forward(self, x: Tensor) -> Tensor:
        if CROPPED.get(x.data_ptr(), False):
            x = x[:, :, :4, :4]
        return self.bn(self.conv(x))


CROPPED: dict[int, bool] = {}


def test_a_python_random_crop_is_counted_from_the_inputs() -> None:
    model = PythonRandomCrop(rate=0.05).train()
    batches = [torch.randn(4, 3, 8, 8) + 1 for _ in range(60)]
    random.seed(5)
    new = precisebn.recompute_bn_buffers(model, batches)
    random.seed(5)  # the reference draws the same crops, one forward per batch
    assert_matches(new, pooled_inputs(model, batches))


@pytest.mark.parametrize("period", [100, 25, 4])
def test_a_size_change_by_a_hidden_rule_is_counted_exactly(period: int) -> None:
    torch.manual_seed(6)
    model = HiddenCrop(period=period).train()
    batches = [torch.randn(4, 3, 8, 8) + 1 for _ in range(100)]
    CROPPED.clear()
    CROPPED.update({b.data_ptr(): i % period == period - 1 for i, b in enumerate(batches)})
    pooled = pooled_inputs(model, batches)
    assert pooled["bn"].shape[1] == 4 * 64 * (100 - 100 // period) + 4 * 16 * (100 // period)
    # Every batch is read, also from an iterator, which is read once.
    assert_matches(precisebn.recompute_bn_buffers(model, batches), pooled)
    assert_matches(precisebn.recompute_bn_buffers(model, iter(batches)), pooled)


class MaskedBN(nn.Module):
    """BatchNorm1d over the rows whose first feature is positive: sizes depend on values."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x[x[:, 0] > 0])


def test_value_dependent_sizes_are_counted_exactly() -> None:
    model = MaskedBN().train()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.rand(16, 4, generator=gen) + 0.1 for _ in range(2)]
    batches += [torch.randn(16, 4, generator=gen) for _ in range(6)]
    new = precisebn.recompute_bn_buffers(model, batches)
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


def test_a_layer_skipped_on_one_batch_pools_the_others() -> None:
    model = SkipsOnce(skip_call=5).train()
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(10, 3, generator=gen) * 2 + 2 for _ in range(8)]
    new = precisebn.recompute_bn_buffers(model, iter(batches))
    assert model.calls == 0  # the forward's counter is an attribute: restored afterwards
    reference = SkipsOnce(skip_call=5).train()
    reference.load_state_dict(model.state_dict())
    pooled = pooled_inputs(reference, batches)
    assert pooled["bn2"].shape[1] == 7 * 10
    assert_matches(new, pooled)


class ReadsSometimes(nn.Module):
    """Reads its BN layer's running variance on the batches listed in ``reading``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.reading: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        if x.data_ptr() in self.reading:
            x = x / (self.bn.running_var + 1).sqrt()
        return self.bn(x)


def test_a_read_of_the_statistics_sees_the_callers_values_on_every_batch() -> None:
    model = ReadsSometimes().train()
    with torch.no_grad():
        model.bn.running_var.fill_(3.0)
    batches = [torch.randn(8, 4) * 3 for _ in range(40)]
    model.reading = {b.data_ptr() for b in batches[10:]}
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(new, pooled_inputs(model, batches))
    assert torch.equal(model.bn.running_var, torch.full((4,), 3.0))


def test_a_run_draws_nothing_from_the_global_random_generators() -> None:
    model = SmallCNN().train()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(40)]
    state_before = (random.getstate(), torch.get_rng_state())
    new = precisebn.recompute_bn_buffers(model, batches)
    assert_matches(new, pooled_inputs(model, batches))
    assert random.getstate() == state_before[0]
    assert torch.equal(torch.get_rng_state(), state_before[1])


# ------------------------------------------------------------------- the forward's output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_forward_equals_the_models_own_training_forward_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    model = SmallCNN().to(dtype).eval()
    x = (torch.randn(8, 3, 8, 8) * 3 + 1).to(dtype)
    out, _ = precisebn.capture(model, x)
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    with torch.no_grad():
        expected = twin(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------ model wrappers


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch._dynamo's own imports
def test_compiled_and_averaged_models() -> None:
    torch.manual_seed(8)
    model = SmallCNN().train()
    batches = [torch.randn(8, 3, 8, 8) * 2 + 1 for _ in range(6)]
    reference = pooled_inputs(model, batches)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    before = state(averaged)
    new = precisebn.recompute_bn_buffers(averaged, batches)
    assert_state_unchanged(before, averaged)
    assert_matches({k.removeprefix("module."): v for k, v in new.items()}, reference)
    compiled = torch.compile(model)
    new = precisebn.recompute_bn_buffers(compiled, batches)
    assert_matches({k.removeprefix("_orig_mod."): v for k, v in new.items()}, reference)
