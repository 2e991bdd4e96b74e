"""soft_prompt_caption on tiny random CLIP vision + GPT-2: what a run saves, export, frozen weights, resume,
LoRA, the JSON-list format, Chinese. Subprocess runs only where the command line itself is under test (each
costs ~10 s of CPU to import torch and transformers); the Trainer-level checks run in this process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools.jsonl import read_jsonl
from recipes.common.captions import CaptionPromptCollator
from recipes.soft_prompt_caption import collator, modeling

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "soft_prompt_caption"
TRAIN, EXPORT = RECIPE / "train.py", RECIPE / "export.py"
# Random tiny bases: the tests check the code path, not what pre-training buys.
FAST = ["--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--max_new_tokens", "6",
        "--logging_steps", "1"]
SIZES = "trained: soft_prompt 10 x 128 + projection.weight 128 x 64 + projection.bias 128 = 9,600 parameters"


@pytest.fixture(scope="module")
def env(recipe_env):
    """A small caption set (40 train images, 8 eval) and a model cache of its own."""
    return recipe_env("softprompt", "caption", 48, 40)


def _run(script, args, env):
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _data(d):
    return ["--train_file", str(d / "synth" / "train.jsonl"), "--eval_file", str(d / "synth" / "eval.jsonl")]


def _eval_inputs(d, run):
    """`generate` inputs for the first 4 eval images, made as the run made them (its processors, no
    prompt)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    records = [{"image": str(d / "synth" / r["image"])} for r in read_jsonl(d / "synth" / "eval.jsonl")[:4]]
    return CaptionPromptCollator(AutoImageProcessor.from_pretrained(run),
                                 AutoTokenizer.from_pretrained(run))(records)


def test_run_saves_only_trained_parts_and_the_export_equals_the_run(env):
    d, e = env
    out = d / "run"
    r = _run(TRAIN, [*_data(d), "--output_dir", str(out), "--max_steps", "4", *FAST,
                     "--save_strategy", "steps", "--save_steps", "2"], e)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval_CIDEr", "eval_Bleu_4", "eval_ROUGE_L"} <= set(metrics["before"])
    assert set(metrics["before"]) == set(metrics["after"])
    assert (metrics["recipe"], metrics["prompt_length"], metrics["trained_parameters"]) == (
        "soft_prompt_caption", 10, 9600)
    # what a resume must match (the trained weights' shapes and meaning)
    assert {k: metrics[k] for k in ("vision_features", "projection", "trainable_parameters")} == {
        "vision_features": "pooled", "projection": "linear", "trainable_parameters": 9600}
    assert (SIZES in r.stderr
            and "train length budget: 200 samples, 0 truncated" in r.stderr)  # 40 images x 5 captions
    # Only what trains is on disk; the bases are named in config.json.
    trained = load_file(out / "trained.safetensors")
    assert {k: tuple(v.shape) for k, v in trained.items()} == {"soft_prompt": (10, 128),
                                                              "projection.weight": (128, 64),
                                                              "projection.bias": (128,)}
    assert not list(out.rglob("model.safetensors")) and not (out / "adapter_config.json").exists()
    assert not torch.equal(load_file(out / "checkpoint-2" / "trained.safetensors")["soft_prompt"],
                           trained["soft_prompt"])

    full = d / "full"
    x = _run(EXPORT, ["--run", str(out), "--out", str(full)], e)
    assert x.returncode == 0, x.stderr[-3000:]
    from transformers import AutoModel

    run_model = modeling.SoftPromptCaptioner.from_trained(out).eval()
    exported = AutoModel.from_pretrained(full).eval()
    inputs = _eval_inputs(d, out)
    keys = inputs.pop("keys")
    ids = torch.tensor([[5, 6, 7]] * 4)
    with torch.no_grad():
        assert torch.equal(run_model(pixel_values=inputs["pixel_values"], input_ids=ids).logits,
                           exported(pixel_values=inputs["pixel_values"], input_ids=ids).logits)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(run_model.generate(**inputs, **gen), exported.generate(**inputs, **gen))
    # What the run scored at the end is exactly bases + trained.safetensors: the same greedy captions.
    final = {row["key"]: row["prediction"] for row in read_jsonl(out / "predictions" / "final.jsonl")}
    from transformers import AutoTokenizer

    texts = AutoTokenizer.from_pretrained(out).batch_decode(run_model.generate(**inputs, **gen),
                                                            skip_special_tokens=True)
    assert [final[k] for k in keys] == [t.strip() for t in texts]


