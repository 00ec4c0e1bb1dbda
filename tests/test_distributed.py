"""Exact statistics across ranks: spawned CPU processes on gloo, loopback only.

Each world (2 and 3 ranks) is spawned once; every rank runs all scenarios in order and
saves what it saw. The tests then compare the ranks with each other and with one process
running the union of all ranks' batches.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import precisebn
from spawned import free_port

PG_TIMEOUT_S = 20  # gloo gives up on a collective after this
WORLD_TIMEOUT_S = 90  # the test gives up on a spawned world after this
FAILING_RANK = 1
Batch = tuple[Tensor, bool]
Result = dict[str, Any]


class Net(nn.Module):
    """Conv + BN2d, Linear + BN1d, a BN layer reached by "rare" batches, one never reached."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.rare = nn.BatchNorm1d(5)
        self.never = nn.BatchNorm1d(5)

    def forward(self, x: Tensor, rare: bool = False) -> Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = self.bn1(self.fc(h))
        return self.rare(h) if rare else h


def make_model(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)  # the same weights on every rank
    return Net().to(dtype)


def feed(model: Callable[..., Any], batch: Batch) -> Any:
    return model(batch[0], rare=batch[1])


def shard(case: str, rank: int, world: int, dtype: torch.dtype = torch.float64) -> list[Batch]:
    """Rank ``rank``'s batches: ranks differ in batch count, batch size and distribution."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}/{rank}".encode()))
    count = rank + 1
    if case == "empty_rank" and rank == 0:
        count = 0
    rare = case == "rare" and rank == world - 1
    size = 3 + 2 * rank
    return [
        ((torch.randn(size, 3, 5, 5, generator=gen) * (1 + rank) + 2 * rank).to(dtype), rare)
        for _ in range(count)
    ]


def union(case: str, world: int, dtype: torch.dtype = torch.float64) -> list[Batch]:
    return [batch for rank in range(world) for batch in shard(case, rank, world, dtype)]


def snapshot(model: nn.Module) -> dict[str, Any]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    return {"state": state, "flags": flags}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["flags"] == b["flags"] and all(
        torch.equal(v, b["state"][k]) for k, v in a["state"].items()
    )


def recompute(model: nn.Module, loader: Any, **kwargs: Any) -> Result:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, info = precisebn.recompute_bn_buffers(
            model, loader, forward=feed, return_info=True, **kwargs
        )
    return {
        "buffers": new,
        "stderr": info.stderr,
        "converged": info.converged,
        "num_batches": info.num_batches,
        "num_samples": info.num_samples,
        "warnings": [str(w.message) for w in caught],
    }


class Counted:
    """An endless loader of i.i.d. batches (one stream per rank) that counts what is read."""

    def __init__(self, rank: int, *, limit: int | None = None) -> None:
        self.gen = torch.Generator().manual_seed(100 + rank)
        self.limit = limit
        self.read = 0

    def __iter__(self) -> Any:
        while self.limit is None or self.read < self.limit:
            self.read += 1
            yield torch.randn(64, 4, generator=self.gen) * 2 + 1


def tol_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))


# --- scenarios, run by every rank in this order -------------------------------------------


def s_unequal(rank: int, world: int) -> Result:
    return recompute(make_model(), shard("unequal", rank, world))


def s_empty_rank(rank: int, world: int) -> Result:
    return recompute(make_model(), shard("empty_rank", rank, world))


def s_rare(rank: int, world: int) -> Result:
    model = make_model()
    result = recompute(model, shard("rare", rank, world))
    result["never_kept"] = torch.equal(
        result["buffers"]["never.running_var"], model.never.running_var
    )
    return result


def s_raises(rank: int, world: int) -> Result:
    model = make_model().train()
    before = snapshot(model)

    def loader() -> Any:
        yield from shard("unequal", rank, world)[:1]
        if rank == FAILING_RANK:
            raise OSError(f"disk gone on rank {rank}")
        yield from shard("unequal", rank, world)[1:]

    start = time.monotonic()
    try:
        recompute(model, loader())
    except Exception as error:
        return {
            "error": type(error).__name__,
            "message": str(error),
            "seconds": time.monotonic() - start,
            "untouched": same(before, snapshot(model)),
        }
    return {"error": None}


def s_layout_mismatch(rank: int, world: int) -> Result:
    layers = ["bn"] if rank == 0 else ["bn", "bn1"]
    try:
        recompute(make_model(), shard("unequal", rank, world), layers=layers)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def s_after_errors(rank: int, world: int) -> Result:
    """The group still works after the failed runs above (no rank left a collective
    behind that this run's would pair with)."""
    return recompute(make_model(), shard("unequal", rank, world))


def s_ddp(rank: int, world: int) -> Result:
    model = DistributedDataParallel(make_model(torch.float32))
    before = snapshot(model)
    result = recompute(model, shard("unequal", rank, world, torch.float32))
    result["untouched"] = same(before, snapshot(model))
    return result


def s_sync_bn(rank: int, world: int) -> Result:
    # Training mode under a process group on CPU: SyncBatchNorm's own forward would raise.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(make_model()).train()
    before = snapshot(model)
    result = recompute(model, shard("unequal", rank, world))
    result["untouched"] = same(before, snapshot(model))
    return result


def s_opt_out(rank: int, world: int) -> Result:
    return recompute(make_model(), shard("unequal", rank, world), distributed=False)


def s_hand_loop(rank: int, world: int) -> Result:
    model = make_model()
    stats = precisebn.init(precisebn.bn_buffers(model))
    for batch in shard("unequal", rank, world):
        stats = precisebn.update(stats, model, batch, forward=feed)
    stats = precisebn.all_reduce_stats(stats)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return {"buffers": precisebn.finalize(stats, like=precisebn.bn_buffers(model))}


def s_tol(rank: int, world: int) -> Result:
    loader = Counted(rank)
    new, info = precisebn.recompute_bn_buffers(
        tol_model(), loader, num_batches=5000, tol=3e-2, return_info=True
    )
    return {
        "buffers": new,
        "converged": info.converged,
        "read": loader.read,
        "num_batches": info.num_batches,
    }


def s_tol_uneven(rank: int, world: int) -> Result:
    """Rank 0 runs out of batches long before the others have converged."""
    loader = Counted(rank, limit=20 if rank == 0 else None)
    new, info = precisebn.recompute_bn_buffers(
        tol_model(), loader, num_batches=5000, tol=2e-2, return_info=True
    )
    return {
        "buffers": new,
        "converged": info.converged,
        "read": loader.read,
        "num_batches": info.num_batches,
    }


def s_tol_raises(rank: int, world: int) -> Result:
    """A rank's loader raises during a tol= run, while the others wait at a check."""

    def loader() -> Any:
        for i, batch in enumerate(Counted(rank)):
            if rank == FAILING_RANK and i == 40:
                raise OSError(f"disk gone on rank {rank}")
            yield batch

    start = time.monotonic()
    try:
        precisebn.recompute_bn_buffers(tol_model(), loader(), num_batches=5000, tol=1e-4)
    except Exception as error:
        return {
            "error": type(error).__name__,
            "message": str(error),
            "seconds": time.monotonic() - start,
        }
    return {"error": None}


def second_model() -> Net:
    torch.manual_seed(1)
    return Net().to(torch.float64)


def s_many(rank: int, world: int) -> Result:
    """Two models in one pass, with tol: one reduction for both at every check."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        results = precisebn.recompute_bn_buffers_many(
            [make_model(), second_model()],
            shard("unequal", rank, world),
            forward=feed,
            return_info=True,
        )
    return {
        "buffers": [new for new, _ in results],
        "stderr": [info.stderr for _, info in results],
        "num_batches": [info.num_batches for _, info in results],
    }


def s_subgroup(rank: int, world: int) -> Result:
    group = dist.new_group([0, 2])
    model = make_model()
    if rank == 1:
        try:
            precisebn.all_reduce_stats(
                precisebn.init(precisebn.bn_buffers(model)), process_group=group
            )
        except ValueError as error:
            return {"error": str(error)}
        return {"error": None}
    return recompute(model, shard("unequal", rank, world), process_group=group)


SCENARIOS: dict[str, tuple[Callable[[int, int], Result], int]] = {
    "unequal": (s_unequal, 2),
    "empty_rank": (s_empty_rank, 2),
    "rare": (s_rare, 2),
    "raises": (s_raises, 2),
    "layout_mismatch": (s_layout_mismatch, 2),
    "tol": (s_tol, 2),
    "tol_uneven": (s_tol_uneven, 2),
    "tol_raises": (s_tol_raises, 2),
    "many": (s_many, 2),
    "after_errors": (s_after_errors, 2),
    "ddp": (s_ddp, 2),
    "sync_bn": (s_sync_bn, 2),
    "opt_out": (s_opt_out, 2),
    "hand_loop": (s_hand_loop, 2),
    "subgroup": (s_subgroup, 3),
}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )
    results: dict[str, Result] = {}
    try:
        for name, (scenario, min_world) in SCENARIOS.items():
            if world >= min_world:
                try:
                    results[name] = scenario(rank, world)
                except Exception as error:  # recorded; the test that reads it fails
                    results[name] = {"unexpected": f"{type(error).__name__}: {error}"}
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


# --- the spawned worlds -----------------------------------------------------------------


def _spawn(world: int, out: Path) -> list[dict[str, Result]]:
    context = mp.start_processes(
        _worker,
        args=(world, free_port(), str(out)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank world did not finish within {WORLD_TIMEOUT_S} s")
    finally:
        for process in context.processes:  # only the processes spawned here
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    size: int = request.param
    return _spawn(size, tmp_path_factory.mktemp(f"world{size}"))


def ranks(world: list[dict[str, Result]], scenario: str) -> list[Result]:
    results = [r[scenario] for r in world]
    for rank, result in enumerate(results):
        assert "unexpected" not in result, f"rank {rank}: {result['unexpected']}"
    return results


def single_process(model: nn.Module, batches: list[Batch], **kwargs: Any) -> dict[str, Tensor]:
    """The reference: one process, no process group, all batches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(precisebn.recompute_bn_buffers(model, batches, forward=feed, **kwargs))


def assert_identical_across_ranks(results: list[Result]) -> None:
    first = results[0]["buffers"]
    for rank, result in enumerate(results[1:], start=1):
        assert result["buffers"].keys() == first.keys()
        for key, value in result["buffers"].items():
            assert torch.equal(value, first[key]), f"rank {rank} differs from rank 0 on {key}"


def assert_close_buffers(got: dict[str, Tensor], want: dict[str, Tensor], **tol: float) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype
        torch.testing.assert_close(got[key], value, msg=lambda m, k=key: f"{k}: {m}", **tol)


F64 = {"rtol": 1e-12, "atol": 1e-12}

# --- tests --------------------------------------------------------------------------------


def test_unequal_shards_match_the_single_process_union(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "unequal")
    n = len(results)
    assert_identical_across_ranks(results)
    want = single_process(make_model(), union("unequal", n), layers=["bn", "bn1"])
    got = {k: v for k, v in results[0]["buffers"].items() if k in want}
    assert_close_buffers(got, want, **F64)
    assert results[0]["num_batches"] == sum(range(1, n + 1))
    assert results[0]["num_samples"] == sum((r + 1) * (3 + 2 * r) for r in range(n))
    assert all(r["num_batches"] == results[0]["num_batches"] for r in results)


def test_standard_errors_match_the_single_process_union(
    world: list[dict[str, Result]],
) -> None:
    results = ranks(world, "unequal")
    for result in results[1:]:
        for key, value in result["stderr"].items():
            torch.testing.assert_close(  # NaN: a layer no batch reached
                value, results[0]["stderr"][key], rtol=0, atol=0, equal_nan=True
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = precisebn.recompute_bn_buffers(
            make_model(),
            union("unequal", len(results)),
            forward=feed,
            layers=["bn", "bn1"],
            return_info=True,
        )
    want = info.stderr
    got = {k: v for k, v in results[0]["stderr"].items() if k in want}
    assert_close_buffers(got, want, rtol=1e-9, atol=1e-12)


def test_tol_stops_every_rank_at_the_same_batch(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "tol")
    assert_identical_across_ranks(results)
    reads = {r["read"] for r in results}
    assert len(reads) == 1, reads  # each rank read the same number of batches...
    (read,) = reads
    assert read % 16 == 0
    assert 16 <= read < 5000
    assert all(r["converged"] is True for r in results)
    assert results[0]["num_batches"] == read * len(results)


def test_tol_with_a_rank_that_runs_out(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "tol_uneven")
    assert_identical_across_ranks(results)
    assert results[0]["read"] == 20
    others = {r["read"] for r in results[1:]}
    assert len(others) == 1, others
    assert next(iter(others)) > 20, others
    assert all(r["converged"] is True for r in results)
    assert results[0]["num_batches"] == 20 + sum(r["read"] for r in results[1:])


def test_a_rank_failing_during_a_tol_run_fails_every_rank_promptly(
    world: list[dict[str, Result]],
) -> None:
    for rank, result in enumerate(ranks(world, "tol_raises")):
        assert result["seconds"] < PG_TIMEOUT_S / 2, f"rank {rank} waited for a timeout"
        if rank == FAILING_RANK:
            assert result["error"] == "OSError"
        else:
            assert result["error"] == "RankFailedError"
            assert f"rank(s) [{FAILING_RANK}]" in result["message"]


def test_many_models_are_reduced_together(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "many")
    n = len(results)
    for index, model in enumerate([make_model(), second_model()]):
        per_rank = [{"buffers": r["buffers"][index]} for r in results]
        assert_identical_across_ranks(per_rank)
        want = single_process(model, union("unequal", n), layers=["bn", "bn1"])
        got = {k: v for k, v in results[0]["buffers"][index].items() if k in want}
        assert_close_buffers(got, want, **F64)
        assert results[0]["num_batches"][index] == sum(range(1, n + 1))


def test_a_rank_without_batches_contributes_nothing(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "empty_rank")
    assert_identical_across_ranks(results)
    want = single_process(make_model(), union("empty_rank", len(results)), layers=["bn", "bn1"])
    got = {k: v for k, v in results[0]["buffers"].items() if k in want}
    assert_close_buffers(got, want, **F64)


def test_a_layer_reached_on_one_rank_only(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "rare")
    assert_identical_across_ranks(results)
    want = single_process(make_model(), union("rare", len(results)))
    assert_close_buffers(results[0]["buffers"], want, **F64)
    rare = results[0]["buffers"]["rare.running_var"]
    assert not torch.equal(rare, make_model().rare.running_var)  # recomputed
    # The layer no rank reached keeps its buffers, with the same warning everywhere.
    assert all(r["never_kept"] for r in results)
    assert len(results[0]["warnings"]) == 1
    assert "'never'" in results[0]["warnings"][0]
    assert "'rare'" not in results[0]["warnings"][0]
    assert all(r["warnings"] == results[0]["warnings"] for r in results)


def test_a_raising_loader_fails_every_rank_promptly(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "raises")
    for rank, result in enumerate(results):
        assert result["untouched"], f"rank {rank} changed the model"
        assert result["seconds"] < PG_TIMEOUT_S / 2, f"rank {rank} waited for a timeout"
        if rank == FAILING_RANK:
            assert result["error"] == "OSError"
            assert result["message"] == f"disk gone on rank {rank}"
        else:
            assert result["error"] == "RankFailedError"  # a RuntimeError
            assert f"rank(s) [{FAILING_RANK}]" in result["message"]


def test_different_layouts_raise_on_every_rank(world: list[dict[str, Result]]) -> None:
    for result in ranks(world, "layout_mismatch"):
        assert result["error"] is not None
        assert "different layers or channel counts" in result["error"]


def test_the_group_still_works_after_failed_runs(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "after_errors")
    assert_identical_across_ranks(results)
    for key, value in ranks(world, "unequal")[0]["buffers"].items():
        assert torch.equal(results[0]["buffers"][key], value)


def test_ddp_wrapped_model_keeps_the_callers_names(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "ddp")
    assert_identical_across_ranks(results)
    assert all(r["untouched"] for r in results)
    n = len(results)
    plain = single_process(make_model(torch.float32), union("unequal", n, torch.float32))
    want = {f"module.{k}": v for k, v in plain.items()}
    assert_close_buffers(results[0]["buffers"], want)


def test_sync_batch_norm_is_recomputed_locally_and_reduced_once(
    world: list[dict[str, Result]],
) -> None:
    results = ranks(world, "sync_bn")
    assert_identical_across_ranks(results)
    assert all(r["untouched"] for r in results)  # buffers, and training flags restored
    want = single_process(make_model(), union("unequal", len(results)))
    assert_close_buffers(results[0]["buffers"], want, **F64)


def test_opting_out_keeps_per_rank_statistics(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "opt_out")
    n = len(results)
    for rank, result in enumerate(results):
        want = single_process(make_model(), shard("unequal", rank, n), layers=["bn", "bn1"])
        got = {k: v for k, v in result["buffers"].items() if k in want}
        assert_close_buffers(got, want, **F64)
        assert result["num_batches"] == rank + 1
    assert not torch.equal(
        results[0]["buffers"]["bn.running_mean"], results[1]["buffers"]["bn.running_mean"]
    )


def test_hand_written_loop_with_all_reduce_stats(world: list[dict[str, Result]]) -> None:
    results = ranks(world, "hand_loop")
    assert_identical_across_ranks(results)
    # The same statistics as recompute_bn_buffers, up to float64 rounding (it pools batches
    # in blocks; the hand-written loop merges them one at a time).
    assert_close_buffers(results[0]["buffers"], ranks(world, "unequal")[0]["buffers"], **F64)


def test_process_group_selects_the_ranks_that_pool(world: list[dict[str, Result]]) -> None:
    if len(world) < 3:
        pytest.skip("needs 3 ranks")
    results = [r["subgroup"] for r in world]
    assert results[1]["error"] is not None
    assert "not a member" in results[1]["error"]
    members = [results[0], results[2]]
    assert all("unexpected" not in r for r in members), members
    assert_identical_across_ranks(members)
    batches = shard("unequal", 0, 3) + shard("unequal", 2, 3)
    want = single_process(make_model(), batches, layers=["bn", "bn1"])
    got = {k: v for k, v in members[0]["buffers"].items() if k in want}
    assert_close_buffers(got, want, **F64)
    assert members[0]["num_batches"] == 1 + 3


def test_without_a_process_group_the_reduction_is_the_identity() -> None:
    assert not dist.is_initialized()
    model = make_model()
    stats = precisebn.init(precisebn.bn_buffers(model))
    stats = precisebn.update(stats, model, shard("unequal", 0, 1)[0], forward=feed)
    reduced = precisebn.all_reduce_stats(stats)
    assert reduced is not stats
    assert reduced.keys() == stats.keys()
    assert all(reduced[k] is stats[k] for k in stats)
