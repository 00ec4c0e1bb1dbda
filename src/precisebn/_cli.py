"""The ``precisebn`` command line: ``precisebn demo`` and ``precisebn recompute``.

Results go to standard output; log messages and errors to standard error. An error
exits with status 1 (2 for a command line argparse rejects) and writes nothing; so does
SIGINT (status 130) or SIGTERM (status 143) before the output is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from precisebn import __version__, _demo
from precisebn._batches import BatchLayoutError, Forward
from precisebn._buffers import BNBuffers
from precisebn._recompute import recompute_bn_buffers
from precisebn._report import eps_by_layer, report

logger = logging.getLogger("precisebn")


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


class _Terminated(BaseException):
    """SIGTERM arrived: like KeyboardInterrupt, it unwinds through every ``finally`` (so the
    temporary file is removed) and past the ``except Exception`` around user code."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``precisebn`` command line; return the exit status.

    SIGINT and SIGTERM stop a command with one line on stderr and status 128 + the signal
    number (130, 143), not a traceback.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command: Callable[[argparse.Namespace], int] = args.run
    with _logging_to_stderr(verbosity=args.verbose), _handling_signals() as run:
        try:
            return command(args)
        except CLIError as error:
            print(f"precisebn {args.command}: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return _stopped(args.command, "interrupted", signal.SIGINT, run)
        except _Terminated:
            return _stopped(args.command, "terminated (SIGTERM)", signal.SIGTERM, run)


def _stopped(command: str, what: str, signum: int, run: _Run) -> int:
    # Before the final rename nothing is in place: the output is written atomically.
    written = "" if run.committing else "; nothing was written"
    print(f"precisebn {command}: error: {what}{written}", file=sys.stderr)
    return 128 + signum


class _Run:
    """One command run by `main`, as its signal handler and `_write` see it.

    Attributes:
        committing: `_write` has begun moving the finished output into place; from then on
            a signal is ignored, since the work is done and the process is about to exit.
        stopping: a signal has already raised; more of them must not cut the cleanup short.
    """

    def __init__(self) -> None:
        self.committing = False
        self.stopping = False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT raises KeyboardInterrupt and SIGTERM `_Terminated`, once, before the commit."""
        if self.committing or self.stopping:
            return
        self.stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated


_RUN: ContextVar[_Run | None] = ContextVar("precisebn_cli_run", default=None)


@contextlib.contextmanager
def _handling_signals() -> Iterator[_Run]:
    """Send SIGINT and SIGTERM to `_Run.on_signal` while a command runs, then restore.

    Only in the main thread (the only one that may set handlers, and that receives signals),
    and only over the default handlers: one that a program embedding `main` installed, or
    SIG_IGN, is left alone.
    """
    run = _Run()
    token = _RUN.set(run)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, run.on_signal)
    try:
        yield run
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
        _RUN.reset(token)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``precisebn`` and its subcommands.

    Example:
        >>> build_parser().parse_args(["demo", "--quick"]).quick
        True
    """
    parser = argparse.ArgumentParser(
        prog="precisebn",
        description="Exact recomputation of BatchNorm running statistics (precise BN).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(command=None, verbose=0)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what is done (-vv: also tracebacks of errors)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(sub, common)
    _add_recompute(sub, common)
    return parser


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small BN net on scikit-learn's digits and show what precise BN changes",
        description=(
            "Train a small BatchNorm conv net on scikit-learn's bundled handwritten digits "
            "(CPU, no download) with settings that make the running statistics stale, average "
            "its weights (SWA), and compare test accuracy and loss with EMA, stale, precise and "
            "update_bn statistics. Needs scikit-learn: pip install 'precisebn[demo]'."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="reduced training (a few seconds)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation and batch order (default: 0)"
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help='after the table, print one JSON object as the last line ("accuracy", "loss", ...)',
    )
    demo.set_defaults(command="demo", run=run_demo_command)


def _add_recompute(sub: Any, common: argparse.ArgumentParser) -> None:
    rec = sub.add_parser(
        "recompute",
        parents=[common],
        help="recompute the BN statistics of a checkpoint and write a new checkpoint",
        description=(
            "Build a model with a factory, load a checkpoint's state dict into it, recompute the "
            "running statistics of its BatchNorm layers over batches from a loader factory, and "
            "write a copy of the checkpoint with the new statistics. Prints how far each layer's "
            "statistics moved. Factories are named 'package.module:function' and called with no "
            "arguments; the current directory is searched for the module first."
        ),
    )
    rec.add_argument(
        "--model", required=True, metavar="MODULE:FACTORY", help="returns the torch.nn.Module"
    )
    rec.add_argument(
        "--checkpoint", required=True, type=Path, metavar="IN.pt", help="checkpoint to read"
    )
    rec.add_argument(
        "--data",
        required=True,
        metavar="MODULE:FACTORY",
        help="returns an iterable of batches (e.g. a DataLoader)",
    )
    rec.add_argument(
        "--out", required=True, type=Path, metavar="OUT.pt", help="checkpoint to write"
    )
    rec.add_argument(
        "--num-batches",
        type=_positive_int,
        default=200,
        metavar="N",
        help="the most batches to use (default: 200)",
    )
    rec.add_argument(
        "--tol",
        type=_positive_float,
        default=None,
        metavar="TOL",
        help="stop once every channel's standard errors are within TOL of its statistics "
        "(e.g. 0.01), checked every 16 batches from batch 16 on; --num-batches stays the "
        "cap (default: use every batch up to the cap)",
    )
    rec.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)"
    )
    rec.add_argument(
        "--key",
        metavar="NAME",
        help="the entry of the checkpoint that holds the model's state dict "
        "(default: the checkpoint itself, or its only entry that is a state dict)",
    )
    rec.add_argument(
        "--forward",
        metavar="MODULE:FUNCTION",
        help="forward(model, batch) -> output, for batches that are not a tensor or a tuple "
        "or list whose first element is the input (e.g. dicts)",
    )
    rec.add_argument(
        "--trusted",
        action="store_true",
        help="load the checkpoint with torch.load(weights_only=False), for checkpoints that "
        "hold other Python objects: this runs code from the file, so only for files you trust",
    )
    rec.add_argument(
        "--eval",
        action="store_true",
        help="put the model in eval mode first: dropout and other modules act as at inference "
        "(the BN layers still pool batch statistics)",
    )
    rec.add_argument(
        "--no-direct",
        action="store_true",
        help="intercept every BN call of every batch, for a forward that changes a layer's "
        "input size between batches of equal shapes by a rule of its own (a counter, a "
        "private random generator); the default runs repeated shapes without interception, "
        "checks one such batch in eight and starts over if a check fails",
    )
    rec.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (it may be the input)"
    )
    rec.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: if standard error is a terminal and tqdm is installed)",
    )
    rec.add_argument(
        "--top",
        type=_positive_int,
        default=None,
        metavar="K",
        help="flag the K layers that moved most (default: 3, at most a quarter of the layers)",
    )
    rec.set_defaults(command="recompute", run=run_recompute_command)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@contextlib.contextmanager