@pytest.fixture(scope="module")
def bases(env):
    from recipes.common.tiny.models import build_tiny

    d, _ = env
    return build_tiny("clip-vision", d / "bases" / "vision"), build_tiny("gpt2", d / "bases" / "gpt2")


def _trainer(d, bases, model, output_dir, **args):
    """A SoftPromptTrainer as train.py builds it, in this process (no start-up cost), on 16 captions of 8
    images."""
    from transformers import AutoImageProcessor, AutoTokenizer, TrainingArguments

    from recipes.common.args import LearningRateArguments
    from recipes.common.captions import CaptionCollator
    from recipes.common.data import load_records
    from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

    tok = AutoTokenizer.from_pretrained(bases[1])
    records = load_records(d / "synth" / "train.jsonl", "caption", max_rows=8).map(
        lambda r: {"captions": r["captions"][:2]})
    train, _ = collator.tokenize_captions(records, tok, prefix_length=11)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, remove_unused_columns=False, logging_steps=1, seed=0, **args)
    data_collator = CaptionCollator(AutoImageProcessor.from_pretrained(bases[0]), tok.pad_token_id)
    return SoftPromptTrainer(model=model, args=args, train_dataset=train,
                             learning_rates=LearningRateArguments(),
                             processing_class=tok,
                             data_collator=data_collator)


def test_training_leaves_frozen_weights_bit_identical(env, bases, tmp_path):
    """With weight decay on and LoRA: every weight but the soft prompt, projection and LoRA stays as it was,
    bit for bit."""
    from peft import LoraConfig, get_peft_model

    d, _ = env
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=r"language_model\..*\.c_attn")
    model = get_peft_model(modeling.SoftPromptCaptioner.from_parts(*bases), lora)
    for name, p in model.named_parameters():
        if "soft_prompt" in name or "projection" in name:
            p.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(d, bases, model, tmp_path, max_steps=3, learning_rate=0.05, weight_decay=0.1,
             save_strategy="no").train()
    after = model.state_dict()
    changed = {k.removeprefix("base_model.model.") for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"soft_prompt", "projection.weight", "projection.bias"} | {
        f"language_model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight"
        for i in (0, 1) for ab in "AB"}


def test_resumed_training_ends_like_an_uninterrupted_one(env, bases, tmp_path):
    d, _ = env

    def train(output_dir, init_seed, resume=None):
        torch.manual_seed(init_seed)
        model = modeling.SoftPromptCaptioner.from_parts(*bases)
        trainer = _trainer(d, bases, model, output_dir, max_steps=12, learning_rate=0.01,
                           save_strategy="steps", save_steps=4)
        trainer.train(resume_from_checkpoint=resume)
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    whole, whole_losses = train(tmp_path / "whole", init_seed=0)
    shutil.copytree(tmp_path / "whole" / "checkpoint-4",
                    tmp_path / "resumed" / "checkpoint-4")  # as if killed after step 4
    # Another initialisation: only loading the checkpoint's trained parts can make the runs agree.
    resumed, resumed_losses = train(tmp_path / "resumed", init_seed=1, resume=True)
    assert resumed_losses[-8:] == pytest.approx(whole_losses[-8:], rel=1e-5) and len(resumed_losses) == 12
    assert (torch.equal(resumed.soft_prompt, whole.soft_prompt)
            and torch.equal(resumed.projection.weight, whole.projection.weight))
    assert sorted(load_file(tmp_path / "whole" / "checkpoint-12" / "trained.safetensors")) == [
        "projection.bias", "projection.weight", "soft_prompt"]


