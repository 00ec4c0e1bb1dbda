"""BNBuffers behaves as a plain dict of tensors: on disk, to pytrees, and to apply_bn_buffers."""

from __future__ import annotations

import collections
import copy
import pickle
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


def result(net: nn.Module | None = None) -> precisebn.BNBuffers:
    net = model() if net is None else net
    new = precisebn.recompute_bn_buffers(net, [torch.randn(16, 3) for _ in range(3)])
    assert isinstance(new, precisebn.BNBuffers)
    assert (new.num_batches, new.num_samples) == (3, 48)
    return new


def unsorted() -> precisebn.BNBuffers:
    """Keys in reverse sorted order, so sorted and insertion order differ."""
    return precisebn.BNBuffers(
        {VAR: torch.full((4,), 2.0), MEAN: torch.arange(4.0)}, num_batches=5, num_samples=7
    )


def assert_same_buffers(got: object, want: dict[str, Tensor]) -> None:
    assert isinstance(got, precisebn.BNBuffers)
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_bit_identical(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert list(before) == list(after)
    for key in before:
        a, b = before[key], after[key]
        assert a.dtype == b.dtype, key
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key


# --- pickling / torch.save -----------------------------------------------------------------


def test_pickles_exactly_like_an_ordered_dict() -> None:
    new = result()
    assert pickle.dumps(new) == pickle.dumps(collections.OrderedDict(new))
    assert b"precisebn" not in pickle.dumps(new)


def test_torch_save_load_weights_only_round_trip(tmp_path: Path) -> None:
    net = model()
    new = result(net)
    path = tmp_path / "bn.pt"
    torch.save(new, path)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is collections.OrderedDict
    assert isinstance(loaded, dict)
    assert list(loaded) == list(new)
    for key in new:
        assert torch.equal(loaded[key], new[key])
    assert not net.load_state_dict(loaded, strict=False).unexpected_keys
    assert torch.equal(net[1].running_mean, new[MEAN])
    assert torch.equal(net[1].running_var, new[VAR])
    # The attributes are in memory only, and the original keeps them.
    assert not hasattr(loaded, "num_batches")
    assert (new.num_batches, new.num_samples) == (3, 48)


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
    assert done.stdout.strip() == f"OrderedDict {sorted(new)} {new[VAR].tolist()}"


def test_copy_and_deepcopy_keep_attributes() -> None:
    new = unsorted()
    shallow = copy.copy(new)
    deep = copy.deepcopy(new)
    for twin in (shallow, deep):
        assert_same_buffers(twin, new)
        assert twin is not new
        assert (twin.num_batches, twin.num_samples) == (5, 7)
    assert shallow[MEAN] is new[MEAN]
    assert deep[MEAN] is not new[MEAN]
    deep[MEAN].add_(1)
    assert torch.equal(new[MEAN], torch.arange(4.0))


def test_deepcopy_keeps_shared_tensors_shared() -> None:
    shared = torch.zeros(4)
    new = precisebn.BNBuffers({MEAN: shared, VAR: shared}, num_batches=1, num_samples=2)
    deep = copy.deepcopy({"a": new, "b": new})
    assert deep["a"] is deep["b"]
    assert deep["a"][MEAN] is deep["a"][VAR]


# --- pytrees -------------------------------------------------------------------------------


def test_optree_tree_map_gives_bnbuffers() -> None:
    new = result()
    doubled = optree.tree_map(lambda t: t * 2, new)
    assert_same_buffers(doubled, {k: v * 2 for k, v in new.items()})
    assert (doubled.num_batches, doubled.num_samples) == (3, 48)


def test_torch_pytree_tree_map_gives_bnbuffers() -> None:
    new = result()
    doubled = torch_pytree.tree_map(lambda t: t * 2, new)
    assert_same_buffers(doubled, {k: v * 2 for k, v in new.items()})
    assert (doubled.num_batches, doubled.num_samples) == (3, 48)


def test_optree_flattens_like_a_dict() -> None:
    new = unsorted()
    leaves = optree.tree_leaves(new)
    want = optree.tree_leaves(dict(new))
    assert len(leaves) == 2
    assert all(a is b for a, b in zip(leaves, want, strict=True))
    assert leaves[0] is new[MEAN]  # sorted keys, as optree sorts a dict's
    assert optree.tree_paths(new) == optree.tree_paths(dict(new)) == [(MEAN,), (VAR,)]
    # Unflattening restores insertion order, as optree does for a dict.
    assert list(optree.tree_map(lambda t: t, new)) == [VAR, MEAN]


def test_torch_pytree_flattens_like_a_dict() -> None:
    new = unsorted()
    leaves, _ = torch_pytree.tree_flatten(new)
    want, _ = torch_pytree.tree_flatten(dict(new))
    assert len(leaves) == 2
    assert all(a is b for a, b in zip(leaves, want, strict=True))
    paths = [path for path, _ in torch_pytree.tree_flatten_with_path(new)[0]]
    assert paths == [path for path, _ in torch_pytree.tree_flatten_with_path(dict(new))[0]]


def test_optree_structure_round_trips() -> None:
    new = unsorted()
    leaves, spec = optree.tree_flatten(new)
    assert spec == optree.tree_structure(new)
    assert spec.num_leaves == 2
    back = optree.tree_unflatten(spec, leaves)
    assert_same_buffers(back, new)
    assert (back.num_batches, back.num_samples) == (5, 7)
    # Nested inside other containers too.
    nested = optree.tree_map(lambda t: t + 1, {"bn": new, "step": torch.zeros(())})
    assert_same_buffers(nested["bn"], {k: v + 1 for k, v in new.items()})


def test_optree_structure_compares_like_a_dict_plus_counts() -> None:
    new = unsorted()
    reordered = precisebn.BNBuffers(dict(sorted(new.items())), num_batches=5, num_samples=7)
    assert optree.tree_structure(new) == optree.tree_structure(reordered)
    other = precisebn.BNBuffers(new, num_batches=6, num_samples=7)
    assert optree.tree_structure(new) != optree.tree_structure(other)
    assert optree.tree_structure(new) != optree.tree_structure(dict(new))


def test_torch_pytree_structure_round_trips() -> None:
    new = unsorted()
    leaves, spec = torch_pytree.tree_flatten(new)
    assert spec == torch_pytree.tree_structure(new)
    assert spec.num_leaves == 2
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert_same_buffers(back, new)
    assert (back.num_batches, back.num_samples) == (5, 7)
    loaded = torch_pytree.treespec_loads(torch_pytree.treespec_dumps(spec))
    assert loaded == spec
    again = torch_pytree.tree_unflatten(leaves, loaded)
    assert (again.num_batches, again.num_samples) == (5, 7)


def test_torch_cxx_pytree_tree_map_gives_bnbuffers() -> None:
    cxx_pytree = pytest.importorskip("torch.utils._cxx_pytree")
    new = unsorted()
    doubled = cxx_pytree.tree_map(lambda t: t * 2, new)
    assert_same_buffers(doubled, {k: v * 2 for k, v in new.items()})
    assert (doubled.num_batches, doubled.num_samples) == (5, 7)


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
