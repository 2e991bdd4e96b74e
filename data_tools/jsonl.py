"""JSONL reading and writing with line numbers: every bad line becomes a `DataError` naming file and line.

`iter_rows` also reads a file holding one JSON list of rows (`[{"image_path": ..., "text": ...}, ...]`,
as many tools write), naming each row by the line it starts on and its index.

Parsing is stricter than `json.loads`, because what it lets through silently corrupts data later:
a key repeated in one object (the last value wins, the first is lost), `NaN`/`Infinity` and numbers
too large for a float (not JSON; other tools cannot read them back), lone UTF-16 surrogates such as
`"\\ud800"` (valid JSON syntax, but not text: writing them as UTF-8 fails) and nesting too deep to
parse. Each is a row error; in a whole-file read (`load_json`), a file error naming the item (e.g.
`annotations[17]`) and its line. A UTF-8 byte order mark is skipped, and a line ends at LF, CRLF or a
lone CR.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import DUPLICATE_KEY, MALFORMED_JSON, NOT_UTF8, UNREADABLE_FILE, DataError
from .files import atomic_write

BOM = b"\xef\xbb\xbf"
# A lone surrogate can only come from a \u escape (UTF-8 cannot encode one), so rows whose text has
# no such escape are not walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# A binary file read as text gives a not_utf8 error per "line"; one error says what it is instead.
_BINARY = {b"\x1f\x8b": ("a gzip-compressed file", "decompress it first (gunzip -k {})"),
           b"BZh": ("a bzip2-compressed file", "decompress it first (bunzip2 -k {})"),
           b"\xfd7zXZ\x00": ("an xz-compressed file", "decompress it first (unxz -k {})"),
           b"\x28\xb5\x2f\xfd": ("a zstd-compressed file", "decompress it first (unzstd {})"),
           b"PK\x03\x04": ("a zip archive", "unpack it first (unzip {})"),
           b"PAR1": ("a Parquet file", "write it as JSONL first (pandas.read_parquet('{}').to_json(OUT, "
                     "orient='records', lines=True, force_ascii=False))")}


def open_input(path: str | os.PathLike, mode: str = "rb", **kwargs) -> IO:
    """`open` for reading, with a `DataError` naming the file when it is missing, a folder, unreadable or
    (in binary mode) compressed or Parquet."""
    try:
        f = open(path, mode, **kwargs)
        head = f.peek(8)[:8] if mode == "rb" else b""
        for magic, (what, todo) in _BINARY.items():
            if head.startswith(magic):
                f.close()
                raise DataError(UNREADABLE_FILE, f"is {what}, not JSON text; {todo.format(path)}", path=path)
        return f
    except FileNotFoundError:
        raise DataError(UNREADABLE_FILE, "file does not exist", path=path) from None
    except IsADirectoryError:
        raise DataError(UNREADABLE_FILE, "is a folder, not a file", path=path) from None
    except PermissionError:
        raise DataError(UNREADABLE_FILE, "cannot be read (permission denied)", path=path) from None
    except OSError as e:
        raise DataError(UNREADABLE_FILE, f"cannot be read ({e.strerror or e})", path=path) from None


class NestingError(DataError):
    """JSON nested too deeply for the parser: the rest of the text cannot be read reliably."""


class StrictJson:
    """`json.JSONDecoder.raw_decode` that refuses duplicate keys, NaN/Infinity, overflowing floats, lone
    surrogates and too-deep nesting with a `DataError` (no file or line: the caller adds them).

    The decoder's hooks only note a problem (raising inside them would abort a whole JSON list file),
    so that each row of a list can be refused on its own. Not thread-safe: one instance per reader.
    """

    def __init__(self):
        self._problems: list[DataError] = []
        self._decoder = json.JSONDecoder(object_pairs_hook=self._object, parse_constant=self._constant,
                                         parse_float=self._float)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            self._problems.append(DataError(
                DUPLICATE_KEY, f"key {key!r} appears twice in one object (JSON readers keep only one of the "
                "values); keep one"))
        return obj

    def _constant(self, name: str) -> None:
        self._problems.append(DataError(MALFORMED_JSON, f"{name} is not valid JSON; write a number or null"))

    def _float(self, text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            self._problems.append(DataError(MALFORMED_JSON, f"number {text[:40]} is too large for a float"))
        return value

    def raw_decode(self, text: str, pos: int = 0) -> tuple[Any, int]:
        """Decode one value at `pos`; return `(value, end)`. Raises `json.JSONDecodeError` on a syntax
        error and `DataError` for the problems above."""
        self._problems.clear()
        try:
            value, end = self._decoder.raw_decode(text, pos)
        except RecursionError:
            raise NestingError(MALFORMED_JSON, "is nested too deeply to read") from None
        except json.JSONDecodeError:
            raise
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise DataError(MALFORMED_JSON, f"cannot be read ({e})") from None
        if self._problems:
            raise self._problems[0]
        if _SURROGATE_ESCAPE.search(text, pos, end):
            check_text(value)
        return value, end

    def loads(self, text: str) -> Any:
        """Decode a whole string (surrounding whitespace allowed)."""
        start = len(text) - len(text.lstrip(" \t\n\r"))
        value, end = self.raw_decode(text, start)
        if text[end:].strip(" \t\n\r"):
            raise json.JSONDecodeError("Extra data", text, end)
        return value


def check_text(value: Any, field: str | None = None) -> None:
    """Raise a `DataError` if a string anywhere in `value` (keys included) holds a lone UTF-16 surrogate."""
    stack = [(value, field)]
    while stack:  # iterative: a deeply nested value must not exhaust the stack
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise DataError(NOT_UTF8, "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                                "its pair), which is not text", field=where)
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, where))
                stack.append((v, k if where is None else f"{where}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, f"{where or ''}[{i}]") for i, v in enumerate(item))


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """Number the lines of a binary file; LF, CRLF and a lone CR (old Mac files) all end a line."""
    line_no = 0
    for chunk in f:
        body = chunk[:-1] if chunk.endswith(b"\n") else chunk
        if body.endswith(b"\r"):
            body = body[:-1]
        for piece in body.split(b"\r") if b"\r" in body else (body,):
            line_no += 1
            if line_no == 1:
                piece = piece.removeprefix(BOM)
            yield line_no, piece


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError, bytes]]:
    """Yield `(line_number, parsed_or_error, raw_line)` for every non-blank line of a JSONL file.

    Blank lines are not rows and are skipped. The raw bytes are yielded so that a rejected row can be
    written out exactly as it was read. A missing or unreadable file raises `DataError`.
    """
    decoder = StrictJson()
    with open_input(path) as f:
        for line_no, raw in _lines(f):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, DataError(NOT_UTF8, f"is not UTF-8 ({e.reason} at byte {e.start})", path=path,
                                         line=line_no), raw
                continue
            try:
                yield line_no, decoder.loads(text), raw
            except json.JSONDecodeError as e:
                yield line_no, DataError(MALFORMED_JSON, f"is not valid JSON ({e.msg} at column {e.colno})",
                                         path=path, line=line_no), raw
            except DataError as e:
                yield line_no, e.at(path=path, line=line_no), raw


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; raise on the first bad line. Use `data_tools.clean` to drop bad rows instead."""
    rows = []
    for _, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        rows.append(row)
    return rows


