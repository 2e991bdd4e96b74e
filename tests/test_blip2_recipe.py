"""blip2_lora_caption end to end on the tiny BLIP-2: train, metrics, merge equality, resume, bad input, 2
processes."""

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_tools.jsonl import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "blip2_lora_caption" / "train.py"
MERGE = ROOT / "recipes" / "blip2_lora_caption" / "merge.py"
# tiny:blip2-opt has random weights: the tests check the code path, not what pre-training buys.
FAST = ["--model_name_or_path", "tiny:blip2-opt", "--report_to", "none", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--max_new_tokens", "8", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def env(recipe_env):
    """A small caption set (40 train images, 8 eval) and a model cache of the module's own."""
    return recipe_env("blip2", "caption", 48, 40)


def _run(args, env, **kw):
    return subprocess.run([sys.executable, str(TRAIN), *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def _data(d):
    return ["--train_file", str(d / "synth" / "train.jsonl"), "--eval_file", str(d / "synth" / "eval.jsonl")]


def test_train_saves_adapter_and_metrics_and_merge_equals_adapter_plus_base(env):
    d, e = env
    out = d / "run"
    r = _run([*_data(d), "--output_dir", str(out), "--max_steps", "6", *FAST], e)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert ({"eval_CIDEr", "eval_Bleu_4", "eval_ROUGE_L"} <= set(metrics["before"])
            and set(metrics["before"]) == set(metrics["after"]))
    assert "train length budget: 200 samples, 0 truncated" in r.stderr  # 40 images x 5 captions
    assert (out / "adapter_model.safetensors").exists() and (out / "processor_config.json").exists()
    assert "component" in r.stderr and "bridge" in r.stderr  # the parameter table

    merged = d / "merged"
    r = subprocess.run([sys.executable, str(MERGE), "--run", str(out), "--out", str(merged)], env=e,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [p for p in d.iterdir() if p.name.startswith(".merged.")]  # its temp folder, renamed
    assert (merged / "run.json").read_text() == (out / "run.json").read_text()  # how it trained (its prompt)
    # a folder that holds anything is never written into; a failed merge leaves no folder behind
    saved = sorted((p.name, p.stat().st_mtime_ns) for p in merged.iterdir())
    for run, target in ((out, merged), (d / "no-such-run", d / "merged2")):
        r = subprocess.run([sys.executable, str(MERGE), "--run", str(run), "--out", str(target)], env=e,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len([line for line in r.stderr.splitlines() if line.startswith("error: ")]) == 1, r.stderr
    assert "merged: exists and is not an empty folder" in subprocess.run(
        [sys.executable, str(MERGE), "--run", str(out), "--out", str(merged)], env=e, capture_output=True,
        text=True).stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in merged.iterdir()) == saved
    assert not (d / "merged2").exists() and not [p for p in d.iterdir() if p.name.startswith(".merged2.")]

    from peft import PeftConfig, PeftModel
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from data_tools.images import load_image

    base = Blip2ForConditionalGeneration.from_pretrained(
        PeftConfig.from_pretrained(out).base_model_name_or_path)
    adapted = PeftModel.from_pretrained(base, out).eval()
    full = Blip2ForConditionalGeneration.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)
    rows = read_jsonl(d / "synth" / "eval.jsonl")[:4]
    inputs = processor(images=[load_image(d / "synth" / r["image"]) for r in rows],
                       text=[r["captions"][0] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = adapted(**inputs).logits, full(**inputs).logits
        assert not torch.allclose(a, Blip2ForConditionalGeneration.from_pretrained(
            PeftConfig.from_pretrained(out).base_model_name_or_path)(**inputs).logits,
            atol=1e-3)  # training changed it
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        gen = dict(pixel_values=inputs["pixel_values"], max_new_tokens=6, do_sample=False)
        assert torch.equal(adapted.generate(**gen), full.generate(**gen))


def _parses(path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


# An evaluation at the epoch's end (step 25): a stopped run must not run one at the step it stops at.
KILLED = ["--max_steps", "30", *FAST, "--save_strategy", "steps", "--save_steps", "10",
          "--eval_strategy", "epoch"]


def _wait_for_checkpoint_10(p: subprocess.Popen, out: Path) -> None:
    # Until checkpoint-10 is complete (trainer_state.json, its last file, parses): the 20 steps left and the
    # final evaluation keep the run from finishing first even on a fast machine.
    deadline = time.time() + 300
    while (not _parses(out / "checkpoint-10" / "trainer_state.json") and p.poll() is None
           and time.time() < deadline):
        time.sleep(0.02)


def _loss_tail(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h][-5:]


@pytest.fixture(scope="module")
def whole(env):
    """An uninterrupted 30-step run that saves every 10 steps: what killed and stopped runs must end as."""
    d, e = env
    r = _run([*_data(d), *KILLED, "--output_dir", str(d / "whole"), "--dataloader_num_workers", "0"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "whole"


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(env, whole):
    d, e = env
    common = [*_data(d), *KILLED, "--dataloader_num_workers", "0"]
    out = d / "killed"
    p = subprocess.Popen([sys.executable, str(TRAIN), *common, "--output_dir", str(out)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_checkpoint_10(p, out)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    # what a kill while saving leaves: weights, no trainer_state.json; 'last' skips it
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / "adapter_config.json").write_text("{}")
    r = _run([*common, "--output_dir", str(out), "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]

    resumed = json.loads((out / "metrics.json").read_text())["after"]
    assert resumed == pytest.approx(json.loads((whole / "metrics.json").read_text())["after"], abs=1e-6)
    assert _loss_tail(out) == pytest.approx(_loss_tail(whole), rel=1e-4)


def test_sigterm_with_jit_checkpoint_saves_the_step_under_way_and_the_resumed_run_ends_the_same(env, whole):
    """--enable_jit_checkpoint: SIGTERM to the run and its DataLoader workers, as a scheduler sends it,
    saves the step under way and stops with exit code 143, nothing scored (not even the evaluation an epoch
    end would run); the same command (a job script's: --resume_from_checkpoint auto) then goes on, and ends
    the run as if it had never stopped."""
    d, e = env
    common = [*_data(d), *KILLED, "--dataloader_num_workers", "2", "--enable_jit_checkpoint",
              "--resume_from_checkpoint", "auto"]
    out = d / "stopped"
    p = subprocess.Popen([sys.executable, str(TRAIN), *common, "--output_dir", str(out)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_checkpoint_10(p, out)
    os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143 and "Traceback" not in err, err[-3000:]
    step = int(re.search(r"SIGTERM: training stopped at step (\d+) of 30 and saved (\S+)\. Run the same "
                         r"command with --resume_from_checkpoint last \(or auto\)", err)[1])
    assert 10 <= step < 30 and err.count("SIGTERM: training stopped") == 1 and "resuming from" not in err
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "metrics.json").exists() and not (out / "predictions" / "final.jsonl").exists()
    assert not (out / "predictions" / f"step-{step}.jsonl").exists() or step == 25  # an epoch is 25 steps

    r = _run([*common, "--output_dir", str(out)], e)
    assert r.returncode == 0 and f"resuming from {out / f'checkpoint-{step}'}\n" in r.stderr, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 30
    resumed = json.loads((out / "metrics.json").read_text())["after"]
    assert resumed == pytest.approx(json.loads((whole / "metrics.json").read_text())["after"], abs=1e-6)
    assert _loss_tail(out) == pytest.approx(_loss_tail(whole), rel=1e-4)


def test_bad_inputs_are_clear_errors(env):
    d, e = env
    r = _run([*_data(d), "--output_dir", str(d / "x"), *FAST, "--model_name_or_path", "./no/such/model"], e)
    assert r.returncode != 0 and "model path './no/such/model' does not exist" in r.stderr

    bad = d / "synth" / "bad.jsonl"
    rows = read_jsonl(d / "synth" / "train.jsonl")[:10]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"image": "images/000000.png"}\n{oops\n')
    args = ["--train_file", str(bad), "--eval_file", str(d / "synth" / "eval.jsonl"),
            "--output_dir", str(d / "y"), "--max_steps", "1", *FAST]
    r = _run(args, e)
    assert (r.returncode != 0 and "2 invalid row(s)" in r.stderr
            and f"{bad}:11: field 'captions'" in r.stderr)
    assert "python -m data_tools clean" in r.stderr
    r = _run([*args, "--skip_bad_rows"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{bad}: skipped 2 invalid row(s) of 12" in r.stdout + r.stderr
    rejects = d / "y" / "rejects" / "train.rejects.jsonl"  # under the run, not beside the user's data
    assert [x["reason"] for x in read_jsonl(rejects)] == ["missing_field", "malformed_json"]
    assert not (d / "synth" / "bad.jsonl.rejects.jsonl").exists()

    broken = d / "synth" / "broken.jsonl"
    (d / "synth" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_jsonl(broken, [{"image": "images/broken.png", "captions": ["a red circle"]}] * 8)
    r = _run(["--train_file", str(broken), "--output_dir", str(d / "z"), "--max_steps", "1", *FAST], e)
    assert r.returncode == 2 and "images/broken.png" in r.stderr and "unreadable_image" in r.stderr
    assert "Traceback" not in r.stderr and f"{broken}:1: field 'image'" in r.stderr

    # A length budget that the image tokens alone exceed: said before any generation, not at the sampler.
    r = _run([*_data(d), "--output_dir", str(d / "w"), *FAST, "--max_length", "2"], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error: no train sample fits: length budget: " in r.stderr and "raise --max_length" in r.stderr
    assert not (d / "w" / "predictions").exists()

    # A resume whose optimizer groups differ from the checkpoint's (per-component rates then, not now).
    groups = [*_data(d), *FAST, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
              "--output_dir", str(d / "groups")]
    assert _run([*groups, "--lm_lr", "0.001"], e).returncode == 0
    shutil.rmtree(d / "groups" / "checkpoint-2")
    r = _run([*groups, "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "the checkpoint's optimizer has a parameter group per model component" in r.stderr
    # Other LoRA settings: refused before anything is scored, the settings named.
    r = _run([*groups, "--lm_lr", "0.001", "--lora_r", "4", "--lora_alpha", "64", "--resume_from_checkpoint",
              "last"], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("adapter.default.lora_alpha 32 -> 64; adapter.default.r 16 -> 4; trainable_parameters "
            in r.stderr), r.stderr[-3000:]
    assert json.loads((d / "groups" / "run.json").read_text())["adapter"]["default"]["r"] == 16
    r = _run([*groups, "--lm_lr", "0.001", "--peft_method", "none", "--freeze_language_model", "false",
              "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "adapter {'default': {" in r.stderr and "} -> None; trainable_parameters " in r.stderr

    # --save_only_model checkpoints hold no optimizer state: going on from one is refused before anything is
    # scored (it went on with a fresh optimizer and the schedule restarted); one at the run's end is scored.
    only = [*groups[:-1], str(d / "only-model"), "--save_only_model", "true"]
    assert _run(only, e).returncode == 0
    r = _run([*only, "--max_steps", "3", "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"error: --resume_from_checkpoint: {d / 'only-model' / 'checkpoint-2'} holds no optimizer and "
            "learning-rate schedule state" in r.stderr), r.stderr[-3000:]
    assert not (d / "only-model" / "checkpoint-3").exists()
    r = _run([*only, "--resume_from_checkpoint", "last"], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is the run's last step (--max_steps 2): scoring it" in r.stderr, r.stderr[-3000:]

    # Another image size: BLIP-2 would add the first of its 64 px position embeddings to a 32 px image.
    r = _run([*_data(d), "--output_dir", str(d / "v"), *FAST, "--processor_kwargs",
              '{"size": {"height": 32, "width": 32}}'], e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("error: --processor_kwargs size {'height': 32, 'width': 32}: BLIP-2's vision tower has position "
            "embeddings for 64 x 64 px images only" in r.stderr), r.stderr[-3000:]


def test_a_cut_off_image_is_found_before_the_first_step_and_the_headline_is_on_the_test_split(env):
    """A truncated image: an error naming file:line before training, or with --skip_bad_rows a counted reject
    and a run that ends; with --test_file the before/after numbers are on it, the val split's apart."""
    d, e = env
    rows = read_jsonl(d / "synth" / "train.jsonl")[:12]
    whole = (d / "synth" / rows[0]["image"]).read_bytes()
    (d / "synth" / "images" / "cut.png").write_bytes(whole[: len(whole) // 2])
    rows[5] = {**rows[5], "image": "images/cut.png"}
    write_jsonl(d / "synth" / "cut.jsonl", rows)
    held = read_jsonl(d / "synth" / "eval.jsonl")
    write_jsonl(d / "synth" / "val.jsonl", held[:4])
    write_jsonl(d / "synth" / "test.jsonl", held[4:])
    args = ["--train_file", str(d / "synth" / "cut.jsonl"), "--eval_file", str(d / "synth" / "val.jsonl"),
            "--test_file", str(d / "synth" / "test.jsonl"), "--max_steps", "3", *FAST]
    r = _run([*args, "--output_dir", str(d / "cut")], e)
    assert (r.returncode == 2
            and f"{d / 'synth' / 'cut.jsonl'}:6: field 'image'" in r.stderr), r.stderr[-3000:]
    assert "truncated_image" in r.stderr and "Traceback" not in r.stderr and "{'loss'" not in r.stderr
    # Relative paths, from the data's folder: metrics.json holds them absolute, for `make eval` anywhere.
    out = d / "cut-skip"
    relative = ["--train_file", "cut.jsonl", "--eval_file", "val.jsonl", "--test_file", "test.jsonl",
                *args[6:]]
    r = _run([*relative, "--output_dir", str(out), "--skip_bad_rows"], e, cwd=d / "synth")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["reason"] for x in read_jsonl(out / "rejects" / "train.rejects.jsonl")] == ["truncated_image"]
    metrics = json.loads((out / "metrics.json").read_text())
    synth = (d / "synth").resolve()
    assert metrics["heldout"] == "test" and metrics["heldout_file"] == str(synth / "test.jsonl")
    assert metrics["train_file"] == str(synth / "cut.jsonl")
    assert metrics["eval_file"] == str(synth / "val.jsonl")
    assert (set(metrics["val"]) == {"before", "after"}
            and set(metrics["val"]["after"]) == set(metrics["after"]))
    keys = {x["key"] for x in read_jsonl(out / "predictions" / "final.jsonl")}
    assert keys == {str((d / "synth" / x["image"]).resolve()) for x in held[4:]}  # the test images
    keys = {x["key"] for x in read_jsonl(out / "predictions" / "val-final.jsonl")}
    assert keys == {str((d / "synth" / x["image"]).resolve()) for x in held[:4]}


def _losses(run):
    return [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]


def test_two_processes_equal_one_process_with_the_same_global_batch(env):
    """2 CPU processes x 4 samples train as 1 process x 8: the same losses, weights and held-out metrics."""
    d, e = env
    # Dropout would draw per process; 7 eval images: rank 1 pads its 3 to rank 0's 4 (as many batches).
    common = [*_data(d), "--max_steps", "3", *FAST, "--lora_dropout", "0", "--eval_max_samples", "7",
              "--per_device_eval_batch_size", "2"]
    r = _run([*common, "--per_device_train_batch_size", "8", "--output_dir", str(d / "one")], e)
    assert r.returncode == 0, r.stderr[-4000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", "29547", str(TRAIN),
           *common, "--per_device_train_batch_size", "4", "--output_dir", str(d / "two"),
           "--cache_vision_features", "true"]  # the same losses as the live tower
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("parameters:\n") == 1  # the recipe's info is logged by the main process alone
    # The main process computes the features, its progress shown; the other reads them.
    assert "vision features: 2 / 48 images" in r.stderr and r.stderr.count("vision features of 48") == 1
    one, two = (json.loads((d / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert (one["world_size"], two["world_size"], one["global_step"], two["global_step"]) == (1, 2, 3, 3)
    assert (_losses(d / "two") == pytest.approx(_losses(d / "one"), abs=1e-5)
            and len(_losses(d / "one")) == 3)
    from safetensors.torch import load_file

    ref, got = (load_file(d / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
    # Generation split across the processes: the same predictions and scores.
    assert two["after"] == pytest.approx(one["after"], abs=1e-6)
    predictions = [read_jsonl(d / run / "predictions" / "final.jsonl") for run in ("one", "two")]
    assert len(predictions[0]) == 7 and sorted(predictions[1], key=str) == sorted(predictions[0], key=str)


@pytest.mark.slow
def test_sigterm_stops_two_processes_at_the_same_step(env):
    """Under 2 processes, the one that gets SIGTERM first does not stop alone: both save the same step (the
    checkpoint holds both processes' RNG states), and the message is printed once."""
    d, e = env
    out = d / "two-stopped"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", "29553", str(TRAIN),
           *_data(d), *KILLED, "--per_device_train_batch_size", "4", "--dataloader_num_workers", "1",
           "--enable_jit_checkpoint", "--output_dir", str(out)]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _wait_for_checkpoint_10(p, out)
    os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143, err[-3000:]
    steps = re.findall(r"SIGTERM: training stopped at step (\d+) of 30", err)
    assert len(steps) == 1 and 10 <= int(steps[0]) < 30, err[-3000:]
    saved = out / f"checkpoint-{steps[0]}"
    assert (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()
    assert _parses(saved / "trainer_state.json") and not (out / "metrics.json").exists()


def test_cached_vision_features_train_exactly_as_the_live_tower(env):
    """--cache_vision_features: the same losses and held-out metrics as running the frozen tower every
    step."""
    d, e = env
    common = [*_data(d), "--max_steps", "4", *FAST, "--save_strategy", "steps", "--save_steps", "4"]
    runs = {}
    for cached in ("false", "true"):
        out = d / f"features-{cached}"
        r = _run([*common, "--output_dir", str(out), "--cache_vision_features", cached], e)
        assert r.returncode == 0, r.stderr[-3000:]
        history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        runs[cached] = ([h["loss"] for h in history if "loss" in h],
                        json.loads((out / "metrics.json").read_text())["after"])
    assert "vision features of 48 images" in r.stderr  # 40 training + 8 evaluation images, each once
    (folder,) = [p for p in (d / "features-true" / "vision_features").iterdir() if p.is_dir()]
    meta = json.loads((folder / "features.json").read_text())
    # tiny ViT: 8 x 8 patches + class token, 64 wide
    assert meta["shape"] == [65, 64] and meta["dtype"] == "float32"
    assert len(runs["true"][0]) == 4 and runs["true"][0] == pytest.approx(runs["false"][0], rel=1e-5)
    assert runs["true"][1] == pytest.approx(runs["false"][1], abs=1e-6)

    # A second run with the same model, processor and images reuses the features; a trained tower refuses
    # them.
    r = _run([*common, "--output_dir", str(d / "features-again"), "--cache_vision_features", "true",
              "--vision_feature_dir", str(d / "features-true" / "vision_features")], e)
    assert r.returncode == 0 and "vision features: " not in r.stderr and str(folder) in r.stderr
    r = _run([*common, "--output_dir", str(d / "features-bad"), "--cache_vision_features", "true",
              "--unfreeze_last_n_vision_layers", "1"], e)
    assert r.returncode != 0 and "parameters of the vision tower train" in r.stderr