def _logging_to_stderr(*, verbosity: int) -> Iterator[None]:
    """Show the library's log records on stderr while the command runs, then restore."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("precisebn: %(levelname)s: %(message)s"))
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


# --------------------------------------------------------------------------- demo


def run_demo_command(args: argparse.Namespace) -> int:
    """``precisebn demo``: train, recompute, print the tables (and the JSON line)."""
    if sys.stderr.isatty():
        print("training on scikit-learn's digits ...", file=sys.stderr, flush=True)
    try:
        result = _demo.run_demo(seed=args.seed, quick=args.quick)
    except ImportError as error:
        raise CLIError(str(error)) from None
    print(_demo.format_table(result))
    print()
    for line in _demo.verdict(result):
        print(line)
    print()
    print("what moved in the averaged model's BN layers:")
    print(result.report)
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
    return 0


# ---------------------------------------------------------------------- recompute


def run_recompute_command(args: argparse.Namespace) -> int:
    """``precisebn recompute``: every check first, then the work, then one write."""
    _check_output(args.out, overwrite=args.overwrite)
    device = _device(args.device)
    model = _build_model(args.model)
    checkpoint = read_checkpoint(args.checkpoint, key=args.key, trusted=args.trusted)
    _load_state(model, checkpoint, spec=args.model)
    model.to(device)
    if args.eval:
        model.eval()
    loader = _build_loader(args.data)
    forward = _load_forward(args.forward)
    logger.info("recomputing on %s, up to %d batches of %s", device, args.num_batches, args.data)
    new = _recompute(
        model,
        loader,
        num_batches=args.num_batches,
        tol=args.tol,
        forward=forward,
        progress=_want_progress(args.progress),
        direct=not args.no_direct,
    )
    moved = report(checkpoint.state, new, eps=eps_by_layer(model), top=args.top)
    reached = ""
    if new.converged is not None:
        reached = f"; tol={args.tol:g} {'reached' if new.converged else 'not reached'}"
    print(
        f"recomputed {len(moved)} BatchNorm layers over {new.num_batches} batches "
        f"({new.num_samples} samples){reached}"
    )
    print(moved)
    updated = {k: v.detach().to("cpu", checkpoint.state[k].dtype) for k, v in new.items()}
    _write(checkpoint.with_state(updated), args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _recompute(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: int,
    tol: float | None = None,
    forward: Forward | None,
    progress: bool,
    direct: bool = True,
) -> BNBuffers:
    """The library call; its errors become `CLIError`, its warnings log records."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            new = recompute_bn_buffers(
                model,
                loader,
                num_batches=num_batches,
                tol=tol,
                forward=forward,
                progress=progress,
                direct=direct,
            )
        except (ValueError, TypeError, RuntimeError, ImportError) as error:
            logger.debug("recomputing failed", exc_info=True)
            hint = ""
            if isinstance(error, BatchLayoutError):
                hint = " (here: --forward MODULE:FUNCTION, naming such a function)"
            raise CLIError(f"recomputing the statistics failed: {error}{hint}") from None
    for warning in caught:
        logger.warning("%s", warning.message)
    return new


