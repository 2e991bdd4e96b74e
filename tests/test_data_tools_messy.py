"""data_tools on real-world files: path checks that stay fast on big files, and inputs that are not plain
JSONL (compressed, a JSON list, JSONL under another name) told apart with one clear message."""

import bz2
import gzip
import json
import lzma
import os
import pathlib
import signal
import stat
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_tools.clean import check_rows, clean, main_clean, main_validate
from data_tools.convert import convert_records
from data_tools.errors import DataError
from data_tools.hashes import ImageHasher
from data_tools.jsonl import load_json, read_jsonl
from data_tools.split import main_split, split_file

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, color="red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def test_check_rows_resolves_each_folder_once_not_each_row(tmp_path, monkeypatch):
    # Resolving every row's path in full was 3/4 of validate's time on a 500k-row file.
    for k in range(3):
        _png(tmp_path / "img" / f"{k}.png")
    (tmp_path / "img" / "link.png").symlink_to("0.png")
    rows = [{"image": f"img/{k % 3}.png", "captions": ["x"]} for k in range(200)]
    rows.append({"image": "img/link.png", "captions": ["x"]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [str((tmp_path / f"img/{k % 3}.png").resolve()) for k in range(200)]
    expected.append(str((tmp_path / "img/0.png").resolve()))
    calls = []
    resolve = pathlib.Path.resolve
    monkeypatch.setattr(pathlib.Path, "resolve", lambda self, *a: calls.append(self) or resolve(self, *a))
    got = [r for _, r, _ in check_rows(tmp_path / "d.jsonl", "caption", check_images="none")]
    assert [r["image"] for r in got] == expected
    assert len(calls) < 10


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)


def _parquet_like(data: bytes) -> bytes:
    return b"PAR1\x15\x04" + data[:100] + b"\n\x00\xff" * 50 + b"PAR1"


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, _parquet_like])
def test_a_compressed_input_is_one_error_not_a_reject_per_line(tmp_path, compress):
    _png(tmp_path / "a.png")
    row = json.dumps({"image": "a.png", "captions": ["x"]}) + "\n"
    (tmp_path / "d.jsonl").write_bytes(compress((row * 2000).encode()))
    for args in (["validate", "--task", "caption", "d.jsonl"],
                 ["clean", "--task", "caption", "d.jsonl", "--out", "c.jsonl", "--rejects", "r.jsonl"],
                 ["dedup", "--task", "caption", "d.jsonl", "--out", "o.jsonl"],
                 ["convert", "--from", "llava", "d.jsonl", "--out", "o.jsonl"]):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, args
        assert r.stderr.count("\n") == 1 and "d.jsonl: is a" in r.stderr, args
        assert "file, not JSON text; " in r.stderr, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.jsonl"]  # no output, no temp file


def test_dedup_split_check_leakage_name_a_json_list_file_as_such(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([{"image": "a.png", "captions": ["x"]}] * 3))
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["y"]}) + "\n")
    for args in (["dedup", "--task", "caption", "d.json", "--out", "o.jsonl"],
                 ["split", "d.json", "--out-dir", "s", "--seed", "0"],
                 ["check-leakage", "e.jsonl", "d.json"],
                 ["hash", "d.json", "--out", "h.npz"]):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, args
        assert "d.json: holds one JSON list of rows" in r.stderr and "clean first" in r.stderr, args
    # clean reads it and writes JSONL, which dedup takes
    assert _cli("clean", "--task", "caption", "d.json", "--out", "c.jsonl", "--rejects", "r.jsonl",
                cwd=tmp_path).returncode == 0
    assert _cli("dedup", "--task", "caption", "c.jsonl", "--out", "o.jsonl", cwd=tmp_path).returncode == 0
    assert read_jsonl(tmp_path / "o.jsonl") == [{"image": "a.png", "captions": ["x"]}]


@pytest.mark.parametrize("name", ["llava.json", "llava.ndjson", "llava.jsonl"])
def test_convert_reads_jsonl_whatever_its_suffix(tmp_path, name):
    rows = [{"image": f"{k}.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                     {"from": "gpt", "value": f"A{k}"}]} for k in range(3)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad\n")
    conv = convert_records("llava", [tmp_path / name], tmp_path)
    assert [r["image"] for r in conv.records] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [(r["reason"], r["item"]) for r in conv.rejects] == [("malformed_json", "line 4")]


@pytest.mark.parametrize("indent", [None, 2])
def test_convert_refuses_one_json_object_as_rows(tmp_path, indent):
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}, indent=indent))
    with pytest.raises(DataError, match="coco.json: expected a JSON list of rows or JSONL, got one JSON obj"):
        convert_records("llava", [tmp_path / "coco.json"], tmp_path)


