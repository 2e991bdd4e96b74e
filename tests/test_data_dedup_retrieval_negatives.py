"""Retrieval dedup never writes a text as both a caption and a negative of one record: a later row's
caption that is a negative of the record wins (the image shows it), the negative is listed in the report."""

from __future__ import annotations

from data_tools import dedup
from data_tools.dedup import normalize_text
from tests.test_dedup import make_images, read, write_lines


def test_a_later_caption_removes_the_same_negative(tmp_path, capsys):
    make_images(tmp_path / "img")
    rows = [
        {"image": "img/a.png", "captions": ["a dog on grass"], "neg_captions": ["a cat on a sofa", "a car"]},
        {"image": "img/a_copy.png", "captions": ["A cat on a sofa."]},
        {"image": "img/b.png", "captions": ["b"], "neg_captions": ["x"]},
        {"image": "img/b_meta.png", "captions": ["X!"], "neg_captions": ["y"]},
        {"image": "img/c.png", "captions": ["c"], "neg_captions": ["z"]},
        {"image": "img/c.png", "captions": ["Z"]},  # the record's only negative: none left
    ]
    write_lines(tmp_path / "ret.jsonl", rows)
    out, report = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    assert dedup.main(["--task", "retrieval", str(tmp_path / "ret.jsonl"), "--out", str(out), "--report",
                       str(report), "--workers", "1", "--no-hash-cache"]) == 0
    assert read(out) == [
        {"image": "img/a.png", "captions": ["a dog on grass", "A cat on a sofa."], "neg_captions": ["a car"]},
        {"image": "img/b.png", "captions": ["b", "X!"], "neg_captions": ["y"]},
        {"image": "img/c.png", "captions": ["c", "Z"]},
    ]
    entries = read(report)
    assert [(e["line"], e["merged_into"], e.get("dropped_neg_captions")) for e in entries] == [
        (2, 1, ["a cat on a sofa"]), (4, 3, ["x"]), (6, 5, ["z"])]
    for record in read(out):  # was: "a cat on a sofa" in both lists of the first record
        positives = {normalize_text(c) for c in record["captions"]}
        assert not positives & {normalize_text(c) for c in record.get("neg_captions", [])}
    # Every negative of the input is in the output or in the report.
    written = [c for r in read(out) for c in r.get("neg_captions", [])]
    reported = [c for e in entries for c in e.get("dropped_neg_captions", [])]
    assert sorted(written + reported) == sorted(c for r in rows for c in r.get("neg_captions", []))
