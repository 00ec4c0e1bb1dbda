"""The drop-ins, under the peers' own tests (adapted where those encode an inexact answer)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import precisebn
from precisebn.compat import update_bn, update_bn_stats

from reference import assert_same, pooled_inputs, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------ torch.optim.swa_utils.update_bn's own tests
#
# torch's tests (TestSWAUtils in test/optim/test_swa_utils.py) build a small fully
# connected and a small conv net, feed 100 random objects in shuffled batches of 5
# through update_bn with a TensorDataset of x alone and of (x, y), reset the BN buffers
# and run again, and check that eval mode and the momentum survive. They compare
# running_var with the *biased* variance E[x^2] - E[x]^2 at atol 0.1; the exact answer is
# the unbiased pooled variance, which is checked here to float32 precision.


class DNN(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.n_features = 20
        self.fc1 = nn.Linear(features, self.n_features)
        self.bn = nn.BatchNorm1d(self.n_features)

    def preactivation(self, x: Tensor) -> Tensor:
        return self.fc1(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.preactivation(x))


class CNN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.n_features = 10
        self.conv1 = nn.Conv2d(channels, self.n_features, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(self.n_features, momentum=0.3)

    def preactivation(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.preactivation(x))


def exact(net: DNN | CNN, x: Tensor) -> tuple[Tensor, Tensor]:
    """The pooled mean and unbiased variance of the BN input over every object."""
    with torch.no_grad():
        pre = net.preactivation(x).double()
    pre = pre.transpose(0, 1).reshape(net.n_features, -1)
    return pre.mean(dim=1), pre.var(dim=1)


def check_update_bn(net: DNN | CNN, x: Tensor) -> None:
    y = torch.rand(len(x))
    only_x = DataLoader(TensorDataset(x), batch_size=5, shuffle=True)
    x_and_y = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    mean, var = exact(net, x)

    def reset(module: nn.Module) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean = torch.zeros_like(module.running_mean)
            module.running_var = torch.ones_like(module.running_var)

    for loader in (x_and_y, only_x, x_and_y):
        net.apply(reset)
        update_bn(loader, net, device=x.device)
        torch.testing.assert_close(net.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert net.bn.num_batches_tracked.item() == 20


def test_update_bn_dnn() -> None:
    torch.manual_seed(0)
    net = DNN(features=5).train()
    check_update_bn(net, torch.rand(100, 5))
    assert net.training


def test_update_bn_cnn() -> None:
    torch.manual_seed(0)
    net = CNN(channels=3).train()
    check_update_bn(net, torch.rand(100, 3, 5, 5))
    assert net.training


def test_update_bn_keeps_eval_mode_and_momentum() -> None:
    net = CNN(channels=3).eval()
    update_bn(DataLoader(TensorDataset(torch.rand(100, 3, 5, 5)), batch_size=5), net)
    assert not net.training
    assert net.bn.momentum == 0.3


def test_update_bn_without_bn_layers_is_a_no_op() -> None:
    net = nn.Linear(3, 2)
    before = snapshot(net)
    update_bn([torch.randn(4, 3)], net)
    assert_same(before, snapshot(net))


def test_update_bn_pools_a_short_last_batch_by_its_size() -> None:
    """The original averages batches with equal weights: a last batch of 2 counts as
    much as one of 30. Here it counts as 2 values."""
    torch.manual_seed(0)
    net = DNN(features=5).train()
    x = torch.rand(62, 5) * 3
    update_bn(DataLoader(TensorDataset(x), batch_size=30), net)
    mean, var = exact(net, x)
    torch.testing.assert_close(net.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------- fvcore's update_bn_stats' own tests
#
# fvcore's tests (tests/test_precise_bn.py) run BatchNorm1d/2d/3d alone over
# itertools.cycle of 8 random batches for 800 iterations, and expect the mean of the
# batch means and the mean of the *per-batch unbiased variances*, which leaves out the
# spread between batch means. The exact answer is the variance pooled over every value
# seen; it is checked here to float32 precision. The weights must not change, and a loader
# that runs out early is an AssertionError.


@pytest.mark.parametrize(
    ("bn", "shape"),
    [
        (nn.BatchNorm1d, (16, 8, 24)),
        (nn.BatchNorm2d, (16, 8, 24, 8)),
        (nn.BatchNorm3d, (16, 8, 4, 12, 6)),
    ],
)
def test_update_bn_stats(bn: type[nn.Module], shape: tuple[int, ...]) -> None:
    torch.manual_seed(42)
    model = bn(shape[1]).train()
    tensors = [torch.randn(shape) for _ in range(8)]
    old_weight = model.weight.detach().clone()
    update_bn_stats(model, itertools.cycle(tensors), 8 * 100)
    values = torch.cat([t.transpose(0, 1).reshape(shape[1], -1) for t in tensors], 1).double()
    n = values.shape[1]
    # 100 copies of the same values: the pooled mean is theirs, and the sum of squared
    # deviations 100 times theirs, over 100 n - 1.
    mean = values.mean(dim=1)
    var = 100 * (values - mean[:, None]).square().sum(dim=1) / (100 * n - 1)
    torch.testing.assert_close(model.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.weight.detach(), old_weight)
    assert model.num_batches_tracked.item() == 800


def test_update_bn_stats_insufficient_data() -> None:
    model = nn.BatchNorm2d(32).train()
    before = snapshot(model)
    with pytest.raises(AssertionError, match="meant to run for 20 iterations"):
        update_bn_stats(model, itertools.repeat(torch.randn(16, 32, 24, 24), 10), 20)
    assert_same(before, snapshot(model))


def test_update_bn_stats_leaves_frozen_layers_alone() -> None:
    """Like fvcore, only the BN layers in training mode are recomputed."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    model.train()
    model[1].eval()
    frozen = model[1].running_var.clone()
    batches = [torch.randn(4, 3, 8, 8) + 1 for _ in range(5)]
    update_bn_stats(model, batches, num_iters=5)
    assert torch.equal(model[1].running_var, frozen)
    want = pooled_inputs(model, batches, layers=["3"])["3"]
    torch.testing.assert_close(model[3].running_var.double(), want.var(dim=1), rtol=1e-5, atol=0)
    assert not model[1].training  # flags as the caller left them


def test_update_bn_stats_progress_argument() -> None:
    model = nn.BatchNorm1d(3).train()
    with pytest.raises(ValueError, match="progress must be None or 'tqdm'"):
        update_bn_stats(model, [torch.randn(4, 3)], 1, progress="rich")
    update_bn_stats(model, [torch.randn(4, 3)], 1, progress=None)
    assert model.num_batches_tracked.item() == 1


def test_compat_results_are_those_of_recompute() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    batches = [(torch.randn(8, 3), torch.zeros(8)) for _ in range(6)]
    want = precisebn.recompute_bn_buffers(model, batches)
    update_bn(batches, model)
    for key, value in want.items():
        assert torch.equal(model.get_buffer(key), value)