def test_hash_cache_and_hash_files_get_the_usual_permissions(tmp_path):
    # Beside a shared data set, a cache only its writer could read would be hashed again by everyone else.
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", "blue")
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"image": f"{k}.png", "captions": [k]}) + "\n" for k in "ab"))
    umask = os.umask(0o022)
    try:
        assert _cli("dedup", "--task", "caption", "d.jsonl", "--out", "o.jsonl", cwd=tmp_path).returncode == 0
        assert _cli("hash", "d.jsonl", "--out", "h/h-0.npz", cwd=tmp_path).returncode == 0
    finally:
        os.umask(umask)
    for name in (".data_tools_hashes.npz", "h/h-0.npz", "o.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert [p.name for p in (tmp_path / "h").iterdir()] == ["h-0.npz"]


def test_windows_paths_are_named_as_such(tmp_path):
    _png(tmp_path / "sub" / "a.png")
    rows = [{"image": "sub\\a.png", "captions": ["x"]}, {"image": "C:\\data\\a.png", "captions": ["x"]},
            {"image": "d:/a.png", "captions": ["x"]}, {"image": "sub/a.png", "captions": ["x"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [r for _, r, _ in check_rows(tmp_path / "d.jsonl", "caption")]
    assert [getattr(r, "reason", "ok") for r in got] == [
        "missing_image", "path_outside_root", "path_outside_root", "ok"]
    assert "a backslash is not a folder separator here: write 'sub/a.png'" in str(got[0])


def test_a_refused_value_in_a_big_annotations_file_is_named_by_its_item(tmp_path):
    anns = [{"image_id": 0, "caption": f"c{k}"} for k in range(300)]
    data = {"info": {"v": 1}, "images": [{"id": 0, "file_name": "0.jpg"}], "annotations": anns}
    text = json.dumps(data)  # one line, as COCO's files are
    cases = {'"c250"}': ('"c250", "caption": "again"}', "annotations[250]", 1),
             '"c7"}': ('"c7", "score": NaN}', "annotations[7]", 1),
             '{"v": 1}': ('{"v": Infinity}', "info", 1)}
    for old, (new, field, line) in cases.items():
        (tmp_path / "c.json").write_text(text.replace(old, new, 1))
        with pytest.raises(DataError) as e:
            load_json(tmp_path / "c.json")
        assert (e.value.path, e.value.line, e.value.field) == (str(tmp_path / "c.json"), line, field)
    (tmp_path / "l.json").write_text('[{"a": 1},\n {"b": 2},\n {"c": {"d": 1, "d": 2}}]')
    with pytest.raises(DataError, match=r"l.json:3: field '\[2\]': key 'd' appears twice"):
        load_json(tmp_path / "l.json")


def test_validate_does_not_hold_every_bad_row_in_memory(tmp_path, capsys):
    # A wrong --image-root makes every row bad: millions of errors must not all wait in memory.
    n = 20_000
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{k}.png", "text": ""}) + "\n"
                                              for k in range(n)))
    tracemalloc.start()
    try:
        rc = main_validate(["--task", "caption", "--no-check-images", str(tmp_path / "d.jsonl")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == n + 1
    assert err[0] == f"{tmp_path / 'd.jsonl'}:1: field 'text[0]': is empty [empty_text]"
    assert err[n - 1].startswith(f"{tmp_path / 'd.jsonl'}:{n}: ")
    assert peak < 8_000_000, peak  # holding them all: ~55 MB


def test_validate_and_clean_take_check_images_header(tmp_path, monkeypatch, capsys):
    # Decoding is ~4 ms of CPU per 640x480 JPEG: minutes for COCO; the header check is ~0.06 ms.
    import data_tools.clean

    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x"]}) + "\n"
                                      + json.dumps({"image": "b.png", "captions": ["x"]}) + "\n")
    monkeypatch.setattr(data_tools.clean, "load_image", lambda *a, **k: pytest.fail("decoded"))
    d = str(tmp_path / "d.jsonl")
    assert main_validate(["--task", "caption", "--check-images", "header", d]) == 1
    assert "d.jsonl:2: field 'image': 'b.png': image file does not exist" in capsys.readouterr().err
    assert main_validate(["--task", "caption", "--check-images", "none", d]) == 0
    assert main_clean(["--task", "caption", "--check-images", "header", d, "--out", str(tmp_path / "c.jsonl"),
                       "--rejects", str(tmp_path / "r.jsonl")]) == 0
    assert read_jsonl(tmp_path / "c.jsonl") == [{"image": "a.png", "captions": ["x"]}]


def _fail_fsync_of(monkeypatch, name: str) -> None:
    fsync = os.fsync

    def failing(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


def test_outputs_that_belong_together_are_all_replaced_or_none(tmp_path, monkeypatch):
    # Splits of two runs side by side would leak images between train and test.
    for k in range(12):
        _png(tmp_path / f"{k}.png", (20 * k, 0, 255 - 20 * k))
    rows = [{"image": f"{k}.png", "captions": [f"c{k}"]} for k in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = ("train", "val", "test")
    for name in names:
        (tmp_path / f"{name}.jsonl").write_text("old\n")
    _fail_fsync_of(monkeypatch, "train.jsonl")  # the last to be closed
    with pytest.raises(OSError, match="No space left"):
        split_file(tmp_path / "d.jsonl", tmp_path, [0.5, 0.25, 0.25], seed=0, near_threshold=None,
                   hasher=ImageHasher(progress=False))
    assert [(tmp_path / f"{n}.jsonl").read_text() for n in names] == ["old\n"] * 3
    (tmp_path / "c.jsonl").write_text("old\n")
    (tmp_path / "r.jsonl").write_text("old\n")
    _fail_fsync_of(monkeypatch, "c.jsonl")
    with pytest.raises(OSError, match="No space left"):
        clean(tmp_path / "d.jsonl", "caption", tmp_path / "c.jsonl", tmp_path / "r.jsonl")
    assert [(tmp_path / n).read_text() for n in ("c.jsonl", "r.jsonl")] == ["old\n"] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == [
        "c.jsonl", "d.jsonl", "r.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]  # no temp file left


def test_sigterm_removes_unfinished_outputs_and_says_so(tmp_path, monkeypatch, capsys):
    # A SLURM time limit sends SIGTERM: temp files as big as the outputs must not stay in the data folder.
    import data_tools.clean
    from data_tools.__main__ import main

    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text((json.dumps({"image": "a.png", "captions": ["x"]}) + "\n") * 50)
    (tmp_path / "c.jsonl").write_text("old\n")
    seen = []
    normalize = data_tools.clean.normalize_record

    def terminated_at_row_10(row, task):
        seen.append(row)
        if len(seen) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return normalize(row, task)

    monkeypatch.setattr(data_tools.clean, "normalize_record", terminated_at_row_10)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["clean", "--task", "caption", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "c.jsonl"),
                 "--rejects", str(tmp_path / "r.jsonl")]) == 130
    assert capsys.readouterr().err == "interrupted; outputs were not replaced\n"
    assert signal.getsignal(signal.SIGTERM) == before
    assert len(seen) == 10 and (tmp_path / "c.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.jsonl", "d.jsonl"]


@pytest.mark.parametrize("ratios", ["nan,0.5,0.5", "inf,1,1", "1e309,1,1"])
def test_split_refuses_ratios_that_are_not_finite(tmp_path, ratios, capsys):
    with pytest.raises(SystemExit) as e:
        main_split([str(tmp_path / "d.jsonl"), "--out-dir", str(tmp_path), "--seed", "0", "--ratios", ratios])
    assert e.value.code == 2 and "ratios must be finite, non-negative" in capsys.readouterr().err


def test_check_rows_keeps_little_per_failed_image(tmp_path):
    # A wrong --image-root: every one of a data set's distinct images is missing.
    n = 20_000
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"img/{k}.png", "captions": ["x"]}) + "\n"
                                              for k in range(n)))
    tracemalloc.start()
    try:
        reasons = Counter(r.reason for _, r, _ in check_rows(tmp_path / "d.jsonl", "caption", progress=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reasons == {"missing_image": n}
    assert peak < 12_000_000, peak  # a DataError kept per image: ~53 MB
