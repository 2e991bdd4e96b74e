"""llava_instruct end to end on the random tiny LLaVA: stage 2 with trained projector + vision layer (merge
equality, chat), resume, stage 1 (projector only), and a 2-process run with text-only batches."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import TEXT_ONLY, make_synthetic

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "llava_instruct" / "train.py"
# tiny:llava has random weights: the tests check the code path, not what training buys.
FAST = ["--model_name_or_path", "tiny:llava", "--report_to", "none", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--max_new_tokens", "6", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """32 image conversations + 8 text-only ones for training, 7 held out (one text-only); 12 captioned
    images; a private model cache."""
    d = tmp_path_factory.mktemp("llava")
    src = [r for r in read_jsonl(make_synthetic("instruct", 40, d / "synth", seed=1, progress=False))
           if "image" in r]
    text_only = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                 for q, a in TEXT_ONLY["en"]]
    write_jsonl(d / "synth" / "train.jsonl", src[:32] + text_only + text_only[:2])
    write_jsonl(d / "synth" / "eval.jsonl", src[32:] + text_only[:1])
    captions = read_jsonl(make_synthetic("caption", 12, d / "synth", seed=1, progress=False))
    write_jsonl(d / "synth" / "cap_train.jsonl", captions[:8])
    write_jsonl(d / "synth" / "cap_eval.jsonl", captions[8:])
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1")
    return d, e


def _run(args, env):
    return subprocess.run([sys.executable, str(TRAIN), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _data(d, prefix=""):
    return ["--train_file", str(d / "synth" / f"{prefix}train.jsonl"),
            "--eval_file", str(d / "synth" / f"{prefix}eval.jsonl")]


STAGE2 = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
          "--unfreeze_last_n_vision_layers", "1", "--projector_lr", "0.003"]


@pytest.fixture(scope="module")
def stage2(env):
    d, e = env
    out = d / "run"
    r = _run([*_data(d), "--output_dir", str(out), *FAST, *STAGE2], e)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_stage2_saves_projector_and_vision_layer_with_the_adapter_and_merge_equals_them(env, stage2):
    d, e = env
    out, r = stage2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval_VQA_accuracy", "eval_CIDEr", "eval_n_short", "eval_n_long"} <= set(metrics["after"])
    assert set(metrics["after_shuffled_images"]) == set(metrics["after"])  # the same items, other images
    shuffled = {row["key"] for row in read_jsonl(out / "predictions" / "final-shuffled-images.jsonl")}
    assert shuffled == {row["key"] for row in read_jsonl(out / "predictions" / "final.jsonl")}
    assert metrics["task"] == "instruct" and metrics["length_budget"]["train"]["samples"] == 40
    assert metrics["prompts_left_out"] == {"eval": 0}
    assert "length budget: 40 conversations, 0 cut" in r.stderr and "component" in r.stderr
    keys = {row["key"] for row in read_jsonl(out / "predictions" / "final.jsonl")}
    assert "6:1" in keys and len(keys) == metrics["after"]["eval_n_short"] + metrics["after"]["eval_n_long"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        saved = [k for k in f.keys() if "lora_" not in k]
    # The full copies: the projector and vision layer 0 (vision_feature_layer -2 of 2 layers:
    # the last one LLaVA uses).
    assert {k.split(".")[3] for k in saved} == {"multi_modal_projector", "vision_tower"}
    assert {k.split("encoder.layers.")[1].split(".")[0] for k in saved if "vision_tower" in k} == {"0"}

    from peft import PeftConfig, PeftModel
    from transformers import LlavaForConditionalGeneration

    from recipes.common.chat import ChatCollator, ChatEncoder, tokenize_conversations
    from recipes.common.data import load_records
    from recipes.common.merge import load_run, merge_run
    from recipes.llava_instruct import chat

    merged = merge_run(out, d / "merged", LlavaForConditionalGeneration)
    adapted, processor = load_run(out, LlavaForConditionalGeneration)
    full, _ = load_run(merged, LlavaForConditionalGeneration)
    base = LlavaForConditionalGeneration.from_pretrained(
        PeftConfig.from_pretrained(out).base_model_name_or_path).eval()
    assert isinstance(adapted, PeftModel) and not isinstance(full, PeftModel)
    # two images, one text-only
    records = load_records(d / "synth" / "eval.jsonl", "instruct").select([0, 1, 6])
    samples, _ = tokenize_conversations(records, ChatEncoder(processor), None)
    batch = ChatCollator(ChatEncoder(processor))(list(samples))
    batch.pop("labels")
    with torch.no_grad():
        a, b = adapted(**batch).logits, full(**batch).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, base(**batch).logits, atol=1e-3)  # training changed it
    for part in ("model.multi_modal_projector.linear_1.weight",
                 "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                 "model.vision_tower.encoder.layers.1.mlp.fc1.weight"):
        changed = not torch.equal(full.state_dict()[part], base.state_dict()[part])
        # the projector and layer 0 trained; layer 1 is unused
        assert changed == ("layers.1" not in part), part

    image = str(Path(records[0]["image"]))
    answers = []
    for model in (out, merged):
        with pytest.MonkeyPatch.context() as mp:
            printed = []
            mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
            argv = ["--model", str(model), "--image", image, "--prompt", "Describe the image.",
                    "--max_new_tokens", "5"]
            assert chat.main(argv) == 0
        answers.append(printed)
    assert answers[0] == answers[1] and len(answers[0]) == 1
    with pytest.MonkeyPatch.context() as mp:  # the image placed by the prompt itself: the same question
        printed = []
        mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        assert chat.main(["--model", str(out), "--image", image, "--prompt", "<image>\nDescribe the image.",
                          "--max_new_tokens", "5"]) == 0
    assert printed == answers[0]
    with pytest.raises(ValueError, match="--prompt holds <image> but no --image is given"):
        chat.main(["--model", str(out), "--prompt", "<image>\nDescribe the image."])

    # Interactive: messages from standard input until an empty line; the first answer is the --prompt one.
    with pytest.MonkeyPatch.context() as mp:
        printed, messages = [], iter(["Describe the image.", "How many shapes are there?", ""])
        mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        mp.setattr("builtins.input", lambda prompt="": next(messages))
        assert chat.main(["--model", str(out), "--image", image, "--max_new_tokens", "5"]) == 0
    assert len(printed) == 2 and all(line.startswith("model> ") for line in printed)
    assert printed[0] == "model> " + (answers[0][0] or "(empty answer)")


def test_a_resumed_run_ends_like_an_uninterrupted_one(env, stage2):
    d, e = env
    out, _ = stage2
    resumed = d / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(out / "predictions", resumed / "predictions")
    r = _run([*_data(d), "--output_dir", str(resumed), *FAST, *STAGE2, "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    def loss(run):
        history = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    assert loss(resumed)[-2:] == pytest.approx(loss(out)[-2:], rel=1e-5)
    whole, again = (json.loads((run / "metrics.json").read_text()) for run in (out, resumed))
    assert again["before"] == whole["before"] and again["after"] == pytest.approx(whole["after"], abs=1e-6)


def test_stage1_trains_the_projector_alone_on_captions(env):
    d, e = env
    out = d / "stage1"
    r = _run([*_data(d, "cap_"), "--output_dir", str(out), *FAST, "--stage", "pretrain", "--max_steps", "2",
              "--metric_for_best_model", "VQA_accuracy", "--shuffled_image_check", "false"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "length budget: 40 conversations" in r.stderr  # 8 images x 5 captions
    assert "metric_for_best_model is CIDEr instead" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"] == "caption" and metrics["stage"] == "pretrain"
            and "eval_VQA_accuracy" not in metrics["after"])
    # Keyed by image path, as `eval report` keys captions.
    assert {row["key"] for row in read_jsonl(out / "predictions" / "final.jsonl")} == {
        str(d / "synth" / row["image"]) for row in read_jsonl(d / "synth" / "cap_eval.jsonl")}

    assert not (out / "adapter_config.json").exists()  # a full checkpoint: stage 2 starts from it
    assert _changed_parts(out, e) == {"multi_modal_projector"}


def test_full_checkpoints_reload_as_the_best_model_and_on_a_resume(env):
    """A full checkpoint (no adapter) is saved under the architecture's original weight names: the best
    model loaded at the end and a resumed run's start are its weights, not the untouched base's."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from recipes.common.trainer import load_full_weights

    d, e = env
    args = [*_data(d, "cap_"), *FAST, "--stage", "pretrain", "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "2",
            "--load_best_model_at_end", "true", "--metric_for_best_model", "loss", "--greater_is_better",
            "true", "--shuffled_image_check", "false", "--projector_lr", "0.01"]
    out = d / "full_best"
    r = _run([*args, "--output_dir", str(out)], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["after_step"] == 2  # the higher eval loss
    final, best, last = (load_file(f / "model.safetensors") for f in (out, out / "checkpoint-2",
                                                                       out / "checkpoint-4"))
    assert any(k not in final for k in LlavaForConditionalGeneration(  # saved under other names
        LlavaForConditionalGeneration.config_class.from_pretrained(out)).state_dict())
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)
    # load_full_weights loads what from_pretrained reads.
    model = LlavaForConditionalGeneration.from_pretrained(out / "checkpoint-2")
    assert load_full_weights(model, out / "checkpoint-4")
    reference = LlavaForConditionalGeneration.from_pretrained(out / "checkpoint-4").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    # Resumed from step 2, the run reaches step 4's weights.
    resumed = d / "full_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(out / "run.json", resumed / "run.json")
    r = _run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    again = load_file(resumed / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(again[k], last[k]) for k in last)


