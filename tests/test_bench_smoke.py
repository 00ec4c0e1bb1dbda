"""Smoke check of bench/: every figure's code on tiny sizes, loose bounds, no timing
asserts (the machine running CI is shared)."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fvcore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compiled, errors, exactness, gpu, guarantees, many, overhead, report, timing
from bench.methods import ESTIMATORS, METHODS, bn_layers, run_precisebn
from bench.models import (
    CNN,
    Detector,
    ResNet,
    TorchvisionBasicBlock,
    Workload,
    batch_sizes,
    bn_mlp,
    detector_backbone,
    make_batches,
    make_model,
    resnet,
    resnet_cnn,
    tabular_workload,
)

import precisebn
import precisebn._recompute as recompute_module
from precisebn._binding import Weights

SMALL_MLP = Workload("mlp small", lambda: bn_mlp(8, 16, 2), (8,))
SMALL_CNN = Workload("cnn small", lambda: resnet_cnn(4, 1), (3, 8, 8))


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """As the bench runs (``--threads 1``): on a busy machine, tiny models on two threads
    wait for each other's cores, and a single round's times jump tenfold."""


def errors_on(workload: Workload, sizes: list[int]) -> dict[str, exactness.Errors]:
    model = make_model(workload)
    return exactness.all_errors(model, make_batches(workload, sizes))


def test_cnn_ragged_precisebn_exact_and_equal_weight_peers_are_not() -> None:
    errs = errors_on(CNN, batch_sizes(3, 6, ragged=True))
    assert errs["precisebn"].mean <= exactness.MEAN_BOUND
    assert errs["precisebn"].var <= exactness.VAR_BOUND
    # Equal weight per batch, whatever its size: ragged batches move the mean.
    assert errs["torch update_bn"].mean > 100 * exactness.MEAN_BOUND
    assert errs["seed"].mean > 100 * exactness.MEAN_BOUND


def test_shifted_mean_precisebn_within_bound_and_mean_square_peers_cancel() -> None:
    errs = errors_on(tabular_workload(1e3), batch_sizes(6, 32, ragged=True))
    assert errs["precisebn"].mean <= exactness.MEAN_BOUND
    assert errs["precisebn"].var <= exactness.VAR_BOUND_SHIFTED
    # E[x^2] - E[x]^2 in float32 at mean = 1e3 std loses most of the variance's digits.
    assert errs["fvcore"].var > 1e-3
    assert errs["seed"].var > 1e-3


def test_batches_of_two_bias_the_equal_weight_estimators() -> None:
    errs = errors_on(SMALL_MLP, [2] * 32)
    assert errs["precisebn"].var <= exactness.VAR_BOUND
    assert errs["torch update_bn"].var > 0.1
    assert errs["seed"].var > 0.1


def test_every_method_times_and_reports() -> None:
    torch.manual_seed(0)
    model = make_model(SMALL_MLP)
    batches = make_batches(SMALL_MLP, [4, 4])
    timings = timing.interleaved(METHODS, model, batches, repeats=1, warmup=0)
    assert set(timings) == set(METHODS)
    row = {
        "workload": "tiny",
        "num_batches": 2,
        "methods": {name: t.as_dict() for name, t in timings.items()},
    }
    table = report.speed_table([row])
    assert all(name in table for name in ESTIMATORS)


def test_tol_runs_stop_on_a_check_and_estimate_what_a_missed_tol_needs() -> None:
    reached = errors.batches_to_tol(SMALL_MLP, 16, 0.1, 64)
    assert reached["converged"] is True
    assert reached["num_batches"] % 16 == 0  # checked every 16 batches
    assert 0 < reached["worst"] <= 0.1
    assert reached["needed"] is None
    missed = errors.batches_to_tol(SMALL_MLP, 16, 1e-3, 32)
    assert missed["converged"] is False
    assert missed["num_batches"] == 32
    assert missed["worst"] > 1e-3
    assert missed["needed"] > 32
    table = report.tol_table([reached, missed])
    assert "> 32" in table


def test_reported_errors_are_close_to_the_actual_ones() -> None:
    curve = errors.error_vs_batches(SMALL_MLP, 16, long=128, sizes=(16, 32, 64), runs=2)
    assert [r["batches"] for r in curve["rows"]] == [16, 32]  # 64 > long / 4 is dropped
    for row in curve["rows"]:
        for stat in ("mean", "var"):
            assert math.isfinite(row[f"reported_{stat}"])
            assert row[f"reported_{stat}"] > 0
            assert math.isfinite(row[f"actual_{stat}"])
            assert row[f"actual_{stat}"] > 0
            assert 0.5 < row[f"ratio_{stat}"] < 2.0
    layers = [r["layer"] for r in curve["n_eff"]]
    assert len(layers) == 2
    assert all(r["values"] == 32 * 16 and r["n_eff"] > 0 for r in curve["n_eff"])


def test_values_per_sample_reads_each_layers_spatial_size() -> None:
    sizes = errors.values_per_sample(SMALL_CNN, make_model(SMALL_CNN))
    assert sizes["1"] == 64
    assert sizes["3.bn1"] == 64
    assert sizes["4.bn1"] == 16
    assert sizes["5.bn2"] == 4
    assert set(errors.values_per_sample(SMALL_MLP, make_model(SMALL_MLP)).values()) == {1}


def test_errors_on_keep_the_buffers_and_the_section_renders() -> None:
    model = make_model(SMALL_MLP)
    batches = make_batches(SMALL_MLP, [8] * 4)
    on = errors.with_errors(model, batches)
    off = run_precisebn(model, batches)
    assert off.keys() == on.keys()
    assert all(torch.equal(off[k], on[k]) for k in on)
    rows = errors.cost([(SMALL_MLP, 8, 4)], repeats=1)
    assert len(rows[0]["errors_ratios"]) == 1
    assert rows[0]["errors_ratio"] > 0
    data = {
        "cost": rows,
        "tol": [errors.batches_to_tol(SMALL_MLP, 16, 0.1, 32)],
        "curves": [errors.error_vs_batches(SMALL_MLP, 8, long=64, sizes=(16,), runs=1)],
        "n_eff": [],
    }
    data["n_eff"] = [{"workload": "mlp small", "batches": 16, "rows": data["curves"][0]["n_eff"]}]
    section = report.errors_section({"errors": data})
    assert section[0] == "## Standard errors and tol="
    text = "\n".join(section)
    assert "with errors / precisebn" in text
    assert "mlp small" in text
    assert report.errors_section({})[2] == "Not in this run."


TINY = Workload("mlp tiny", lambda: bn_mlp(16, 8, 2), (16,))


def test_decoding_loader_decodes_crops_and_flips_the_same_batches_every_pass() -> None:
    import numpy as np
    from PIL import Image

    loader = many.DecodingLoader((3, 8, 8), [3, 2], source=12, seed=5)
    first, second = list(loader), list(loader)
    assert len(loader) == 2
    assert [tuple(x.shape) for x in first] == [(3, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 for x in first)
    # Every pass decodes again: equal batches, new tensors.
    assert all(torch.equal(a, b) and a is not b for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0][0], first[0][1])  # one image per sample
    # The first batch's samples: PIL decode, resize to 8 + margin, crop and flip as drawn.
    gen = torch.Generator().manual_seed(5)
    top, left = torch.randint(0, loader.margin + 1, (2, 3), generator=gen).tolist()
    flips = (torch.rand(3, generator=gen) < 0.5).tolist()
    side = 8 + loader.margin
    for i in range(3):
        img = Image.open(io.BytesIO(loader.pngs[i])).resize((side, side), Image.Resampling.BILINEAR)
        img = img.crop((left[i], top[i], left[i] + 8, top[i] + 8))
        if flips[i]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img)).float()
        expected = (pixels.permute(2, 0, 1) / 255 - many.MEAN) / many.STD
        torch.testing.assert_close(first[0][i], expected)
    flat = list(many.DecodingLoader((16,), [4], source=6))
    assert tuple(flat[0].shape) == (4, 16)
    with pytest.raises(ValueError, match="no images"):
        many.DecodingLoader((15,), [4], source=6)


def test_many_row_times_every_method_and_the_section_renders() -> None:
    same = many.Row("tiny, same", TINY, 8, (3, 3), source=6)
    subnets = many.Row(
        "tiny, subnets", TINY, 8, (3, 3), source=6, widths=(4, 5, 6, 7, 8, 9, 10, 11)
    )
    rows = [many.time_row(row, 3, repeats=1, warmup=False) for row in (same, subnets)]
    for row in rows:
        assert row["forward_ms"] > 0
        assert row["loaders"]["costly"]["loader_ms_per_batch"] > 0
        for loader in many.LOADERS:
            per = row["loaders"][loader]
            assert per["methods"][many.BASELINE]["ratio"] == 1.0
            for t in [*per["methods"].values(), per["many_vs_update_bn"]]:
                assert math.isfinite(t["ratio"])
                assert 0 < t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
            # One pass for all models gives each model's own buffers, to the bit.
            assert per["max_difference"]["many"] == 0.0
        # One pass of the loader instead of K: never below 1/K (loose above: one round).
        assert 1 / many.K < row["loaders"]["costly"]["expected_ratio"] < 1.5
    assert set(rows[0]["loaders"]["free"]["methods"]) == set(many.METHOD_NAMES)
    assert rows[0]["loaders"]["free"]["max_difference"]["vmap"] == 0.0
    assert "vmap" not in rows[1]["loaders"]["free"]["methods"]  # different architectures
    forward = many.forward_reference(TINY, 8, 2, repeats=1, warmup=0)
    assert forward["ratio"] > 0
    assert forward["vmap_ms_per_batch"] > 0
    data = {"k": many.K, "costly_target": 0.3, "free_target": 1.0, "rows": rows}
    data["forward"] = [forward]
    section = report.many_section({"many": data})
    assert section[0] == "## Many models, one pass"
    text = "\n".join(section)
    assert "tiny, subnets | costly" in text
    assert "many / sequential precisebn" in text
    assert report.many_section({})[2] == "Not in this run."
    t = {"ratio": 1.02, "ratio_min": 0.97, "ratio_max": 1.1}
    assert report._many_met(t, 1.0) == "**no** (within spread)"
    assert report._many_met({**t, "ratio_min": 1.01}, 1.0) == "**no**"
    assert report._many_met(t, 1.05) == "yes"
    assert "vmap / sequential" in "\n".join(gpu._many_part({"many": data}))


def test_resnets_have_torchvisions_layout() -> None:
    # torchvision's resnet18 / resnet50: parameter counts, BN layers and state-dict keys.
    for depth, params, bns, keys in ((18, 11_689_512, 20, 122), (50, 25_557_032, 53, 320)):
        model = resnet(depth)
        assert sum(p.numel() for p in model.parameters()) == params
        assert len(bn_layers(model)) == bns
        assert len(model.state_dict()) == keys
    assert "layer4.1.downsample.1.running_var" not in model.state_dict()
    assert "layer4.0.downsample.1.running_var" in model.state_dict()
    with torch.no_grad():
        assert resnet(18).train()(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match="18 or 50"):
        resnet(34)


def test_update_loop_and_one_row_block_give_the_recompute_buffers() -> None:
    model = make_model(SMALL_CNN)
    batches = make_batches(SMALL_CNN, [4, 5, 6])
    ref = run_precisebn(model, batches)
    for method in (overhead.run_update_loop, overhead.one_row):
        got = method(model, batches)
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7)
    # Inside block_rows(k) a run's fold has k rows; outside, the library's own pass again.
    rec = precisebn.recorder(model)
    with overhead.block_rows(1):
        assert (
            recompute_module._ModelPass(rec, Weights(), expected=8, errors=False).fold.block.shape[
                0
            ]
            == 1
        )
    assert recompute_module._ModelPass.__name__ == "_ModelPass"
    default = recompute_module._ModelPass(rec, Weights(), expected=40, errors=False)
    assert default.fold.block.shape[0] == overhead.BLOCK > 1


def test_overhead_parts_add_up_and_the_section_renders() -> None:
    speed = overhead.speed([(SMALL_MLP, 8, 3)], repeats=1)
    assert set(speed[0]["methods"]) == set(overhead.SPEED_METHODS)
    assert speed[0]["bn_calls"] == 2
    calls = overhead.per_call((2, 6), num_batches=4, repeats=1)
    assert [r["depth"] for r in calls["rows"]] == [2, 6]
    for fit in calls["fits"].values():
        assert all(math.isfinite(v) for v in fit.values())
    fixed = overhead.fixed_costs(SMALL_MLP, 8, repeats=2)
    assert fixed["run_us"] > 0
    assert fixed["update_us"] > 0
    situ = overhead.in_situ(SMALL_MLP, 8, 4)
    assert situ["bare_us"] > 0
    assert math.isfinite(situ["bound_minus_bare_us"])
    parts = overhead.predicted(speed, calls, {speed[0]["workload"]: {**fixed, **situ}})[0]
    fit = calls["fits"]["recompute"]
    in_situ = situ["bound_minus_bare_us"]
    expected = in_situ + fit["per_batch_us"] + fixed["run_us"] / 3
    assert parts["recompute_predicted_us"] == pytest.approx(expected)
    update = situ["update_bound_minus_bare_us"] + situ["update_outside_us"]
    assert parts["update_predicted_us"] == pytest.approx(update)
    assert parts["in_situ_per_call_us"] == pytest.approx(in_situ / 2)
    blocks = overhead.block([(SMALL_MLP, 8, 3)], repeats=1)
    assert blocks[0]["one_row_ratio"] > 0
    data = {
        "recompute_target": overhead.RECOMPUTE_TARGET,
        "update_target": overhead.UPDATE_TARGET,
        "block": overhead.BLOCK,
        "speed": speed,
        "per_call": calls,
        "predicted": [parts],
        "blocks": blocks,
    }
    section = report.overhead_section({"overhead": data})
    assert section[0] == report.OVERHEAD_HEADER
    text = "\n".join(section)
    assert "| mlp small batch 8 | 3 | 2 |" in text
    assert "µs per intercepted call" in text
    assert f"block of 1 / block of {overhead.BLOCK}" in text
    assert "MALLOC" not in text  # no rows with a tuned malloc in this run
    assert report.overhead_section({})[2] == "Not in this run."
    assert "update loop / floor" in "\n".join(gpu._overhead_part({"overhead": speed}))
    assert gpu._overhead_part({}) == []


def test_guarantees_table_shows_what_copy_on_write_adds() -> None:
    rows = [
        {"model": "reads", "buffers_mib": 64.0, "written_mib": 0.0, "floor_mib": 0.5,
         "precisebn_mib": 0.7},
    ]  # fmt: skip
    table = report.guarantees_tables({"buffers": rows})
    assert "| reads | 64.0 | 0.0 | 0.50 | 0.70 | 0.20 |" in table
    assert "direct" not in "\n".join(report._guarantees_part({"guarantees": {"buffers": rows}}))
    assert callable(guarantees.run)


def test_compiled_rows_run_compiled_and_the_detector_graph_leaves_the_head_out() -> None:
    """One compiled row on a small detector, with dynamo and AOT but no compiler (CI's two
    cores): the recompute's graph keeps the backbone and drops the FPN and the head."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    trunk = ResNet(TorchvisionBasicBlock, [1, 1, 1, 1])
    tiny = Workload("detector tiny", lambda: Detector(trunk, 32, 1, 3), (3, 32, 32))
    case = compiled.Case(tiny, 2, 2, 0.6, detector_backbone, "backbone", "pruned")
    row = compiled.time_case(
        case, repeats=1, warmup=0, options={"backend": aot_autograd(fw_compiler=keep)}
    )
    assert set(row["methods"]) == set(compiled.METHOD_NAMES)
    assert row["methods"][compiled.BASELINE]["ratio_to_floor"] == 1.0
    assert row["recomputed_layers"] == row["bn_layers"] == 12
    assert row["compile_s"]["forward"] > 0
    assert row["compile_s"]["recompute"] > 0
    assert row["recompute_graphs"] == 1
    assert row["repeat"]["graphs"] == 0  # cached: a second run compiles nothing
    assert row["timed_graphs"] == 0
    assert row["eager_fallbacks"] == []
    assert row["difference"]["mean"] < 1e-5
    assert row["difference"]["var"] < 1e-5
    forward, recompute = (
        [str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs
    )
    assert sum("group_norm" in op for op in forward) == 6  # two towers, once per level
    assert not any("group_norm" in op for op in recompute)
    assert sum("convolution" in op for op in recompute) == 12  # the trunk's convs only
    data = {**compiled.run(quick=True, repeats=1), "rows": [row], "warm_up_s": 1.0}
    section = report.compiled_section({"compiled": data})
    assert section[0] == report.COMPILED_HEADER
    text = "\n".join(section)
    assert "| detector tiny batch 2 | 2 | 12 of 12 (backbone) |" in text
    assert "Every row ran compiled" in text
    assert "compiled recompute beats eager from" in text
    assert "Compiled runs" in "\n".join(gpu._compiled_part({"compiled": data}))


def test_compiled_section_is_full_run_only_and_amortises_the_compile() -> None:
    quick = compiled.run(quick=True, repeats=1)
    assert quick["rows"] == []
    assert "Not in a `--quick` run" in "\n".join(report.compiled_section({"compiled": quick}))
    assert report.compiled_section({})[2] == "Not in this run."
    per = {"compiled forward": 0.01, "compiled recompute": 0.01, "eager recompute": 0.03}
    row = {
        "num_batches": 10,
        "methods": {k: {"median_s": v * 10} for k, v in per.items()},
        "compile_s": {"forward": 2.0, "recompute": 4.0},
    }
    a = compiled.amortised(row, 200)
    assert a["forward_ms"] == pytest.approx(20.0)  # 10 ms + 2 s / 200
    assert a["recompute_ms"] == pytest.approx(30.0)
    assert a["eager_recompute_ms"] == pytest.approx(30.0)
    assert a["break_even"] == pytest.approx(200.0)  # 4 s saved at 20 ms a batch


def test_gpu_compiled_sync_check_guards_the_loop_from_the_second_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    result = gpu.compiled_no_sync_check(torch.device("cpu"), {"backend": "eager"})
    assert result.startswith("passed: 0 host-device syncs"), result
    assert modes == ["error", "default"]
