"""Atomic file writes: a unique temp file in the target's folder, flushed and fsynced, then renamed over it.

Readers see the old file or the new one, never a partial one; two writers of one path never mix their
lines (the last rename wins whole); a killed writer leaves at most its own temp file, which the next
`atomic_write` of that path does not reuse, and an exception removes it. `atomic_folder` does the same
for a new folder (a merged checkpoint): it appears whole or not at all. `check_outputs` refuses, before
any work, output paths that would overwrite an input or each other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from .errors import BAD_VALUE, DataError

_UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", *,
                 together: list | None = None) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit it replaces `path` (folders are made).
    With `together` (from `replaced_together`) the complete temp file waits there to be renamed."""
    path = Path(path)
    if path.is_dir():
        # Checked first: os.replace would fail only at the end, after all the work.
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        if together is None:
            os.replace(tmp, path)
        else:
            together.append((tmp, path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def replaced_together() -> Iterator[list]:
    """Outputs that belong together (a data set's splits, kept rows and rejects): pass the list it yields
    as `together` to their `atomic_write`s. Each is written and fsynced in full before any replaces its
    target, so a failure or a kill during the writing leaves every old file, never a mix of two runs."""
    pending: list[tuple[str, Path]] = []
    try:
        yield pending
        for tmp, path in pending:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `path` to fill; on a clean exit it is renamed to `path`, else removed. `path`
    must not exist yet (or be an empty folder): a folder that holds anything is never overwritten."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty folder; give a new one (nothing is "
                              "overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the usual permissions
        os.rename(tmp, path)  # onto nothing or an empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one file: the same path once symlinks and `..` are resolved, or (both
    existing) the same file on disk, as a hard link is."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse output paths that are folders, one file named twice (one output would overwrite the other),
    or the same file as one of `inputs` (an atomic rename would replace the input with the output: a
    split written over its own input loses rows). `outputs` maps how the caller names each output (e.g.
    its option, `--out`) to its path; None is no output. Call it before any work, so that nothing is
    written."""
    inputs = [p for p in inputs if p is not None]
    seen: dict[str, str] = {}
    for name, p in outputs.items():
        if p is None:
            continue
        for source in inputs:
            if same_file(p, source):
                raise DataError(BAD_VALUE, f"{name} is the input {source} (the same file); writing it would "
                                "replace the input: give another path (nothing was written)", path=p)
        if Path(p).is_dir():
            raise DataError(BAD_VALUE, f"{name} is a folder; give a file name", path=p)
        real = os.path.realpath(p)
        if real in seen:
            raise DataError(BAD_VALUE, f"{seen[real]} and {name} name the same file; one would overwrite "
                            "the other", path=p)
        seen[real] = name
