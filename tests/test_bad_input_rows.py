"""Image roots, the formats users bring, and bad rows: validate / clean / the record loader (check_rows)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from data_tools import errors as E
from data_tools.clean import check_rows, clean, validate
from data_tools.errors import DataError
from data_tools.images import resolve_image_path
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record

REPO = Path(__file__).resolve().parents[1]


def _png(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def _one_line_error(r, *needles):
    assert r.returncode in (1, 2), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


# --- image root ----------------------------------------------------------------------------------------
def test_image_root_apart_from_the_jsonl(tmp_path):
    _png(tmp_path / "coco/train2017/000000000009.jpg")
    data = _jsonl(tmp_path / "data/coco/train.jsonl", [{"image": "000000000009.jpg", "captions": ["a dog"]}])
    root = tmp_path / "coco/train2017"
    rows = [row for _, row, _ in check_rows(data, "caption", image_root=root, progress=False)]
    assert rows == [{"image": str(root / "000000000009.jpg"), "captions": ["a dog"]}]
    # Default root: the file's folder, where the image is not.
    assert [e.reason for e in validate(data, "caption", progress=False)] == [E.MISSING_IMAGE]
    assert _cli("validate", "--task", "caption", "--image-root", root, data).returncode == 0
    # clean keeps the paths relative to the root, wherever --out is.
    out = tmp_path / "elsewhere/clean.jsonl"
    r = _cli(
        "clean",
        "--task",
        "caption",
        data,
        "--image-root",
        root,
        "--out",
        out,
        "--rejects",
        tmp_path / "rej.jsonl",
    )
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out) == [{"image": "000000000009.jpg", "captions": ["a dog"]}]
    assert f"--image-root {root}" in r.stdout
    r = _cli("validate", "--task", "caption", "--image-root", tmp_path / "nowhere", data)
    _one_line_error(r, tmp_path / "nowhere", "not a folder")


def test_clean_out_in_another_folder_rewrites_or_refuses(tmp_path):
    _png(tmp_path / "data/img/a.png")
    data = _jsonl(tmp_path / "data/raw.jsonl", [{"image": "img/a.png", "captions": ["x"]}])
    # A folder above the input's: paths are rewritten and still resolve.
    report = clean(data, "caption", tmp_path / "clean.jsonl", tmp_path / "rej.jsonl", progress=False)
    assert report.kept == 1 and read_jsonl(tmp_path / "clean.jsonl")[0]["image"] == "data/img/a.png"
    assert validate(tmp_path / "clean.jsonl", "caption", progress=False) == []
    # A sibling folder: the paths would need '..', which readers refuse; nothing is written.
    r = _cli(
        "clean",
        "--task",
        "caption",
        data,
        "--out",
        tmp_path / "other/clean.jsonl",
        "--rejects",
        tmp_path / "rej2.jsonl",
    )
    _one_line_error(r, "other/clean.jsonl", "--image-root")
    assert not (tmp_path / "other").exists() and not (tmp_path / "rej2.jsonl").exists()
    with pytest.raises(DataError, match="image root"):
        clean(data, "caption", tmp_path / "other/clean.jsonl", tmp_path / "rej2.jsonl", progress=False)


def test_outside_root_guard_and_symlinks(tmp_path):
    root = tmp_path / "root"
    _png(tmp_path / "elsewhere/images/a.png")
    _png(root / "in.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere/images")  # the user put the image folder here
    (root / "escape.png").symlink_to(tmp_path / "elsewhere/images/a.png")  # a file link out of the root
    (root / "alias.png").symlink_to(root / "in.png")  # a file link inside the root
    good = resolve_image_path("linked/a.png", root)
    assert good == (tmp_path / "elsewhere/images/a.png").resolve()
    assert resolve_image_path("alias.png", root) == (root / "in.png").resolve()
    for bad in (
        "../elsewhere/images/a.png",
        str(tmp_path / "elsewhere/images/a.png"),
        "escape.png",
        "linked/../../elsewhere/images/a.png",
        "in.png/../..",
    ):
        with pytest.raises(DataError) as e:
            resolve_image_path(bad, root)
        assert e.value.reason == E.PATH_OUTSIDE_ROOT, bad
        assert "--" not in e.value.message  # a library caller has no flag to name
        assert resolve_image_path(bad, root, allow_outside_root=True)
    with pytest.raises(DataError, match="pass --allow-outside-root"):
        resolve_image_path("escape.png", root, flag="--allow-outside-root")
    data = _jsonl(
        root / "d.jsonl",
        [{"image": "linked/a.png", "captions": ["x"]}, {"image": "escape.png", "captions": ["x"]}],
    )
    errors = validate(data, "caption", progress=False)
    assert [(e.line, e.reason) for e in errors] == [(2, E.PATH_OUTSIDE_ROOT)]
    r = _cli("validate", "--task", "caption", data)
    assert r.returncode == 1 and "--allow-outside-root" in r.stderr and "Traceback" not in r.stderr


def test_nul_byte_in_an_image_path_is_a_reject(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "a\u0000.png", "captions": ["x"]}])
    [error] = validate(data, "caption", progress=False)
    assert (error.line, error.reason, error.field) == (1, E.BAD_VALUE, "image") and "NUL" in error.message
    r = _cli(
        "clean", "--task", "caption", data, "--out", tmp_path / "c.jsonl", "--rejects", tmp_path / "r.jsonl"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert read_jsonl(tmp_path / "r.jsonl")[0]["reason"] == E.BAD_VALUE


# --- formats users bring ------------------------------------------------------------------------------
def test_llama_factory_and_swift_messages_with_images():
    row = {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "images": ["cat.jpg"],
    }
    rec = normalize_record(row, "instruct")
    assert rec == {
        "image": "cat.jpg",
        "conversations": [
            {"from": "human", "value": "<image>What is this?"},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    sharegpt = {
        "conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
        "images": ["a.jpg"],
    }
    assert normalize_record(sharegpt, "instruct")["image"] == "a.jpg"
    text_only = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "images": [],
    }
    assert "image" not in normalize_record(text_only, "instruct")
    several = {
        "messages": [
            {"role": "user", "content": "<image><image>same?"},
            {"role": "assistant", "content": "no"},
        ],
        "images": ["a.jpg", "b.jpg"],
    }
    # instruct rows may have several
    assert normalize_record(several, "instruct")["images"] == ["a.jpg", "b.jpg"]
    with pytest.raises(DataError) as e:
        normalize_record({**several, "images": ["a.jpg"]}, "instruct")
    assert e.value.reason == E.BAD_VALUE and "2 '<image>' tokens for 1 image(s)" in e.value.message
    with pytest.raises(DataError) as e:
        normalize_record({"image": ["a.jpg", "b.jpg"], "captions": ["x"]}, "caption")
    assert e.value.reason == E.MULTIPLE_IMAGES


def test_instruction_response_and_question_answer_aliases(tmp_path):
    rec = normalize_record(
        {"image": "a.jpg", "instruction": "Describe it.", "response": "A red square."}, "instruct"
    )
    assert rec["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": "A red square."},
    ]
    alpaca = normalize_record({"instruction": "Add.", "input": "2 + 2", "output": "4"}, "instruct")
    assert alpaca["conversations"][0]["value"] == "Add.\n2 + 2" and "image" not in alpaca
    _png(tmp_path / "a.jpg")
    data = _jsonl(
        tmp_path / "vqa.jsonl",
        [
            {"image": "a.jpg", "question": "colour?", "answer": "red"},
            {"image": "a.jpg", "question": "shape?", "answer": "square"},
        ],
    )
    rows = [row for _, row, _ in check_rows(data, "vqa", progress=False)]
    assert [(r["question_id"], r["answers"]) for r in rows] == [
        ("vqa.jsonl:1", ["red"]),
        ("vqa.jsonl:2", ["square"]),
    ]


def test_duplicate_question_ids_name_both_lines(tmp_path):
    _png(tmp_path / "a.png")
    data = _jsonl(
        tmp_path / "vqa.jsonl",
        [
            {"image": "a.png", "question_id": 1, "question": "q1", "answers": ["a"]},
            {"image": "a.png", "question_id": 2, "question": "q2", "answers": ["b"]},
            {"image": "a.png", "question_id": "1", "question": "q3", "answers": ["c"]},
        ],
    )
    [error] = validate(data, "vqa", progress=False)
    assert (error.line, error.reason) == (3, E.DUPLICATE_ID) and "line 1" in error.message
    assert str(error).startswith(f"{data}:3: field 'question_id'")
    r = _cli("validate", "--task", "vqa", data)
    assert r.returncode == 1 and f"{data}:3:" in r.stderr and "line 1" in r.stderr


# --- bad files and outputs, through the CLI -----------------------------------------------------------
def _bad_files(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "list.json").write_text('[{"image": "a.png", "captions": ["x"]},\n {"image": ')
    (tmp_path / "deep.json").write_text("[" * 100_000)
    return {
        "missing": tmp_path / "missing.jsonl",
        "folder": tmp_path / "dir.jsonl",
        "malformed list": tmp_path / "list.json",
        "deep list": tmp_path / "deep.json",
    }


@pytest.mark.parametrize("command", ["validate", "clean"])
def test_unreadable_inputs_are_one_line_errors(tmp_path, command):
    for what, path in _bad_files(tmp_path).items():
        args = (
            ["--out", tmp_path / "o.jsonl", "--rejects", tmp_path / "r.jsonl"] if command == "clean" else []
        )
        r = _cli(command, "--task", "caption", path, *args)
        _one_line_error(r, path)
        assert not (tmp_path / "o.jsonl").exists(), what
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], what


def test_surrogates_bom_and_cr_through_clean(tmp_path):
    _png(tmp_path / "a.png")
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        b'\xef\xbb\xbf{"image": "a.png", "captions": ["ok"]}\r'
        b'{"image": "a.png", "captions": ["\\ud800"]}\r'
        b'{"image": "a.png", "image": "b.png", "captions": ["dup"]}\r'
        b'{"image": "a.png", "captions": ["x"], "score": NaN}\r'
    )
    r = _cli("validate", "--task", "caption", data)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = _cli(
        "clean", "--task", "caption", data, "--out", tmp_path / "c.jsonl", "--rejects", tmp_path / "r.jsonl"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert read_jsonl(tmp_path / "c.jsonl") == [{"image": "a.png", "captions": ["ok"]}]
    assert [(x["line"], x["reason"]) for x in read_jsonl(tmp_path / "r.jsonl")] == [
        (2, E.NOT_UTF8),
        (3, E.DUPLICATE_KEY),
        (4, E.MALFORMED_JSON),
    ]


def test_out_equal_to_rejects_or_a_folder(tmp_path):
    _png(tmp_path / "a.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "captions": ["x"]}])
    r = _cli(
        "clean", "--task", "caption", data, "--out", tmp_path / "o.jsonl", "--rejects", tmp_path / "o.jsonl"
    )
    _one_line_error(r, "o.jsonl", "overwrite")
    (tmp_path / "outdir").mkdir()
    r = _cli(
        "clean", "--task", "caption", data, "--out", tmp_path / "outdir", "--rejects", tmp_path / "r.jsonl"
    )
    _one_line_error(r, "outdir", "folder")


def test_concurrent_cleans_of_one_out_leave_one_whole_output(tmp_path):
    _png(tmp_path / "a.png")
    inputs = [
        _jsonl(
            tmp_path / f"in{k}.jsonl",
            [{"image": "a.png", "captions": [f"run {k} row {i}"]} for i in range(3000)],
        )
        for k in range(3)
    ]
    out = tmp_path / "out.jsonl"
    start = threading.Barrier(len(inputs))
    failures = []

    def run(k):
        start.wait()
        try:
            clean(inputs[k], "caption", out, tmp_path / f"rej{k}.jsonl", progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    rows = read_jsonl(out)
    runs = {r["captions"][0].split()[1] for r in rows}
    assert len(rows) == 3000 and len(runs) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_clean_interrupted_mid_write_keeps_the_old_output(tmp_path, monkeypatch):
    import data_tools.clean as clean_module

    _png(tmp_path / "a.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "captions": [str(i)]} for i in range(10)])
    out = tmp_path / "o.jsonl"
    out.write_text('{"old": true}\n')
    real = clean_module.normalize_record
    calls = []

    def failing(row, task):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk gone")
        return real(row, task)

    monkeypatch.setattr(clean_module, "normalize_record", failing)
    with pytest.raises(RuntimeError):
        clean(data, "caption", out, tmp_path / "r.jsonl", progress=False)
    assert out.read_text() == '{"old": true}\n' and not (tmp_path / "r.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.jsonl", "o.jsonl"]


def test_synth_language_aliases_and_one_line_errors(tmp_path, capsys):
    from data_tools.synth import main as synth_main

    assert (
        synth_main(
            ["--task", "caption", "--n", "2", "--out-dir", str(tmp_path), "--lang", "zh-CN", "--no-progress"]
        )
        == 0
    )
    assert all("a" not in c for r in read_jsonl(tmp_path / "caption.jsonl") for c in r["captions"])
    capsys.readouterr()
    assert synth_main(["--task", "caption", "--n", "2", "--out-dir", str(tmp_path), "--lang", "fr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fr'" in err[0]
    (tmp_path / "images/synth.json").write_bytes(b"\xff garbage")
    assert synth_main(["--task", "caption", "--n", "2", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0]
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]
