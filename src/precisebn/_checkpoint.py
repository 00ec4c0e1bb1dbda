"""Checkpoints on disk: find the state dict in one, check that it fits a model, write a copy.

`read_checkpoint` loads a file with ``torch.load`` and finds the model's state dict in it;
`load_into` loads that state dict into a model, after `fit_problems` has said in words why
it would not fit; `Checkpoint.with_buffers` puts recomputed buffers into a copy of the
content, and `write_checkpoint` saves it atomically. Every problem is a `CheckpointError`.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "check_writable",
    "find_state",
    "fit_problems",
    "load_into",
    "read_checkpoint",
    "write_atomically",
    "write_checkpoint",
]

logger = logging.getLogger("precisebn")

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, holds no state dict that fits, or cannot be written.

    Attributes:
        argument: the keyword argument that gets past the problem (``"key"``, ``"trusted"``
            or ``"overwrite"``), or ``None``: lets a caller name its own option for it.
    """

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class Checkpoint:
    """What ``torch.load`` returned, and where in it the model's state dict sits.

    Attributes:
        content: the loaded object.
        key: the entry of ``content`` that is the state dict; ``None`` if ``content`` is it.
        state: the state dict.
    """

    content: Any
    key: str | None
    state: Mapping[str, Any]

    def with_buffers(self, new: Mapping[str, Tensor]) -> Any:
        """The content, with the state dict's entries named in ``new`` replaced.

        Each new tensor is detached and converted to the dtype of the entry it replaces, on
        the CPU. Shallow copies are made of the content and the state dict (an
        ``OrderedDict`` keeps its ``_metadata``); the checkpoint itself is not changed.

        Example:
            >>> import torch
            >>> state = {"w": torch.zeros(2)}
            >>> ckpt = Checkpoint({"m": state, "epoch": 3}, "m", state)
            >>> ckpt.with_buffers({"w": torch.ones(2, dtype=torch.float64)})
            {'m': {'w': tensor([1., 1.])}, 'epoch': 3}
        """
        state = copy.copy(self.state)
        state.update(  # type: ignore[attr-defined]
            {k: v.detach().to("cpu", self.state[k].dtype) for k, v in new.items()}
        )
        if self.key is None:
            return state
        content = copy.copy(self.content)
        content[self.key] = state
        return content


def read_checkpoint(path: PathLike, *, key: str | None = None, trusted: bool = False) -> Checkpoint:
    """Load ``path`` onto the CPU with ``torch.load`` and find its state dict (`find_state`).

    Args:
        path: the checkpoint file.
        key: the entry that holds the state dict (default: the content itself, or its only
            entry that is a state dict).
        trusted: load with ``weights_only=False``, for files that hold other Python objects.
            That runs code from the file: only for files you trust.

    Raises:
        CheckpointError: the file is missing or unreadable, or holds no state dict (or none
            at ``key``).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "in.pt"
        ...     torch.save({"model": torch.nn.BatchNorm1d(2).state_dict(), "epoch": 3}, path)
        ...     ckpt = read_checkpoint(path)
        >>> ckpt.key, list(ckpt.state)
        ('model', ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'])
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:
        hint = (
            ""
            if trusted
            else (
                "; if it holds other Python objects and you trust the file, pass trusted=True "
                "(which runs code from it)"
            )
        )
        raise CheckpointError(
            f"{path}: cannot read it with torch.load(weights_only={not trusted}): "
            f"{type(error).__name__}: {_first_line(error)}{hint}",
            argument=None if trusted else "trusted",
        ) from error
    try:
        return find_state(content, key=key)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}", argument=error.argument) from None


def find_state(content: Any, *, key: str | None = None) -> Checkpoint:
    """Find the state dict (a mapping from names to tensors) in a loaded checkpoint.

    It is ``content[key]`` if ``key`` is given, else ``content`` itself if that is one,
    else the only entry of ``content`` that is one.

    Raises:
        CheckpointError: there is no such state dict, or several and no ``key``.

    Example:
        >>> import torch
        >>> find_state({"model": {"w": torch.zeros(2)}, "epoch": 3}).key
        'model'
    """
    if key is not None:
        if not isinstance(content, Mapping) or key not in content:
            keys = sorted(map(str, content)) if isinstance(content, Mapping) else []
            raise CheckpointError(f"the checkpoint has no entry {key!r} (entries: {keys})")
        if not _is_state_dict(content[key]):
            raise CheckpointError(f"the checkpoint's entry {key!r} is not a state dict of tensors")
        return Checkpoint(content, key, content[key])
    if _is_state_dict(content):
        return Checkpoint(content, None, content)
    if isinstance(content, Mapping):
        found = [k for k, v in content.items() if isinstance(k, str) and _is_state_dict(v)]
        if len(found) == 1:
            logger.info("using the state dict in entry %r of the checkpoint", found[0])
            return Checkpoint(content, found[0], content[found[0]])
        if found:
            raise CheckpointError(
                f"the checkpoint holds several state dicts {found}: choose one with key=",
                argument="key",
            )
    raise CheckpointError(
        f"the checkpoint holds a {type(content).__name__} that is not a state dict "
        "(a mapping from names to tensors), nor a mapping with one"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def load_into(model: nn.Module, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state, strict=True)``, with the reasons in one message if not.

    Raises:
        CheckpointError: ``state`` does not fit the model (see `fit_problems`).

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> load_into(bn, {**bn.state_dict(), "running_var": torch.full((2,), 4.0)})
        >>> bn.running_var
        tensor([4., 4.])
    """
    problems = fit_problems(model.state_dict(), state)
    if not problems:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            problems = [" ".join(str(error).split())]
    if problems:
        raise CheckpointError("the checkpoint does not fit the model: " + "; ".join(problems))


