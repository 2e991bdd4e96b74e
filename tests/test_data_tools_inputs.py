"""Inputs users give the data tools: Alpaca rows with an empty input, an image in an assistant turn, an
output path that is the input, a wrong image root, and dedup of near-duplicate chains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main as data_tools_main
from data_tools.clean import clean, missing_image_hint, validate
from data_tools.convert import convert
from data_tools.dedup import dedup_file
from data_tools.errors import DataError
from data_tools.hashes import Grouping
from data_tools.hashing import centre_groups, colours_match, colours_of, hamming, phash_of
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record
from data_tools.split import split_file
from tests.test_dedup import CAPTION_ROWS, make_images, natural_image, write_lines


def _red(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)


# --- 1. Alpaca rows: "input": "" says "no input" ---------------------------------------------------------

ALPACA = {"image": "a.jpg", "instruction": "What colour is the shape?", "input": "", "output": "Blue."}
ALPACA_TURNS = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": "Blue."}]


@pytest.mark.parametrize("empty", ["", "  \n\t"])
def test_alpaca_empty_input_is_no_input(empty):
    record = normalize_record({**ALPACA, "input": empty}, "instruct")
    assert record == {"image": "a.jpg", "conversations": ALPACA_TURNS}
    # As if it were left out, and a real input is still appended.
    assert normalize_record({k: v for k, v in ALPACA.items() if k != "input"}, "instruct") == record
    assert normalize_record({**ALPACA, "input": "A square."}, "instruct")["conversations"][0]["value"] == (
        "<image>\nWhat colour is the shape?\nA square.")


@pytest.mark.parametrize("bad", [3, ["x"], {"text": ""}])
def test_alpaca_input_that_is_not_a_string_stays_an_error(bad):
    with pytest.raises(DataError) as e:
        normalize_record({**ALPACA, "input": bad}, "instruct")
    assert (e.value.reason, e.value.field) == ("wrong_type", "input")


def test_alpaca_empty_input_passes_validate_and_convert(tmp_path, capsys):
    Image.new("RGB", (32, 32), (0, 0, 220)).save(tmp_path / "a.jpg")
    (tmp_path / "x.jsonl").write_text(json.dumps(ALPACA) + "\n", encoding="utf-8")
    assert data_tools_main(["validate", "--task", "instruct", str(tmp_path / "x.jsonl")]) == 0
    assert "all rows valid" in capsys.readouterr().out
    (tmp_path / "alpaca.json").write_text(json.dumps([ALPACA, {**ALPACA, "input": " "}]), encoding="utf-8")
    conv = convert("llava", [tmp_path / "alpaca.json"], tmp_path / "out.jsonl")
    assert conv.rejects == []
    assert read_jsonl(tmp_path / "out.jsonl") == [{"image": "a.jpg", "conversations": ALPACA_TURNS}] * 2


# --- 2. `<image>` only in user turns -----------------------------------------------------------------------

IMAGE_IN_REPLY_ROWS = [
    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                         {"from": "gpt", "value": "A red square."}]},
    {"image": "a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                         {"from": "gpt", "value": "<image>\nA red square."}]},
    {"image": "a.png", "conversations": [{"from": "system", "value": "Look: <image>"},
                                         {"from": "human", "value": "What is it?"},
                                         {"from": "gpt", "value": "A red square."}]},
    {"image": "a.png", "messages": [{"role": "user", "content": "What is it?"},
                                    {"role": "assistant", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "This."}]}]},
    {"image": "a.png", "instruction": "What is it?", "output": "It is <image>."},
]


def test_image_in_an_assistant_or_system_turn_is_a_counted_reject(tmp_path):
    _red(tmp_path / "a.png")
    write_lines(tmp_path / "in.jsonl", IMAGE_IN_REPLY_ROWS)
    report = clean(tmp_path / "in.jsonl", "instruct", tmp_path / "out.jsonl", tmp_path / "rejects.jsonl",
                   progress=False)
    assert (report.rows, report.kept, dict(report.rejected)) == (5, 1, {"bad_value": 4})
    assert [(r["line"], r["reason"], r["field"]) for r in read_jsonl(tmp_path / "rejects.jsonl")] == [
        (2, "bad_value", "conversations[1].value"),
        (3, "bad_value", "conversations[0].value"),
        (4, "bad_value", "messages[1].value"),
        (5, "bad_value", "output"),
    ]
    first = read_jsonl(tmp_path / "rejects.jsonl")[0]["message"]
    assert first == "has '<image>' in a 'gpt' turn; an image can only be placed in a user ('human') turn"
    assert [str(e) for e in validate(tmp_path / "in.jsonl", "instruct", progress=False)][0] == (
        f"{tmp_path / 'in.jsonl'}:2: field 'conversations[1].value': {first} [bad_value]")


def test_image_in_an_assistant_turn_is_skipped_by_skip_bad_rows(tmp_path):
    from recipes.common.data import load_records

    _red(tmp_path / "a.png")
    write_lines(tmp_path / "in.jsonl", IMAGE_IN_REPLY_ROWS)
    records = load_records(tmp_path / "in.jsonl", "instruct", skip_bad_rows=True,
                           rejects_path=tmp_path / "rejects.jsonl")
    assert records["line"] == [1] and "1 rows, 4 skipped" in records.info.description
    assert [r["field"] for r in read_jsonl(tmp_path / "rejects.jsonl")] == [
        "conversations[1].value", "conversations[0].value", "messages[1].value", "output"]


# --- 3. No writer replaces its own input --------------------------------------------------------------------


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """tmp_path/d/train.jsonl (CAPTION_ROWS, images in d/img); the working folder is tmp_path."""
    make_images(tmp_path / "d" / "img")
    write_lines(tmp_path / "d" / "train.jsonl", CAPTION_ROWS)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "d"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv", [
    ["split", "d/train.jsonl", "--out-dir", "d", "--seed", "0"],
    ["split", "d/train.jsonl", "--out-dir", "d/img/..", "--seed", "0", "--no-hash-cache"],
    ["clean", "--task", "caption", "d/train.jsonl", "--out", "d/train.jsonl", "--rejects", "d/r.jsonl"],
    ["clean", "--task", "caption", "d/train.jsonl", "--out", "d/c.jsonl", "--rejects", "./d/train.jsonl"],
    ["dedup", "--task", "caption", "d/train.jsonl", "--out", "d/link.jsonl"],  # a symlink to the input
    ["dedup", "--task", "caption", "d/train.jsonl", "--out", "d/o.jsonl", "--report", "d/hard.jsonl"],
    ["dedup", "--task", "caption", "d/train.jsonl", "--out", "d/o.jsonl", "--hash-cache", "d/train.jsonl"],
    ["convert", "--from", "image-text-json", "d/train.jsonl", "--out", "d/train.jsonl"],
    ["convert", "--from", "image-text-json", "d/train.jsonl", "--out", "d/o.jsonl", "--rejects",
     "d/hard.jsonl"],
    ["hash", "d/train.jsonl", "--out", "d/train.jsonl"],
    ["check-leakage", "d/train.jsonl", "d/c.jsonl", "--hash-cache", "d/c.jsonl"],
])
def test_a_writer_refuses_an_output_that_is_its_input_before_writing_anything(data, argv, capsys):
    (data / "link.jsonl").symlink_to("train.jsonl")
    os.link(data / "train.jsonl", data / "hard.jsonl")  # another name of the same file
    (data / "c.jsonl").write_text(json.dumps({"image": "img/c.png", "captions": ["A cat."]}) + "\n")
    before = _files(data)
    assert data_tools_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "(the same file)" in err
    assert "writing it would replace the input" in err
    assert _files(data) == before  # no output, no cache, no temp file; the input whole


def test_dedup_refuses_to_write_over_a_hash_file_it_reads(data, capsys):
    assert data_tools_main(["hash", "d/train.jsonl", "--out", "d/h.npz", "--no-hash-cache"]) == 0
    capsys.readouterr()
    before = _files(data)
    assert data_tools_main(["dedup", "--task", "caption", "d/train.jsonl", "--hashes", "d/*.npz",
                            "--out", "d/h.npz"]) == 2
    assert "the output is the input d/h.npz (the same file)" in capsys.readouterr().err
    assert _files(data) == before


def test_split_beside_its_input_still_works(data, capsys):
    """The refusal is for the same file only: IN in the output folder under another name is fine."""
    assert data_tools_main(["split", "d/train.jsonl", "--out-dir", "d", "--names", "a,b", "--ratios",
                            "0.5,0.5", "--seed", "0", "--no-hash-cache"]) == 0
    rows = read_jsonl(data / "a.jsonl") + read_jsonl(data / "b.jsonl")
    assert len(rows) == 9 and len(read_jsonl(data / "train.jsonl")) == 9


# --- 4. Most images missing: name the image root ------------------------------------------------------------


@pytest.mark.parametrize("n_missing,n_rows,hint", [
    (1, 1, True), (3, 3, True), (2, 3, True), (6, 10, True),  # all, or more than half and at least 2
    (0, 5, False), (1, 2, False), (1, 3, False), (5, 10, False),
])
def test_missing_image_hint_when_all_or_most_rows_miss_their_image(n_missing, n_rows, hint, tmp_path):
    reasons = ["missing_image"] * n_missing + ["empty_text"]
    text = missing_image_hint(reasons, n_rows, tmp_path / "train.jsonl", None, "--image-root")
    assert bool(text) == hint
    if hint:
        assert text == (f" {n_missing} of {n_rows} rows name an image file that does not exist. Image paths "
                        f"are resolved against the image root {tmp_path.resolve()} (by default the folder of "
                        "train.jsonl): if the images are in another folder, pass --image-root with the "
                        "folder they are relative to, instead of dropping the rows.")


@pytest.fixture
def apart(tmp_path, monkeypatch) -> Path:
    """tmp_path/images/{a,b,c}.png and tmp_path/data/train.jsonl naming them relative to images/."""
    for name in "abc":
        _red(tmp_path / "images" / f"{name}.png")
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "train.jsonl",
                [{"image": f"{name}.png", "captions": [f"Picture {name}."]} for name in "abc"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def validate_cli(*options: str) -> int:
    return data_tools_main(["validate", "--task", "caption", *options, "data/train.jsonl"])


def test_validate_and_clean_name_the_image_root_when_every_image_is_missing(apart, capsys):
    data_dir = (apart / "data").resolve()
    assert validate_cli() == 1
    err = capsys.readouterr().err
    assert (f"data/train.jsonl: 3 of 3 rows name an image file that does not exist. Image paths are resolved "
            f"against the image root {data_dir} (by default the folder of train.jsonl): if the images are in "
            "another folder, pass --image-root with the folder") in err
    assert data_tools_main(["clean", "--task", "caption", "data/train.jsonl", "--out", "data/c.jsonl",
                            "--rejects", "data/r.jsonl"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: data/train.jsonl: 3 of 3 rows") and f"image root {data_dir} " in err
    # Given the right root, nothing is missing and nothing is said.
    assert validate_cli("--image-root", "images") == 0
    assert "image root" not in capsys.readouterr().err


def test_validate_says_nothing_of_the_root_for_one_missing_image_in_three(apart, capsys):
    (apart / "images" / "b.png").unlink()
    assert validate_cli("--image-root", "images") == 1
    err = capsys.readouterr().err
    assert "missing_image" in err and "resolved against" not in err
    (apart / "images" / "c.png").unlink()  # 2 of 3: more than half
    assert validate_cli("--image-root", "images") == 1
    assert (f"2 of 3 rows name an image file that does not exist. Image paths are resolved against the image "
            f"root {(apart / 'images').resolve()}: if") in capsys.readouterr().err


def test_recipe_data_error_names_the_image_root_and_its_recipe_flag(apart):
    from recipes.common.data import BadRowsError, load_records

    with pytest.raises(BadRowsError) as e:
        load_records(apart / "data" / "train.jsonl", "caption")
    text = str(e.value)
    assert (f"3 of 3 rows name an image file that does not exist. Image paths are resolved against the image "
            f"root {(apart / 'data').resolve()} (by default the folder of train.jsonl): if the images are in "
            "another folder, pass --image_root with the folder they are relative to") in text
    with pytest.raises(DataError, match="has no valid rows. 3 of 3 rows name an image file") as e:
        load_records(apart / "data" / "train.jsonl", "caption", skip_bad_rows=True,
                     rejects_path=apart / "rejects.jsonl")
    assert "--image_root" in str(e.value)


# --- 5. dedup merges a row only into a kept image near it; split keeps chains together ----------------------


def test_centre_groups_do_not_chain():
    # 0~1~2~3~4, each 3 bits from the next: one connected component, but 0 and 2 are 6 bits apart.
    centre, distance = centre_groups(6, [0, 1, 2, 3], [1, 2, 3, 4], [3, 3, 3, 3])
    assert centre.tolist() == [0, 0, 2, 2, 4, 5] and distance.tolist() == [0, 3, 0, 3, 0, 0]
    # Pairs in any order and direction, a pair given twice: the smallest distance counts.
    centre, distance = centre_groups(5, [2, 1, 0, 1, 2], [0, 0, 3, 2, 1], [4, 3, 2, 1, 0])
    assert centre.tolist() == [0, 0, 0, 0, 4] and distance.tolist() == [0, 3, 4, 2, 0]
    assert centre_groups(0, [], [], [])[0].tolist() == []


def test_grouping_centres_keep_identical_images_together():
    # Images 1 and 2 have one content; 0~2 and 1~3 are near, 0 and 3 are not.
    g = Grouping(np.array([0, 1, 1, 3]), np.array([0, 0, 0, 0]), np.array([0, 1]), np.array([2, 3]),
                 np.array([3, 2], np.uint8))
    centre, distance = g.centres()
    assert centre.tolist() == [0, 0, 0, 3] and distance.tolist() == [0, 3, 3, 0]


N_FRAMES = 30


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> tuple[Path, list[Image.Image]]:
    """A window sliding 1 px at a time over a smooth image: each frame within 4 bits of the next, the ends
    over 30 bits apart. Rows: the frames in order, then a copy of frame 5 and frame 0 again."""
    folder = tmp_path_factory.mktemp("frames")
    (folder / "img").mkdir()
    base = natural_image(5, 256)
    images = [base.crop((k, 0, k + 128, 128)) for k in range(N_FRAMES)]
    rows = []
    for k, im in enumerate(images):
        im.save(folder / f"img/f{k}.png")
        rows.append({"image": f"img/f{k}.png", "captions": [f"Frame {k}."]})
    images[5].save(folder / "img/f5_copy.png")
    rows += [{"image": "img/f5_copy.png", "captions": ["Copy of frame 5."]},
             {"image": "img/f0.png", "captions": ["Frame 0 again."]}]
    write_lines(folder / "in.jsonl", rows)
    return folder, images


def _greedy_centres(images: list[Image.Image], threshold: int = 4) -> list[int]:
    """The reference: each frame not yet taken is kept and takes the later free frames near it."""
    h, c = [phash_of(im) for im in images], [colours_of(im) for im in images]
    centre: dict[int, int] = {}
    for k in range(len(images)):
        if k in centre:
            continue
        centre[k] = k
        for m in range(k + 1, len(images)):
            if m not in centre and hamming(h[k], h[m]) <= threshold and colours_match(c[k], c[m]):
                centre[m] = k
    return [centre[k] for k in range(len(images))]


def test_dedup_merges_a_frame_only_into_a_kept_frame_within_the_threshold(frames):
    folder, images = frames
    h = [phash_of(im) for im in images]
    assert all(hamming(a, b) <= 4 for a, b in zip(h, h[1:])) and hamming(h[0], h[-1]) > 20  # a chain
    centre = _greedy_centres(images)
    kept = sorted(set(centre))
    assert 2 < len(kept) < N_FRAMES
    n_in, n_out, report = dedup_file(folder / "in.jsonl", folder / "out.jsonl", "caption",
                                     report_path=folder / "report.jsonl", progress=False)
    assert (n_in, n_out) == (N_FRAMES + 2, len(kept))
    out = read_jsonl(folder / "out.jsonl")
    extra = [(5, "Copy of frame 5."), (0, "Frame 0 again.")]  # the last two rows join their frame's record
    assert out == [{"image": f"img/f{k}.png",
                    "captions": [f"Frame {m}." for m in range(N_FRAMES) if centre[m] == k]
                    + [text for m, text in extra if centre[m] == k]}
                   for k in kept]
    assert read_jsonl(folder / "report.jsonl") == report
    expected = [{"line": m + 1, "action": "merged", "reason": "near_duplicate_image",
                 "merged_into": centre[m] + 1, "image": f"img/f{m}.png",
                 "kept_image": f"img/f{centre[m]}.png",
                 "hamming": hamming(h[m], h[centre[m]]), "dropped_captions": []}
                for m in range(N_FRAMES) if centre[m] != m]
    # The identical copy of frame 5 goes where frame 5 went, at frame 5's distance; frame 0 again is its own.
    expected.append({"line": N_FRAMES + 1, "action": "merged",
                     "reason": "same_image" if centre[5] == 5 else "near_duplicate_image",
                     "merged_into": centre[5] + 1, "image": "img/f5_copy.png",
                     "kept_image": f"img/f{centre[5]}.png", "hamming": hamming(h[5], h[centre[5]]),
                     "dropped_captions": []})
    expected.append({"line": N_FRAMES + 2, "action": "merged", "reason": "same_image", "merged_into": 1,
                     "image": "img/f0.png", "kept_image": "img/f0.png", "hamming": 0, "dropped_captions": []})
    assert report == expected
    assert all(e["hamming"] <= 4 for e in report)


def test_split_keeps_a_chain_of_near_duplicates_together(frames):
    folder, _ = frames
    counts = split_file(folder / "in.jsonl", folder / "splits", [0.5, 0.5], seed=0, names=["a", "b"],
                        image_root=folder, progress=False)
    # One connected component: every frame in one split, though its ends are far apart.
    assert sorted(n for n, _ in counts.values()) == [0, N_FRAMES + 2]
