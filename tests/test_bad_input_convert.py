"""convert on the formats users bring and on bad input: one-line errors or counted rejects, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.clean import validate
from data_tools.convert import convert, default_rejects_path
from data_tools.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "data_tools", "convert", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _one_line_error(r, *needles):
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def test_coco_layout_end_to_end_with_an_image_root(tmp_path):
    from PIL import Image

    (tmp_path / "coco/train2017").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "coco/train2017/000000000009.jpg")
    ann = _write(
        tmp_path / "coco/annotations/captions_train2017.json",
        {
            "images": [{"id": 9, "file_name": "000000000009.jpg"}],
            "annotations": [{"image_id": 9, "caption": "x"}],
        },
    )
    out = tmp_path / "data/coco/train.jsonl"
    r = _cli("--from", "coco-captions", ann, "--image-root", tmp_path / "coco/train2017", "--out", out)
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out)[0]["image"] == "000000000009.jpg"
    assert validate(out, "caption", image_root=tmp_path / "coco/train2017", progress=False) == []


def test_llama_factory_messages_images_and_several_images(tmp_path):
    src = _write(
        tmp_path / "mllm.json",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>Who are they?"},
                    {"role": "assistant", "content": "Two players."},
                ],
                "images": ["mllm_demo_data/1.jpg"],
            },
            {
                "messages": [
                    {"role": "user", "content": "<image><image>Same?"},
                    {"role": "assistant", "content": "No."},
                ],
                "images": ["a.jpg", "b.jpg"],
            },
            {
                "conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
                "images": ["c.jpg"],
            },
        ],
    )
    out = tmp_path / "out/instruct.jsonl"
    conv = convert("llava", [src], out)
    assert [r.get("image", r.get("images")) for r in conv.records] == [
        "mllm_demo_data/1.jpg", ["a.jpg", "b.jpg"], "c.jpg"]  # several images: kept as a list, in order
    assert conv.records[0]["conversations"][0] == {"from": "human", "value": "<image>Who are they?"}
    assert not default_rejects_path(out).exists() or read_jsonl(default_rejects_path(out)) == []


def test_a_bad_row_of_a_json_list_is_rejected_alone(tmp_path):
    src = _write(
        tmp_path / "l.json",
        '[{"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, '
        '{"from": "gpt", "value": "a"}]},\n {"image": "b.jpg", "image": "c.jpg"},\n'
        ' {"image": "a\\u0000.jpg", "conversations": []},\n'
        ' {"conversations": [{"from": "human", "value": "\\ud800"}]}]',
    )
    conv = convert("llava", [src], tmp_path / "o.jsonl")
    assert len(conv.records) == 1
    assert [(r["item"], r["reason"]) for r in conv.rejects] == [
        ("[1]", "duplicate_key"),
        ("[2]", "bad_value"),
        ("[3]", "not_utf8"),
    ]
    assert read_jsonl(tmp_path / "o.rejects.jsonl")[2]["row"]  # written, even with the surrogate


@pytest.mark.parametrize("fmt", ["coco-captions", "llava", "image-text-json"])
def test_unreadable_inputs_are_one_line_errors(tmp_path, fmt):
    (tmp_path / "dir.json").mkdir()
    bad = {
        "missing": tmp_path / "missing.json",
        "folder": tmp_path / "dir.json",
        "malformed": _write(tmp_path / "bad.json", '[{"image": "a.jpg", "text": "x"},\n {"image": '),
        "deep": _write(tmp_path / "deep.json", "[" * 100_000),
        "not utf-8": tmp_path / "latin1.json",
    }
    (tmp_path / "latin1.json").write_bytes(b'[{"image": "caf\xe9.jpg", "text": "x"}]')
    for what, path in bad.items():
        r = _cli("--from", fmt, path, "--out", tmp_path / "o.jsonl")
        _one_line_error(r, path)
        assert not (tmp_path / "o.jsonl").exists(), what


def test_outputs_that_collide_or_are_folders(tmp_path):
    src = _write(tmp_path / "p.json", [{"image": "a.jpg", "text": "x"}])
    r = _cli(
        "--from", "image-text-json", src, "--out", tmp_path / "o.jsonl", "--rejects", tmp_path / "o.jsonl"
    )
    _one_line_error(r, "--out", "--rejects")
    (tmp_path / "folder").mkdir()
    r = _cli("--from", "image-text-json", src, "--out", tmp_path / "folder")
    _one_line_error(r, "folder")


def test_malformed_official_vqa_answers_are_rejected_with_the_reason(tmp_path):
    questions = _write(
        tmp_path / "q.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 1, "question": "a?", "question_id": 10},
                {"image_id": 1, "question": "b?", "question_id": 11},
                {"image_id": 1, "question": "c?", "question_id": 12},
            ],
        },
    )
    annotations = _write(
        tmp_path / "a.json",
        {
            "annotations": [
                {"question_id": 10, "image_id": 1, "answers": ["yes", "no"]},
                {"question_id": 11, "image_id": 1, "answers": [{"answer_id": 1}]},
                {"question_id": 12, "image_id": 1, "answers": [{"answer": "yes"}]},
            ]
        },
    )
    conv = convert("vqav2", [questions, annotations], tmp_path / "o.jsonl")
    assert [r["question_id"] for r in conv.records] == [12]
    assert [(r["item"], r["reason"], r["field"]) for r in conv.rejects] == [
        ("questions[0]", "wrong_type", "answers[0]"),
        ("questions[1]", "wrong_type", "answers[0]"),
    ]
    assert "official VQA format" in conv.rejects[0]["message"]
