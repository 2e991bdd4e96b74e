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
