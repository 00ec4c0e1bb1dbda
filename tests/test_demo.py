"""``precisebn demo --quick``: its table, its JSON line, its determinism and its honesty."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest
import torch

from precisebn import _cli, _demo

pytest.importorskip("sklearn")

SEED = 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """``python -m precisebn demo --quick --json`` in a fresh process, as CI runs it."""
    return subprocess.run(
        [sys.executable, "-m", "precisebn", "demo", "--quick", "--json", "--seed", str(SEED)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path_factory.mktemp("demo"),
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def report(quick_run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert quick_run.returncode == 0, quick_run.stderr
    parsed: dict[str, Any] = json.loads(quick_run.stdout.splitlines()[-1])
    return parsed


def test_json_structure(report: dict[str, Any]) -> None:
    assert (report["seed"], report["quick"]) == (SEED, True)
    assert report["train_size"] + report["test_size"] == 1797
    for field in ("accuracy", "loss"):
        assert set(report[field]) == set(_demo.ROWS)
        assert all(isinstance(v, float) for v in report[field].values())
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    # Accuracies are whole numbers of test images.
    for value in report["accuracy"].values():
        images = value * report["test_size"]
        assert images == pytest.approx(round(images), abs=1e-6)
    # How far the SWA model's BN layers moved, as precisebn.report gives it.
    moved = report["report"]
    assert list(moved) == ["1", "4", "8"]
    assert [layer["channels"] for layer in moved.values()] == [16, 32, 64]
    for layer in moved.values():
        assert set(layer) == {
            "channels",
            "shift_mean",
            "shift_max",
            "ratio_min",
            "ratio_max",
            "rel_error",
            "n_eff",
        }
        assert 0 < layer["shift_mean"] <= layer["shift_max"]
        assert 0 < layer["ratio_min"] <= layer["ratio_max"]
        # The run's standard errors fill in the last two columns.
        assert 0 < layer["rel_error"] < 0.2
        assert layer["n_eff"] > 0
    assert (report["settings"]["epochs"], report["settings"]["swa_epochs"]) == _demo.EPOCHS["quick"]


def test_precise_beats_stale_on_swa_weights(report: dict[str, Any]) -> None:
    accuracy, loss = report["accuracy"], report["loss"]
    assert accuracy["swa_precise"] > accuracy["swa_stale"]
    assert loss["swa_precise"] < loss["swa_stale"]
    # Precise BN and update_bn pool nearly the same statistics; both are far from chance.
    assert abs(accuracy["swa_precise"] - accuracy["swa_update_bn"]) <= 0.01
    assert accuracy["swa_precise"] > 0.9


def test_table_precedes_the_json(
    quick_run: subprocess.CompletedProcess[str], report: dict[str, Any]
) -> None:
    lines = quick_run.stdout.splitlines()[:-1]
    for name, label in _demo.ROWS.items():
        row = next(line for line in lines if line.strip().startswith(label))
        assert row.split()[-2] == f"{report['accuracy'][name]:.2%}"
    assert any(line.startswith("SWA weights: ") for line in lines)
    # Then the report of the SWA model's layers, after the verdict.
    heading = lines.index("what moved in the averaged model's BN layers:")
    assert heading > max(i for i, line in enumerate(lines) if line.startswith("Peer: "))
    rows = [line.split() for line in lines[heading:] if re.match(r"  \S+ +\d+ ", line)]
    assert [row[:2] for row in rows] == [["1", "16"], ["4", "32"], ["8", "64"]]
    for row, figures in zip(rows, report["report"].values(), strict=True):
        assert float(row[3]) == pytest.approx(figures["shift_max"], abs=1e-3)
    assert sum(row[-1] == "*" for row in rows) == 1
    assert quick_run.stderr == ""  # no status line when stderr is not a terminal


def test_deterministic_for_a_seed(report: dict[str, Any]) -> None:
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    again = _demo.run_demo(seed=SEED, quick=True).to_json()
    assert (again["accuracy"], again["loss"]) == (report["accuracy"], report["loss"])
    assert again["report"] == report["report"]
    # The caller's thread count and random state are left alone.
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)


def _result(**accuracy: float) -> _demo.DemoResult:
    scores = {name: _demo.Score(accuracy=0.95, loss=0.2) for name in _demo.ROWS}
    for name, value in accuracy.items():
        scores[name] = _demo.Score(accuracy=value, loss=0.2 + (0.95 - value))
    return _demo.DemoResult(SEED, True, scores, 1437, 360, 1.0)


def test_verdict_says_when_precise_bn_did_not_help() -> None:
    worse = _demo.verdict(_result(precise=0.94, swa_precise=0.90))
    assert worse[0].endswith("precise BN did not help on this seed.")
    assert worse[1].startswith("SWA weights: 90.00% precise vs 95.00% stale (-5.00 points)")
    assert worse[1].endswith("precise BN did not help on this seed.")
    better = _demo.verdict(_result(ema=0.90, swa_stale=0.60))
    assert better[0].startswith("Final weights: 95.00% precise vs 90.00% EMA (+5.00 points)")
    assert better[0].endswith("precise BN helps.")
    assert "(+35.00 points)" in better[1]
    assert "update_bn reaches the same accuracy" in better[2]
    same = _demo.verdict(_result())
    assert same[0].endswith("the same accuracy on this seed.")


def test_missing_scikit_learn_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert _cli.main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err
    assert "pip install 'precisebn[demo]'" in err


def test_console_script_runs_the_cli() -> None:
    try:
        metadata.distribution("precisebn")
    except metadata.PackageNotFoundError:
        pytest.skip("precisebn is not installed (pip install -e .)")
    scripts = metadata.entry_points(group="console_scripts", name="precisebn")
    assert [script.load() for script in scripts] == [_cli.main]
