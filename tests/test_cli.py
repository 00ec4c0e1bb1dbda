"""``precisebn recompute`` end to end, its errors, and the command line's conventions."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import cli_factories
import precisebn
from precisebn import _checkpoint, _cli

from reference import assert_matches, pooled_inputs

TESTS = Path(__file__).resolve().parent
FACTORIES = "cli_factories"


def run_cli(
    *args: str, cwd: Path, python: tuple[str, ...] = ("-m", "precisebn")
) -> subprocess.CompletedProcess[str]:
    """``python -m precisebn ARGS`` with the factories importable and one CPU thread."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, *python, *args],
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


def expected_buffers(state: dict[str, torch.Tensor], num_batches: int) -> dict[str, torch.Tensor]:
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


def test_summary_is_the_report_of_the_buffers(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    results: list[tuple[dict[str, torch.Tensor], precisebn.RunInfo]] = []
    library = _cli.recompute_bn_buffers

    def spy(*args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], precisebn.RunInfo]:
        results.append(library(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(_cli, "recompute_bn_buffers", spy)
    out = tmp_path / "out.pt"
    assert _cli.main([*recompute_args(checkpoint, out), "--top", "1"]) == 0
    stdout = capsys.readouterr().out
    old, written = torch.load(checkpoint, weights_only=True), torch.load(out, weights_only=True)
    [(new, info)] = results
    expected = precisebn.report(old, new, info=info, eps=1e-5, top=1)  # the model's layers' eps
    assert f"\n{expected}\n" in stdout
    assert [row.layer for row in expected] == ["1", "4", "9"]
    assert expected.flagged() == [max(expected, key=lambda row: row.score).layer]
    assert sum(line.rstrip().endswith("*") for line in stdout.splitlines()) == 1
    # The figures are those of the written checkpoint.
    for row in expected:
        std = (written[f"{row.layer}.running_var"].double() + 1e-5).sqrt()
        moved = old[f"{row.layer}.running_mean"].double() - written[f"{row.layer}.running_mean"]
        assert row.shift_max == pytest.approx((moved.abs() / std).max().item(), rel=1e-6)
        printed = next(line for line in stdout.splitlines() if line.startswith(f"  {row.layer} "))
        assert float(printed.split()[3]) == pytest.approx(row.shift_max, abs=1e-3)


def test_wrapped_checkpoint_gets_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = tmp_path / "swa.pt", tmp_path / "out.pt"
    torch.save(AveragedModel(cli_factories.make_model()).state_dict(), path)
    assert _cli.main(recompute_args(path, out)) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err
    assert "missing keys ('0.weight'" in err
    assert "start with 'module.'" in err
    assert not out.exists()


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
    err = capsys.readouterr().err
    assert "the batch is a dict (a mapping with keys ['image', 'label'])" in err
    assert "forward=lambda model, batch: model(batch['image'])" in err
    assert "(here: --forward MODULE:FUNCTION" in err
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
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("recomputed although --out exists")

    monkeypatch.setattr(_cli, "recompute_bn_buffers", not_called)  # checked before the work
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert _cli.main(recompute_args(checkpoint, out)) == 1
    assert capsys.readouterr().err == (
        f"precisebn recompute: error: {out} exists; choose another path or pass "
        "overwrite=True (here: --overwrite)\n"
    )
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


def test_tol_stops_early_and_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = f"{FACTORIES}:make_long_loader"
    args = recompute_args(checkpoint, tmp_path / "out.pt", data=data, num_batches="48")
    assert _cli.main([*args, "--tol", "0.3"]) == 0
    out = capsys.readouterr()
    assert "over 16 batches (1024 samples); tol=0.3 reached" in out.out
    assert out.err == ""
    rows = [line.split() for line in out.out.splitlines() if re.match(r"  \S+ +\d+ ", line)]
    assert rows
    for row in rows:  # rel. error and n_eff columns are filled in
        assert float(row[6]) <= 0.3
        assert float(row[7]) > 0


@pytest.mark.filterwarnings("always")
def test_tol_out_of_reach_warns(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = recompute_args(checkpoint, tmp_path / "out.pt")
    assert _cli.main([*args, "--tol", "0.01"]) == 0
    out = capsys.readouterr()
    assert "over 4 batches (32 samples); tol=0.01 not reached" in out.out
    assert "precisebn: WARNING: tol=0.01 was not reached" in out.err
    assert (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--num-batches", "0"),
        ("--device", "tpu"),
        ("--tol", "0"),
        ("--tol", "nan"),
        ("--no-direct", "--eval"),  # gone with the direct batches: every batch is intercepted
    ],
)
def test_argparse_rejects_bad_values(
    option: str, value: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*recompute_args(checkpoint, tmp_path / "out.pt"), option, value]  # the last one wins
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(args)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def _spare_bn_args(tmp_path: Path) -> list[str]:
    path = tmp_path / "spare.pt"
    torch.save(cli_factories.make_model_with_spare_bn().state_dict(), path)
    model = f"{FACTORIES}:make_model_with_spare_bn"
    return recompute_args(path, tmp_path / "out.pt", model=model)


@pytest.mark.filterwarnings("always")  # as a command line shows them; the tests' default: error
def test_unreached_layer_is_a_logged_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    showwarning = warnings.showwarning
    assert _cli.main(_spare_bn_args(tmp_path)) == 0
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "'spare'" in line]
    assert line.startswith("precisebn: WARNING: ")
    assert "UserWarning" not in err  # the message alone, not where it was raised
    assert ".py:" not in err
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(written["spare.running_var"], torch.ones(4))
    # logging.captureWarnings is undone.
    assert warnings.showwarning is showwarning
    assert logging.getLogger("py.warnings").handlers == []


@pytest.mark.filterwarnings("error")  # python -W error: warnings are errors
def test_warning_as_error_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(_spare_bn_args(tmp_path)) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("precisebn recompute: error: ")
    assert "'spare'" in line
    assert not (tmp_path / "out.pt").exists()


def test_verbose_logs_and_restores_the_logger(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loggers = [logging.getLogger("precisebn"), logging.getLogger("py.warnings")]
    before = [(list(each.handlers), each.level, each.propagate) for each in loggers]
    assert _cli.main([*recompute_args(checkpoint, tmp_path / "out.pt"), "-v"]) == 0
    assert "precisebn: INFO: recomputed 3 BatchNorm layers" in capsys.readouterr().err
    assert [(list(each.handlers), each.level, each.propagate) for each in loggers] == before


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


# ------------------------------------------------------- atomic output, signals


POSIX_SIGNALS = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
STOPS = [
    pytest.param("SIGTERM", 143, "terminated (SIGTERM)", id="SIGTERM"),
    pytest.param("SIGINT", 130, "interrupted", id="SIGINT"),
]

# Runs the command line with a torch.save that writes a few bytes, then sends the signal
# named by the first argument to its own process: a stop in the middle of the write.
SIGNAL_WHILE_SAVING = """
import os, signal, sys, time
import torch
from precisebn import _cli

def save(content, file):
    file.write(b"partial")
    file.flush()
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(60)

torch.save = save
raise SystemExit(_cli.main(sys.argv[2:]))
"""


TEMPORARY = r"\.out\.pt\.[a-z0-9_]{8}\.tmp"
"""The name of the temporary file of ``--out out.pt`` (tempfile's random part)."""


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@POSIX_SIGNALS
@pytest.mark.parametrize(("name", "status", "what"), STOPS)
def test_signal_while_recomputing(
    name: str, status: int, what: str, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.pt"
    data = f"{FACTORIES}:make_loader_sending_{name.lower()}"
    result = run_cli(*recompute_args(checkpoint, out, data=data), cwd=tmp_path)
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines() == [
        f"precisebn recompute: error: {what}; nothing was written"
    ]
    assert "wrote" not in result.stdout
    assert files_in(tmp_path) == ["in.pt"]


@POSIX_SIGNALS
@pytest.mark.parametrize(("name", "status", "what"), STOPS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_signal_while_writing_leaves_no_file(
    name: str, status: int, what: str, overwrite: bool, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.pt"
    if overwrite:
        out.write_bytes(b"precious")
    args = [*recompute_args(checkpoint, out), *(["--overwrite"] if overwrite else [])]
    result = run_cli(name, *args, cwd=tmp_path, python=("-c", SIGNAL_WHILE_SAVING))
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines() == [
        f"precisebn recompute: error: {what}; nothing was written"
    ]
    assert "Traceback" not in result.stderr
    # The temporary file is gone; the old --out, if any, is intact.
    assert files_in(tmp_path) == (["in.pt", "out.pt"] if overwrite else ["in.pt"])
    if overwrite:
        assert out.read_bytes() == b"precious"


@POSIX_SIGNALS
def test_sigkill_while_writing_leaves_no_partial_output(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    result = run_cli(
        "SIGKILL",
        *recompute_args(checkpoint, out),
        cwd=tmp_path,
        python=("-c", SIGNAL_WHILE_SAVING),
    )
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()  # only the hidden temporary file remains, and a rerun works
    (left,) = (name for name in files_in(tmp_path) if name != "in.pt")
    assert re.fullmatch(TEMPORARY, left)
    result = run_cli(*recompute_args(checkpoint, out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cli_factories.make_model().load_state_dict(torch.load(out, weights_only=True))


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_no_output(
    overwrite: bool,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    out = tmp_path / "out.pt"
    if overwrite:
        out.write_bytes(b"precious")
    options = ["--overwrite"] if overwrite else []

    def full_disk(content: Any, file: BinaryIO) -> None:
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert _cli.main([*recompute_args(checkpoint, out), *options]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"precisebn recompute: error: {out}: cannot write it: "
        "OSError: [Errno 28] No space left on device\n"
    )
    assert files_in(tmp_path) == (["in.pt", "out.pt"] if overwrite else ["in.pt"])
    if overwrite:
        assert out.read_bytes() == b"precious"
    monkeypatch.undo()
    assert _cli.main([*recompute_args(checkpoint, out), *options]) == 0
    cli_factories.make_model().load_state_dict(torch.load(out, weights_only=True))
    assert files_in(tmp_path) == ["in.pt", "out.pt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_appears_only_when_complete(
    overwrite: bool,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    out = tmp_path / "out.pt"
    if overwrite:
        out.write_bytes(b"precious")
    seen: list[tuple[list[str], bytes | None]] = []
    save = torch.save

    def spy(content: Any, file: BinaryIO) -> None:
        # What a SIGKILL now would leave: the old --out (if any) and a hidden temporary file.
        seen.append((files_in(tmp_path), out.read_bytes() if out.exists() else None))
        save(content, file)

    monkeypatch.setattr(torch, "save", spy)
    assert (
        _cli.main([*recompute_args(checkpoint, out), *(["--overwrite"] if overwrite else [])]) == 0
    )
    ((names, old),) = seen
    assert old == (b"precious" if overwrite else None)
    (tmp,) = (name for name in names if name not in ("in.pt", "out.pt"))
    assert re.fullmatch(TEMPORARY, tmp)
    assert files_in(tmp_path) == ["in.pt", "out.pt"]
    cli_factories.make_model().load_state_dict(torch.load(out, weights_only=True))


@POSIX_SIGNALS
def test_output_permissions_follow_the_umask(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    umask = os.umask(0o027)
    try:
        assert _cli.main(recompute_args(checkpoint, tmp_path / "out.pt")) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "out.pt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0o600


def test_signal_handlers_during_a_command(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    during: list[dict[int, Any]] = []
    library = _cli.recompute_bn_buffers

    def spy(*args: Any, **kwargs: Any) -> Any:
        during.append({signum: signal.getsignal(signum) for signum in before})
        return library(*args, **kwargs)

    monkeypatch.setattr(_cli, "recompute_bn_buffers", spy)
    assert _cli.main(recompute_args(checkpoint, tmp_path / "out.pt")) == 0
    # SIGINT keeps Python's handler (KeyboardInterrupt); SIGTERM raises only over the default.
    assert during[0][signal.SIGINT] is before[signal.SIGINT]
    if before[signal.SIGTERM] is signal.SIG_DFL:
        assert during[0][signal.SIGTERM] is _cli._raise_terminated
    else:  # someone else's handler, or SIG_IGN: left alone
        assert during[0][signal.SIGTERM] is before[signal.SIGTERM]
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_sigterm_raises_once() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(_cli.Terminated):
            _cli._raise_terminated(signal.SIGTERM, None)
        # A second SIGTERM, while the first unwinds, must not cut the cleanup short.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, _cli.Terminated])
def test_interrupted_write_leaves_nothing(stop: type[BaseException], tmp_path: Path) -> None:
    def interrupted(content: Any, file: BinaryIO) -> None:
        file.write(b"partial")
        raise stop

    out = tmp_path / "out.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", interrupted)
        with pytest.raises(stop):  # re-raised as it came, not as a CheckpointError
            _checkpoint.write_checkpoint({"w": torch.ones(1)}, out)
    assert files_in(tmp_path) == []


def test_buffers_the_forward_writes_are_written_out_as_they_were(
    tmp_path: Path, one_thread: None
) -> None:
    source = tmp_path / "writer.pt"
    model = cli_factories.make_writer_model().train()
    torch.save(model.state_dict(), source)
    out = tmp_path / "out.pt"
    args = recompute_args(source, out, model=f"{FACTORIES}:make_writer_model")
    assert _cli.main(args) == 0
    before, after = torch.load(source), torch.load(out)
    assert list(after) == list(before)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["bn.running_mean", "bn.running_var"]
    loader = cli_factories.make_loader()[:4]
    assert_matches(after, pooled_inputs(model, loader))


# ----------------------------------------------------------------------------------- --plot

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_is_written_after_the_checkpoint(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    pytest.importorskip("matplotlib")
    from precisebn import plot

    drawn: list[Any] = []
    draw, write = plot.report, _cli.write_atomically

    def spy_draw(*args: Any, **kwargs: Any) -> Any:
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    out, image = tmp_path / "out.pt", tmp_path / "moved.png"
    checkpoint_there: list[bool] = []

    def spy_write(path: Path, to: Callable[[IO[bytes]], object]) -> None:
        checkpoint_there.append(out.exists())
        write(path, to)

    monkeypatch.setattr(plot, "report", spy_draw)
    monkeypatch.setattr(_cli, "write_atomically", spy_write)
    data = f"{FACTORIES}:make_long_loader"
    args = recompute_args(checkpoint, out, data=data, num_batches="48")
    assert _cli.main([*args, "--tol", "0.3", "--plot", str(image)]) == 0
    printed = capsys.readouterr()
    assert printed.out.rstrip().endswith(f"wrote {out}\nwrote {image}")
    assert printed.err == ""
    assert checkpoint_there == [True]
    assert image.read_bytes().startswith(PNG)
    assert files_in(tmp_path) == ["in.pt", "moved.png", "out.pt"]  # no temporary file left
    # The figure: the three layers' shifts, and their errors with the --tol line.
    (figure,) = drawn
    _, ratio_ax, errors_ax = figure.axes
    assert [label.get_text() for label in ratio_ax.get_xticklabels()] == ["1", "4", "9"]
    (tol,) = (line for line in errors_ax.get_lines() if line.get_label() == "tol = 0.3")
    assert list(tol.get_ydata()) == [0.3, 0.3]


def test_plot_without_matplotlib_fails_before_the_work(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called: list[str] = []
    monkeypatch.setattr(_cli, "_build_model", lambda spec: called.append(spec))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    args = recompute_args(checkpoint, tmp_path / "out.pt")
    assert _cli.main([*args, "--plot", str(tmp_path / "moved.png")]) == 1
    assert capsys.readouterr().err == (
        "precisebn recompute: error: --plot: precisebn.plot needs matplotlib: "
        "pip install 'precisebn[plot]'\n"
    )
    assert called == []
    assert files_in(tmp_path) == ["in.pt"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("moved.png", "exists; choose another path or pass overwrite=True (here: --overwrite)"),
        ("moved.xyz", "--plot: {path}: unknown image format 'xyz': end the name with one of"),
        ("moved", "--plot: {path}: no image format"),
        ("out.png", "--plot and --out name the same file"),
        ("missing/moved.png", "the directory"),
    ],
)
def test_plot_is_checked_before_the_work(
    name: str,
    message: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("matplotlib")
    called: list[str] = []
    monkeypatch.setattr(_cli, "_build_model", lambda spec: called.append(spec))
    (tmp_path / "moved.png").write_bytes(b"precious")
    path = tmp_path / name
    out = tmp_path / ("out.png" if name == "out.png" else "out.pt")
    assert _cli.main([*recompute_args(checkpoint, out), "--plot", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("precisebn recompute: error: ")
    assert err.count("\n") == 1
    assert message.format(path=path) in err
    assert called == []
    assert files_in(tmp_path) == ["in.pt", "moved.png"]
    assert (tmp_path / "moved.png").read_bytes() == b"precious"


def test_plot_overwrite_replaces_the_image(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    pytest.importorskip("matplotlib")
    image = tmp_path / "moved.svg"
    image.write_bytes(b"precious")
    args = [*recompute_args(checkpoint, tmp_path / "out.pt"), "--plot", str(image), "--overwrite"]
    assert _cli.main(args) == 0
    assert b"<svg" in image.read_bytes()  # the format follows the suffix
    assert files_in(tmp_path) == ["in.pt", "moved.svg", "out.pt"]


def test_plot_that_cannot_be_written_keeps_the_checkpoint(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    pytest.importorskip("matplotlib")
    write = _cli.write_atomically

    def full_disk(path: Path, to: Callable[[IO[bytes]], object]) -> None:
        def fails(file: IO[bytes]) -> None:
            file.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")

        write(path, fails)  # the real writer, whose temporary file must go

    monkeypatch.setattr(_cli, "write_atomically", full_disk)
    out, image = tmp_path / "out.pt", tmp_path / "moved.png"
    assert _cli.main([*recompute_args(checkpoint, out), "--plot", str(image)]) == 1
    printed = capsys.readouterr()
    assert printed.out.rstrip().endswith(f"wrote {out}")
    assert printed.err == (
        f"precisebn recompute: error: --plot {image}: cannot write it: "
        f"OSError: [Errno 28] No space left on device ({out} was written)\n"
    )
    assert files_in(tmp_path) == ["in.pt", "out.pt"]
    cli_factories.make_model().load_state_dict(torch.load(out, weights_only=True))


def test_help_names_plot(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli.main(["recompute", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--plot OUT.png" in out
    assert "pip install 'precisebn[plot]'" in out


@pytest.mark.parametrize(
    ("flag", "expected"), [([], None), (["--compile"], True), (["--no-compile"], False)]
)
def test_compile_is_passed_through(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: list[str],
    expected: bool | None,
) -> None:
    seen: list[Any] = []
    library = _cli.recompute_bn_buffers

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["compile"])
        return library(*args, **{**kwargs, "compile": False})  # no compiler's wait in tests

    monkeypatch.setattr(_cli, "recompute_bn_buffers", spy)
    assert _cli.main([*recompute_args(checkpoint, tmp_path / "out.pt"), *flag]) == 0
    assert seen == [expected]