def test_lora_run_on_a_plain_json_list_saves_lora_and_export_merges_it(env):
    """`[{"image_path", "text"}]` data (one row per caption) and LoRA on the LM, in one run."""
    d, e = env
    pairs = [{"image_path": row["image"], "text": caption}
             for row in read_jsonl(d / "synth" / "train.jsonl")[:8] for caption in row["captions"][:2]]
    (d / "synth" / "pairs.json").write_text(json.dumps(pairs))
    out = d / "lora"
    r = _run(TRAIN, ["--train_file", str(d / "synth" / "pairs.json"),
                     "--eval_file", str(d / "synth" / "pairs.json"),
                     "--output_dir", str(out), "--max_steps", "3", *FAST, "--peft_method", "lora",
                     "--learning_rate", "0.02"], e)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "train length budget: 16 samples" in r.stderr  # one sample per row
    keys = [row["key"] for row in read_jsonl(out / "predictions" / "final.jsonl")]
    assert len(keys) == len(set(keys)) == 8  # the rows of an image merged for generation: one prediction each
    # r=8 on c_attn (128 -> 384), c_proj (128 -> 128), c_fc (128 -> 512), mlp c_proj (512 -> 128), 2 layers.
    assert "projection.bias 128 + LoRA 32,768 = 42,368 parameters" in r.stderr
    trained = load_file(out / "trained.safetensors")
    assert len([k for k in trained if ".lora_" in k]) == 16 and "base_model.model.soft_prompt" in trained
    assert (out / "adapter_config.json").exists()
    from peft import LoraConfig, get_peft_model

    merged = modeling.SoftPromptCaptioner.from_trained(out).eval()
    config = json.loads((out / "config.json").read_text())
    parts = config["vision_model_name_or_path"], config["language_model_name_or_path"]
    unmerged = get_peft_model(modeling.SoftPromptCaptioner.from_parts(*parts),
                              LoraConfig.from_pretrained(out))
    modeling.load_trained(unmerged, out)
    without_lora = modeling.SoftPromptCaptioner.from_parts(*parts)
    modeling.load_trained(without_lora, _without_lora(out, d / "nolora"))
    x, ids = torch.randn(2, 3, 64, 64), torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        a, b = (merged(pixel_values=x, input_ids=ids).logits,
                unmerged.eval()(pixel_values=x, input_ids=ids).logits)
        assert not torch.allclose(a, without_lora.eval()(pixel_values=x, input_ids=ids).logits,
                                  atol=1e-4)  # LoRA counts
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _without_lora(run, folder):
    """The run's soft prompt and projection alone, as a run without LoRA would have saved them."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    trained = load_file(run / "trained.safetensors")
    tensors = {k.removeprefix("base_model.model."): v for k, v in trained.items() if ".lora_" not in k}
    save_file(tensors, folder / "trained.safetensors")
    return folder


def test_chinese_embedded_default_end_to_end_and_eval_report(env):
    d, e = env
    out = d / "zh"
    r = _run(TRAIN, ["--lang", "zh", "--output_dir", str(out), "--max_steps", "2", *FAST,
                     "--max_train_samples", "16", "--eval_max_samples", "8", "--prompt", "图片里"], e)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lang"] == "zh" and "caption-zh" in metrics["eval_file"]
    assert all("\u4e00" <= ch <= "\u9fff" for ch in read_jsonl(metrics["eval_file"])[0]["captions"][0][:2])
    # `python -m eval report` scores the run again, on characters, without METEOR (English only).
    from eval.caption import caption_metrics
    from eval.report import report_run

    row = report_run(out)

    # The embedded default has a test split: the final predictions and the headline "after" are on it.
    assert metrics["heldout"] == "test" and metrics["heldout_file"] == metrics["test_file"]
    predictions = {row["key"]: row["prediction"] for row in read_jsonl(out / "predictions" / "final.jsonl")}
    references = {row["image"]: row["captions"] for row in read_jsonl(metrics["heldout_file"])}
    references = {k: references[str(Path(k).relative_to(Path(metrics["heldout_file"]).parent))]
                  for k in predictions}
    rescored = caption_metrics(predictions, references, lang="zh", metrics=["CIDEr"])
    assert rescored["CIDEr"] == pytest.approx(metrics["after"]["eval_CIDEr"])
    assert (row["final"]["CIDEr"] == pytest.approx(metrics["after"]["eval_CIDEr"])
            and "METEOR" not in row["final"])


@pytest.mark.parametrize("features", ["pooled", "patches"])
def test_cached_vision_features_train_exactly_as_the_live_tower(env, features):
    """--cache_vision_features stores what the model reads (image_features): the same losses and metrics."""
    d, e = env
    common = [*_data(d), "--max_steps", "3", *FAST, "--save_strategy", "steps", "--save_steps", "3",
              "--vision_features", features]
    runs = {}
    for cached in ("false", "true"):
        out = d / f"features-{features}-{cached}"
        r = _run(TRAIN, [*common, "--output_dir", str(out), "--cache_vision_features", cached], e)
        assert r.returncode == 0, r.stderr[-3000:]
        history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
        runs[cached] = ([h["loss"] for h in history if "loss" in h],
                        json.loads((out / "metrics.json").read_text())["after"])
    (folder,) = [p for p in (d / f"features-{features}-true" / "vision_features").iterdir() if p.is_dir()]
    # pooled: one vector an image (CLIP's pooled output); patches: the tiny tower's 64 patch vectors, no
    # class token.
    assert json.loads((folder / "features.json").read_text())["shape"] == (
        [1, 64] if features == "pooled" else [64, 64])
    assert len(runs["true"][0]) == 3 and runs["true"][0] == pytest.approx(runs["false"][0], rel=1e-5)
    assert runs["true"][1] == pytest.approx(runs["false"][1], abs=1e-6)


def test_bases_in_local_folders_are_recorded_by_absolute_path_for_export_from_anywhere(env, bases):
    """config.json names bases given as relative folders by their absolute path, so export.py (and
    from_trained) find them from any working folder; a base that moved is a one-line error."""
    d, e = env
    args = ["--train_file", "synth/train.jsonl", "--output_dir", "rel", "--max_steps", "1", *FAST,
            "--vision_model", "bases/vision", "--language_model", "bases/gpt2"]
    r = subprocess.run([sys.executable, str(TRAIN), *args], env=e, cwd=d, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    config = json.loads((d / "rel" / "config.json").read_text())
    assert (config["vision_model_name_or_path"], config["language_model_name_or_path"]) == (
        str(bases[0].resolve()), str(bases[1].resolve()))
    x = _run(EXPORT, ["--run", str(d / "rel"), "--out", str(d / "rel_full")], e)  # from the tests' folder
    assert x.returncode == 0, x.stderr[-3000:]

    config["vision_model_name_or_path"] = str(d / "moved" / "vision")
    (d / "rel" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="moved/vision' does not exist.*export.py --vision_model"):
        modeling.SoftPromptCaptioner.from_trained(d / "rel")


def test_bf16_bases_train_an_unfrozen_tower_in_float32_and_a_null_budget_is_the_lm_length(env):
    """--dtype bfloat16: the vision tower, unfrozen, trains (and is saved) in float32 while the frozen LM
    stays bf16; `max_length: null` in a config is no budget but the LM's positions, not a crash."""
    d, e = env
    config = (RECIPE / "config.yaml").read_text().replace("\nmax_length: 128 ", "\nmax_length: null ")
    assert "max_length: null" in config
    (d / "null.yaml").write_text(config)
    r = _run(TRAIN, [*_data(d), *FAST, "--config", str(d / "null.yaml"), "--max_steps", "1", "--dtype",
                     "bfloat16", "--bf16",
                     "--freeze_vision_tower", "false", "--eval_max_samples", "2", "--output_dir",
                     str(d / "bf16")], e)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = load_file(d / "bf16" / "trained.safetensors")
    vision = {k: v.dtype for k, v in trained.items() if k.startswith("vision_model.")}
    assert vision and set(vision.values()) == {torch.float32}
