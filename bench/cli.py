"""What the bench commands check of their options before a run, and how they write a result file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_tools.files import atomic_write_text


def positive(kind=int):
    """An argparse type: a number of `kind` above 0 (a size of 0 would be changed or crash only after minutes
    of set-up)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def result_path_error(option: str, path: str | os.PathLike | None, *, append: bool = False) -> str | None:
    """Why `path` cannot take this run's result (None: it can), known before the run: its folder is missing,
    or it holds an earlier result, which is never replaced (`append`: the run adds to the file)."""
    if path is None:
        return None
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        return f"{option} {path}: no folder {folder}"
    if path.is_dir():
        return f"{option} {path}: is a folder; give a file name"
    if path.exists() and not append:
        return (f"{option} {path}: exists (an earlier result is never replaced); give another name or "
                "remove it")
    return None


def append_text(path: str | os.PathLike, text: str) -> None:
    """`text` after what `path` holds, written whole or not at all (a temp file renamed over it)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + text)
