"""qlora_vqa end to end on the random tiny LLaVA, 4-bit through bitsandbytes' CPU kernels: VQA metrics and
files, export (dequantized base + adapter) equality, resume, the bf16 autocast path, and clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "qlora_vqa" / "train.py"
MERGE = ROOT / "recipes" / "qlora_vqa" / "merge.py"
# tiny:llava has random weights: the tests check the code path, not what training buys.
FAST = ["--model_name_or_path", "tiny:llava", "--report_to", "none", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--max_new_tokens", "4", "--logging_steps", "1"]
METRICS = {"eval_VQA_accuracy", "eval_VQA_accuracy_number", "eval_VQA_accuracy_other",
           "eval_VQA_accuracy_yes_no"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """VQA on 12 synthetic images, 3 questions each: 8 images for training, 4 held out; a private model
    cache."""
    d = tmp_path_factory.mktemp("qlora")
    rows = read_jsonl(make_synthetic("vqa", 12, d / "synth", seed=1, progress=False))
    write_jsonl(d / "synth" / "train.jsonl", [r for r in rows if r["image_id"] < 8])
    write_jsonl(d / "synth" / "eval.jsonl", [r for r in rows if r["image_id"] >= 8])
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1")
    return d, e


def _run(args, env):
    return subprocess.run([sys.executable, str(TRAIN), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _data(d):
    return ["--train_file", str(d / "synth" / "train.jsonl"), "--eval_file", str(d / "synth" / "eval.jsonl")]


def _weight_bytes(log: str) -> dict:
    return json.loads(re.search(r"weight bytes: (\{.*?\})", log).group(1).replace("'", '"'))


STEPS = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def run(env):
    d, e = env
    out = d / "run"
    r = _run([*_data(d), "--output_dir", str(out), *FAST, *STEPS], e)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_vqa_metrics_official_results_and_what_a_4bit_run_saves(env, run):
    from eval.report import report_run
    from eval.vqa import question_type_prior, vqa_accuracy

    d, _ = env
    out, r = run
    assert ("optim paged_adamw_8bit needs CUDA" in r.stderr
            and "length budget: 24 conversations, 0 cut" in r.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "vqa" and metrics["global_step"] == 4
    assert metrics["prompts_left_out"] == {"eval": 0}
    assert set(metrics["baseline"]) == set(metrics["before"]) == set(metrics["after"]) == METRICS
    eval_rows, train_rows = read_jsonl(d / "synth" / "eval.jsonl"), read_jsonl(d / "synth" / "train.jsonl")
    refs = {r["question_id"]: r for r in eval_rows}
    prior = question_type_prior(train_rows)
    prior_scores = vqa_accuracy({q: prior.get(r["question_type"], prior[None]) for q, r in refs.items()},
                                refs)
    assert metrics["baseline"]["eval_VQA_accuracy"] == prior_scores["overall"]
    baseline_breakdown = json.loads((out / "predictions" / "baseline.vqa.json").read_text())
    assert baseline_breakdown["perQuestionType"] == prior_scores["perQuestionType"]

    final = {row["key"]: row["prediction"] for row in read_jsonl(out / "predictions" / "final.jsonl")}
    official = json.loads((out / "predictions" / "final.results.json").read_text())
    assert official == [{"question_id": q, "answer": a} for q, a in final.items()] and set(final) == set(refs)
    breakdown = json.loads((out / "predictions" / "final.vqa.json").read_text())
    assert breakdown == {k: v for k, v in vqa_accuracy(final, refs).items() if k != "perQuestion"}
    assert set(breakdown["perQuestionType"]) == {r["question_type"] for r in eval_rows}
    assert breakdown["overall"] == metrics["after"]["eval_VQA_accuracy"]
    # what `make eval` shows
    assert report_run(out)["final"]["overall"] == metrics["after"]["eval_VQA_accuracy"]

    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        saved = json.loads((folder / "quantization_config.json").read_text())
        q = saved["quantization_config"]
        assert ((saved["dtype"], q["load_in_4bit"], q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"])
                == ("float32", True, "nf4", True))


def test_export_equals_quantized_base_plus_adapter_and_merging_into_the_original_weights_would_not(env, run):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from recipes.common.chat import ChatCollator, ChatEncoder, tokenize_conversations
    from recipes.common.data import load_records
    from recipes.common.merge import load_run
    from recipes.common.merge import load_quantized_run, merge_quantized_run
    from recipes.qlora_vqa.collator import vqa_conversations

    d, e = env
    out, _ = run
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        # trained with LoRA
        assert {k.split(".")[3] for k in f.keys() if "lora_" not in k} == {"multi_modal_projector"}
    r = subprocess.run([sys.executable, str(MERGE), "--run", str(out), "--out", str(d / "merged32"),
                        "--dtype", "float32"],
                       env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # the base path in the adapter config points there
    os.environ["VLM_RECIPES_CACHE"] = e["VLM_RECIPES_CACHE"]
    try:
        merge_quantized_run(out, d / "merged16", LlavaForConditionalGeneration)  # the default: bf16
        adapted, processor = load_quantized_run(out, LlavaForConditionalGeneration)
        # the adapter on the unquantized base weights
        original, _ = load_run(out, LlavaForConditionalGeneration)
    finally:
        del os.environ["VLM_RECIPES_CACHE"]
    quantized = {n for n, m in adapted.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized and all(".language_model." in n for n in quantized)
    merged32 = LlavaForConditionalGeneration.from_pretrained(d / "merged32").eval()
    merged16 = LlavaForConditionalGeneration.from_pretrained(d / "merged16").eval()
    assert {p.dtype for p in merged16.parameters()} == {torch.bfloat16}
    assert getattr(merged16.config, "quantization_config", None) is None  # loads without bitsandbytes

    records = load_records(d / "synth" / "eval.jsonl", "vqa").select(range(4))
    samples, _ = tokenize_conversations(vqa_conversations(records), ChatEncoder(processor), None)
    batch = ChatCollator(ChatEncoder(processor))(list(samples))
    batch.pop("labels")
    with torch.no_grad():
        reference = adapted(**batch).logits
        err32 = (merged32(**batch).logits - reference).abs().max().item()
        err16 = (merged16(**{**batch, "pixel_values": batch["pixel_values"].bfloat16()}).logits.float()
                 - reference).abs().max().item()
        err_original = (original(**batch).logits - reference).abs().max().item()
        gen = dict(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                   pixel_values=batch["pixel_values"][:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(adapted.generate(**gen), merged32.generate(**gen))
    print(f"max |logit difference| to base + adapter: float32 export {err32:.2e}, bf16 export {err16:.2e}, "
          f"adapter on the original weights {err_original:.2e}")
    assert err32 < 1e-4  # the same weights, up to float32 rounding
    assert err16 < 0.1 * err_original  # bf16 rounding of those weights: far below the NF4 quantization error
    assert err_original > 1e-2  # what merging into the original weights would change


def test_a_resumed_run_ends_like_an_uninterrupted_one(env, run):
    d, e = env
    out, _ = run
    resumed = d / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(out / "predictions", resumed / "predictions")
    r = _run([*_data(d), "--output_dir", str(resumed), *FAST, *STEPS, "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    def losses(run):
        return [h["loss"]
                for h in json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
                if "loss" in h]

    assert losses(resumed)[-2:] == pytest.approx(losses(out)[-2:], rel=1e-5)
    whole, again = (json.loads((run / "metrics.json").read_text()) for run in (out, resumed))
    assert again["before"] == whole["before"] and again["after"] == pytest.approx(whole["after"], abs=1e-6)


def test_bf16_compute_keeps_frozen_weights_in_bf16_and_needs_autocast(env, run):
    d, e = env
    _, fp32 = run
    args = [*_data(d), *FAST, "--max_steps", "2", "--dtype", "bfloat16", "--eval_max_samples", "4"]
    r = _run([*args, "--output_dir", str(d / "no_autocast")], e)
    assert r.returncode != 0 and "need bf16 autocast. Pass --bf16" in r.stderr
    r = _run([*args, "--output_dir", str(d / "bf16"), "--bf16"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    # generation under autocast
    assert set(json.loads((d / "bf16" / "metrics.json").read_text())["after"]) == METRICS
    ours, full = _weight_bytes(r.stderr), _weight_bytes(fp32.stderr)
    # trainable: float32 in both
    assert ours["frozen"] * 2 == full["frozen"] and ours["trainable"] == full["trainable"]

    r = _run([*_data(d), *FAST, "--max_steps", "1", "--output_dir", str(d / "x"), "--peft_method", "none"], e)
    assert r.returncode != 0 and "quantized weights cannot train" in r.stderr


def test_8bit_option_trains_lora_on_int8_weights(env, run):
    d, e = env
    _, four_bit = run
    r = _run([*_data(d), *FAST, "--max_steps", "2", "--eval_max_samples", "4",
              "--output_dir", str(d / "int8"), "--load_in_4bit", "false", "--load_in_8bit", "true"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    int8, nf4 = _weight_bytes(r.stderr), _weight_bytes(four_bit.stderr)
    # The same LM linears, one byte a weight instead of half a byte (+ each format's constants).
    assert (1.7 * nf4["quantized"] < int8["quantized"] < 2.3 * nf4["quantized"]
            and int8["trainable"] == nf4["trainable"])
    assert set(json.loads((d / "int8" / "metrics.json").read_text())["after"]) == METRICS


def test_chat_py_loads_a_qlora_run_on_its_base_quantized_as_in_training(env, run, capsys, monkeypatch):
    """chat.py answers as the run scored: its base 4-bit as in training, not the original weights, and its
    --answer_prompt after the question."""
    from transformers import AutoModelForImageTextToText

    from recipes.common.merge import load_quantized_run
    from recipes.llava_instruct import chat
    from recipes.llava_instruct.chat import load

    d, _ = env
    out, _ = run
    asked, answer = [], chat.answer
    monkeypatch.setattr(chat, "answer", lambda *a, **kw: asked.append(a[3]) or answer(*a, **kw))
    predicted = {r["key"]: r["prediction"] for r in read_jsonl(out / "predictions" / "final.jsonl")}
    row = read_jsonl(d / "synth" / "eval.jsonl")[0]
    chat.main(["--model", str(out), "--image", str(d / "synth" / row["image"]), "--prompt", row["question"],
               "--max_new_tokens", "4"])
    assert capsys.readouterr().out.strip() == predicted[row["question_id"]]
    assert asked == [[{"from": "human", "value": f"<image>\n{row['question']}\nAnswer the question using a "
                                                 "single word or phrase."}]]
    model, _ = load(str(out))
    ref, _ = load_quantized_run(out, AutoModelForImageTextToText)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(got, want)
