"""The result is a plain dict of tensors: on disk, to pytrees, and to apply_bn_buffers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

import precisebn

MEAN, VAR = "1.running_mean", "1.running_var"


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def result(net: nn.Module | None = None) -> dict[str, Tensor]:
    net = model() if net is None else net
    new, info = precisebn.recompute_bn_buffers(
        net, [torch.randn(16, 3) for _ in range(3)], return_info=True
    )
    assert type(new) is dict
    assert (info.num_batches, info.num_samples) == (3, 48)
    return new


def state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_bit_identical(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert list(before) == list(after)
    for key in before:
        a, b = before[key], after[key]
        assert a.dtype == b.dtype, key
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key


# --- torch.save and pytrees ------------------------------------------------------------------


def test_torch_save_load_weights_only_round_trip(tmp_path: Path) -> None:
    net = model()
    new = result(net)
    path = tmp_path / "bn.pt"
    torch.save(new, path)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is dict
    assert list(loaded) == list(new)
    for key in new:
        assert torch.equal(loaded[key], new[key])
    assert not net.load_state_dict(loaded, strict=False).unexpected_keys
    assert torch.equal(net[1].running_mean, new[MEAN])
    assert torch.equal(net[1].running_var, new[VAR])


def test_torch_load_in_a_process_without_precisebn(tmp_path: Path) -> None:
    new = result()
    path = tmp_path / "bn.pt"
    torch.save(new, path)
    code = (
        "import sys, torch\n"
        f"d = torch.load({str(path)!r})\n"  # default arguments: weights_only=True
        "assert 'precisebn' not in sys.modules, 'precisebn was imported'\n"
        "print(type(d).__name__, sorted(d), d['1.running_var'].tolist())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dict {sorted(new)} {new[VAR].tolist()}"


def test_both_pytree_libraries_map_the_result_and_its_info() -> None:
    new, info = precisebn.recompute_bn_buffers(
        model(), [torch.randn(16, 3) + 1 for _ in range(3)], return_info=True
    )
    for tree_map in (optree.tree_map, torch_pytree.tree_map):
        doubled = tree_map(lambda t: t * 2 if isinstance(t, Tensor) else t, (new, info))
        assert type(doubled[0]) is dict
        assert list(doubled[0]) == list(new)
        assert torch.equal(doubled[0][VAR], new[VAR] * 2)
        assert isinstance(doubled[1], precisebn.RunInfo)
        assert doubled[1].num_batches == 3
        assert torch.equal(doubled[1].stderr[VAR], info.stderr[VAR] * 2)
    leaves, spec = optree.tree_flatten(new)
    assert optree.tree_unflatten(spec, leaves) == new


# --- apply_bn_buffers refuses non-finite values ---------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_apply_refuses_non_finite_and_writes_nothing(bad: float) -> None:
    net = model()
    new = result(net)
    new[VAR] = new[VAR].clone()
    new[VAR][2] = bad
    before = state(net)
    with pytest.raises(ValueError, match="non-finite") as error:
        precisebn.apply_bn_buffers(net, new)
    message = str(error.value)
    assert VAR in message
    assert MEAN not in message
    assert "fp16/bf16" in message
    assert "Nothing was written" in message
    assert_bit_identical(before, state(net))


def test_apply_names_the_first_few_non_finite_keys() -> None:
    net = nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(4)))
    buffers = {k: torch.full_like(v, float("nan")) for k, v in precisebn.bn_buffers(net).items()}
    before = state(net)
    with pytest.raises(ValueError, match=r"0\.running_mean.* and 3 more") as error:
        precisebn.apply_bn_buffers(net, buffers)
    assert "3.running_var" not in str(error.value)
    assert_bit_identical(before, state(net))


def test_apply_still_writes_finite_values() -> None:
    net = model()
    new = result(net)
    precisebn.apply_bn_buffers(net, new)
    assert torch.equal(net[1].running_mean, new[MEAN])
    assert torch.equal(net[1].running_var, new[VAR])


def test_apply_checks_keys_before_values() -> None:
    net = model()
    with pytest.raises(KeyError, match="nope"):
        precisebn.apply_bn_buffers(net, {"nope": torch.tensor([float("nan")])})
