"""dedup, split, check-leakage and hash with --image-root: annotations in data/, images in images/ (paths like
"a.png" relative to images/), outputs anywhere keeping those paths, and readers given the same root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools import dedup, split
from data_tools.__main__ import main as data_tools_main
from data_tools.hashes import HashTable
from tests.test_dedup import CAPTION_ROWS, make_images, read, write_lines

# CAPTION_ROWS of test_dedup with paths relative to images/ instead of the JSONL's folder.
ROWS = [None if r is None else {**r, "image": r["image"].removeprefix("img/")} for r in CAPTION_ROWS]
DEDUPED = [
    {"image": "a.png", "captions": ["A dog on grass.", "A brown dog.", "Dog lying outside."]},
    {"image": "b.png", "captions": ["A red car."]},
    {"image": "c.png", "captions": ["A cat."]},
    {"image": "red.png", "captions": ["A red circle."]},
    {"image": "blue.png", "captions": ["A blue circle."]},
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder)
    return folder


@pytest.fixture
def layout(tmp_path, images, monkeypatch) -> Path:
    """tmp_path/images (the image root) and tmp_path/data/in.jsonl; the working folder is tmp_path, so that
    the commands take the relative paths a user types."""
    shutil.copytree(images, tmp_path / "images")
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data/in.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def validate(*files: str) -> int:
    return data_tools_main(["validate", "--task", "caption", "--image-root", "images", *files])


def test_dedup_with_image_root_keeps_paths_and_finds_duplicates(layout, capsys):
    argv = ["--task", "caption", "data/in.jsonl", "--image-root", "images", "--no-hash-cache"]
    assert data_tools_main(["dedup", *argv, "--out", "out/dedup.jsonl", "--report", "out/report.jsonl"]) == 0
    assert "give its readers --image-root images" in capsys.readouterr().out
    assert read(layout / "out/dedup.jsonl") == DEDUPED
    report = read(layout / "out/report.jsonl")
    fields = ("line", "action", "reason", "merged_into", "image", "kept_image")
    assert [tuple(e[k] for k in fields) for e in report] == [
        (4, "merged", "same_image", 1, "a_copy.png", "a.png"),
        (5, "dropped", "exact_duplicate", 1, "a.png", "a.png"),
        (6, "merged", "near_duplicate_image", 1, "a_near.jpg", "a.png"),
        (8, "dropped", "exact_duplicate", 2, "b_meta.png", "b.png"),
    ]
    assert [e["hamming"] for e in report if e["reason"] != "near_duplicate_image"] == [0, 0, 0]
    assert 0 < report[2]["hamming"] <= 4
    assert validate("out/dedup.jsonl") == 0

    # The output next to the input, or in the image root itself: the paths are the same.
    assert data_tools_main(["dedup", *argv, "--out", "data/dedup.jsonl"]) == 0
    assert data_tools_main(["dedup", *argv, "--out", "images/dedup.jsonl"]) == 0
    assert read(layout / "data/dedup.jsonl") == read(layout / "images/dedup.jsonl") == DEDUPED

    # Python API: the same, and with near duplicates off only identical images merge.
    n_in, n_out, _ = dedup.dedup_file("data/in.jsonl", "out/api.jsonl", "caption", image_root="images",
                                      progress=False)
    assert (n_in, n_out) == (9, 5) and read(layout / "out/api.jsonl") == DEDUPED
    _, n_out, report = dedup.dedup_file("data/in.jsonl", "out/exact.jsonl", "caption", image_root="images",
                                        near_threshold=None, progress=False)
    assert n_out == 6 and [(e["line"], e["reason"]) for e in report] == [
        (4, "same_image"), (5, "exact_duplicate"), (8, "exact_duplicate")]
    assert {r["image"] for r in read(layout / "out/exact.jsonl")} == {
        "a.png", "b.png", "a_near.jpg", "c.png", "red.png", "blue.png"}


def test_without_image_root_paths_resolve_against_the_jsonl_folder(layout, capsys):
    # Today's behaviour: "a.png" is data/a.png, which does not exist.
    code = data_tools_main(["dedup", "--task", "caption", "data/in.jsonl", "--out", "data/o.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and "in.jsonl:1" in err and "a.png" in err and "Traceback" not in err
    assert not (layout / "data/o.jsonl").exists()


def test_rebase_refusal_names_only_the_commands_flags(tmp_path, images, capsys):
    # Default root (the JSONL's folder): an output folder that does not contain the images is refused
    # before any hashing, in one line naming the flags of the command that prints it.
    shutil.copytree(images, tmp_path / "raw/img")
    write_lines(tmp_path / "raw/in.jsonl", CAPTION_ROWS)
    (tmp_path / "elsewhere").mkdir()
    out = str(tmp_path / "elsewhere/o.jsonl")
    assert dedup.main(["--task", "caption", str(tmp_path / "raw/in.jsonl"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in.jsonl:1" in err and "outside the output folder" in err
    assert "--image-root" in err and "--allow-outside-root" in err and "--out-dir" not in err
    assert not (tmp_path / "raw/.data_tools_hashes.npz").exists()  # stopped before hashing
    argv = [str(tmp_path / "raw/in.jsonl"), "--out-dir", str(tmp_path / "elsewhere"), "--seed", "0",
            "--no-hash-cache"]
    assert split.main_split(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-root" in err and "outside the output folder" in err
    # With --image-root the same outputs are written, paths unchanged.
    assert dedup.main(["--task", "caption", str(tmp_path / "raw/in.jsonl"), "--out", out, "--no-hash-cache",
                       "--image-root", str(tmp_path / "raw")]) == 0
    assert read(Path(out))[0] == {"image": "img/a.png",
                                  "captions": ["A dog on grass.", "A brown dog.", "Dog lying outside."]}


def test_split_and_check_leakage_with_image_root(layout, capsys):
    argv = ["data/in.jsonl", "--image-root", "images", "--out-dir", "splits", "--ratios", "0.5,0.5",
            "--names", "a,b", "--seed", "0", "--task", "caption", "--no-hash-cache"]
    assert data_tools_main(["split", *argv]) == 0
    assert "give their readers --image-root images" in capsys.readouterr().out
    parts = {name: read(layout / f"splits/{name}.jsonl") for name in "ab"}
    written = [r for rows in parts.values() for r in rows]
    inputs = [{"image": r["image"], "captions": r.get("captions", [r.get("caption")])} for r in ROWS if r]
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(map(key, written)) == sorted(map(key, inputs))  # paths as they were: "a.png"
    assert all(parts.values())
    where = {r["image"]: name for name, rows in parts.items() for r in rows}
    assert where["a.png"] == where["a_copy.png"] == where["a_near.jpg"]  # one image group, one split
    assert where["b.png"] == where["b_meta.png"]
    assert validate("splits/a.jsonl", "splits/b.jsonl") == 0
    # Deterministic, and the splits of one seed are the same wherever the input lies.
    shutil.copy(layout / "data/in.jsonl", layout / "in_top.jsonl")
    argv2 = ["in_top.jsonl", *argv[1:3], "--out-dir", "splits2", *argv[5:]]
    assert data_tools_main(["split", *argv2]) == 0
    for name in "ab":
        first, second = (layout / folder / f"{name}.jsonl" for folder in ("splits", "splits2"))
        assert first.read_bytes() == second.read_bytes()

    leak = ["check-leakage", "--image-root", "images", "--no-hash-cache"]
    capsys.readouterr()
    assert data_tools_main([*leak, "splits/a.jsonl", "splits/b.jsonl"]) == 0
    assert "no leakage across 2 files" in capsys.readouterr().out
    # Files in two folders, both relative to the image root: an identical and a near-duplicate image.
    write_lines(layout / "data/one.jsonl", [{"image": "a.png", "captions": ["x"]}])
    (layout / "other").mkdir()
    write_lines(layout / "other/two.jsonl", [{"image": "c.png", "captions": ["y"]},
                                             {"image": "a_copy.png", "captions": ["y"]},
                                             {"image": "a_near.jpg", "captions": ["y"]}])
    assert data_tools_main([*leak, "data/one.jsonl", "other/two.jsonl"]) == 1
    out = capsys.readouterr().out
    assert "a.png <-> a_copy.png  (identical)" in out and "LEAKAGE: 2 image pairs" in out
    leaks = split.find_leaks(["data/one.jsonl", "other/two.jsonl"], image_root="images", progress=False)
    assert [(e["line_a"], e["image_a"], e["line_b"], e["image_b"], e["exact"]) for e in leaks] == [
        (1, "a.png", 2, "a_copy.png", True), (1, "a.png", 3, "a_near.jpg", False)]
    assert leaks[0]["hamming"] == 0 and 0 < leaks[1]["hamming"] <= 4


def test_hash_shards_with_image_root_give_the_same_outputs(layout, capsys):
    for i in range(2):
        assert data_tools_main(["hash", "data/in.jsonl", "--image-root", "images", "--shard", f"{i}/2",
                                "--out", f"h/h-{i}.npz", "--no-hash-cache"]) == 0
    with np.load(layout / "h/h-0.npz") as z, np.load(layout / "h/h-1.npz") as z1:
        stored = [p for f in (z, z1) for p in f["paths"].tobytes().decode().split("\0") if p]
    assert sorted(stored) == ["a.png", "a_copy.png", "a_near.jpg", "b.png", "b_meta.png", "blue.png", "c.png",
                              "red.png"]  # relative to the image root
    assert sum(len(HashTable.load(layout / f"h/h-{i}.npz")) for i in range(2)) == 8
    base = ["--task", "caption", "data/in.jsonl", "--image-root", "images"]
    plain = ["--no-hash-cache", "--out", "d1.jsonl", "--report", "r1.jsonl"]
    assert data_tools_main(["dedup", *base, *plain]) == 0
    # The shards are found under the image root given to the merge, wherever it now is.
    (layout / "images").rename(layout / "moved")
    base[4] = "moved"
    sharded = ["--hashes", "h/h-*.npz"]
    assert data_tools_main(["dedup", *base, *sharded, "--out", "d2.jsonl", "--report", "r2.jsonl"]) == 0
    assert "0 hashed, 8 from the cache or hash files" in capsys.readouterr().out
    assert (layout / "d1.jsonl").read_bytes() == (layout / "d2.jsonl").read_bytes()
    assert (layout / "r1.jsonl").read_bytes() == (layout / "r2.jsonl").read_bytes()
    assert read(layout / "d2.jsonl") == DEDUPED

    split_argv = ["data/in.jsonl", "--image-root", "moved", "--ratios", "0.5,0.5", "--names", "a,b",
                  "--seed", "1"]
    assert data_tools_main(["split", *split_argv, "--out-dir", "s1", "--no-hash-cache"]) == 0
    assert data_tools_main(["split", *split_argv, "--out-dir", "s2", *sharded]) == 0
    for name in "ab":
        assert (layout / f"s1/{name}.jsonl").read_bytes() == (layout / f"s2/{name}.jsonl").read_bytes()
    leak = ["check-leakage", "--image-root", "moved", *sharded]
    assert data_tools_main([*leak, "s2/a.jsonl", "s2/b.jsonl"]) == 0
    assert data_tools_main([*leak, "data/in.jsonl", "d2.jsonl"]) == 1
    # A shard that lacks an image names the row that uses it.
    capsys.readouterr()
    assert data_tools_main(["dedup", *base, "--hashes", "h/h-0.npz", "--out", "d3.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "none of the --hashes files" in err and "in.jsonl:" in err
