"""Rows and files whose meaning is unclear: two fields saying different things, an empty file, a Karpathy
split value that is not one of the four. Each is an error or a counted reject, never a silent choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.__main__ import main as data_tools_main
from data_tools.convert import convert_records
from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]


def _images(folder: Path, *names: str) -> None:
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / name)


def _bad(record: dict, task: str) -> DataError:
    with pytest.raises(DataError) as e:
        normalize_record(record, task)
    return e.value


# --- two fields for one thing ----------------------------------------------------------------------------

@pytest.mark.parametrize("images", [["b.jpg"], ["a.jpg", "b.jpg"], "b.jpg"])
def test_instruct_row_with_image_and_other_images_is_refused(images):
    e = _bad({"image": "a.jpg", "images": images, "conversations": TURNS}, "instruct")
    assert (e.reason, e.field) == ("bad_value", "image")
    assert "'images'" in e.message and "b.jpg" in e.message


def test_instruct_row_with_image_and_the_same_images_passes():
    for images in (["a.jpg"], "a.jpg"):
        record = normalize_record({"image": "a.jpg", "images": images, "conversations": TURNS}, "instruct")
        assert record == {"image": "a.jpg", "conversations": TURNS}


@pytest.mark.parametrize("alias", ["image_path", "file_name", "filepath", "img"])
def test_two_image_fields_that_differ_are_refused(alias):
    e = _bad({"image": "a.jpg", alias: "b.jpg", "captions": ["x"]}, "caption")
    assert (e.reason, e.field) == ("bad_value", "image")
    assert f"'{alias}'" in e.message and "'a.jpg'" in e.message and "'b.jpg'" in e.message
    assert normalize_record({"image": "a.jpg", alias: "a.jpg", "captions": ["x"]}, "caption") == {
        "image": "a.jpg", "captions": ["x"]}


def test_an_image_field_that_is_null_does_not_hide_another():
    assert normalize_record({"image": None, "image_path": "a.jpg", "captions": ["x"]}, "caption") == {
        "image": "a.jpg", "captions": ["x"]}


@pytest.mark.parametrize("task", ["caption", "retrieval"])
@pytest.mark.parametrize("other", [{"caption": "two"}, {"text": "one"}, {"sentences": [{"raw": "three"}]}])
def test_two_caption_fields_that_differ_are_refused(task, other):
    e = _bad({"image": "a.jpg", "captions": ["one", "two"], **other}, task)
    assert (e.reason, e.field) == ("bad_value", "captions")
    assert f"'{next(iter(other))}'" in e.message


def test_two_caption_fields_that_agree_pass():
    row = {"image": "a.jpg", "captions": ["one"], "caption": "one", "sentences": [{"raw": "one"}]}
    assert normalize_record(row, "caption") == {"image": "a.jpg", "captions": ["one"]}


def test_conversations_and_messages_that_differ_are_refused():
    messages = [{"role": "user", "content": "<image>\nWhat is it?"},
                {"role": "assistant", "content": "A dot."}]
    e = _bad({"image": "a.jpg", "conversations": TURNS, "messages": messages}, "instruct")
    assert (e.reason, e.field) == ("bad_value", "conversations")
    assert "'messages'" in e.message
    same = [{"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A square."}]
    assert normalize_record({"image": "a.jpg", "conversations": TURNS, "messages": same}, "instruct") == {
        "image": "a.jpg", "conversations": TURNS}


def test_response_and_output_that_differ_are_refused():
    row = {"image": "a.jpg", "instruction": "What is it?", "response": "A square.", "output": "A dot."}
    e = _bad(row, "instruct")
    assert (e.reason, e.field) == ("bad_value", "response")
    assert "'output'" in e.message


def test_validate_names_the_line_and_both_fields(tmp_path, capsys):
    _images(tmp_path, "a.jpg", "b.jpg")
    rows = [{"image": "a.jpg", "images": ["a.jpg"], "conversations": TURNS},
            {"image": "a.jpg", "images": ["b.jpg"], "conversations": TURNS}]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert data_tools_main(["validate", "--task", "instruct", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: field 'image':" in err and "'images'" in err and f"{path}:1:" not in err


# --- a file with no rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_validate_and_clean_refuse_a_file_with_no_rows(tmp_path, capsys, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    assert data_tools_main(["validate", "--task", "caption", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and "no rows" in err[0]
    out = tmp_path / "out.jsonl"
    assert data_tools_main(["clean", "--task", "caption", str(path), "--out", str(out),
                            "--rejects", str(tmp_path / "rejects.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: " in err[0] and "no rows" in err[0]
    assert not out.exists()


def test_validate_of_several_files_names_the_empty_one(tmp_path, capsys):
    _images(tmp_path, "a.jpg")
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(json.dumps({"image": "a.jpg", "captions": ["x"]}) + "\n", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    assert data_tools_main(["validate", "--task", "caption", str(good), str(empty)]) == 2
    assert f"{empty}: " in capsys.readouterr().err


# --- Karpathy split values -------------------------------------------------------------------------------

def _karpathy(tmp_path: Path) -> Path:
    path = tmp_path / "dataset_coco.json"
    images = [{"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": f"caption {i}"}]}
              for i, split in enumerate(["train", "TRAIN", "restval", "dev", "test"])]
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


@pytest.mark.parametrize("split", [None, "all", "train,restval"])
def test_karpathy_unknown_split_values_are_rejects(tmp_path, split):
    conv = convert_records("karpathy", [_karpathy(tmp_path)], tmp_path, split=split)
    assert [(r["item"], r["reason"], r["field"]) for r in conv.rejects] == [
        ("images[1]", "bad_value", "split"), ("images[3]", "bad_value", "split")]
    assert "'TRAIN'" in conv.rejects[0]["message"] and "'dev'" in conv.rejects[1]["message"]
    kept = [r["image"] for r in conv.records]
    assert kept == (["0.jpg", "2.jpg"] if split == "train,restval" else ["0.jpg", "2.jpg", "4.jpg"])
    assert conv.skipped == (1 if split == "train,restval" else 0)


def test_karpathy_cli_counts_the_unknown_split_rejects(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert data_tools_main(["convert", "--from", "karpathy", str(_karpathy(tmp_path)), "--split", "train",
                            "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rejected 2" in printed and "skipped 2 images of other splits" in printed
    assert [r["image"] for r in read_jsonl(out)] == ["0.jpg"]
