"""JSONL reading and writing with line numbers: every bad line becomes a `DataError` naming file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MALFORMED_JSON, NOT_UTF8, DataError


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError, bytes]]:
    """Yield `(line_number, parsed_or_error, raw_line)` for every non-blank line of a JSONL file.

    Blank lines are not rows and are skipped. The raw bytes are yielded so that a rejected row can be
    written out exactly as it was read.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, DataError(NOT_UTF8, f"is not UTF-8 ({e.reason} at byte {e.start})", path=path, line=line_no), raw
                continue
            try:
                yield line_no, json.loads(text), raw
            except json.JSONDecodeError as e:
                yield line_no, DataError(MALFORMED_JSON, f"is not valid JSON ({e.msg} at column {e.colno})", path=path, line=line_no), raw


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; raise on the first bad line. Use `data_tools.clean` to drop bad rows instead."""
    rows = []
    for _, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        rows.append(row)
    return rows


class JsonlWriter:
    """Streams rows to a JSONL file that appears only when the `with` block ends without an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0

    def __enter__(self) -> "JsonlWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "w", encoding="utf-8")
        return self

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as UTF-8 JSONL (atomically: a partial file never replaces a good one); return the count."""
    with JsonlWriter(path) as w:
        for row in rows:
            w.write(row)
    return w.count
