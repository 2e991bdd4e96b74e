"""A plain `[{"image_path": ..., "text": ...}]` JSON list is read as rows, with errors naming line and
index."""

import json

import pytest
from PIL import Image

from data_tools.clean import clean
from data_tools.errors import DataError
from data_tools.jsonl import iter_rows, read_jsonl
from eval.report import read_references
from recipes.common.captions import caption_eval_records
from recipes.common.data import BadRowsError, load_records


def _images(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)


def test_a_json_list_loads_like_jsonl_and_one_row_per_caption_merges(tmp_path):
    _images(tmp_path)
    path = tmp_path / "pairs.json"
    rows = [{"image_path": "a.png", "text": "a red square"}, {"image_path": "b.png", "text": "blue"},
            {"image_path": "a.png", "text": "red"}]
    path.write_text(json.dumps(rows, indent=2))
    assert [(line, item) for line, _, _, item in iter_rows(path)] == [(2, "[0]"), (6, "[1]"), (10, "[2]")]
    ds = load_records(path, "caption")
    assert ds["captions"] == [["a red square"], ["blue"], ["red"]]
    merged = caption_eval_records(ds)
    assert merged["image"] == merged["key"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert merged["captions"] == [["a red square", "red"], ["blue"]]
    assert (read_references(str(path), "caption")[str(tmp_path / "a.png")]["captions"]
            == ["a red square", "red"])


def test_bad_rows_of_a_list_name_file_line_and_index(tmp_path):
    _images(tmp_path)
    path = tmp_path / "pairs.json"
    rows = [{"image_path": "a.png", "text": "ok"}, {"image_path": "a.png"}, 5,
            {"image_path": "b.png", "text": ""}]
    path.write_text(json.dumps(rows))
    with pytest.raises(BadRowsError) as e:
        load_records(path, "caption")
    text = str(e.value)
    assert "3 invalid row(s)" in text and f"{path}:1: field '[1].captions': is missing" in text
    assert (f"{path}:1: field '[2]': a row must be a JSON object" in text
            and f"{path}:1: field '[3].text[0]': is empty" in text)
    ds = load_records(path, "caption", skip_bad_rows=True)
    assert ds["captions"] == [["ok"]]
    rejects = read_jsonl(f"{path}.rejects.jsonl")
    assert [(r["field"], r["reason"], r["raw"]) for r in rejects] == [
        ("[1].captions", "missing_field", '{"image_path": "a.png"}'), ("[2]", "not_an_object", "5"),
        ("[3].text[0]", "empty_text", '{"image_path": "b.png", "text": ""}')]
    report = clean(path, "caption", tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl")
    assert (report.kept, sum(report.rejected.values())) == (1, 3)
    assert read_jsonl(tmp_path / "clean.jsonl") == [{"image": "a.png", "captions": ["ok"]}]


@pytest.mark.parametrize("text, line, message", [
    ('[{"image_path": "a.png", "text": "x"},\n {"image_path": "a.png" "text": "y"}]', 2,
     "Expecting ',' delimiter"),
    ('[{"image_path": "a.png", "text": "x"} {"image_path": "a.png"}]', 1, "expected ',' or ']' after a row"),
    ('[{"image_path": "a.png", "text": "x"}]\n[]', 2, "extra data after the list"),
])
def test_a_broken_json_list_is_one_error_for_the_file(tmp_path, text, line, message):
    _images(tmp_path)
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(DataError,
                       match=rf"{path}:{line}: is not a valid JSON list of rows "
                             rf"\({message}.*\[malformed_json\]"):
        load_records(path, "caption", skip_bad_rows=True)


def test_empty_list_and_jsonl_are_unchanged(tmp_path):
    _images(tmp_path)
    (tmp_path / "empty.json").write_text(" \n[ ]\n")
    assert list(iter_rows(tmp_path / "empty.json")) == []
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "captions": ["x"]}\n\n'
                                         '{"image": "b.png", "caption": "y"}\n')
    assert [(line, item) for line, _, _, item in iter_rows(tmp_path / "rows.jsonl")] == [(1, None), (3, None)]
