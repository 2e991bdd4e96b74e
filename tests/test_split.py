"""Split by image group and the leakage check: groups never straddle splits, ratios, determinism, exit
codes."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from data_tools.hashing import hamming, hash_image_fast
from data_tools.split import assign_groups, find_leaks, main_check_leakage, main_split, split_records
from tests.test_dedup import make_images, natural_image, read, write_lines


def test_assign_groups_cuts_rows_at_ratios():
    assert Counter(assign_groups([1] * 10, [0.8, 0.1, 0.1], seed=0)) == {0: 8, 1: 1, 2: 1}
    # Ratios need not sum to 1; a split may get nothing when groups are too big to share.
    assert Counter(assign_groups([1] * 4, [1, 1], seed=3)) == {0: 2, 1: 2}
    assert assign_groups([10], [0.5, 0.5], seed=0) in ([0], [1])


def test_split_records_keeps_groups_whole_and_is_seeded():
    groups = [0, 0, 2, 3, 3, 3, None, None, 8, 0] * 5
    groups = [g if g is None else g + 10 * (k // 10) for k, g in enumerate(groups)]
    a = split_records(groups, [0.6, 0.2, 0.2], seed=1)
    assert a == split_records(groups, [0.6, 0.2, 0.2], seed=1)
    assert a != split_records(groups, [0.6, 0.2, 0.2], seed=2)
    split_of_group = defaultdict(set)
    for g, s in zip(groups, a):
        if g is not None:
            split_of_group[g].add(s)
    assert all(len(s) == 1 for s in split_of_group.values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """60 distinct images (1 to 4 VQA-style rows each) plus copies and near duplicates of some of them."""
    root = tmp_path_factory.mktemp("split")
    (root / "img").mkdir()
    rows = []
    for k in range(60):
        natural_image(100 + k).save(root / f"img/{k}.png")
        for q in range(1 + k % 4):
            rows.append({"image": f"img/{k}.png", "question_id": f"{k}-{q}", "question": f"Q{q}?",
                         "answers": ["a"]})
    # Rows of other files of images 0 and 1 must land with them.
    shutil.copy(root / "img/0.png", root / "img/0_copy.png")
    natural_image(101).save(root / "img/1_near.jpg", quality=90)
    rows += [
        {"image": "img/0_copy.png", "question_id": "copy", "question": "Q?", "answers": ["a"]},
        {"image": "img/1_near.jpg", "question_id": "near", "question": "Q?", "answers": ["a"]},
    ]
    write_lines(root / "all.jsonl", rows)
    return root


def run_split(dataset: Path, out: Path, seed: int, capsys=None) -> dict[str, list[dict]]:
    argv = [str(dataset / "all.jsonl"), "--out-dir", str(out), "--ratios", "0.8,0.1,0.1", "--seed", str(seed),
            "--task", "vqa"]
    assert main_split(argv) == 0
    return {name: read(out / f"{name}.jsonl") for name in ("train", "val", "test")}


def test_split_by_image_ratios_determinism_and_no_leakage(dataset, capsys):
    splits = run_split(dataset, dataset, seed=0)
    printed = capsys.readouterr().out
    total = sum(len(rows) for rows in splits.values())
    assert total == 152
    # One group = one image, plus the copy of 0 and the near duplicate of 1; the largest group has 6 rows.
    image_of = {"0_copy": "0", "1_near": "1"}
    split_of_image = defaultdict(set)
    for name, rows in splits.items():
        for r in rows:
            stem = Path(r["image"]).stem
            split_of_image[image_of.get(stem, stem)].add(name)
        assert f"{name}: {len(rows)} rows" in printed
    assert all(len(s) == 1 for s in split_of_image.values())
    for name, ratio in zip(splits, (0.8, 0.1, 0.1)):
        assert abs(len(splits[name]) - ratio * total) <= 6
    # Rows keep their input order within a split.
    order = [json.loads(line)["question_id"] for line in (dataset / "all.jsonl").read_text().splitlines()]
    for rows in splits.values():
        ids = [r["question_id"] for r in rows]
        assert ids == sorted(ids, key=order.index)

    files = [str(dataset / f"{n}.jsonl") for n in splits]
    assert main_check_leakage(files) == 0
    assert "no leakage" in capsys.readouterr().out

    before = {n: (dataset / f"{n}.jsonl").read_bytes() for n in splits}
    run_split(dataset, dataset, seed=0)
    assert {n: (dataset / f"{n}.jsonl").read_bytes() for n in splits} == before
    run_split(dataset, dataset, seed=1)
    assert {n: (dataset / f"{n}.jsonl").read_bytes() for n in splits} != before


def test_split_into_subfolder_needs_images_inside_it(dataset, capsys):
    argv = [str(dataset / "all.jsonl"), "--out-dir", str(dataset / "splits"), "--ratios", "0.5,0.5",
            "--seed", "0"]
    assert main_split(argv) == 2
    assert "outside the output folder" in capsys.readouterr().err
    # A parent folder of the input is fine: paths are rewritten relative to it.
    nested = dataset / "nested"
    (nested / "img").mkdir(parents=True, exist_ok=True)
    shutil.copy(dataset / "img/0.png", nested / "img/0.png")
    write_lines(nested / "x.jsonl", [{"image_path": "img/0.png", "caption": "a"}])
    assert main_split([str(nested / "x.jsonl"), "--out-dir", str(dataset / "up"), "--ratios", "1",
                       "--names", "all", "--seed", "0"]) == 2
    assert main_split([str(nested / "x.jsonl"), "--out-dir", str(dataset), "--ratios", "1",
                       "--names", "only", "--seed", "0"]) == 0
    assert read(dataset / "only.jsonl") == [{"image_path": "nested/img/0.png", "caption": "a"}]


def test_check_leakage_finds_exact_and_near(tmp_path, capsys):
    make_images(tmp_path / "img")
    write_lines(tmp_path / "train.jsonl", [
        {"image": "img/a.png", "caption": "x"},
        {"image": "img/b.png", "caption": "x"},
        {"image": "img/c.png", "caption": "x"},
    ])
    write_lines(tmp_path / "test.jsonl", [
        {"image": "img/red.png", "caption": "x"},
        None,
        {"image": "img/b_meta.png", "caption": "x"},
        {"image": "img/a_small.png", "caption": "x"},
        {"image": "img/a_small.png", "caption": "y"},
    ])
    write_lines(tmp_path / "val.jsonl",
                [{"image": "img/blue.png", "caption": "x"}, {"image": "img/a_copy.png", "caption": "x"}])
    files = [tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "val.jsonl"]
    leaks = find_leaks(files, progress=False)
    found = [(Path(e["file_a"]).stem, e["line_a"], Path(e["file_b"]).stem, e["line_b"], e["exact"])
             for e in leaks]
    assert found == [
        ("test", 4, "val", 2, False),
        ("train", 1, "test", 4, False),
        ("train", 1, "val", 2, True),
        ("train", 2, "test", 3, True),
    ]
    assert [e["hamming"] > 0 for e in leaks] == [True, True, False, False]
    assert all(e["hamming"] <= 4 for e in leaks)
    assert leaks[2]["image_a"] == "img/a.png" and leaks[2]["image_b"] == "img/a_copy.png"

    assert main_check_leakage([str(f) for f in files]) == 1
    out = capsys.readouterr().out
    assert f"{files[0]}:2 <-> {files[1]}:3  img/b.png <-> img/b_meta.png  (identical)" in out
    assert "LEAKAGE: 4 image pairs" in out

    # Near duplicates off: only the identical images leak.
    assert [e["exact"] for e in find_leaks(files, near_threshold=None, progress=False)] == [True, True]
    assert main_check_leakage([str(tmp_path / "val.jsonl"), str(tmp_path / "test.jsonl"), "--no-near"]) == 0
    # Red and blue circles share a grey-level hash but are different images: no leakage.
    write_lines(tmp_path / "val.jsonl", [{"image": "img/blue.png", "caption": "x"}])
    write_lines(tmp_path / "test.jsonl",
                [{"image": "img/red.png", "caption": "x"}, {"image": "img/red.png", "caption": "z"}])
    assert main_check_leakage([str(tmp_path / "val.jsonl"), str(tmp_path / "test.jsonl")]) == 0


def test_identical_pictures_are_one_image_at_any_near_threshold(tmp_path, capsys):
    """A JPEG and a PNG of its decoded pixels are one image, though their fast hashes (the JPEG's reduced
    decode) are 2 bits apart: split and check-leakage find them at --near-threshold 0 and 1 too."""
    make_images(tmp_path / "img")  # a.png and a_near.jpg: 2 bits apart, not the same pixels
    assert hamming(hash_image_fast(tmp_path / "img/a.png").phash,
                   hash_image_fast(tmp_path / "img/a_near.jpg").phash) == 2
    seeds = [504, 509, 513, 516, 518, 524]
    for s in seeds:
        natural_image(s, 240).save(tmp_path / f"img/{s}.jpg", quality=90)
        with Image.open(tmp_path / f"img/{s}.jpg") as im:
            im.convert("RGB").save(tmp_path / f"img/{s}.png")
        fast = [hash_image_fast(tmp_path / f"img/{s}.{ext}").phash for ext in ("jpg", "png")]
        assert hamming(*fast) == 2  # what the test is about: beyond a threshold of 0 or 1
    write_lines(tmp_path / "train.jsonl", [{"image": f"img/{s}.jpg", "caption": "x"} for s in seeds]
                + [{"image": "img/a.png", "caption": "x"}])
    write_lines(tmp_path / "test.jsonl", [{"image": f"img/{s}.png", "caption": "x"} for s in seeds]
                + [{"image": "img/a_near.jpg", "caption": "x"}])
    files = [tmp_path / "train.jsonl", tmp_path / "test.jsonl"]
    expected = [(f"img/{s}.jpg", f"img/{s}.png", True) for s in seeds]
    for threshold in (0, 1):
        leaks = find_leaks(files, near_threshold=threshold, progress=False)
        assert [(e["image_a"], e["image_b"], e["exact"]) for e in leaks] == expected
    leaks = find_leaks(files, near_threshold=2, progress=False)
    assert [(e["image_a"], e["image_b"], e["exact"]) for e in leaks] == [
        *expected, ("img/a.png", "img/a_near.jpg", False)]
    capsys.readouterr()
    assert main_check_leakage([str(f) for f in files] + ["--near-threshold", "0"]) == 1
    assert "LEAKAGE: 6 image pairs in two files (6 identical, 0 near duplicates)" in capsys.readouterr().out

    rows = [{"image": f"img/{s}.{ext}", "caption": ext} for s in seeds for ext in ("jpg", "png")]
    write_lines(tmp_path / "all.jsonl", rows)
    assert main_split([str(tmp_path / "all.jsonl"), "--out-dir", str(tmp_path), "--ratios", "0.5,0.5",
                       "--names", "train,test", "--seed", "0", "--near-threshold", "0"]) == 0
    splits = {name: read(tmp_path / f"{name}.jsonl") for name in ("train", "test")}
    split_of = defaultdict(set)
    for name, rows in splits.items():
        for r in rows:
            split_of[Path(r["image"]).stem].add(name)
    assert sorted(split_of) == [str(s) for s in seeds] and all(len(v) == 1 for v in split_of.values())
    assert main_check_leakage([str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"),
                               "--near-threshold", "0"]) == 0


def test_a_list_of_one_image_groups_and_rebases_like_the_image_field_without_task(tmp_path, capsys):
    """`"images": ["a.png"]` (an accepted alias) names the same image as `"image": "a.png"`: split without
    --task keeps both rows of each image in one split, check-leakage sees it, paths are rewritten as lists."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    rows = []
    for k in range(20):
        natural_image(300 + k).save(tmp_path / "data" / "img" / f"{k}.png")
        rows += [{"images": [f"img/{k}.png"], "caption": "a"}, {"image": f"img/{k}.png", "caption": "b"}]
    write_lines(tmp_path / "data" / "all.jsonl", rows)
    out = tmp_path
    assert main_split([str(tmp_path / "data" / "all.jsonl"), "--out-dir", str(out), "--ratios", "0.5,0.5",
                       "--names", "train,test", "--seed", "0"]) == 0
    splits = {name: read(out / f"{name}.jsonl") for name in ("train", "test")}
    image_of = lambda r: r["image"] if "image" in r else r["images"][0]  # noqa: E731
    assert all(isinstance(r.get("images", []), list) for rows in splits.values() for r in rows)
    seen = {name: {image_of(r) for r in rows} for name, rows in splits.items()}
    assert seen["train"] and seen["test"] and not seen["train"] & seen["test"]
    assert all(p.startswith("data/img/") for names in seen.values() for p in names)  # rebased to out/
    assert sum(len(rows) for rows in splits.values()) == 40
    # A row of a train image moved into the test file is found by check-leakage.
    moved = next(r for r in splits["train"] if "images" in r)
    write_lines(out / "test.jsonl", [*splits["test"], moved])
    capsys.readouterr()
    assert main_check_leakage([str(out / "train.jsonl"), str(out / "test.jsonl")]) == 1
