"""qlora_vqa checked on recipe runs (random tiny LLaVA, a few steps on the CPU): a rerun without
quantization into a 4-bit run's folder is loaded unquantized; a resume refuses changed quantization, dtype
or --answer_prompt; a bad --answer_prompt, float16 on the CPU and a non-string answer_type are one-line
errors naming the option or file:line:field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from data_tools.jsonl import read_jsonl, write_jsonl
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "qlora_vqa" / "train.py"
FAST = ["--model_name_or_path", "tiny:llava", "--report_to", "none", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--max_new_tokens", "4", "--logging_steps", "1",
        "--max_steps", "1"]


@pytest.fixture(scope="module")
def env(recipe_env):
    """VQA on 6 synthetic images, 3 questions each: 4 images for training, 2 held out; a private model
    cache."""
    return recipe_env("qlora_checks", "vqa", 6, 12, OMP_NUM_THREADS="1")


def _data(d):
    return ["--train_file", d / "synth" / "train.jsonl", "--eval_file", d / "synth" / "eval.jsonl"]


def _one_line_error(r) -> str:
    """The `error: ...` line of a run that stopped on a bad option or input (exit code 2, no traceback)."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return next(line for line in r.stderr.splitlines() if line.startswith("error: "))


def test_a_rerun_without_quantization_into_a_4bit_runs_folder_loads_unquantized(env):
    from transformers import AutoModelForImageTextToText

    from recipes.common.merge import load_trained_run
    from recipes.common.models import resolve_model_path

    d, e = env
    out = d / "rerun"
    r = run_script(TRAIN, [*_data(d), *FAST, "--output_dir", out], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "quantization_config.json").read_text())["quantization_config"]["load_in_4bit"]
    # no checkpoints (--save_strategy no): the same folder again, the base unquantized
    r = run_script(TRAIN, [*_data(d), *FAST, "--output_dir", out, "--load_in_4bit", "false"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "quantization_config.json").exists()

    os.environ["VLM_RECIPES_CACHE"] = e["VLM_RECIPES_CACHE"]
    try:
        model, _ = load_trained_run(out, AutoModelForImageTextToText)
        base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny:llava"))
    finally:
        del os.environ["VLM_RECIPES_CACHE"]
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    # the adapter sits on the weights it trained on: the base's own, not a 4-bit rounding of them
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    loaded = dict(model.get_base_model().named_parameters())[name.replace(".weight", ".base_layer.weight")]
    assert torch.equal(loaded, dict(base.named_parameters())[name])


@pytest.fixture(scope="module")
def checkpointed(env):
    """A 4-bit run of 2 steps that saved checkpoint-1 and checkpoint-2, and its run.json."""
    d, e = env
    out = d / "resume"
    r = run_script(TRAIN, [*_data(d), *FAST, "--max_steps", "2", "--save_strategy", "steps",
                           "--save_steps", "1", "--output_dir", out], e)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_json_records_quantization_dtype_and_answer_prompt(checkpointed):
    run = json.loads((checkpointed / "run.json").read_text())
    assert {k: run[k] for k in ("dtype", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                "bnb_4bit_use_double_quant", "answer_prompt")} == {
        "dtype": "float32", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "answer_prompt": "Answer the question using a single word or phrase."}


CHANGES = [  # (flags of the resume, what the refusal names): quantization, dtype, the prompt
    (["--load_in_4bit", "false"], "load_in_4bit True -> False; bnb_4bit_quant_type 'nf4' -> None"),
    (["--dtype", "bfloat16", "--bf16"], "dtype 'float32' -> 'bfloat16'"),
    (["--answer_prompt", "Answer briefly."],
     "answer_prompt 'Answer the question using a single word or phrase.' -> 'Answer briefly.'"),
]


@pytest.mark.parametrize("flags,named", CHANGES, ids=[" ".join(f) for f, _ in CHANGES])
def test_a_resume_that_changes_quantization_dtype_or_answer_prompt_is_refused(env, checkpointed, flags,
                                                                             named):
    d, e = env
    before = (checkpointed / "run.json").read_text()
    r = run_script(TRAIN, [*_data(d), *FAST, "--max_steps", "2", "--output_dir", checkpointed,
                           "--resume_from_checkpoint", "last", *flags], e)
    error = _one_line_error(r)
    assert "--resume_from_checkpoint" in error and named in error, error
    assert (checkpointed / "run.json").read_text() == before  # still what the run started with


def test_a_resume_with_the_same_settings_goes_on(env, checkpointed, tmp_path):
    d, e = env
    copy = tmp_path / "resume"
    shutil.copytree(checkpointed, copy)
    r = run_script(TRAIN, [*_data(d), *FAST, "--max_steps", "2", "--output_dir", copy,
                           "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((copy / "metrics.json").read_text())["global_step"] == 2


PROMPTS = [  # (prompt, what the error names)
    ("Answer </s> now", "holds '</s>', which the tokenizer reads as its special token"),
    ("Look at <image> and answer", "holds '<image>', which places an image"),
]


@pytest.mark.parametrize("prompt,named", PROMPTS, ids=[p for p, _ in PROMPTS])
@pytest.mark.parametrize("skip", [False, True], ids=["", "skip_bad_rows"])
def test_a_bad_answer_prompt_is_named_not_blamed_on_the_data(env, prompt, named, skip):
    d, e = env
    out = d / f"prompt-{len(prompt)}-{skip}"
    r = run_script(TRAIN, [*_data(d), *FAST, "--output_dir", out, "--answer_prompt", prompt,
                           *(["--skip_bad_rows", "true"] if skip else [])], e)
    error = _one_line_error(r)
    assert error.startswith(f"error: --answer_prompt {prompt!r} {named}"), error
    assert "train.jsonl" not in r.stderr and not (out / "rejects").exists()


def test_float16_on_the_cpu_is_refused_before_the_model_loads(env):
    d, e = env
    r = run_script(TRAIN, [*_data(d), *FAST, "--output_dir", d / "fp16", "--dtype", "float16", "--fp16"], e)
    assert _one_line_error(r) == ("error: --dtype float16 needs a CUDA GPU (on the CPU there is no fp16 "
                                  "autocast): use --dtype float32, or --dtype bfloat16 with --bf16.")


def test_a_non_string_answer_type_is_reported_with_file_line_and_field_or_skipped(env):
    d, e = env
    rows = read_jsonl(d / "synth" / "eval.jsonl")
    bad = d / "bad_types"
    bad.mkdir()
    shutil.copytree(d / "synth" / "images", bad / "images")
    write_jsonl(bad / "eval.jsonl", [{**rows[0], "answer_type": 1}, {**rows[1], "question_type": ["x"]},
                                     *rows[2:]])
    data = ["--train_file", d / "synth" / "train.jsonl", "--eval_file", bad / "eval.jsonl"]
    r = run_script(TRAIN, [*data, *FAST, "--output_dir", d / "types"], e)
    assert _one_line_error(r) == f"error: {bad / 'eval.jsonl'}: 2 invalid row(s):"
    assert (f"\n  {bad / 'eval.jsonl'}:1: field 'answer_type': expected a string, got int [wrong_type]\n"
            f"  {bad / 'eval.jsonl'}:2: field 'question_type': expected a string, got list [wrong_type]\n"
            in r.stderr)

    r = run_script(TRAIN, [*data, *FAST, "--output_dir", d / "types_skipped", "--skip_bad_rows", "true"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    rejects = read_jsonl(d / "types_skipped" / "rejects" / "eval.rejects.jsonl")
    assert [(x["line"], x["reason"], x["field"]) for x in rejects] == [
        (1, "wrong_type", "answer_type"), (2, "wrong_type", "question_type")]
    scored = read_jsonl(d / "types_skipped" / "predictions" / "final.jsonl")
    assert len(scored) == len(rows) - 2
