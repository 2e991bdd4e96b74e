"""Which image a row names, for dedup, split, check-leakage and hash: several images under any alias are
refused, as are two aliases naming different images."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools import dedup
from data_tools.split import main_check_leakage, main_split
from tests.test_dedup import natural_image, write_lines

TURNS = [{"from": "human", "value": "<image>what?"}, {"from": "gpt", "value": "a"}]


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for k, name in enumerate("abc"):
        natural_image(400 + k).save(tmp_path / f"img/{name}.png")
    write_lines(tmp_path / "other.jsonl", [{"image": "img/a.png", "conversations": TURNS}])
    return tmp_path


@pytest.mark.parametrize("row,field,reason", [
    ({"image": ["img/a.png", "img/b.png"]}, "image", "multiple_images"),
    ({"img": ["img/b.png", "img/a.png"]}, "img", "multiple_images"),
    ({"images": ["img/a.png", "img/b.png"]}, "images", "multiple_images"),
    ({"image": "img/c.png", "images": ["img/a.png"]}, "image", "bad_value"),  # which one is meant?
    ({"image_path": "img/c.png", "file_name": "img/a.png"}, "image_path", "bad_value"),
])
def test_several_or_conflicting_images_are_refused_without_task(folder, capsys, row, field, reason):
    write_lines(folder / "multi.jsonl", [{"image": "img/c.png", "conversations": TURNS},
                                         {**row, "conversations": TURNS}])
    files = [str(folder / "multi.jsonl"), str(folder / "other.jsonl"), "--workers", "1", "--no-hash-cache"]
    assert main_check_leakage(files) == 2  # was: no leakage, the row's img/a.png unseen
    err = capsys.readouterr().err
    assert f"multi.jsonl:2: field '{field}'" in err and f"[{reason}]" in err
    split = [str(folder / "multi.jsonl"), "--out-dir", str(folder), "--seed", "0", "--no-hash-cache"]
    assert main_split(split) == 2 and f"[{reason}]" in capsys.readouterr().err
    assert not (folder / "train.jsonl").exists()
    dedup_args = ["--task", "instruct", str(folder / "multi.jsonl"), "--out", str(folder / "d.jsonl"),
                  "--no-hash-cache"]
    assert dedup.main(dedup_args) == 2 and "multi.jsonl:2" in capsys.readouterr().err


def test_aliases_naming_one_image_still_find_leakage(folder, capsys):
    row = {"image": "img/a.png", "images": ["img/a.png"], "conversations": TURNS}  # equal: one image
    write_lines(folder / "same.jsonl", [row])
    files = [str(folder / "same.jsonl"), str(folder / "other.jsonl"), "--workers", "1", "--no-hash-cache"]
    assert main_check_leakage(files) == 1
    assert "(identical)" in capsys.readouterr().out
