"""convert: every name a row gives a field under is read, and every image alias has its path checked."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.convert import default_rejects_path, main
from data_tools.jsonl import read_jsonl


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rejects(out: Path) -> list[tuple[str, str, str | None]]:
    return [(r["item"], r["reason"], r["field"]) for r in read_jsonl(default_rejects_path(out))]


def test_image_text_json_refuses_a_field_named_twice_with_different_values(tmp_path):
    src = write_rows(tmp_path / "pairs.jsonl", [
        {"image_path": "a.jpg", "caption": "a red square", "captions": ["a blue circle", "a green triangle"]},
        {"image_path": "b.jpg", "image": "c.jpg", "text": "a dog"},
        {"image_path": "d.jpg", "image": "./d.jpg", "caption": "a cat", "captions": ["a cat"]},  # the same
        {"image_path": "e.jpg", "text": "a bird", "caption": None},  # null: not given
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    assert main(["--from", "image-text-json", str(src), "--out", str(out)]) == 0
    # Was: a.jpg with "a red square" only (two captions lost) and b.jpg (c.jpg ignored), rejected 0.
    assert read_jsonl(out) == [{"image": "d.jpg", "captions": ["a cat"]},
                               {"image": "e.jpg", "captions": ["a bird"]}]
    assert rejects(out) == [("line 1", "bad_value", "caption"), ("line 2", "bad_value", "image_path")]
    messages = [r["message"] for r in read_jsonl(default_rejects_path(out))]
    assert "differs from 'captions'" in messages[0] and "'b.jpg' vs 'c.jpg'" in messages[1]


def test_llava_checks_the_path_under_every_image_alias(tmp_path):
    turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    rows = [
        {"id": "1", "image_path": "/etc/a.jpg"},
        {"id": "2", "images": "../b.jpg"},
        {"id": "3", "img": "x/../../c.jpg"},
        {"id": "4", "file_name": "/d.jpg"},
        {"id": "5", "images": ["ok.jpg", "/e.jpg"]},
        {"id": "6", "image": "/etc/f.jpg"},
        {"id": "7", "image_path": "./sub//g.jpg"},  # fine: written normalised
        {"id": "8", "image": "h.jpg", "img": "i.jpg"},  # two images for one: which?
    ]
    src = tmp_path / "l.json"
    src.write_text(json.dumps([{**r, "conversations": turns} for r in rows]), encoding="utf-8")
    out = tmp_path / "l.jsonl"
    assert main(["--from", "llava", str(src), "--out", str(out)]) == 0
    # Was: rows 1-4 written with their paths as given (only "image" and lists were checked).
    assert [(r["id"], r["image"]) for r in read_jsonl(out)] == [("7", "sub/g.jpg")]
    assert rejects(out) == [
        ("[0]", "path_outside_root", "image_path"), ("[1]", "path_outside_root", "images"),
        ("[2]", "path_outside_root", "img"), ("[3]", "path_outside_root", "file_name"),
        ("[4]", "path_outside_root", "images[1]"), ("[5]", "path_outside_root", "image"),
        ("[7]", "bad_value", "image"),
    ]
