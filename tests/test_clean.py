"""validate / clean / load_image on a corpus of bad and odd inputs made here: every reject reason is hit."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools import errors as E
from data_tools.clean import clean, validate
from data_tools.errors import DataError
from data_tools.images import load_image
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png(path, size=(32, 32), color=RED):
    Image.new("RGB", size, color).save(path)


@pytest.fixture()
def odd_images(tmp_path):
    """Valid images in awkward formats, each with the RGB pixel we expect back at (x, y)."""
    d = tmp_path / "img"
    d.mkdir()
    cases = {}

    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(d / "cmyk.jpg", quality=95)  # pure cyan ink
    cases["cmyk.jpg"] = ((8, 8), (0, 255, 255))

    a = np.full((16, 16), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    Image.fromarray(a).save(d / "gray16.png")
    cases["gray16.png"] = ((8, 8), (128, 128, 128))

    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30] + [200, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    p.info["transparency"] = 0
    p.save(d / "palette_alpha.png", transparency=0)
    cases["palette_alpha.png"] = ((12, 8), (255, 255, 255))  # transparent -> white, not (10, 20, 30)

    Image.new("L", (16, 16), 77).save(d / "gray.png")
    cases["gray.png"] = ((8, 8), (77, 77, 77))

    Image.new("RGB", (16, 16), (0, 200, 0)).save(d / "img.webp", lossless=True)
    cases["img.webp"] = ((8, 8), (0, 200, 0))

    # 40x20 stored, left half red; EXIF orientation 6 means "rotate 90 degrees clockwise to display":
    # shown as 20x40 with red on top.
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "exif_rot.jpg", exif=exif, quality=95)
    cases["exif_rot.jpg"] = ((10, 5), RED)
    return d, cases


def test_odd_but_valid_images_load_as_correct_rgb(odd_images):
    d, cases = odd_images
    for name, (xy, expected) in cases.items():
        im = load_image(d / name)
        assert im.mode == "RGB", name
        got = im.getpixel(xy)
        assert np.abs(np.subtract(got, expected)).max() <= 6, (name, got, expected)
    assert load_image(d / "exif_rot.jpg").size == (20, 40)
    assert np.abs(np.subtract(load_image(d / "exif_rot.jpg").getpixel((10, 35)), BLUE)).max() <= 6


def _make_corpus(tmp_path):
    """A caption JSONL with one row per reject reason, plus valid rows; returns
    (path, expected reasons by line)."""
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    _png(d / "img" / "ok.png")
    _png(d / "img" / "ok2.png", color=BLUE)
    (d / "img" / "empty.png").write_bytes(b"")
    (d / "img" / "notimage.png").write_text("hello, I am text")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buf, "JPEG")
    (d / "img" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png(d / "img" / "tiny.png", size=(4, 4))
    Image.new("1", (8000, 8000)).save(d / "img" / "bomb.png")  # 64 MP, a few KB on disk
    _png(tmp_path / "outside.png")

    rows = [  # (raw line bytes, expected reason or None)
        (json.dumps({"image": "img/ok.png", "captions": ["a red square", "red box"]}), None),
        ('{"image": "img/ok.png", "captions": ["unterminated', E.MALFORMED_JSON),
        (b'{"image": "img/ok.png", "captions": ["caf\xe9"]}', E.NOT_UTF8),
        ("[1, 2, 3]", E.NOT_AN_OBJECT),
        (json.dumps({"captions": ["no image"]}), E.MISSING_FIELD),
        (json.dumps({"image": "img/ok.png"}), E.MISSING_FIELD),
        (json.dumps({"image": "img/ok.png", "captions": "a string, not a list"}), E.WRONG_TYPE),
        (json.dumps({"image": 7, "captions": ["x"]}), E.WRONG_TYPE),
        (json.dumps({"image": "img/ok.png", "captions": ["fine", "   "]}), E.EMPTY_TEXT),
        (json.dumps({"image": "img/ok.png", "captions": []}), E.EMPTY_TEXT),
        (json.dumps({"image": "img/missing.png", "captions": ["x"]}), E.MISSING_IMAGE),
        (json.dumps({"image": "img/empty.png", "captions": ["x"]}), E.EMPTY_IMAGE_FILE),
        (json.dumps({"image": "img/notimage.png", "captions": ["x"]}), E.UNREADABLE_IMAGE),
        (json.dumps({"image": "img/truncated.jpg", "captions": ["x"]}), E.TRUNCATED_IMAGE),
        (json.dumps({"image": "img/tiny.png", "captions": ["x"]}), E.IMAGE_TOO_SMALL),
        (json.dumps({"image": "img/bomb.png", "captions": ["x"]}), E.IMAGE_TOO_LARGE),
        (json.dumps({"image": "../outside.png", "captions": ["x"]}), E.PATH_OUTSIDE_ROOT),
        (json.dumps({"image": str(tmp_path / "outside.png"), "captions": ["x"]}), E.PATH_OUTSIDE_ROOT),
        (json.dumps({"image_path": "img/ok2.png", "text": "alias row, kept"}), None),
        ("", "blank"),  # a blank line is not a row
        (json.dumps({"image": "img/ok.png", "captions": [{"raw": "coco style sentence"}]}), None),
    ]
    path = d / "captions.jsonl"
    with open(path, "wb") as f:
        for raw, _ in rows:
            f.write((raw if isinstance(raw, bytes) else raw.encode()) + b"\n")
    expected = {i + 1: reason for i, (_, reason) in enumerate(rows) if reason != "blank"}
    return path, expected


def test_validate_names_line_field_and_reason(tmp_path):
    path, expected = _make_corpus(tmp_path)
    errors = validate(path, "caption", progress=False)
    got = {e.line: e.reason for e in errors}
    assert got == {line: reason for line, reason in expected.items() if reason}
    by_line = {e.line: e for e in errors}
    assert str(by_line[6]).startswith(f"{path}:6: field 'captions':")
    assert by_line[9].field == "captions[1]"
    assert "img/truncated.jpg" in str(by_line[14])


def test_clean_keeps_plus_rejects_equals_rows(tmp_path):
    path, expected = _make_corpus(tmp_path)
    out = tmp_path / "clean.jsonl"  # a folder above the input's: image paths get "data/" in front
    rejects = tmp_path / "rejects.jsonl"
    report = clean(path, "caption", out, rejects, progress=False)
    n_bad = sum(1 for r in expected.values() if r)
    assert report.rows == len(expected) == 20
    assert report.kept == len(expected) - n_bad == 3
    assert sum(report.rejected.values()) == n_bad
    assert report.rejected[E.PATH_OUTSIDE_ROOT] == 2

    kept = read_jsonl(out)
    # Canonical form, and image paths rewritten relative to the output file's folder.
    assert kept[0] == {"image": "data/img/ok.png", "captions": ["a red square", "red box"]}
    assert kept[1] == {"image": "data/img/ok2.png", "captions": ["alias row, kept"]}
    assert kept[2]["captions"] == ["coco style sentence"]
    assert load_image(out.parent / kept[1]["image"]).getpixel((0, 0)) == BLUE

    rej = read_jsonl(rejects)
    assert [(r["line"], r["reason"]) for r in rej] == [(line, r) for line, r in expected.items() if r]
    # undecodable byte kept visible
    assert rej[1]["raw"] == '{"image": "img/ok.png", "captions": ["caf\\xe9"]}'


def test_allow_outside_root(tmp_path):
    path, _ = _make_corpus(tmp_path)
    errors = validate(path, "caption", allow_outside_root=True, progress=False)
    assert E.PATH_OUTSIDE_ROOT not in {e.reason for e in errors}


def test_cli_validate_exit_codes_and_clean_summary(tmp_path):
    path, expected = _make_corpus(tmp_path)
    r = subprocess.run([sys.executable, "-m", "data_tools", "validate", "--task", "caption", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{path}:2:" in r.stderr and "python -m data_tools clean" in r.stderr
    out, rej = tmp_path / "c.jsonl", tmp_path / "r.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "data_tools", "clean", "--task", "caption", str(path), "--out", str(out),
         "--rejects", str(rej)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    summary = {" ".join(line.split()[:-1]): line.split()[-1] for line in r.stdout.splitlines()[:-1]
               if line.strip()}
    assert summary["input rows"] == "20" and summary["kept"] == "3" and summary["path_outside_root"] == "2"
    r = subprocess.run([sys.executable, "-m", "data_tools", "validate", "--task", "caption", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_validate_names_the_task_a_file_of_another_task_fits(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"image": "a.png", "captions": ["a red square"]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "data_tools", "validate", "--task", "instruct", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{path}: no valid row. Line 1 is a valid record for task caption, not instruct." in r.stderr
    r = subprocess.run([sys.executable, "-m", "data_tools", "validate", "--task", "caption", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "no valid row" not in r.stderr, r.stderr


def test_schemas_vqa_instruct_and_aliases():
    assert normalize_record({"image": "a.png", "question_id": 3, "question": "what?", "answer": "red"},
                            "vqa")["answers"] == ["red"]
    vqa2 = {"image": "a.png", "question_id": "q1", "question": "what?",
            "answers": [{"answer": "red", "answer_id": 1}]}
    assert normalize_record(vqa2, "vqa")["answers"] == ["red"]
    with pytest.raises(DataError) as e:
        normalize_record({"image": "a.png", "question_id": True, "question": "q", "answers": ["a"]}, "vqa")
    assert (e.value.reason, e.value.field) == (E.WRONG_TYPE, "question_id")

    msgs = {
        "image": "a.png",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]},
            {"role": "assistant", "content": "a square"},
        ],
    }
    rec = normalize_record(msgs, "instruct")
    assert rec["conversations"] == [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhat is this?"},
        {"from": "gpt", "value": "a square"},
    ]
    text_only = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert "image" not in normalize_record(text_only, "instruct")
    with pytest.raises(DataError) as e:
        normalize_record({"conversations": [{"from": "human", "value": "<image>\nhi"},
                                            {"from": "gpt", "value": "x"}]}, "instruct")
    assert e.value.reason == E.BAD_VALUE
    with pytest.raises(DataError) as e:
        normalize_record({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}, "instruct")
    assert "no assistant turn" in e.value.message


@pytest.mark.parametrize("first", [[], [{"role": "system", "content": "be brief"}]])
def test_a_conversation_that_opens_with_an_answer_is_refused(first):
    """Chat templates render an answer after the turns before it: the recipes cannot train on an answer
    to nothing (or, with Gemma 3's template, to a system turn folded into it), so validate refuses it."""
    answer_first = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"}]
    turns = [{"from": "system", "value": t["content"]} for t in first] + answer_first
    with pytest.raises(DataError) as e:
        normalize_record({"conversations": turns}, "instruct")
    assert (e.value.reason, e.value.field) == (E.BAD_VALUE, "conversations")
    assert f"turn {len(first)} is an assistant turn before any user turn" in e.value.message
    messages = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
    with pytest.raises(DataError) as e:
        normalize_record({"messages": messages}, "instruct")
    assert (e.value.reason, e.value.field) == (E.BAD_VALUE, "messages")
