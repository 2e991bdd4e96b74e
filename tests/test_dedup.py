"""Hashing, near-duplicate pairs and dedup: exact values on small image sets built in tmp folders."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from data_tools import dedup
from data_tools.dedup import dedup_file, normalize_text
from data_tools.hashing import (
    content_hash,
    hamming,
    hash_image,
    image_groups,
    near_pairs,
    phash,
    union_find_groups,
)


def natural_image(seed: int, size: int = 128) -> Image.Image:
    """A smooth random colour image: structured enough for a stable perceptual hash, different per seed."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size // 16, size // 16, 3)).cumsum(0).cumsum(1)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    return Image.fromarray(a.astype(np.uint8)).resize((size, size), Image.BICUBIC)


def shape_image(colour) -> Image.Image:
    im = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(im).ellipse([30, 30, 98, 98], fill=colour)
    return im


def make_images(folder: Path) -> None:
    """a.png and variants of it, b.png and variants, c.png, and two shapes that differ only in colour."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = natural_image(1), natural_image(2)
    a.save(folder / "a.png")
    a.save(folder / "a_copy.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved with metadata")
    b.save(folder / "b.png")
    b.save(folder / "b_meta.png", pnginfo=info, compress_level=1)
    buffer = io.BytesIO()
    a.save(buffer, "JPEG", quality=85)
    (folder / "a_near.jpg").write_bytes(buffer.getvalue())
    dotted = a.copy()
    for k in range(5):
        dotted.putpixel((10 + 7 * k, 20 + 3 * k), (255, 255, 255))
    dotted.save(folder / "a_dots.png")
    a.resize((120, 120), Image.BICUBIC).save(folder / "a_small.png")
    natural_image(3).save(folder / "c.png")
    shape_image((220, 30, 30)).save(folder / "red.png")
    shape_image((30, 30, 220)).save(folder / "blue.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    make_images(folder / "img")
    return folder


def write_lines(path: Path, rows: list) -> None:
    """Rows as JSONL; None writes a blank line (skipped, but it still counts as a line number)."""
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- hashing ---------------------------------------------------------------------------------------


def test_content_hash_ignores_file_name_and_metadata(images):
    img = images / "img"
    assert content_hash(img / "a.png") == content_hash(img / "a_copy.png")
    assert content_hash(img / "b.png") == content_hash(img / "b_meta.png")
    assert (img / "b.png").read_bytes() != (img / "b_meta.png").read_bytes()
    assert content_hash(img / "a.png") != content_hash(img / "a_near.jpg")
    assert content_hash(img / "a.png") != content_hash(img / "b.png")


def test_phash_near_and_far(images):
    img = images / "img"
    a = phash(img / "a.png")
    assert 0 <= a < 2**64
    for near in ("a_near.jpg", "a_dots.png", "a_small.png"):
        assert hamming(a, phash(img / near)) <= 4, near
    for far in ("b.png", "c.png"):
        assert hamming(a, phash(img / far)) > 10, far


def test_grey_hash_twins_of_different_colours_are_not_grouped(images):
    red, blue = hash_image(images / "img/red.png"), hash_image(images / "img/blue.png")
    assert hamming(red.phash, blue.phash) <= 4  # the grey-level hash alone cannot tell them apart
    groups, near = image_groups([red, blue], 4)
    assert groups == [0, 1] and near == []


def test_unloadable_image_says_clean_first(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(dedup.DataError, match="run python -m data_tools clean first"):
        content_hash(tmp_path / "bad.png")


@pytest.mark.parametrize("threshold,chunk", [(0, None), (3, 7), (6, 64)])
def test_near_pairs_matches_brute_force(threshold, chunk):
    rng = random.Random(threshold)
    # Clusters of hashes a few bit flips apart, so that there are pairs to find at every distance.
    hashes = []
    for _ in range(60):
        base = rng.getrandbits(64)
        for _ in range(rng.randint(1, 5)):
            h = base
            for bit in rng.sample(range(64), rng.randint(0, 5)):
                h ^= 1 << bit
            hashes.append(h)
    expected = {
        (i, j, bin(hashes[i] ^ hashes[j]).count("1"))
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= threshold
    }
    i, j, d = near_pairs(hashes, threshold, chunk=chunk)
    found = set(zip(i.tolist(), j.tolist(), d.tolist()))
    assert found == expected and len(found) == len(i)
    assert expected  # the test means something


def test_near_pairs_empty_and_union_find():
    i, j, d = near_pairs([], 4)
    assert len(i) == len(j) == len(d) == 0
    assert union_find_groups(6, [(4, 1), (1, 3), (5, 2)]) == [0, 1, 2, 1, 1, 2]


# --- dedup ----------------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  A  Dog,\tON grass. ") == "a dog, on grass"
    assert normalize_text("...Hello!?") == "hello"


CAPTION_ROWS = [
    {"image": "img/a.png", "captions": ["A dog on grass."]},  # line 1
    {"image": "img/b.png", "caption": "A red car."},  # line 2 (alias, normalised on read)
    None,  # line 3: blank
    {"image": "img/a_copy.png", "captions": ["a dog  on grass", "A brown dog."]},  # line 4
    {"image": "img/a.png", "captions": ["A dog on grass."]},  # line 5
    {"image": "img/a_near.jpg", "captions": ["Dog lying outside.", "A brown dog"]},  # line 6
    {"image": "img/c.png", "captions": ["A cat."]},  # line 7
    {"image": "img/b_meta.png", "captions": ["a red car!"]},  # line 8
    {"image": "img/red.png", "captions": ["A red circle."]},  # line 9
    {"image": "img/blue.png", "captions": ["A blue circle."]},  # line 10
]


def test_caption_dedup_merges_and_reports(images):
    write_lines(images / "in.jsonl", CAPTION_ROWS)
    n_in, n_out, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "caption",
                                     report_path=images / "report.jsonl", progress=False)
    assert (n_in, n_out) == (9, 5)
    assert read(images / "out.jsonl") == [
        {"image": "img/a.png", "captions": ["A dog on grass.", "A brown dog.", "Dog lying outside."]},
        {"image": "img/b.png", "captions": ["A red car."]},
        {"image": "img/c.png", "captions": ["A cat."]},
        {"image": "img/red.png", "captions": ["A red circle."]},
        {"image": "img/blue.png", "captions": ["A blue circle."]},
    ]
    assert read(images / "report.jsonl") == report
    near_hamming = report[2]["hamming"]
    assert near_hamming <= 4  # a different file content, whatever the distance
    assert report == [
        {"line": 4, "action": "merged", "reason": "same_image", "merged_into": 1, "image": "img/a_copy.png",
         "kept_image": "img/a.png", "hamming": 0, "dropped_captions": ["a dog  on grass"]},
        {"line": 5, "action": "dropped", "reason": "exact_duplicate", "merged_into": 1, "image": "img/a.png",
         "kept_image": "img/a.png", "hamming": 0, "dropped_captions": ["A dog on grass."]},
        {"line": 6, "action": "merged", "reason": "near_duplicate_image", "merged_into": 1,
         "image": "img/a_near.jpg", "kept_image": "img/a.png", "hamming": near_hamming,
         "dropped_captions": ["A brown dog"]},
        {"line": 8, "action": "dropped", "reason": "exact_duplicate", "merged_into": 2,
         "image": "img/b_meta.png", "kept_image": "img/b.png", "hamming": 0,
         "dropped_captions": ["a red car!"]},
    ]


def test_every_input_caption_survives_or_is_reported(images):
    write_lines(images / "in.jsonl", CAPTION_ROWS)
    _, _, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "caption", progress=False)
    out_captions = [c for r in read(images / "out.jsonl") for c in r["captions"]]
    reported = [c for e in report for c in e.get("dropped_captions", [])]
    in_captions = [c for r in CAPTION_ROWS if r for c in r.get("captions", [r.get("caption")])]
    for caption in in_captions:
        assert caption in out_captions or caption in reported, caption
    for caption in reported:  # a caption is only left out when its normalised text is in the output
        assert normalize_text(caption) in {normalize_text(c) for c in out_captions}
    assert len(out_captions) + len(reported) == len(in_captions)


def test_no_near_merges_identical_images_only(images):
    write_lines(images / "in.jsonl", CAPTION_ROWS)
    _, n_out, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "caption", near_threshold=None,
                                  progress=False)
    assert n_out == 6
    assert [(e["line"], e["reason"]) for e in report] == [(4, "same_image"), (5, "exact_duplicate"),
                                                          (8, "exact_duplicate")]


def test_retrieval_merges_negatives_without_contradiction(images):
    rows = [
        {"image": "img/a.png", "captions": ["A dog."], "neg_captions": ["A cat."]},
        {"image": "img/a_copy.png", "captions": ["A brown dog."],
         "neg_captions": ["a cat", "A brown dog", "A car."]},
    ]
    write_lines(images / "in.jsonl", rows)
    _, _, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "retrieval", progress=False)
    assert read(images / "out.jsonl") == [{"image": "img/a.png", "captions": ["A dog.", "A brown dog."],
                                           "neg_captions": ["A cat.", "A car."]}]
    assert report[0]["dropped_neg_captions"] == ["a cat", "A brown dog"]


def test_vqa_drops_exact_duplicates_and_keeps_near_image_rows(images):
    rows = [
        {"image": "img/a.png", "question_id": 1, "question": "What animal?",
         "answers": ["dog", "dog", "puppy"]},
        {"image": "img/a.png", "question_id": 2, "question": "what  animal",
         "answers": ["puppy", "Dog", "dog."]},
        {"image": "img/a.png", "question_id": 3, "question": "What colour?", "answers": ["brown"]},
        {"image": "img/a_small.png", "question_id": 4, "question": "What animal?", "answers": ["dog"]},
        {"image": "img/b.png", "question_id": 5, "question": "What animal?",
         "answers": ["dog", "dog", "puppy"]},
    ]
    write_lines(images / "in.jsonl", rows)
    _, n_out, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "vqa", progress=False)
    assert [r["question_id"] for r in read(images / "out.jsonl")] == [1, 3, 4, 5]
    assert [(e["line"], e["action"], e["reason"]) for e in report] == [
        (2, "dropped", "exact_duplicate"),
        (4, "kept", "near_duplicate_image"),
    ]
    assert report[0]["merged_into"] == 1 and report[1]["grouped_with"] == 1
    assert 0 < report[1]["hamming"] <= 4


def test_instruct_drops_exact_duplicates_with_and_without_image(images):
    def conv(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    rows = [
        {"image": "img/a.png", "conversations": conv("<image>\nDescribe.", "A dog.")},
        {"image": "img/a_copy.png", "conversations": conv("<image>\ndescribe", "a dog")},
        {"image": "img/a.png", "conversations": conv("<image>\nDescribe.", "A brown dog.")},
        {"conversations": conv("Hi.", "Hello.")},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversations": conv("Hi.", "Hello there.")},
    ]
    write_lines(images / "in.jsonl", rows)
    _, n_out, report = dedup_file(images / "in.jsonl", images / "out.jsonl", "instruct", progress=False)
    assert n_out == 4
    assert [(e["line"], e["reason"], e["merged_into"]) for e in report] == [(2, "exact_duplicate", 1),
                                                                            (5, "exact_duplicate", 4)]


def test_cli_summary_and_rebased_paths(images, capsys):
    write_lines(images / "in.jsonl", CAPTION_ROWS)
    code = dedup.main(["--task", "caption", str(images / "in.jsonl"), "--out", str(images / "out.jsonl"),
                       "--report", str(images / "r.jsonl")])
    assert code == 0
    out = capsys.readouterr().out
    assert "9 rows in, 5 rows out" in out
    assert ("dropped (exact_duplicate): 2" in out and "merged (near_duplicate_image): 1" in out
            and "merged (same_image): 1" in out)
    assert len(read(images / "r.jsonl")) == 4
    # An output folder that contains the images gets paths relative to it; one that does not is refused.
    (images / "img" / "sub").mkdir(exist_ok=True)
    assert dedup.main(["--task", "caption", str(images / "in.jsonl"),
                       "--out", str(images / "img/sub/out.jsonl")]) == 2
    assert "outside the output folder" in capsys.readouterr().err


def test_cli_refuses_one_file_for_output_and_report_and_a_folder_before_any_work(images, capsys):
    write_lines(images / "in.jsonl", CAPTION_ROWS)
    same = str(images / "same.jsonl")
    assert dedup.main(["--task", "caption", str(images / "in.jsonl"), "--out", same, "--report", same]) == 2
    assert "the output and the report name the same file" in capsys.readouterr().err
    assert not (images / "same.jsonl").exists()
    assert dedup.main(["--task", "caption", str(images / "in.jsonl"), "--out", str(images / "o.jsonl"),
                       "--report", str(images / "img")]) == 2
    assert "the report is a folder" in capsys.readouterr().err and not (images / "o.jsonl").exists()


def test_cli_bad_image_fails_naming_line(images, capsys):
    write_lines(images / "in.jsonl",
                [{"image": "img/a.png", "caption": "x"}, {"image": "img/missing.png", "caption": "y"}])
    assert dedup.main(["--task", "caption", str(images / "in.jsonl"),
                       "--out", str(images / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "clean first" in err and "in.jsonl:2" in err
