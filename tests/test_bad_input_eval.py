"""`python -m eval` on bad input: a one-line error naming the file (and line), no traceback or wrong score."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.caption import caption_metrics, normalize_lang

REPO = Path(__file__).resolve().parents[1]
FAST = ["--metrics", "Bleu", "CIDEr"]  # no Java start-up


def _jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code in (1, 2), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture()
def caption_files(tmp_path):
    preds = _jsonl(
        tmp_path / "preds.jsonl",
        [{"image": "a.png", "prediction": "a red square"}, {"image": "b.png", "prediction": "a blue circle"}],
    )
    refs = _jsonl(
        tmp_path / "refs.jsonl",
        [
            {"image": "a.png", "captions": ["a red square", "red box"]},
            {"image": "b.png", "captions": ["a blue circle", "blue disc"]},
        ],
    )
    return preds, refs


def test_unreadable_prediction_files(tmp_path, caption_files, capsys):
    preds, refs = caption_files
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "deep.jsonl").write_text("[" * 100_000)
    (tmp_path / "surrogate.jsonl").write_text('{"image": "a.png", "prediction": "\\ud800"}\n')
    (tmp_path / "dup.jsonl").write_text('{"image": "a.png", "prediction": "x", "prediction": "y"}\n')
    (tmp_path / "nan.jsonl").write_text('{"image": "a.png", "prediction": NaN}\n')
    for bad in ("missing.jsonl", "dir.jsonl", "deep.jsonl", "surrogate.jsonl", "dup.jsonl", "nan.jsonl"):
        code = main(["caption", "--predictions", str(tmp_path / bad), "--references", str(refs), *FAST])
        _one_line(capsys, code, tmp_path / bad)
        code = main(["caption", "--predictions", str(preds), "--references", str(tmp_path / bad), *FAST])
        _one_line(capsys, code, tmp_path / bad)


def test_bom_and_cr_line_endings_are_read(tmp_path, caption_files, capsys):
    preds, refs = caption_files
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + preds.read_bytes().replace(b"\n", b"\r"))
    assert main(["caption", "--predictions", str(bom), "--references", str(refs), *FAST, "--json"]) == 0
    clean = main(["caption", "--predictions", str(preds), "--references", str(refs), *FAST, "--json"])
    out = capsys.readouterr().out.splitlines()
    assert clean == 0 and out[0] == out[1]


def test_official_files_malformed_or_deep(tmp_path, capsys):
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}]}))
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "caption": "a cat"},\n {"image_id": ')
    (tmp_path / "deep.json").write_text("[" * 100_000)
    for bad in ("bad.json", "deep.json", "missing.json"):
        code = main(
            [
                "caption",
                "--coco-annotations",
                str(tmp_path / "ann.json"),
                "--coco-results",
                str(tmp_path / bad),
                *FAST,
            ]
        )
        _one_line(capsys, code, tmp_path / bad)
    code = main(
        [
            "retrieval",
            "--scores",
            str(tmp_path / "deep.json"),
            "--text-image-index",
            str(tmp_path / "bad.json"),
        ]
    )
    _one_line(capsys, code, tmp_path / "deep.json")


def test_malformed_official_vqa_answers(tmp_path, capsys):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    r = tmp_path / "r.json"
    r.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    for answers in (["yes", "no"], "yes", [{"answer_id": 1}], []):
        a = tmp_path / "a.json"
        a.write_text(
            json.dumps(
                {
                    "annotations": [
                        {
                            "question_id": 1,
                            "image_id": 1,
                            "answers": answers,
                            "answer_type": "yes/no",
                            "question_type": "is",
                        }
                    ]
                }
            )
        )
        code = main(["vqa", "--vqa-annotations", str(a), "--vqa-questions", str(q), "--vqa-results", str(r)])
        _one_line(capsys, code, a, "answers")


def test_duplicate_question_ids_in_references_name_both_lines(tmp_path, capsys):
    refs = _jsonl(
        tmp_path / "refs.jsonl",
        [{"question_id": 1, "answers": ["yes"] * 10}, {"question_id": "1", "answers": ["no"] * 10}],
    )
    preds = _jsonl(tmp_path / "preds.jsonl", [{"question_id": 1, "answer": "yes"}])
    code = main(["vqa", "--predictions", str(preds), "--references", str(refs)])
    _one_line(capsys, code, f"{refs}:2", "line 1")


def test_lang_values(tmp_path, caption_files, capsys):
    assert [
        normalize_lang(x) for x in ("en", "EN-us", "zh-CN", "zh_Hans", "zh-Hant-TW", "cmn", "ja-JP", "th")
    ] == ["en", "en", "zh", "zh", "zh", "zh", "ja", "th"]
    for bad in ("fr", "klingon", "", "zh!"):
        with pytest.raises(ValueError, match="not supported"):
            normalize_lang(bad)
    preds, refs = caption_files
    code = main(["caption", "--predictions", str(preds), "--references", str(refs), "--lang", "fr", *FAST])
    _one_line(capsys, code, "--lang", "'fr'")
    assert (
        main(
            [
                "caption",
                "--predictions",
                str(preds),
                "--references",
                str(refs),
                "--lang",
                "zh-CN",
                "--metrics",
                "CIDEr",
            ]
        )
        == 0
    )


def test_cjk_scored_as_english_warns_once(capsys):
    refs = {"a": ["一只红色的正方形", "红色方块"], "b": ["一个蓝色的圆", "蓝色圆形"]}
    preds = {"a": "一只红色的正方形", "b": "蓝色圆形"}
    caption_metrics(preds, refs, lang="en", metrics=["CIDEr"])
    err = capsys.readouterr().err
    assert sum("warning" in line for line in err.splitlines()) == 1 and "zh" in err
    zh = caption_metrics(preds, refs, lang="zh-Hans", metrics=["CIDEr"])
    assert "warning" not in capsys.readouterr().err and zh["CIDEr"] > 1
    caption_metrics({"a": "a cat", "b": "a dog"}, {"a": ["a cat"], "b": ["a dog"]}, metrics=["CIDEr"])
    assert "warning" not in capsys.readouterr().err


def test_per_sample_output_checks(tmp_path, caption_files, capsys):
    preds, refs = caption_files
    code = main(
        ["caption", "--predictions", str(preds), "--references", str(refs), *FAST, "--per-sample", str(preds)]
    )
    _one_line(capsys, code, "overwritten")
    code = main(
        [
            "caption",
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            *FAST,
            "--per-sample",
            str(tmp_path),
        ]
    )
    _one_line(capsys, code, "folder")


def test_cli_subprocess_has_no_traceback(tmp_path, caption_files):
    _, refs = caption_files
    (tmp_path / "deep.jsonl").write_text("[" * 100_000)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval",
            "caption",
            "--predictions",
            str(tmp_path / "deep.jsonl"),
            "--references",
            str(refs),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'deep.jsonl'}:1:" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "eval", "report", str(tmp_path / "no_run")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_json_list_files_are_read_like_jsonl(tmp_path, caption_files, capsys):
    # A JSON list of rows, as data_tools reads them (and as COCO results files are: [{image_id, caption}]).
    preds, refs = caption_files
    as_list = tmp_path / "preds.json"
    as_list.write_text(json.dumps([json.loads(line) for line in preds.read_text().splitlines()], indent=2))
    refs_list = tmp_path / "refs.json"
    refs_list.write_text(json.dumps([json.loads(line) for line in refs.read_text().splitlines()]))
    code = main(["caption", "--predictions", str(as_list), "--references", str(refs_list), *FAST, "--json"])
    assert code == 0
    assert main(["caption", "--predictions", str(preds), "--references", str(refs), *FAST, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1] and json.loads(out[0])["CIDEr"] > 0


@pytest.mark.parametrize("indent", [None, 2])
def test_an_official_annotations_file_given_as_jsonl_names_the_flag_it_goes_with(tmp_path, capsys, indent):
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"id": 5, "image_id": 1, "caption": "a dog"}]},
                               indent=indent))
    preds = _jsonl(tmp_path / "preds.jsonl", [{"image_id": 1, "prediction": "a dog"}])
    code = main(["caption", "--predictions", str(preds), "--references", str(coco), *FAST])
    _one_line(capsys, code, f"{coco}: is an official annotations file", "--coco-annotations")
    _jsonl(tmp_path / "numbers.jsonl", ["5"])  # a first row that is not an object is named as such
    code = main(["caption", "--predictions", str(preds), "--references", str(tmp_path / "numbers.jsonl"),
                 *FAST])
    _one_line(capsys, code, f"{tmp_path / 'numbers.jsonl'}:1: row must be a JSON object")
    vqa = tmp_path / "vqa_val.json"
    vqa.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "2"}]}]},
                              indent=indent))
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "answer": "2"}])
    code = main(["vqa", "--predictions", str(answers), "--references", str(vqa)])
    _one_line(capsys, code, f"{vqa}: is an official annotations file", "--vqa-annotations")