def _load_forward(spec: str | None) -> Forward | None:
    if spec is None:
        return None
    forward: Forward = load_object(spec, option="--forward")
    if not callable(forward):
        raise CLIError(
            f"--forward {spec!r} is an object of type {type(forward).__name__}, not a function "
            "forward(model, batch)"
        )
    return forward


def _check_output(out: Path, *, overwrite: bool) -> None:
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise CLIError(f"--out {out} exists; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise CLIError(f"--out {out}: the directory {out.parent} does not exist")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device cuda: CUDA is not available to this torch {torch.__version__} "
            "(no GPU, or a CPU-only build); use --device cpu"
        )
    return torch.device(name)


def load_object(spec: str, *, option: str) -> Any:
    """Import the object named ``"package.module:attribute"`` (the attribute may be dotted).

    The current directory is searched before the installed packages, as ``python -m`` does.

    Raises:
        CLIError: the spec is malformed, the module cannot be imported, or has no such attribute.

    Example:
        >>> import os
        >>> load_object("os.path:join", option="--model") is os.path.join
        True
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CLIError(f"{option} {spec!r}: expected 'package.module:factory'")
    with _cwd_on_path():
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as error:
            logger.debug("import failed", exc_info=True)
            raise CLIError(
                f"{option} {spec!r}: cannot import module {module_name!r}: "
                f"{type(error).__name__}: {error}"
            ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise CLIError(
                f"{option} {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _call_factory(spec: str, *, option: str) -> Any:
    factory = load_object(spec, option=option)
    if isinstance(factory, torch.nn.Module) or not callable(factory):
        raise CLIError(
            f"{option} {spec!r} is an object of type {type(factory).__name__}, not a factory: "
            "name a function "
            "(or class) that takes no arguments"
        )
    try:
        return factory()
    except Exception as error:
        logger.debug("factory failed", exc_info=True)
        raise CLIError(
            f"{option} {spec!r}: calling it failed: {type(error).__name__}: {error}"
        ) from None


def _build_model(spec: str) -> nn.Module:
    model = _call_factory(spec, option="--model")
    if not isinstance(model, torch.nn.Module):
        raise CLIError(
            f"--model {spec!r} returned a value of type {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def _build_loader(spec: str) -> Iterable[Any]:
    loader = _call_factory(spec, option="--data")
    wrong = isinstance(loader, (str, bytes, Mapping, torch.nn.Module))
    if wrong or not isinstance(loader, Iterable):
        raise CLIError(
            f"--data {spec!r} returned a value of type {type(loader).__name__}, not an "
            "iterable of batches "
            "(e.g. a DataLoader or a list of tensors)"
        )
    return loader


def _want_progress(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    if not sys.stderr.isatty():
        return False
    try:
        importlib.import_module("tqdm")
    except ImportError:
        logger.info("no progress bar: tqdm is not installed (pip install 'precisebn[progress]')")
        return False
    return True


# --------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint and where in it the model's state dict sits.

    Attributes:
        content: what ``torch.load`` returned.
        key: the entry of ``content`` that is the state dict, or ``None`` if it is ``content``.
        state: the state dict.
    """

    content: Any
    key: str | None
    state: Mapping[str, Any]

    def with_state(self, updated: Mapping[str, Any]) -> Any:
        """A shallow copy of the checkpoint whose state dict has ``updated`` entries replaced."""
        state = copy.copy(self.state)  # keeps an OrderedDict's _metadata
        state.update(updated)  # type: ignore[attr-defined]
        if self.key is None:
            return state
        content = copy.copy(self.content)
        content[self.key] = state
        return content