def _changed_parts(run, e) -> set[str]:
    """Parts of the full checkpoint `run` (multi_modal_projector, language_model, vision_tower, lm_head) that
    differ from the tiny:llava base in the test's model cache."""
    from transformers import LlavaForConditionalGeneration

    from recipes.common.models import resolve_model_path

    os.environ["VLM_RECIPES_CACHE"] = e["VLM_RECIPES_CACHE"]
    try:
        base = LlavaForConditionalGeneration.from_pretrained(resolve_model_path("tiny:llava")).state_dict()
    finally:
        del os.environ["VLM_RECIPES_CACHE"]
    trained = LlavaForConditionalGeneration.from_pretrained(run).state_dict()
    return {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
            for k in base if not torch.equal(base[k], trained[k])}


def test_stage2_can_train_the_whole_language_model_instead_of_lora(env):
    d, e = env
    out = d / "full_lm"
    r = _run([*_data(d), "--output_dir", str(out), *FAST, "--peft_method", "none", "--max_steps", "2",
              "--unfreeze_last_n_vision_layers", "0", "--eval_max_samples", "2",
              "--shuffled_image_check", "false"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()  # a full checkpoint
    changed = _changed_parts(out, e)
    assert {"multi_modal_projector", "language_model"} <= changed and "vision_tower" not in changed, changed


# Gemma 3 (token_type_ids, another family) with the family matrix, in `make test-families` (CI)
@pytest.mark.parametrize("model", ["tiny:llava", pytest.param("tiny:gemma3", marks=pytest.mark.matrix)])
def test_two_processes_equal_one_process_with_the_same_global_batch(env, model):
    """2 CPU processes x 4 samples (image and text-only ones mixed) train as 1 process x 8: the same losses,
    adapter and trained projector, and the same held-out metrics; one process encodes the data, and the
    launch prints and writes what one process does (a bad row skipped, progress bars), not once a process."""
    d, e = env
    out = d / model.replace(":", "_")
    train, held_out = d / "synth" / "train_bad.jsonl", d / "synth" / "eval.jsonl"
    rows = (d / "synth" / "train.jsonl").read_text()
    train.write_text(rows + '{"image": "images/missing.png", "conversations": [{"from": "human", "value": '
                     '"<image>\\nhi"}, {"from": "gpt", "value": "hi"}]}\n')
    # The random sampler: batches by modality are made per process; LoRA dropout would draw per process.
    common = ["--train_file", str(train), "--eval_file", str(held_out), *FAST, "--model_name_or_path", model,
              "--max_steps", "3", "--lora_dropout", "0", "--train_sampling_strategy", "random",
              "--eval_max_samples", "4", "--shuffled_image_check", "true", "--skip_bad_rows", "true"]
    one = _run([*common, "--per_device_train_batch_size", "8", "--output_dir", str(out / "one")], e)
    assert one.returncode == 0, one.stderr[-4000:]
    config = str(ROOT / "accelerate_configs" / "multi_cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--main_process_port", "29581", str(TRAIN), *common, "--per_device_train_batch_size", "4",
           "--output_dir", str(out / "two")]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    # Rank 0 alone encoded the data (opening every image; one progress bar a split, ending once); rank 1
    # read its samples, and they are removed.
    for path in (train, held_out):  # bars started (tqdm may draw the finished one twice, as timing falls)
        assert len(re.findall(rf"encoding {re.escape(str(path))}: +0%", r.stderr)) == 1, r.stderr[-4000:]
    bad_line = rows.count("\n") + 1
    skipped = f"{train}: skipped 1 invalid row(s) of {bad_line}"
    for run, logs in (("one", one), ("two", r)):
        assert [x["line"] for x in read_jsonl(out / run / "rejects" / "train.rejects.jsonl")] == [bad_line]
        assert logs.stdout.count(skipped) == 1, logs.stdout[-2000:]
    for bar in ("eval prompt lengths", "Map"):
        assert 0 < r.stderr.count(bar) == one.stderr.count(bar), bar
    assert not list((out / "two").glob(".encoded-*"))
    one, two = (json.loads((out / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert (one["world_size"], two["world_size"], one["global_step"], two["global_step"]) == (1, 2, 3, 3)
    losses = [[h["loss"] for h in json.loads((out / run / "trainer_state.json").read_text())["log_history"]
               if "loss" in h] for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    from safetensors.torch import load_file

    ref, got = (load_file(out / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert ref.keys() == got.keys() and any("multi_modal_projector" in k for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
    assert two["after"] == pytest.approx(one["after"], abs=1e-6)
    assert len(read_jsonl(out / "two" / "predictions" / "final.jsonl")) == 4


def test_trainer_gives_the_projector_its_learning_rate_and_batches_by_modality(tmp_path):
    import datasets
    from transformers import TrainingArguments

    from recipes.common.args import FreezeArguments, LearningRateArguments, PeftArguments
    from recipes.common.peft_setup import apply_freezing, apply_peft, trained_modules_to_save
    from recipes.common.sampling import ModalityLengthGroupedSampler
    from recipes.llava_instruct.trainer import InstructTrainer
    from tests.test_llava_chat import _tiny_llava

    model = _tiny_llava()
    freeze = FreezeArguments(freeze_bridge=False, unfreeze_last_n_vision_layers=1)
    model = apply_peft(model, PeftArguments(modules_to_save=trained_modules_to_save(model, freeze)))
    freeze.freeze_bridge = None
    apply_freezing(model, freeze)
    data = datasets.Dataset.from_list([{"input_ids": [1] * n, "length": n, "has_image": n > 3}
                                       for n in range(1, 9)])
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, use_cpu=True,
                             report_to=[], train_sampling_strategy="group_by_length",
                             per_device_train_batch_size=2)
    trainer = InstructTrainer(model=model, args=args, train_dataset=data,
                              learning_rates=LearningRateArguments(bridge_lr=3e-3, vision_lr=1e-5))
    lrs = {(round(g["lr"], 6), g["weight_decay"]) for g in trainer.create_optimizer().param_groups}
    # projector, vision layer, LoRA
    assert lrs == {(3e-3, 0.1), (3e-3, 0.0), (1e-5, 0.1), (1e-5, 0.0), (1e-4, 0.1)}
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler) and sampler.batch_size == 2
    assert sampler.seed == args.seed == 42
    trainer.args.data_seed = 7  # --data_seed orders the data, as in the Trainer's own sampler
    assert trainer._get_train_sampler().seed == 7


def test_bf16_weights_with_bf16_autocast_generate_before_and_after(env):
    """--dtype bfloat16 --bf16: the float32 projector copy meets the bf16 vision tower when the eval
    generates, which runs under the training's autocast (`generate` goes around accelerate's)."""
    d, e = env
    r = _run([*_data(d), "--output_dir", str(d / "bf16"), *FAST, "--max_steps", "1", "--dtype", "bfloat16",
              "--bf16", "--eval_max_samples", "3"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((d / "bf16" / "metrics.json").read_text())
    assert metrics["before"] and metrics["after"]


@pytest.mark.matrix
def test_two_processes_resumed_in_a_later_epoch_train_its_batches(env):
    """2 processes, modality-grouped batches, a checkpoint in the middle of the second epoch: the resumed
    run trains the batches the uninterrupted one did (the sampler's epoch reaches it through accelerate's
    skip_first_batches wrapper), to the same losses and adapter."""
    d, e = env
    out = d / "resume2"
    config = str(ROOT / "accelerate_configs" / "multi_cpu.yaml")
    common = [*_data(d), *FAST, "--max_steps", "9", "--lora_dropout", "0", "--eval_max_samples", "2",
              "--shuffled_image_check", "false", "--per_device_train_batch_size", "4",
              "--save_strategy", "steps", "--save_steps", "8"]

    def launch(output_dir, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
               "--main_process_port", "29583", str(TRAIN), *common, "--output_dir", str(output_dir), *extra]
        r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        return json.loads((output_dir / "trainer_state.json").read_text())

    whole = launch(out / "whole")
    state = json.loads((out / "whole" / "checkpoint-8" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2  # step 8 lies inside the second epoch
    shutil.copytree(out / "whole" / "checkpoint-8", out / "resumed" / "checkpoint-8")
    resumed = launch(out / "resumed", "--resume_from_checkpoint", "last")
    losses = [[h["loss"] for h in state["log_history"] if "loss" in h] for state in (whole, resumed)]
    assert losses[1][-1] == pytest.approx(losses[0][-1], rel=1e-5)
    from safetensors.torch import load_file

    ref, got = (load_file(out / run / "adapter_model.safetensors") for run in ("whole", "resumed"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
