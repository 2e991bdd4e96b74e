"""convert: each input format on small files made here, exact output records, rejects with reasons."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.convert import convert, convert_records, default_rejects_path, main
from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _rejects(out: Path) -> list[tuple[str, str, str | None]]:
    return [(r["item"], r["reason"], r["field"]) for r in read_jsonl(default_rejects_path(out))]


def _all_valid(rows, task):
    for row in rows:
        assert normalize_record(row, task) == row


def test_coco_captions(tmp_path):
    ann = _write(tmp_path / "coco/annotations/captions_val2014.json", {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
            {"id": 3},  # no file_name
            {"id": 4, "file_name": "no_captions.jpg"},
            {"id": 1, "file_name": "dup.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A man riding a wave  on top of a surfboard.\n"},
            {"image_id": 2, "id": 11, "caption": "Un café près de la fenêtre."},
            {"image_id": 1, "id": 12, "caption": "A surfer on a big wave."},
            {"image_id": 2, "id": 13},  # no caption
            {"image_id": 9, "id": 14, "caption": "unknown image"},
            {"image_id": 1, "id": 15, "caption": "   "},
        ],
    })  # fmt: skip
    out = tmp_path / "data/coco/val.jsonl"
    assert main(["--from", "coco-captions", str(ann), "--image-root", str(tmp_path / "coco/val2014"),
                 "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert rows == [
        {
            "image": "COCO_val2014_000000000001.jpg",  # relative to the image root, as readers take it
            "captions": ["A man riding a wave on top of a surfboard.", "A surfer on a big wave."],
            "image_id": 1,
        },
        {"image": "COCO_val2014_000000000002.jpg", "captions": ["Un café près de la fenêtre."],
         "image_id": 2},
    ]
    assert _rejects(out) == [
        ("images[2]", "missing_field", "file_name"),
        ("images[4]", "bad_value", "id"),
        ("annotations[3]", "missing_field", "caption"),
        ("annotations[4]", "bad_value", "image_id"),
        ("annotations[5]", "empty_text", "caption"),
        ("images[3]", "missing_field", "captions"),
    ]
    first = read_jsonl(default_rejects_path(out))[0]
    assert first["file"] == str(ann) and first["row"] == {"id": 3}


def test_image_root_and_default_write_the_names_relative_to_the_root(tmp_path):
    ann = _write(tmp_path / "ann.json", {
        "images": [{"id": 7, "file_name": "a/./b.jpg"}, {"id": 8, "file_name": "../up.jpg"},
                   {"id": 9, "file_name": "/abs.jpg"}],
        "annotations": [{"image_id": i, "caption": "x"} for i in (7, 8, 9)]})
    conv = convert("coco-captions", [ann], tmp_path / "out/train.jsonl", image_root=tmp_path / "out/images")
    assert [r["image"] for r in conv.records] == ["a/b.jpg"]
    conv = convert("coco-captions", [ann], tmp_path / "out/train.jsonl")  # default: names unchanged
    assert [r["image"] for r in conv.records] == ["a/b.jpg"]
    assert [(r["item"], r["reason"]) for r in read_jsonl(tmp_path / "out/train.rejects.jsonl")] == [
        ("images[1]", "path_outside_root"), ("images[2]", "path_outside_root"),
        ("annotations[1]", "bad_value"), ("annotations[2]", "bad_value")]


def _vqa_inputs(tmp_path):
    questions = _write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
            {"image_id": 42, "question": "How many people?", "question_id": 42001},
            {"image_id": 43, "question_id": 43000},  # no question text
            {"image_id": 44, "question": "Is it raining?", "question_id": 44000},  # no annotation
            {"image_id": 45, "question": "何色ですか？", "question_id": 45000},
            {"image_id": 42, "question": "Again?", "question_id": 42000},  # duplicate
        ],
    })  # fmt: skip
    ten = lambda *a: [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]
    annotations = _write(tmp_path / "v2_mscoco_val2014_annotations.json", {
        "annotations": [
            {"question_id": 42000, "image_id": 42, "answers": ten(*["red"] * 8, "dark red", "orange"),
             "answer_type": "other",
             "question_type": "what color is the", "multiple_choice_answer": "red"},
            {"question_id": 42001, "image_id": 42, "answers": ten(*["2"] * 9, "two"), "answer_type": "number",
             "question_type": "how many", "multiple_choice_answer": "2"},
            {"question_id": 43000, "image_id": 43, "answers": ten(*["yes"] * 10), "answer_type": "yes/no",
             "question_type": "is the"},
            {"question_id": 45000, "image_id": 45, "answers": ten(*["赤"] * 10), "answer_type": "other",
             "question_type": "what color"},
            {"question_id": 99000, "image_id": 99, "answers": ten("no"), "answer_type": "yes/no",
             "question_type": "is"},  # no question
            {"question_id": 42001, "image_id": 42, "answers": ten("3")},  # duplicate
        ],
    })  # fmt: skip
    return questions, annotations


def test_vqav2(tmp_path):
    questions, annotations = _vqa_inputs(tmp_path)
    out = tmp_path / "vqa/val.jsonl"
    # Annotations first: the two files are told apart by content, not order.
    assert (
        main(
            [
                "--from",
                "vqav2",
                str(annotations),
                str(questions),
                "--image-root",
                str(tmp_path / "vqa/val2014"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    assert rows == [
        {"image": "COCO_val2014_000000000042.jpg", "question_id": 42000, "question": "What color is the bus?",
         "answers": ["red"] * 8 + ["dark red", "orange"], "answer_type": "other",
         "question_type": "what color is the",
         "multiple_choice_answer": "red", "image_id": 42},
        {"image": "COCO_val2014_000000000042.jpg", "question_id": 42001, "question": "How many people?",
         "answers": ["2"] * 9 + ["two"], "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "image_id": 42},
        {"image": "COCO_val2014_000000000045.jpg", "question_id": 45000, "question": "何色ですか？",
         "answers": ["赤"] * 10, "answer_type": "other", "question_type": "what color", "image_id": 45},
    ]  # fmt: skip
    _all_valid(rows, "vqa")
    assert _rejects(out) == [
        ("annotations[5]", "bad_value", "question_id"),
        ("questions[2]", "missing_field", "question"),
        ("questions[3]", "missing_field", "question_id"),
        ("questions[5]", "bad_value", "question_id"),
        ("annotations[4]", "missing_field", "question_id"),
    ]


def test_vqav2_pattern_and_split(tmp_path):
    questions, annotations = _vqa_inputs(tmp_path)
    conv = convert_records(
        "vqav2", [questions, annotations], tmp_path, split="train",
        image_pattern="{split}2017/{image_id:012d}.jpg"
    )
    assert conv.records[0]["image"] == "train2017/000000000042.jpg"
    with pytest.raises(DataError, match="image-pattern"):
        convert_records("vqav2", [questions, annotations], tmp_path, image_pattern="{nope}.jpg")
    with pytest.raises(DataError, match="annotations") as error:  # a test split: questions only
        convert_records("vqav2", [questions], tmp_path)
    assert str(error.value).startswith(f"{questions}: vqav2 needs a questions file and an annotations file")


def test_llava(tmp_path):
    src = _write(tmp_path / "llava/llava_instruct.json", [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "写一首关于秋天的短诗。"},
                                           {"from": "gpt", "value": "秋风起，落叶黄。"}]},
        {"id": "bad-role", "image": "1.jpg", "conversations": [{"from": "bot", "value": "<image>\nhi"},
                                                               {"from": "gpt", "value": "x"}]},
        {"id": "no-conv", "image": "2.jpg"},
        {"id": "multi", "image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>"},
                                                                       {"from": "gpt", "value": "x"}]},
        "not an object",
        {"id": "3-for-2", "images": ["a.jpg", "b.jpg"],
         "conversations": [{"from": "human", "value": "<image>" * 3}, {"from": "gpt", "value": "x"}]},
    ])  # fmt: skip
    out = tmp_path / "data/llava.jsonl"
    assert main(["--from", "llava", str(src), "--image-root", str(tmp_path / "data/coco/train2017"),
                 "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert rows == [
        {
            "id": "000000033471",
            "image": "000000033471.jpg",
            "conversations": json.loads(src.read_text())[0]["conversations"],
        },
        {
            "id": "text-1",
            "conversations": [{"from": "human", "value": "写一首关于秋天的短诗。"},
                              {"from": "gpt", "value": "秋风起，落叶黄。"}],
        },
        # several images: the `<image>` in the turns places the first, the second leads the first user turn
        {"id": "multi", "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": "x"}],
         "images": ["a.jpg", "b.jpg"]},
    ]
    _all_valid(rows, "instruct")
    assert _rejects(out) == [
        ("[2]", "bad_value", "conversations[0].from"),
        ("[3]", "missing_field", "conversations"),
        ("[5]", "not_an_object", None),
        ("[6]", "bad_value", "conversations"),
    ]


def test_llava_jsonl_input_with_bad_line(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(
        '{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n'
        '{broken\n',
        encoding="utf-8",
    )
    conv = convert("llava", [src], tmp_path / "out.jsonl")
    assert [r["id"] for r in conv.records] == [1]
    assert [(r["item"], r["reason"]) for r in conv.rejects] == [("line 2", "malformed_json")]


def _karpathy(tmp_path):
    return _write(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test",
         "cocoid": 391895,
         "sentences": [{"raw": "A man with a red helmet on a small moped on a dirt road. ", "tokens": ["a"],
                        "imgid": 0, "sentid": 0},
                       {"raw": "Man riding a motor bike on a dirt road on the countryside.", "imgid": 0,
                        "sentid": 1}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000318556.jpg", "imgid": 1, "split": "train",
         "cocoid": 318556,
         "sentences": [{"raw": "A very clean and well decorated empty bathroom"}, {"tokens": ["no", "raw"]}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "imgid": 2, "split": "restval",
         "cocoid": 2,
         "sentences": [{"raw": "A cat."}]},
        {"filename": "1000092795.jpg", "imgid": 3, "split": "train",
         "sentences": [{"raw": "Two young guys with shaggy hair."}]},
        {"filepath": "val2014", "filename": "x.jpg", "imgid": 4, "split": "train", "sentences": []},
        {"filename": "y.jpg", "imgid": 5, "sentences": [{"raw": "no split"}]},
    ]})  # fmt: skip


def test_karpathy_split_filter(tmp_path):
    src = _karpathy(tmp_path)
    out = tmp_path / "coco/train.jsonl"
    assert (
        main(
            [
                "--from",
                "karpathy",
                str(src),
                "--split",
                "train,restval",
                "--image-root",
                str(tmp_path / "coco"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_jsonl(out) == [
        {
            "image": "train2014/COCO_train2014_000000318556.jpg",
            "captions": ["A very clean and well decorated empty bathroom"],
            "split": "train",
            "image_id": 318556,
        },
        {"image": "val2014/COCO_val2014_000000000002.jpg", "captions": ["A cat."], "split": "restval",
         "image_id": 2},
        {"image": "1000092795.jpg", "captions": ["Two young guys with shaggy hair."], "split": "train",
         "image_id": 3},
    ]
    assert _rejects(out) == [
        ("images[1].sentences[1]", "missing_field", "raw"),
        ("images[4]", "missing_field", "sentences"),
        ("images[5]", "missing_field", "split"),
    ]


def test_karpathy_all_splits(tmp_path):
    conv = convert_records("karpathy", [_karpathy(tmp_path)], tmp_path)
    assert [r["split"] for r in conv.records] == ["test", "train", "restval", "train"]
    assert conv.records[0]["captions"] == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
    ]
    assert conv.skipped == 0 and len(conv.rejects) == 3


def test_image_text_json_merges_rows(tmp_path):
    src = _write(tmp_path / "pairs.json", [
        {"image_path": "imgs/a.jpg", "text": "a dog"},
        {"image_path": "imgs/b.jpg", "text": "一只猫"},
        {"image_path": "./imgs/a.jpg", "text": "a brown dog on grass"},  # the same image, spelled differently
        {"image_path": "imgs/c.jpg"},
        {"text": "no image"},
        {"image": "imgs/c.jpg", "captions": ["one", "two"]},
        {"image_path": "imgs/d.jpg", "text": ""},
        {"image_path": 5, "text": "number"},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    assert main(["--from", "image-text-json", str(src), "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert rows == [
        {"image": "imgs/a.jpg", "captions": ["a dog", "a brown dog on grass"]},
        {"image": "imgs/b.jpg", "captions": ["一只猫"]},
        {"image": "imgs/c.jpg", "captions": ["one", "two"]},
    ]
    assert _rejects(out) == [
        ("[3]", "missing_field", "text"),
        ("[4]", "missing_field", "image_path"),
        ("[6]", "empty_text", "text"),
        ("[7]", "wrong_type", "image_path"),
    ]


def test_fatal_input_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert main(["--from", "coco-captions", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.json" in capsys.readouterr().err
    wrong = _write(tmp_path / "list.json", [{"image_path": "a.jpg", "text": "x"}])
    assert main(["--from", "coco-captions", str(wrong), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "'images'" in capsys.readouterr().err
    all_bad = _write(tmp_path / "all_bad.json", [{"text": "x"}])
    assert main(["--from", "image-text-json", str(all_bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    with pytest.raises(SystemExit):
        main(["--from", "llava", str(all_bad), "--split", "train", "--out", str(tmp_path / "o.jsonl")])


def test_cli_summary(tmp_path):
    ann = _write(
        tmp_path / "ann.json",
        {"images": [{"id": 1, "file_name": "a.jpg"}],
         "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1}]},
    )
    out = tmp_path / "sub/out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "convert", "--from", "coco-captions", str(ann),
         "--image-root", str(tmp_path), "--out", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ("converted 1 caption records" in proc.stdout and "missing_field" in proc.stdout
            and "annotations[1]" in proc.stdout)
    assert f"give readers of {out} --image-root {tmp_path}" in proc.stdout
    assert read_jsonl(out) == [{"image": "a.jpg", "captions": ["x"], "image_id": 1}]
