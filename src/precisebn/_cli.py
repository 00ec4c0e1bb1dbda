"""The ``precisebn`` command line: ``precisebn demo`` and ``precisebn recompute``.

It parses, calls the library and prints. Results go to standard output; log records, the
library's warnings (as log records) and errors go to standard error. An error is one line
and exit status 1 (2 for a command line argparse rejects). SIGINT exits with status 130
and SIGTERM with 143, each with one line. The output checkpoint is written atomically
(`precisebn._checkpoint.write_checkpoint`), so none of these leaves a partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import pkgutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from precisebn import __version__, _demo, plot
from precisebn._batches import BatchLayoutError, Forward
from precisebn._checkpoint import (
    CheckpointError,
    check_writable,
    load_into,
    read_checkpoint,
    write_atomically,
    write_checkpoint,
)
from precisebn._recompute import recompute_bn_buffers
from precisebn._report import eps_by_layer, report

logger = logging.getLogger("precisebn")

LIBRARY_ERRORS = (ValueError, TypeError, RuntimeError, ImportError, Warning)
"""What the library raises for bad input; ``Warning`` too, under ``python -W error``."""


class CLIError(Exception):
    """A problem with the command line's input: reported as one line, exit status 1."""


class Terminated(BaseException):
    """SIGTERM arrived. Like KeyboardInterrupt it unwinds through every ``finally`` (so a
    temporary file is removed) and past the ``except Exception`` around user code."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``precisebn`` command line; return the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command: Callable[[argparse.Namespace], int] = args.run
    with _logging_to_stderr(verbosity=args.verbose), _sigterm_raises():
        try:
            return command(args)
        except (CLIError, *LIBRARY_ERRORS) as error:
            logger.debug("%s failed", args.command, exc_info=True)
            return _fail(args.command, _one_line(error) + _hint(error), status=1)
        # The output is written atomically: before its rename nothing is in place. (A signal in
        # the instant after the rename is reported the same way, though the file is complete.)
        except KeyboardInterrupt:
            stopped = "interrupted; nothing was written"
            return _fail(args.command, stopped, status=128 + signal.SIGINT)
        except Terminated:
            stopped = "terminated (SIGTERM); nothing was written"
            return _fail(args.command, stopped, status=128 + signal.SIGTERM)


def _fail(command: str, message: str, *, status: int) -> int:
    print(f"precisebn {command}: error: {message}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _hint(error: BaseException) -> str:
    """The command line's spelling of the keyword argument an error message names."""
    if isinstance(error, BatchLayoutError):
        return " (here: --forward MODULE:FUNCTION, naming such a function)"
    if isinstance(error, CheckpointError) and error.argument:
        return f" (here: --{error.argument})"
    return ""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated`, as SIGINT raises KeyboardInterrupt.

    Only in the main thread (the only one that may set handlers) and only over the default
    handler: one that a program embedding `main` installed, or SIG_IGN, is left alone.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise Terminated


@contextlib.contextmanager
def _logging_to_stderr(*, verbosity: int) -> Iterator[None]:
    """Show the library's log records and warnings on stderr while a command runs, then restore.

    Warnings become records of the ``py.warnings`` logger (`logging.captureWarnings`), shown
    as their message alone, without the file and line they were raised at.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("precisebn: %(levelname)s: %(message)s"))
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    levels = {logger: level, logging.getLogger("py.warnings"): logging.WARNING}
    saved = [(each, each.level, each.propagate) for each in levels]
    for each, each_level in levels.items():
        each.addHandler(handler)
        each.setLevel(each_level)
        each.propagate = False
    format_warning = warnings.formatwarning
    warnings.formatwarning = _warning_message
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warnings.formatwarning = format_warning
        for each, each_level, propagate in saved:
            each.removeHandler(handler)
            each.setLevel(each_level)
            each.propagate = propagate


def _warning_message(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    return str(message)


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
    add = rec.add_argument
    add("--model", required=True, metavar="MODULE:FACTORY", help="returns the torch.nn.Module")
    add("--checkpoint", required=True, type=Path, metavar="IN.pt", help="checkpoint to read")
    add(
        "--data",
        required=True,
        metavar="MODULE:FACTORY",
        help="returns an iterable of batches (e.g. a DataLoader)",
    )
    add("--out", required=True, type=Path, metavar="OUT.pt", help="checkpoint to write")
    add(
        "--num-batches",
        type=_positive_int,
        default=200,
        metavar="N",
        help="the most batches to use (default: 200)",
    )
    add(
        "--tol",
        type=_positive_float,
        default=None,
        metavar="TOL",
        help="stop once every channel's standard errors are within TOL of its statistics "
        "(e.g. 0.01), checked every 16 batches from batch 16 on; --num-batches stays the "
        "cap (default: use every batch up to the cap)",
    )
    add("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    add(
        "--key",
        metavar="NAME",
        help="the entry of the checkpoint that holds the model's state dict "
        "(default: the checkpoint itself, or its only entry that is a state dict)",
    )
    add(
        "--forward",
        metavar="MODULE:FUNCTION",
        help="forward(model, batch) -> output, for batches that are not a tensor or a tuple "
        "or list whose first element is the input (e.g. dicts)",
    )
    add(
        "--trusted",
        action="store_true",
        help="load the checkpoint with torch.load(weights_only=False), for checkpoints that "
        "hold other Python objects: this runs code from the file, so only for files you trust",
    )
    add(
        "--eval",
        action="store_true",
        help="put the model in eval mode first: dropout and other modules act as at inference "
        "(the BN layers still pool batch statistics)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace --out (and --plot) if it exists (--out may be the input)",
    )
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: if standard error is a terminal and tqdm is installed)",
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the batches through one torch.compile graph that returns only the statistics "
        "(default: when the model from --model is compiled)",
    )
    add(
        "--top",
        type=_positive_int,
        default=None,
        metavar="K",
        help="flag the K layers that moved most (default: 3, at most a quarter of the layers)",
    )
    add(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="also draw one image, after --out is written: per layer, every channel's mean "
        "shift (in new std) and log2 variance ratio, old against new, and below them each "
        "layer's largest relative standard error against batches, with --tol's line; the "
        "format follows the suffix (.png, .svg, .pdf, ...); needs matplotlib: "
        "pip install 'precisebn[plot]'",
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


# --------------------------------------------------------------------------- demo


def run_demo_command(args: argparse.Namespace) -> int:
    """``precisebn demo``: train, recompute, print the tables (and the JSON line)."""
    if sys.stderr.isatty():
        print("training on scikit-learn's digits ...", file=sys.stderr, flush=True)
    result = _demo.run_demo(seed=args.seed, quick=args.quick)
    print(_demo.format_table(result))
    print()
    print("\n".join(_demo.verdict(result)))
    print()
    print("what moved in the averaged model's BN layers:")
    print(result.report)
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
    return 0


# ---------------------------------------------------------------------- recompute


def run_recompute_command(args: argparse.Namespace) -> int:
    """``precisebn recompute``: every check first, then the work, then the atomic writes."""
    check_writable(args.out, overwrite=args.overwrite)
    image_format = None if args.plot is None else _check_plot(args)
    device = _device(args.device)
    model = _build_model(args.model)
    checkpoint = read_checkpoint(args.checkpoint, key=args.key, trusted=args.trusted)
    load_into(model, checkpoint.state)
    model.to(device)
    if args.eval:
        model.eval()
    loader = _build_loader(args.data)
    logger.info("recomputing on %s, up to %d batches of %s", device, args.num_batches, args.data)
    new, info = recompute_bn_buffers(
        model,
        loader,
        num_batches=args.num_batches,
        tol=args.tol,
        forward=_load_forward(args.forward),
        progress=_want_progress(args.progress),
        compile=args.compile,
        return_info=True,
    )
    eps = eps_by_layer(model)
    moved = report(checkpoint.state, new, info=info, eps=eps, top=args.top)
    reached = ""
    if info.converged is not None:
        reached = f"; tol={args.tol:g} {'reached' if info.converged else 'not reached'}"
    print(
        f"recomputed {len(moved)} BatchNorm layers over {info.num_batches} batches "
        f"({info.num_samples} samples){reached}"
    )
    print(moved)
    image: bytes | None = None
    if image_format is not None:  # drawn before the checkpoint is written: nothing is half done
        figure = plot.report(checkpoint.state, new, info=info, eps=eps, tol=args.tol)
        image = plot._render(figure, image_format)
    write_checkpoint(checkpoint.with_buffers(new), args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    if image is not None:
        try:
            write_atomically(args.plot, lambda file: file.write(image))
        except OSError as error:
            raise CLIError(
                f"--plot {args.plot}: cannot write it: {type(error).__name__}: {error} "
                f"({args.out} was written)"
            ) from None
        print(f"wrote {args.plot}")
    return 0


def _check_plot(args: argparse.Namespace) -> str:
    """Before the work: matplotlib is there, ``--plot`` names an image format and may be
    written. Returns the format."""
    try:
        image_format = plot._image_format(args.plot)
    except (ImportError, ValueError) as error:
        raise CLIError(f"--plot: {error}") from None
    if args.plot.resolve() == args.out.resolve():
        raise CLIError(f"--plot and --out name the same file, {args.out}")
    check_writable(args.plot, overwrite=args.overwrite)
    return image_format


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
    module, colon, attribute = spec.partition(":")
    if not (module and colon and attribute):
        raise CLIError(f"{option} {spec!r}: expected 'package.module:factory'")
    with _cwd_on_path():
        try:
            return pkgutil.resolve_name(spec)
        except ImportError as error:
            reason = f"cannot import module {module!r}: {type(error).__name__}: {error}"
        except Exception as error:  # a missing attribute, or the module's own code failing
            reason = f"{type(error).__name__}: {error}"
    raise CLIError(f"{option} {spec!r}: {reason}")


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
    if isinstance(factory, nn.Module) or not callable(factory):
        raise CLIError(
            f"{option} {spec!r} is an object of type {type(factory).__name__}, not a factory: "
            "name a function (or class) that takes no arguments"
        )
    try:
        return factory()
    except Exception as error:
        logger.debug("the factory failed", exc_info=True)
        raise CLIError(
            f"{option} {spec!r}: calling it failed: {type(error).__name__}: {error}"
        ) from None


def _build_model(spec: str) -> nn.Module:
    model = _call_factory(spec, option="--model")
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"--model {spec!r} returned a value of type {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def _build_loader(spec: str) -> Iterable[Any]:
    loader = _call_factory(spec, option="--data")
    wrong = isinstance(loader, (str, bytes, Mapping, nn.Module))
    if wrong or not isinstance(loader, Iterable):
        raise CLIError(
            f"--data {spec!r} returned a value of type {type(loader).__name__}, not an "
            "iterable of batches (e.g. a DataLoader or a list of tensors)"
        )
    return loader


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


def _want_progress(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    if not sys.stderr.isatty():
        return False
    if importlib.util.find_spec("tqdm") is None:
        logger.info("no progress bar: tqdm is not installed (pip install 'precisebn[progress]')")
        return False
    return True
