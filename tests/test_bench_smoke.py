"""Smoke check of bench/: the exactness figure on tiny sizes, loose bounds, no timing asserts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fvcore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import exactness, report, timing
from bench.methods import ESTIMATORS, METHODS
from bench.models import (
    CNN,
    Workload,
    batch_sizes,
    bn_mlp,
    make_batches,
    make_model,
    tabular_workload,
)

SMALL_MLP = Workload("mlp small", lambda: bn_mlp(8, 16, 2), (8,))


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
