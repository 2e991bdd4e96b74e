"""qlora_vqa checked without a recipe run: an unquantized save removes a stale quantization_config.json;
float16 on the CPU is refused before anything loads; answer_type / question_type of another type than a
string are counted rejects naming the field; the README says which answer trains."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.clean import main_clean, main_validate
from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.records import normalize_record
from recipes.common.args import ModelArguments
from recipes.common.models import check_mixed_precision, compute_dtype
from recipes.common.quantization import QUANTIZATION_FILE, save_quantization_config
from recipes.qlora_vqa.collator import training_answer

ROOT = Path(__file__).resolve().parent.parent


def _model(quantization_config=None):
    """What save_quantization_config reads of a (non-peft) model: its config and dtype."""
    return SimpleNamespace(config=SimpleNamespace(quantization_config=quantization_config),
                           dtype=torch.float32)


def test_an_unquantized_save_removes_the_quantization_config_an_earlier_run_left(tmp_path):
    four_bit = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    written = save_quantization_config(_model(four_bit), tmp_path)
    assert written == tmp_path / QUANTIZATION_FILE
    assert json.loads(written.read_text()) == {"dtype": "float32", "quantization_config": four_bit}
    # a rerun into the same folder with --load_in_4bit false
    assert save_quantization_config(_model(), tmp_path) is None
    assert not (tmp_path / QUANTIZATION_FILE).exists()
    assert save_quantization_config(_model(), tmp_path) is None  # none there: nothing to remove


def _training(mixed_precision: str, use_cpu: bool = False):
    return SimpleNamespace(mixed_precision=mixed_precision, use_cpu=use_cpu)


def test_float16_on_the_cpu_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    half = ModelArguments(dtype="float16")
    with pytest.raises(ValueError) as caught:
        check_mixed_precision(half, _training("fp16"))
    message = str(caught.value)
    assert message == ("--dtype float16 needs a CUDA GPU (on the CPU there is no fp16 autocast): use "
                       "--dtype float32, or --dtype bfloat16 with --bf16.")
    with pytest.raises(ValueError, match="--dtype float16 needs a CUDA GPU"):
        check_mixed_precision(half, _training("no"))
    # what the message suggests passes; 'auto' is float32 on the CPU
    check_mixed_precision(ModelArguments(dtype="float32"), _training("no"))
    check_mixed_precision(ModelArguments(dtype="bfloat16"), _training("bf16"))
    assert compute_dtype(ModelArguments(dtype="auto")) == torch.float32
    check_mixed_precision(ModelArguments(dtype="auto"), _training("no"))


def test_float16_with_fp16_autocast_on_a_gpu_passes_and_use_cpu_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_mixed_precision(ModelArguments(dtype="float16"), _training("fp16"))
    with pytest.raises(ValueError, match="--dtype float16 needs a CUDA GPU"):
        check_mixed_precision(ModelArguments(dtype="float16"), _training("fp16", use_cpu=True))


GOOD = {"image": "a.jpg", "question_id": 1, "question": "what?", "answers": ["red"], "answer_type": "other",
        "question_type": "what color is the"}
BAD_TYPES = [  # (changes, field, type name)
    ({"answer_type": 1}, "answer_type", "int"),
    ({"answer_type": ["other"]}, "answer_type", "list"),
    ({"question_type": ["x"]}, "question_type", "list"),
    ({"question_type": {"a": 1}}, "question_type", "dict"),
    ({"question_type": True}, "question_type", "bool"),
]


@pytest.mark.parametrize("changes,field,kind", BAD_TYPES, ids=[f"{f}-{k}" for _, f, k in BAD_TYPES])
def test_answer_and_question_type_of_another_type_are_wrong_type_naming_the_field(changes, field, kind):
    with pytest.raises(DataError) as caught:
        normalize_record({**GOOD, **changes}, "vqa")
    assert ((caught.value.reason, caught.value.field, caught.value.message)
            == ("wrong_type", field, f"expected a string, got {kind}"))


def test_absent_or_null_types_stay_as_they_are():
    assert normalize_record(GOOD, "vqa") == GOOD
    without = {k: v for k, v in GOOD.items() if k not in ("answer_type", "question_type")}
    assert normalize_record(without, "vqa") == without
    nulls = {**GOOD, "answer_type": None, "question_type": None}
    assert normalize_record(nulls, "vqa") == nulls  # eval.vqa reads null as absent


def test_validate_and_clean_count_them(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({**GOOD, **changes}) + "\n" for changes in
                            [{}] + [c for c, _, _ in BAD_TYPES]), encoding="utf-8")
    assert main_validate(["--task", "vqa", "--check-images", "none", str(rows)]) == 1
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "rows.jsonl:2: field 'answer_type': expected a string, got int [wrong_type]" in err
    assert "rows.jsonl:4: field 'question_type': expected a string, got list [wrong_type]" in err
    assert "Traceback" not in err
    out, rejects = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl"
    assert main_clean(["--task", "vqa", "--check-images", "none", str(rows), "--out", str(out),
                       "--rejects", str(rejects)]) == 0
    assert [r["answer_type"] for r in read_jsonl(out)] == ["other"]
    assert [(r["line"], r["reason"], r["field"]) for r in read_jsonl(rejects)] == [
        (k + 2, "wrong_type", field) for k, (_, field, _) in enumerate(BAD_TYPES)]


def test_readme_says_the_trained_answer_is_grouped_by_the_official_normalisation():
    answers = ["blue"] * 4 + ["Red"] * 2 + ["red"] * 2 + ["red."] * 2
    assert training_answer(answers) == "Red"  # "red" 6 times once normalised, against 4 "blue"s
    text = " ".join((ROOT / "recipes" / "qlora_vqa" / "README.md").read_text().split())
    assert ("the answer is the record's most frequent human answer after the official VQA normalisation "
            "(which makes \"Red\", \"red\" and \"red.\" one answer), in its most frequent written form"
            in text)
