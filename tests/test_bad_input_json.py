"""Strict JSON reading: what json.loads lets through silently is a row (or file) error, never a crash."""

import json
import threading

import pytest

from data_tools import errors as E
from data_tools.errors import DataError
from data_tools.files import atomic_folder, atomic_write
from data_tools.jsonl import JsonlWriter, iter_json_list, iter_jsonl, load_json, read_jsonl, write_jsonl


def _rows(path):
    return [(line, row.reason if isinstance(row, DataError) else row) for line, row, _ in iter_jsonl(path)]


def test_bom_and_line_endings(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\n{"a": 3}\r{"a": 4}\r\r{"a": 5}')
    assert _rows(path) == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3}), (4, {"a": 4}), (6, {"a": 5})]
    cr_only = tmp_path / "mac.jsonl"
    cr_only.write_bytes(b'{"a": 1}\r{"a": 2}\r')
    assert read_jsonl(cr_only) == [{"a": 1}, {"a": 2}]


def test_duplicate_keys_nan_overflow_surrogates_and_depth_are_row_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [
        '{"image": "a.png", "image": "b.png"}',
        '{"x": {"k": 1, "k": 2}}',
        '{"x": NaN}',
        '{"x": -Infinity}',
        '{"x": 1e400}',
        '{"x": "\\ud800"}',
        '{"x": "\\ud83d\\ude00"}',  # a valid pair: one emoji
        "[" * 100_000,
        '{"ok": true}',
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    got = {line: row for line, row, _ in iter_jsonl(path)}
    assert got[1].reason == E.DUPLICATE_KEY and "'image'" in got[1].message
    assert got[2].reason == E.DUPLICATE_KEY and "'k'" in got[2].message
    assert got[3].reason == got[4].reason == got[5].reason == E.MALFORMED_JSON
    assert "NaN" in got[3].message and "Infinity" in got[4].message
    assert got[6].reason == E.NOT_UTF8 and got[6].field == "x" and "surrogate" in got[6].message
    assert got[7] == {"x": "\U0001f600"}
    assert got[8].reason == E.MALFORMED_JSON and "nested too deeply" in got[8].message
    assert got[9] == {"ok": True}
    assert str(got[1]).startswith(f"{path}:1: ")


def test_json_list_rows_are_refused_one_by_one(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"a": 1},\n {"a": 1, "a": 2},\n {"b": NaN},\n {"c": 3}]')
    rows = [
        (line, item, row.reason if isinstance(row, DataError) else row)
        for line, row, _, item in iter_json_list(path)
    ]
    assert rows == [
        (1, "[0]", {"a": 1}),
        (2, "[1]", E.DUPLICATE_KEY),
        (3, "[2]", E.MALFORMED_JSON),
        (4, "[3]", {"c": 3}),
    ]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        list(iter_json_list(deep))


def test_load_json_file_errors_name_the_file(tmp_path):
    cases = {
        "missing.json": None,
        "bad.json": b'{"a": [1, 2}',
        "dup.json": b'{"annotations": [], "annotations": []}',
        "nan.json": b'{"a": NaN}',
        "deep.json": b"[" * 100_000,
        "latin1.json": b'{"a": "caf\xe9"}',
        "surrogate.json": b'{"a": ["\\udc00"]}',
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as e:
            load_json(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)), name
    with pytest.raises(DataError, match="is a folder"):
        load_json(tmp_path)
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert load_json(tmp_path / "bom.json") == {"a": 1}


def test_missing_file_and_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        list(iter_jsonl(tmp_path))


def test_writers_never_write_non_json(tmp_path):
    with pytest.raises(ValueError, match="NaN|Out of range"):
        write_jsonl(tmp_path / "o.jsonl", [{"x": float("nan")}])
    assert not (tmp_path / "o.jsonl").exists() and list(tmp_path.iterdir()) == []
    # A rejected row may hold a lone surrogate: it is written as an escape, still valid JSON.
    write_jsonl(tmp_path / "r.jsonl", [{"raw": "\ud800"}])
    assert (tmp_path / "r.jsonl").read_text() == '{"raw": "\\ud800"}\n'
    with pytest.raises(IsADirectoryError):
        write_jsonl(tmp_path, [{"a": 1}])


def test_an_exception_mid_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    out = tmp_path / "o.jsonl"
    write_jsonl(out, [{"old": 1}])
    with pytest.raises(RuntimeError), JsonlWriter(out) as w:
        w.write({"new": 1})
        raise RuntimeError("killed mid-write")
    assert read_jsonl(out) == [{"old": 1}]
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "t.txt") as f:
        f.write("partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]


def test_a_folder_appears_whole_or_not_at_all_and_is_never_overwritten(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        assert tmp.parent == tmp_path and not (tmp_path / "out").exists()  # not there until complete
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "a"
    (tmp_path / "ref").mkdir()  # the permissions a folder made the usual way gets
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "ref").stat().st_mode
    (tmp_path / "ref").rmdir()
    with pytest.raises(FileExistsError, match="out: exists and is not an empty folder"):
        with atomic_folder(tmp_path / "out"):
            raise AssertionError("not reached")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "new") as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as tmp:
        (tmp / "b.txt").write_text("b")
    assert (tmp_path / "empty" / "b.txt").read_text() == "b"


def test_concurrent_writers_of_one_path_never_mix(tmp_path):
    out = tmp_path / "o.jsonl"
    start = threading.Barrier(4)

    def write(k):
        start.wait()
        with JsonlWriter(out) as w:
            for i in range(2000):
                w.write({"writer": k, "i": i})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_jsonl(out)
    assert len(rows) == 2000 and len({r["writer"] for r in rows}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]
    json.loads(out.read_text().splitlines()[-1])
