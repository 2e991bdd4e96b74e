"""Instruct turns whose role or text part has the wrong type are counted rejects naming the field, in
validate, clean and convert --from llava, not a traceback."""

from __future__ import annotations

import json

import pytest

from data_tools.clean import main_clean, main_validate
from data_tools.convert import default_rejects_path
from data_tools.convert import main as main_convert
from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record

GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
BAD = [  # (row, field)
    ({"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "conversations[0].from"),
    ({"conversations": [{"from": {"a": 1}, "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "conversations[0].from"),
    ({"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                   {"role": "assistant", "content": "yo"}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": None}]},
                   {"role": "assistant", "content": "yo"}], "image": "a.jpg"}, "messages[0].content[1].text"),
]


@pytest.mark.parametrize("row,field", BAD, ids=[f for _, f in BAD])
def test_bad_turn_type_is_wrong_type_naming_the_field(row, field):
    with pytest.raises(DataError) as caught:
        normalize_record(row, "instruct")
    assert (caught.value.reason, caught.value.field) == ("wrong_type", field)


def test_validate_clean_and_convert_count_them(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [GOOD] + [r for r, _ in BAD]), encoding="utf-8")
    assert main_validate(["--task", "instruct", "--check-images", "none", str(rows)]) == 1
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "rows.jsonl:2: field 'conversations[0].from': expected a role string, got list [wrong_type]" in err
    assert "Traceback" not in err
    out, rejects = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl"
    assert main_clean(["--task", "instruct", "--check-images", "none", str(rows), "--out", str(out),
                       "--rejects", str(rejects)]) == 0
    assert len(read_jsonl(out)) == 1
    assert [(r["line"], r["reason"], r["field"]) for r in read_jsonl(rejects)] == [
        (k + 2, "wrong_type", field) for k, (_, field) in enumerate(BAD)]
    llava = tmp_path / "l.json"
    llava.write_text(json.dumps([GOOD] + [r for r, _ in BAD]), encoding="utf-8")
    converted = tmp_path / "l.jsonl"
    assert main_convert(["--from", "llava", str(llava), "--out", str(converted)]) == 0
    assert len(read_jsonl(converted)) == 1
    assert [(r["item"], r["reason"], r["field"]) for r in read_jsonl(default_rejects_path(converted))] == [
        (f"[{k + 1}]", "wrong_type", field) for k, (_, field) in enumerate(BAD)]