def fit_problems(expected: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Why the state dict ``given`` does not fit a model whose state dict is ``expected``.

    Names the missing and unexpected keys and the shape mismatches, and says when the keys
    carry the prefix of a wrapper (``module.``, ``_orig_mod.``) that the model lacks.

    Example:
        >>> import torch
        >>> fit_problems({"w": torch.zeros(2)}, {"module.w": torch.zeros(2)})[:2]
        ["1 missing key ('w')", "1 unexpected key ('module.w')"]
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
                "DistributedDataParallel, AveragedModel or torch.compile?): build the model "
                "with the same wrapper, or save the inner module's state dict"
            )
    return problems


def _first(items: Sequence[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def check_writable(path: PathLike, *, overwrite: bool = False) -> None:
    """Check that `write_checkpoint` may write ``path``: before the work, not after it.

    Raises:
        CheckpointError: ``path`` is a directory, exists and not ``overwrite``, or its
            directory does not exist.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as file:
        ...     try:
        ...         check_writable(file.name)
        ...     except CheckpointError as error:
        ...         print(error.argument)
        overwrite
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path} exists; choose another path or pass overwrite=True", argument="overwrite"
        )
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the directory {path.parent} does not exist")


def write_checkpoint(content: Any, path: PathLike, *, overwrite: bool = False) -> None:
    """``torch.save(content, path)``, atomically: ``path`` is the old file or the whole new one.

    The content goes to a hidden temporary file ``.NAME.XXXXXXXX.tmp`` in the same
    directory, is flushed to disk, and then takes the name ``path`` with ``os.replace``.
    Any exception, KeyboardInterrupt included, removes the temporary file and leaves
    ``path`` as it was. SIGKILL or a power cut may leave the temporary file, never a
    partial ``path``. The new file gets the permissions the umask gives any new file,
    as ``open()`` would (not the temporary file's 0600).

    Whether ``path`` exists is checked up front (`check_writable`), not at the rename: a
    file that another process creates at ``path`` meanwhile is replaced.

    Raises:
        CheckpointError: ``path`` may not be written (see `check_writable`), or saving failed.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_checkpoint({"w": torch.ones(2)}, Path(tmp) / "out.pt")
        ...     torch.load(Path(tmp) / "out.pt")
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    check_writable(path, overwrite=overwrite)
    try:
        write_atomically(path, lambda file: torch.save(content, file))
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot write it: {type(error).__name__}: {_first_line(error)}"
        ) from error


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a hidden temporary file beside ``path``, flush it to disk, then
    rename it to ``path``; on any exception (KeyboardInterrupt included) remove it and
    re-raise, leaving ``path`` as it was. The new file gets the umask's permissions."""
    tmp: str | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as file:
            tmp = file.name
            os.chmod(tmp, 0o666 & ~_umask())
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # The umask can only be read by setting it: set it straight back. (A file another thread
    # creates in between gets 0o022.)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
