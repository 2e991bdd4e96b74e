"""Which image a row names, for dedup, split, check-leakage and hash: several images under any alias are
refused, as are two aliases naming different images."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools import dedup
from data_tools.split import main_check_leakage, main_split
from tests.test_dedup import natural_image, read, write_lines

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


@pytest.fixture
def linked(tmp_path) -> Path:
    """data/raw/all.jsonl naming coco/N.png, data/raw/coco a symlink to images elsewhere (a mount)."""
    (tmp_path / "mnt/coco").mkdir(parents=True)
    for k in range(6):
        natural_image(500 + k).save(tmp_path / f"mnt/coco/{k}.png")
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/coco").symlink_to(tmp_path / "mnt/coco")
    write_lines(tmp_path / "data/raw/all.jsonl",
                [{"image": f"coco/{k}.png", "captions": [f"cap {k}"]} for k in range(6)])
    return tmp_path


def test_symlinked_image_folder_rebased_by_path_text(linked, capsys):
    from data_tools.clean import main_validate

    data = linked / "data"
    flags = ["--workers", "1", "--no-hash-cache"]
    assert dedup.main(["--task", "caption", str(data / "raw/all.jsonl"), "--out", str(data / "d.jsonl")]
                      + flags) == 0  # was: refused, the images being outside data/ once resolved
    assert [r["image"] for r in read(data / "d.jsonl")] == [f"raw/coco/{k}.png" for k in range(6)]
    assert main_split([str(data / "raw/all.jsonl"), "--out-dir", str(data), "--seed", "0"] + flags) == 0
    split_images = sorted(r["image"] for name in ("train", "val", "test")
                          for r in read(data / f"{name}.jsonl"))
    assert split_images == [f"raw/coco/{k}.png" for k in range(6)]
    # --allow-outside-root wrote ../mnt/coco/0.png, which readers refuse; now the same as without it.
    assert dedup.main(["--task", "caption", str(data / "raw/all.jsonl"), "--out", str(data / "d2.jsonl"),
                       "--allow-outside-root"] + flags) == 0
    assert (data / "d2.jsonl").read_bytes() == (data / "d.jsonl").read_bytes()
    for name in ("d", "train", "test"):
        assert main_validate(["--task", "caption", str(data / f"{name}.jsonl")]) == 0, name
    # An output folder that is not the input's or above it still cannot reach the paths.
    (linked / "elsewhere").mkdir()
    capsys.readouterr()
    assert dedup.main(["--task", "caption", str(data / "raw/all.jsonl"), "--out",
                       str(linked / "elsewhere/d.jsonl")] + flags) == 2
    assert "all.jsonl:1: field 'image'" in capsys.readouterr().err


def test_output_in_the_image_folder_still_gets_paths_inside_it(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(3):
        natural_image(600 + k).save(tmp_path / f"img/{k}.png")
    write_lines(tmp_path / "all.jsonl", [{"image": f"img/{k}.png", "captions": ["a"]} for k in range(3)])
    out = tmp_path / "img/d.jsonl"  # a folder inside the root that holds every image
    assert dedup.main(["--task", "caption", str(tmp_path / "all.jsonl"), "--out", str(out),
                       "--workers", "1", "--no-hash-cache"]) == 0
    assert [r["image"] for r in read(tmp_path / "img/d.jsonl")] == ["0.png", "1.png", "2.png"]