def read_checkpoint(path: Path, *, key: str | None = None, trusted: bool = False) -> Checkpoint:
    """Load ``path`` onto the CPU with ``torch.load`` and find its state dict.

    Args:
        path: the checkpoint file.
        key: the entry that holds the state dict (default: the content itself, or its
            only entry that is a state dict).
        trusted: load with ``weights_only=False``, which runs pickled code.

    Raises:
        CLIError: the file is missing or unreadable, or holds no state dict (or not at ``key``).
    """
    if not path.is_file():
        raise CLIError(f"--checkpoint {path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:
        logger.debug("torch.load failed", exc_info=True)
        hint = "" if trusted else "; if it holds other objects and you trust it: --trusted"
        raise CLIError(
            f"--checkpoint {path}: cannot read it with torch.load(weights_only={not trusted}): "
            f"{type(error).__name__}: {_first_line(error)}{hint}"
        ) from None
    return _find_state(content, path=path, key=key)


def _find_state(content: Any, *, path: Path, key: str | None) -> Checkpoint:
    if key is not None:
        if not isinstance(content, Mapping) or key not in content:
            keys = sorted(map(str, content)) if isinstance(content, Mapping) else []
            raise CLIError(f"--checkpoint {path} has no entry {key!r} (entries: {keys})")
        if not _is_state_dict(content[key]):
            raise CLIError(f"--checkpoint {path}: entry {key!r} is not a state dict of tensors")
        return Checkpoint(content, key, content[key])
    if _is_state_dict(content):
        return Checkpoint(content, None, content)
    if isinstance(content, Mapping):
        found = [k for k, v in content.items() if isinstance(k, str) and _is_state_dict(v)]
        if len(found) == 1:
            logger.info("using the state dict in entry %r of the checkpoint", found[0])
            return Checkpoint(content, found[0], content[found[0]])
        if found:
            raise CLIError(
                f"--checkpoint {path} holds several state dicts {found}; choose one with --key"
            )
    raise CLIError(
        f"--checkpoint {path} holds a {type(content).__name__} that is not a state dict "
        "(a mapping from names to tensors), nor a mapping with one"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def _load_state(model: nn.Module, checkpoint: Checkpoint, *, spec: str) -> None:
    problems = fit_problems(model.state_dict(), checkpoint.state)
    if not problems:
        try:
            model.load_state_dict(checkpoint.state, strict=True)
        except RuntimeError as error:
            problems = [" ".join(str(error).split())]
    if problems:
        raise CLIError(
            f"the checkpoint does not fit the model from --model {spec!r}: " + "; ".join(problems)
        )


def fit_problems(expected: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Why the state dict ``given`` does not fit a model whose state dict is ``expected``.

    Example:
        >>> import torch
        >>> fit_problems({"w": torch.zeros(2)}, {"module.w": torch.zeros(2)})[0]
        "1 missing key ('w')"
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {what}{'s' if len(items) > 1 else ''} ({_first(items)})"
        for what, items in (
            ("missing key", [repr(k) for k in missing]),
            ("unexpected key", [repr(k) for k in unexpected]),
            ("shape mismatch", shapes),
        )
        if items
    ]
    for prefix in ("module.", "_orig_mod."):
        stripped = {k.removeprefix(prefix) for k in given if k.startswith(prefix)}
        if missing and set(missing) <= stripped:
            problems.append(
                f"the checkpoint's keys start with {prefix!r} (saved from a wrapper such as "
                "DistributedDataParallel, AveragedModel or torch.compile?): have --model build "
                "the same wrapper, or save the inner module's state dict"
            )
    return problems


def _first(items: Sequence[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def _write(content: Any, out: Path, *, overwrite: bool) -> None:
    """Save ``content`` to ``out``: never over an existing file unless told, never partially.

    The checkpoint goes to a hidden temporary file in the same directory, is flushed to disk,
    and only then takes the name ``out`` in one atomic step: a hard link, which fails if
    ``out`` appeared meanwhile (or, with ``overwrite``, ``os.replace``). An error, SIGINT or
    SIGTERM removes the temporary file and leaves ``out`` as it was. SIGKILL (or a power
    cut) cannot be caught: it may leave the temporary file ``.OUT.pt.*.tmp``, never a
    partial ``out``.

    Raises:
        CLIError: ``out`` exists and not ``overwrite``, or the file cannot be written.
    """
    handle, tmp = _create_temporary(out)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(content, file)
            file.flush()
            os.fsync(file.fileno())
        run = _RUN.get()
        if run is not None:
            run.committing = True
        _commit(tmp, out, overwrite=overwrite)
    except CLIError:
        raise
    except Exception as error:
        logger.debug("writing failed", exc_info=True)
        raise CLIError(
            f"--out {out}: cannot write it: {type(error).__name__}: {_first_line(error)}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _create_temporary(out: Path) -> tuple[int, Path]:
    # Not tempfile.mkstemp: its files are private (0600), and the checkpoint should get
    # the permissions the umask gives any new file, as a plain open() would.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise CLIError(f"--out {out}: cannot create a temporary file in {out.parent}")


def _commit(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Give the complete file ``tmp`` the name ``out`` atomically; the caller removes ``tmp``."""
    exists = CLIError(f"--out {out} exists; choose another path or pass --overwrite")
    if not overwrite:
        try:
            os.link(tmp, out)  # unlike os.replace, refuses a file that appeared meanwhile
            return
        except FileExistsError:
            raise exists from None
        except OSError:  # no hard links on this filesystem (FAT, some network mounts)
            logger.debug("os.link failed; checking then replacing", exc_info=True)
        if out.exists():
            raise exists
    os.replace(tmp, out)
