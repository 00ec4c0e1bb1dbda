"""``precisebn recompute`` end to end, its errors, and the command line's conventions."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import cli_factories
import precisebn
from precisebn import _cli

TESTS = Path(__file__).resolve().parent
FACTORIES = "cli_factories"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m precisebn ARGS`` with the factories importable and one CPU thread."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "precisebn", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """The state dict of a fresh ``make_model()``: buffers 0 and 1, far from the loader's."""
    path = tmp_path / "in.pt"
    torch.save(cli_factories.make_model().state_dict(), path)
    return path


def recompute_args(checkpoint: Path, out: Path, /, **changes: str) -> list[str]:
    options = {
        "--model": f"{FACTORIES}:make_model",
        "--checkpoint": str(checkpoint),
        "--data": f"{FACTORIES}:make_loader",
        "--out": str(out),
        "--num-batches": "4",
    }
    options.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
    return ["recompute", *(part for item in options.items() for part in item)]


def expected_buffers(state: dict[str, torch.Tensor], num_batches: int) -> precisebn.BNBuffers:
    model = cli_factories.make_model()
    model.load_state_dict(state)
    return precisebn.recompute_bn_buffers(
        model, cli_factories.make_loader(), num_batches=num_batches
    )


def test_recompute_end_to_end(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    before = checkpoint.read_bytes()
    result = run_cli(*recompute_args(checkpoint, out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoint.read_bytes() == before  # the input is untouched

    old = torch.load(checkpoint, weights_only=True)
    written = torch.load(out, weights_only=True)
    expected = expected_buffers(old, num_batches=4)
    assert list(written) == list(old)
    assert set(expected) < set(written)
    for key, value in old.items():
        if key in expected:
            torch.testing.assert_close(written[key], expected[key])
            assert not torch.allclose(written[key], value)  # the statistics did move
        else:
            assert torch.equal(written[key], value), key
    # The written checkpoint loads into a fresh model.
    cli_factories.make_model().load_state_dict(written)

    samples = 4 * cli_factories.BATCH_SIZE
    assert f"recomputed 3 BatchNorm layers over 4 batches ({samples} samples)" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"  \S+ +\d+ ", line)]
    assert [row[0] for row in rows] == ["1", "4", "9"]
    assert sum(row[-1] == "*" for row in rows) == 1  # by default at most a quarter of the layers
    assert result.stdout.rstrip().endswith(f"wrote {out}")
    assert result.stderr == ""  # no progress bar and no log noise in a pipe


def test_summary_matches_the_buffers(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "out.pt"
    assert _cli.main([*recompute_args(checkpoint, out), "--top", "1"]) == 0
    stdout = capsys.readouterr().out
    old, new = torch.load(checkpoint, weights_only=True), torch.load(out, weights_only=True)
    moves = []
    for layer in ("1", "4", "9"):
        std = (new[f"{layer}.running_var"] + 1e-5).sqrt()
        shift = (old[f"{layer}.running_mean"] - new[f"{layer}.running_mean"]).abs() / std
        ratio = (old[f"{layer}.running_var"] + 1e-5) / (new[f"{layer}.running_var"] + 1e-5)
        row = next(line.split() for line in stdout.splitlines() if line.startswith(f"  {layer} "))
        figures = [float(x) for x in row[2:6]]
        wanted = [shift.mean(), shift.max(), ratio.min(), ratio.max()]
        assert figures == pytest.approx([float(w) for w in wanted], abs=1e-3)
        moves.append((max(shift.max().item(), ratio.log().abs().max().item()), layer, row))
    _, most, row = max(moves)
    assert row[-1] == "*"  # --top 1 flags exactly the layer that moved most
    assert sum(line.rstrip().endswith("*") for line in stdout.splitlines()) == 1, most


def test_no_direct_intercepts_every_batch(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    seen: list[bool] = []
    library = _cli.recompute_bn_buffers

    def spy(*args: Any, **kwargs: Any) -> precisebn.BNBuffers:
        seen.append(kwargs["direct"])
        return library(*args, **kwargs)

    monkeypatch.setattr(_cli, "recompute_bn_buffers", spy)
    outs = [tmp_path / "direct.pt", tmp_path / "intercepted.pt"]
    assert _cli.main(recompute_args(checkpoint, outs[0], num_batches="6")) == 0
    assert _cli.main([*recompute_args(checkpoint, outs[1], num_batches="6"), "--no-direct"]) == 0
    assert seen == [True, False]
    direct, intercepted = (torch.load(out, weights_only=True) for out in outs)
    for key, value in direct.items():
        torch.testing.assert_close(value, intercepted[key], rtol=1e-6, atol=1e-7)


def test_wrapped_checkpoint_gets_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = tmp_path / "swa.pt", tmp_path / "out.pt"
    torch.save(AveragedModel(cli_factories.make_model()).state_dict(), path)
    assert _cli.main(recompute_args(path, out)) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err
    assert "missing keys ('0.weight'" in err
    assert "start with 'module.'" in err
    assert not out.exists()


def test_format_summary_flags_the_largest_moves() -> None:
    new = {}
    for layer in ("a", "b", "c", "d"):
        new[f"{layer}.running_mean"] = torch.zeros(3)
        new[f"{layer}.running_var"] = torch.ones(3)
    old = {k: v.clone() for k, v in new.items()}
    old["b.running_mean"] += torch.tensor([0.0, 5.0, 0.0])  # five new stds on one channel
    old["d.running_var"] *= torch.tensor([1.0, 1.0, 30.0])  # |ln 30| = 3.4
    old["c.running_mean"] += 0.1
    moves = _cli.summarize(old, new, eps={})
    b = next(m for m in moves if m.layer == "b")
    assert (b.shift_max, b.shift_mean) == pytest.approx((5.0, 5.0 / 3))
    flagged = [
        line.split()[0]
        for line in _cli.format_summary(moves, top=2).splitlines()
        if line.endswith("*")
    ]
    assert flagged == ["b", "d"]


def test_overwrite_may_replace_the_input(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    old = torch.load(checkpoint, weights_only=True)
    assert _cli.main([*recompute_args(checkpoint, checkpoint), "--overwrite"]) == 0
    written = torch.load(checkpoint, weights_only=True)
    for key, value in expected_buffers(old, num_batches=4).items():
        torch.testing.assert_close(written[key], value)
    assert not list(checkpoint.parent.glob("*.tmp"))  # no temporary file left behind


def test_state_dict_inside_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    state = cli_factories.make_model().state_dict()
    path, out = tmp_path / "full.pt", tmp_path / "out.pt"
    torch.save({"model": state, "epoch": 7, "note": "kept"}, path)
    assert _cli.main(recompute_args(path, out)) == 0
    written = torch.load(out, weights_only=True)
    assert (written["epoch"], written["note"]) == (7, "kept")
    for key, value in expected_buffers(state, num_batches=4).items():
        torch.testing.assert_close(written["model"][key], value)


def test_forward_for_dict_batches(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "out.pt"
    data = f"{FACTORIES}:make_dict_loader"
    assert _cli.main(recompute_args(checkpoint, out, data=data)) == 1
    assert "cannot find the model input in a batch of type dict" in capsys.readouterr().err
    assert not out.exists()
    forward = f"{FACTORIES}:forward_image"
    assert _cli.main(recompute_args(checkpoint, out, data=data, forward=forward)) == 0
    written = torch.load(out, weights_only=True)
    old = torch.load(checkpoint, weights_only=True)
    for key, value in expected_buffers(old, num_batches=4).items():
        torch.testing.assert_close(written[key], value)


def test_several_state_dicts_need_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    state = cli_factories.make_model().state_dict()
    path, out = tmp_path / "two.pt", tmp_path / "out.pt"
    torch.save({"model": state, "ema": state}, path)
    assert _cli.main(recompute_args(path, out)) == 1
    assert "--key" in capsys.readouterr().err
    assert not out.exists()
    assert _cli.main([*recompute_args(path, out), "--key", "ema"]) == 0
    written = torch.load(out, weights_only=True)
    assert torch.equal(written["model"]["1.running_var"], state["1.running_var"])
    assert not torch.equal(written["ema"]["1.running_var"], state["1.running_var"])


def _not_a_state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


ERRORS: dict[str, tuple[dict[str, str], str]] = {
    "no colon": ({"model": FACTORIES}, "expected 'package.module:factory'"),
    "missing module": (
        {"model": "no_such_module_zz:make"},
        "cannot import module 'no_such_module_zz'",
    ),
    "missing attribute": ({"data": f"{FACTORIES}:nope"}, "has no attribute 'nope'"),
    "model factory returns int": (
        {"model": f"{FACTORIES}:make_number"},
        "returned a value of type int, not a torch.nn.Module",
    ),
    "module instance, not factory": ({"model": f"{FACTORIES}:model_instance"}, "not a factory"),
    "factory raises": ({"model": f"{FACTORIES}:make_broken"}, "broken on purpose"),
    "loader factory returns int": (
        {"data": f"{FACTORIES}:make_number"},
        "not an iterable of batches",
    ),
    "loader factory returns a model": ({"data": f"{FACTORIES}:make_model"}, "not an iterable"),
    "checkpoint does not fit": (
        {"model": f"{FACTORIES}:make_other_model"},
        "does not fit the model",
    ),
    "empty loader": ({"data": f"{FACTORIES}:make_empty_loader"}, "no batches"),
    "missing checkpoint": ({"checkpoint": "missing.pt"}, "no such file"),
    "wrong key": ({"key": "weights"}, "has no entry 'weights'"),
    "forward not callable": ({"forward": f"{FACTORIES}:NUM_BATCHES"}, "not a function"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_clear_error(
    case: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changes, message = ERRORS[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.pt"
    assert _cli.main(recompute_args(checkpoint, out, **changes)) == 1
    err = capsys.readouterr().err
    assert err.startswith("precisebn recompute: error: ")
    assert message in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]  # nothing written


@pytest.mark.parametrize(
    ("make", "message"), [(_not_a_state_dict, "not a state dict"), (_garbage, "cannot read it")]
)
def test_unusable_checkpoint(
    make: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = make(tmp_path), tmp_path / "out.pt"
    assert _cli.main(recompute_args(path, out)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_trusted_checkpoint_with_other_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    path, out = tmp_path / "objects.pt", tmp_path / "out.pt"
    state = cli_factories.make_model().state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    assert _cli.main(recompute_args(path, out)) == 1
    assert "--trusted" in capsys.readouterr().err
    assert not out.exists()
    assert _cli.main([*recompute_args(path, out), "--trusted"]) == 0
    written = torch.load(out, weights_only=False)
    assert written["args"] == argparse.Namespace(lr=0.1)
    for key, value in expected_buffers(state, num_batches=4).items():
        torch.testing.assert_close(written["model"][key], value)


def test_existing_output_is_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert _cli.main(recompute_args(checkpoint, out)) == 1
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    # Nor the input itself, without --overwrite.
    before = checkpoint.read_bytes()
    assert _cli.main(recompute_args(checkpoint, checkpoint)) == 1
    assert checkpoint.read_bytes() == before


def test_output_directory_must_exist(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "out.pt"
    assert _cli.main(recompute_args(checkpoint, out)) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.parent.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(recompute_args(checkpoint, tmp_path / "out.pt", device="cuda")) == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--num-batches", "0"), ("--device", "tpu")])
def test_argparse_rejects_bad_values(
    option: str, value: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*recompute_args(checkpoint, tmp_path / "out.pt"), option, value]  # the last one wins
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(args)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_unreached_layer_is_a_logged_warning(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = tmp_path / "spare.pt", tmp_path / "out.pt"
    torch.save(cli_factories.make_model_with_spare_bn().state_dict(), path)
    model = f"{FACTORIES}:make_model_with_spare_bn"
    assert _cli.main(recompute_args(path, out, model=model)) == 0
    err = capsys.readouterr().err
    assert "precisebn: WARNING:" in err
    assert "'spare'" in err
    written = torch.load(out, weights_only=True)
    assert torch.equal(written["spare.running_var"], torch.ones(4))


def test_verbose_logs_and_restores_the_logger(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("precisebn")
    handlers, level = list(logger.handlers), logger.level
    assert _cli.main([*recompute_args(checkpoint, tmp_path / "out.pt"), "-v"]) == 0
    assert "precisebn: INFO: recomputed 3 BatchNorm layers" in capsys.readouterr().err
    assert (logger.handlers, logger.level) == (handlers, level)


def test_explicit_progress_bar(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    assert _cli.main([*recompute_args(checkpoint, tmp_path / "out.pt"), "--progress"]) == 0
    assert re.search(r"precise BN.*4/4", capsys.readouterr().err)


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")

    class Terminal:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stderr", Terminal(tty=True))
    assert _cli._want_progress(None) is True
    monkeypatch.setattr(sys, "stderr", Terminal(tty=False))
    assert _cli._want_progress(None) is False
    assert _cli._want_progress(True) is True


@pytest.mark.parametrize("command", [[], ["demo"], ["recompute"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: precisebn {' '.join(command)}".rstrip())
    if command == ["recompute"]:
        for option in ("--model", "--checkpoint", "--data", "--num-batches", "--device", "--out"):
            assert option in out


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main([]) == 2
    assert "usage: precisebn" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"precisebn {precisebn.__version__}"
