"""JSONL reading and writing with line numbers: every bad line becomes a `DataError` naming file and line.

`iter_rows` also reads a file holding one JSON list of rows (`[{"image_path": ..., "text": ...}, ...]`,
as many tools write), naming each row by the line it starts on and its index.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MALFORMED_JSON, NOT_UTF8, DataError
from .files import atomic_write


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
                yield line_no, DataError(NOT_UTF8, f"is not UTF-8 ({e.reason} at byte {e.start})", path=path,
                                         line=line_no), raw
                continue
            try:
                yield line_no, json.loads(text), raw
            except json.JSONDecodeError as e:
                yield line_no, DataError(MALFORMED_JSON, f"is not valid JSON ({e.msg} at column {e.colno})",
                                         path=path, line=line_no), raw


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; raise on the first bad line. Use `data_tools.clean` to drop bad rows instead."""
    rows = []
    for _, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        rows.append(row)
    return rows


class JsonlWriter:
    """Streams rows to a JSONL file that appears, whole, only when the `with` block ends without an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0

    def __enter__(self) -> "JsonlWriter":
        self._open = atomic_write(self.path)
        self._f = self._open.__enter__()
        return self

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        return self._open.__exit__(exc_type, exc, tb)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as UTF-8 JSONL (atomically: a partial file never replaces a good one); return the count."""
    with JsonlWriter(path) as w:
        for row in rows:
            w.write(row)
    return w.count


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def is_json_list(path: str | os.PathLike) -> bool:
    """Whether the file holds one JSON list (its first non-blank character is `[`) rather than JSONL rows."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf")
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip()[:1] == b"["


def iter_json_list(path: str | os.PathLike) -> Iterator[tuple[int, object, bytes, str]]:
    """Yield `(line, row, raw, item)` for every element of a JSON list file; `item` is "[index]".

    `line` is where the element starts. A syntax error cannot be skipped like a bad JSONL line (the
    rest of the list cannot be found reliably), so it raises a `DataError` for the whole file.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(NOT_UTF8, f"is not UTF-8 ({e.reason} at byte {e.start})", path=path) from None

    def fail(pos: int, message: str) -> DataError:
        column = pos - text.rfind("\n", 0, pos)
        return DataError(MALFORMED_JSON,
                         f"is not a valid JSON list of rows ({message} at column {column}); fix the file, "
                         "or write one JSON object per line (JSONL)", path=path,
                         line=text.count("\n", 0, pos) + 1)

    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, _JSON_SPACE.match(text).end() + 1).end()  # past the opening bracket
    line, counted, index = 1, 0, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield line, row, text[pos:end].encode("utf-8"), f"[{index}]"
            index += 1
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise fail(pos, "expected ',' or ']' after a row")
    pos = _JSON_SPACE.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the list")


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError, bytes, str | None]]:
    """`iter_jsonl` with an `item` (None) per row, or `iter_json_list` for a file holding one JSON list."""
    if is_json_list(path):
        yield from iter_json_list(path)
    else:
        for line, row, raw in iter_jsonl(path):
            yield line, row, raw, None