def _read_text(path: str | os.PathLike) -> str:
    """A whole file as text (UTF-8, a byte order mark skipped); a `DataError` naming the file otherwise."""
    with open_input(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(NOT_UTF8, f"is not UTF-8 ({e.reason} at byte {e.start})", path=path) from None


def load_json(path: str | os.PathLike) -> Any:
    """Read a whole JSON file (COCO / VQA annotations, ...) strictly; every problem is a `DataError` naming
    the file (and the line of a syntax error)."""
    text = _read_text(path)
    try:
        return StrictJson().loads(text)
    except json.JSONDecodeError as e:
        raise DataError(MALFORMED_JSON, f"is not valid JSON ({e.msg} at column {e.colno})", path=path,
                        line=e.lineno) from None
    except NestingError as e:
        raise e.at(path=path) from None
    except DataError as e:
        # Say which item it is in: an annotations file is often one line of a hundred megabytes.
        item, pos = _locate(text) or (None, None)
        if item is not None:
            e.field = item + (f".{e.field}" if e.field else "")
            e.at(line=text.count("\n", 0, pos) + 1)
        raise e.at(path=path) from None


def _locate(text: str) -> tuple[str, int] | None:
    """(`"annotations[17]"`, its position) of the first value the strict checks refuse in a JSON list, or
    in a list or value of a JSON object (COCO and VQA annotations); None if not found there. Only called on
    text whose syntax is valid."""
    decoder = StrictJson()

    def space(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    def value(pos: int, label: str) -> tuple[tuple[str, int] | None, int]:
        if not text.startswith("[", pos):
            try:
                return None, decoder.raw_decode(text, pos)[1]
            except DataError:
                return (label, pos), pos
        pos, index = space(pos + 1), 0
        while not text.startswith("]", pos):
            try:
                pos = space(decoder.raw_decode(text, pos)[1])
            except DataError:
                return (f"{label}[{index}]", pos), pos
            pos, index = (space(pos + 1), index + 1) if text.startswith(",", pos) else (pos, index)
        return None, pos + 1

    pos = space(0)
    if not text.startswith("{", pos):
        return value(pos, "")[0]
    pos = space(pos + 1)
    while text.startswith('"', pos):
        key, pos = json.decoder.scanstring(text, pos + 1)
        found, pos = value(space(space(pos) + 1), key)  # past the colon
        if found is not None:
            return found
        pos = space(pos)
        pos = space(pos + 1) if text.startswith(",", pos) else pos
    return None


def dumps(value: Any) -> str:
    """One line of JSON as our writers write it: UTF-8 text kept readable, and never NaN or Infinity
    (`ValueError`), which are not JSON."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"cannot write {str(value)[:200]} as JSON: {e}") from None


class JsonlWriter:
    """Streams rows to a JSONL file that appears, whole, only when the `with` block ends without an error."""

    def __init__(self, path: str | os.PathLike, *, together: list | None = None):
        self.path = Path(path)
        self.count = 0
        self._together = together  # see files.replaced_together

    def __enter__(self) -> "JsonlWriter":
        self._open = atomic_write(self.path, together=self._together)
        self._f = self._open.__enter__()
        return self

    def write(self, row: dict) -> None:
        line = dumps(row)
        if _SURROGATE.search(line):
            # A rejected row may carry a lone surrogate; as an escape it is still valid JSON text.
            line = json.dumps(row, ensure_ascii=True, allow_nan=False)
        self._f.write(line + "\n")
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
    with open_input(path) as f:
        head = f.read(4096).removeprefix(BOM)
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip()[:1] == b"["


def iter_json_list(path: str | os.PathLike) -> Iterator[tuple[int, object, bytes, str]]:
    """Yield `(line, row, raw, item)` for every element of a JSON list file; `item` is "[index]".

    `line` is where the element starts. A syntax error cannot be skipped like a bad JSONL line (the
    rest of the list cannot be found reliably), so it raises a `DataError` for the whole file.
    """
    text = _read_text(path)

    def fail(pos: int, message: str) -> DataError:
        column = pos - text.rfind("\n", 0, pos)
        return DataError(MALFORMED_JSON,
                         f"is not a valid JSON list of rows ({message} at column {column}); fix the file, "
                         "or write one JSON object per line (JSONL)", path=path,
                         line=text.count("\n", 0, pos) + 1)

    decoder = StrictJson()
    pos = _JSON_SPACE.match(text, _JSON_SPACE.match(text).end() + 1).end()  # past the opening bracket
    line, counted, index = 1, 0, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            except NestingError as e:
                raise e.at(path=path, line=line) from None
            except DataError as e:
                # This row alone is refused; the list goes on after it.
                row, end = e.at(path=path, line=line), _skip_value(text, pos)
            raw = text[pos:end].encode("utf-8", errors="backslashreplace")
            yield line, row, raw, f"[{index}]"
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


def _skip_value(text: str, pos: int) -> int:
    """The end of the JSON value at `pos`, read without the strict checks (which refused it)."""
    return json.JSONDecoder().raw_decode(text, pos)[1]


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError, bytes, str | None]]:
    """`iter_jsonl` with an `item` (None) per row, or `iter_json_list` for a file holding one JSON list."""
    if is_json_list(path):
        yield from iter_json_list(path)
    else:
        for line, row, raw in iter_jsonl(path):
            yield line, row, raw, None
