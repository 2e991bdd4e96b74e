"""clip_retrieval end to end on the random tiny CLIP: metrics and rescoring, WiSE-FT, 2 processes = 1, resume,
LoRA and its merge, embed + search, bad input. (Which weights each mode trains: test_clip_trainer.py.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "clip_retrieval"
# SGD without clipping: a parameter's change is lr x its gradient, so equal parameters mean equal gradients
# (Adam's first step is ~lr x sign(gradient) and would hide a wrong gradient scale).
FAST = ["--model_name_or_path", "tiny:clip", "--report_to", "none", "--per_device_eval_batch_size", "16",
        "--eval_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "1",
        "--optim", "sgd", "--learning_rate", "2.0", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--weight_decay", "0", "--max_grad_norm", "0"]
METRICS = {f"eval_{d}_{m}" for d in ("image_to_text", "text_to_image")
           for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """16 train images (most with hard negatives) and 8 eval images, a zero-shot file, a shared model cache,
    one full run."""
    d = tmp_path_factory.mktemp("clip")
    src = read_jsonl(make_synthetic("retrieval", 24, d / "synth", seed=1, progress=False))
    for r in src[:16:3]:  # images without hard negatives: the processes gather different numbers of texts
        del r["neg_captions"]
    write_jsonl(d / "synth" / "train.jsonl", src[:16])
    write_jsonl(d / "synth" / "eval.jsonl", src[16:])
    write_jsonl(d / "synth" / "zs.jsonl", [{"image": r["image"], "label": r["objects"][0]["size"]}
                                           for r in src[16:]])
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false")
    data = ["--train_file", str(d / "synth" / "train.jsonl"), "--eval_file", str(d / "synth" / "eval.jsonl"),
            "--zero_shot_file", str(d / "synth" / "zs.jsonl"), "--hard_negatives", "true"]
    # 16 images, batch 8: 2 steps an epoch; 5 steps cross two epoch boundaries; checkpoint-3 is mid-epoch.
    whole = [*data, "--max_steps", "5", "--save_strategy", "steps", "--save_steps", "3", *FAST,
             "--eval_strategy", "steps", "--eval_steps", "5"]
    r = _run([*whole, "--per_device_train_batch_size", "8", "--output_dir", str(d / "whole"),
              "--wise_ft_alpha", "0.5"], e)
    assert r.returncode == 0, r.stderr[-4000:]
    return d, e, data, whole


def _run(args, env, script="train.py", **kw):
    return subprocess.run([sys.executable, str(RECIPE / script), *args], env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def _losses(run):
    return [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]


def test_run_writes_metrics_that_make_eval_reproduces_and_wise_ft_interpolates(env):
    d, _, _, _ = env
    out = d / "whole"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (set(metrics["before"]) == set(metrics["after"]) == set(metrics["wise_ft"]["0.5"])
            == METRICS | {"eval_zero_shot_accuracy"})
    assert ((metrics["task"], metrics["global_step"], metrics["zero_shot_labels"])
            == ("retrieval", 5, ["large", "small"]))
    assert len(_losses(out)) == 5 and metrics["after"] != metrics["before"]
    # config.yaml's max_length none: the text tower's length, recorded for embed.py and serve
    base = json.loads((Path(metrics["model"]) / "config.json").read_text())
    assert metrics["max_length"] == base["text_config"]["max_position_embeddings"]
    # The Trainer's evaluation at step 5 logs the loss and the same metrics (metric_for_best_model can use
    # them).
    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "eval_loss" in h]
    assert [h["step"] for h in logged] == [5] and logged[0]["eval_loss"] > 0
    assert ({k: v for k, v in logged[0].items() if k in metrics["after"]}
            == pytest.approx(metrics["after"], abs=1e-6))

    from eval.report import report_run

    row = report_run(out)  # what `make eval` does: Recall@K again from the saved embeddings
    for name in ("before", "final"):
        logged = metrics["after" if name == "final" else "before"]
        assert row[name] == pytest.approx({k: logged[f"eval_{k}"] for k in row[name]}, abs=1e-6)
    assert (row["n"], row["n_eval"]) == (8, 8) and "text_to_image_R@1" in (out / "report.md").read_text()

    base = load_file(d / "cache" / "tiny" / "clip-v2" / "model.safetensors")
    tuned, mixed = load_file(out / "model.safetensors"), load_file(out / "wise_ft-0.5" / "model.safetensors")
    assert not torch.equal(tuned["visual_projection.weight"], base["visual_projection.weight"])
    for k, w in mixed.items():
        torch.testing.assert_close(w, (base[k] + tuned[k]) / 2, atol=1e-6, rtol=0)


def test_two_processes_equal_one_process_with_the_same_global_batch(env):
    d, e, _, whole = env
    out = d / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
           "--main_process_port", "29561", str(RECIPE / "train.py"), *whole,
           "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
           "--output_dir", str(out), "--save_strategy", "no"]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = (json.loads((d / "whole" / "metrics.json").read_text()),
                json.loads((out / "metrics.json").read_text()))
    assert (two["world_size"], two["global_step"]) == (2, 5)
    # The loss of every step (each over the 8 pairs of the global batch) and the weights after them.
    assert _losses(out) == pytest.approx(_losses(d / "whole"), abs=1e-5)
    ref, got = load_file(d / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    base = load_file(d / "cache" / "tiny" / "clip-v2" / "model.safetensors")
    assert max((ref[k] - base[k]).abs().max().item() for k in ref) > 1e-2  # the steps moved the weights
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
    # The evaluation, split across the processes, gives the same numbers.
    assert two["before"] == pytest.approx(one["before"], abs=1e-6)
    # The eval loss too: the 8 eval pairs are one global batch in both runs (4 per process here).
    eval_loss = lambda run: [h["eval_loss"]  # noqa: E731
                             for h in json.loads((run / "trainer_state.json").read_text())["log_history"]
                             if "eval_loss" in h]
    assert eval_loss(out) == pytest.approx(eval_loss(d / "whole"), abs=1e-5)


def _resume_whole_run(env, step: int, out: Path, how: str):
    """The whole run's command, resumed (`how`: last, auto) in `out` from a copy of its checkpoint-`step`."""
    d, e, _, whole = env
    shutil.copytree(d / "whole" / f"checkpoint-{step}", out / f"checkpoint-{step}")
    r = _run([*whole, "--per_device_train_batch_size", "8", "--output_dir", str(out),
              "--resume_from_checkpoint", how], e)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_resumed_run_ends_like_the_uninterrupted_one(env):
    d = env[0]
    out = d / "resumed"
    _resume_whole_run(env, 3, out, "last")
    # Steps 4 and 5: the rest of epoch 1 (its first batch skipped) and the first of epoch 2, with their
    # captions.
    assert _losses(out)[-2:] == pytest.approx(_losses(d / "whole")[-2:], abs=1e-6)
    ref, got = load_file(d / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)


def test_lora_on_the_vision_tower_only_and_its_merge(env):
    d, e, data, _ = env
    out = d / "lora"
    # The base as a user's local checkpoint, relative to the folder the run starts in; merged from another.
    r = _run([*data, "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
              *FAST, "--model_name_or_path", "cache/tiny/clip-v2", "--save_strategy", "no",
              "--peft_method", "lora", "--lora_towers", "vision", "--learning_rate", "0.5"], e, cwd=d)
    assert r.returncode == 0, r.stderr[-4000:]
    base_path = (d / "cache" / "tiny" / "clip-v2").resolve()
    assert (json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
            == json.loads((out / "metrics.json").read_text())["model"] == str(base_path))
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".vision_model.encoder.layers." in k and ".lora_" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "k_proj", "v_proj", "out_proj"}

    from peft import PeftModel
    from transformers import CLIPModel

    from recipes.clip_retrieval.merge import export

    merged = CLIPModel.from_pretrained(export(str(out), str(d / "lora_merged"))).eval()
    adapted = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_path), out).eval()
    base = CLIPModel.from_pretrained(base_path).eval()
    pixels, ids = torch.randn(3, 3, 64, 64), torch.tensor([[1699, 320, 666, 1700], [1699, 343, 1700, 1700]])
    with torch.no_grad():
        a, m, b = (x.get_image_features(pixel_values=pixels).pooler_output for x in (adapted, merged, base))
        torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, b, atol=1e-4)  # training changed the image tower ...
        assert torch.equal(merged.get_text_features(input_ids=ids).pooler_output,
                           base.get_text_features(input_ids=ids).pooler_output)


def test_embed_and_search_use_the_trained_model(env):
    d, e, _, _ = env
    index = d / "index"
    # Paths relative to the folder it runs in; search.py runs in another one.
    r = _run(["--model", "whole", "--file", "synth/eval.jsonl", "--out", "index"], e, "embed.py", cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    final = np.load(d / "whole" / "predictions" / "final.npz")
    images, texts = np.load(index / "images.npy"), np.load(index / "texts.npy")
    np.testing.assert_allclose(images, final["image_embeds"], atol=1e-5)  # the same model, the same eval set
    np.testing.assert_allclose(texts, final["text_embeds"], atol=1e-5)
    meta = json.loads((index / "index.json").read_text())
    assert (meta["model"], meta["file"]) == (str((d / "whole").resolve()),
                                             str((d / "synth" / "eval.jsonl").resolve()))
    query = meta["texts"][3]
    r = _run(["--index", str(index), "--query", query, "--k", "3", "--json"], e, "search.py")
    assert r.returncode == 0, r.stderr[-3000:]
    hits = json.loads(r.stdout)
    cosines = images @ texts[3]
    best = np.argsort(-cosines, kind="stable")[:3]
    assert [h["image"] for h in hits] == [meta["images"][i] for i in best]
    assert [h["score"] for h in hits] == pytest.approx([round(float(cosines[i]), 4) for i in best], abs=1e-4)

    # the reverse
    r = _run(["--index", str(index), "--image", meta["images"][2], "--k", "3", "--json"], e, "search.py")
    assert r.returncode == 0, r.stderr[-3000:]
    cosines = texts @ images[2]
    best = np.argsort(-cosines, kind="stable")[:3]
    assert [h["text"] for h in json.loads(r.stdout)] == [meta["texts"][i] for i in best]
    r = _run(["--index", str(index), "--query", query, "--k", "-1"], e, "search.py")
    assert r.returncode == 2 and "--k -1: give at least 1" in r.stderr  # not every row but the last


def test_bad_rows_are_a_clear_error(env):
    d, e, _, _ = env
    bad = d / "synth" / "bad.jsonl"
    rows = read_jsonl(d / "synth" / "train.jsonl")[:6]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows)
                   + '{"image": "images/000000.png", "captions": []}\n')
    r = _run(["--train_file", str(bad), "--output_dir", str(d / "x"), "--max_steps", "1", *FAST], e)
    assert (r.returncode != 0 and f"{bad}:7: field 'captions': is an empty list" in r.stderr
            and "--skip_bad_rows" in r.stderr)



def test_a_file_with_a_row_per_caption_is_one_record_per_image(env):
    """Eval rows naming one image are one retrieval item with all their captions, not copies of the image
    that tie with each other (text->image R@1 would be 0); train rows likewise (each image once an epoch)."""
    d, e, _, _ = env
    by_caption = lambda src: [{"image_path": r["image"], "text": c}  # noqa: E731
                              for r in read_jsonl(src) for c in r["captions"][:2]]
    (d / "synth" / "train_list.json").write_text(json.dumps(by_caption(d / "synth" / "train.jsonl")))
    (d / "synth" / "eval_list.json").write_text(json.dumps(by_caption(d / "synth" / "eval.jsonl")))
    out = d / "by_caption"
    r = _run(["--train_file", str(d / "synth" / "train_list.json"), "--eval_file",
              str(d / "synth" / "eval_list.json"), "--num_train_epochs", "1", "--per_device_train_batch_size",
              "8", "--output_dir", str(out), *FAST], e)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "32 rows merged into 16 images" in r.stderr and "16 rows merged into 8 images" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2  # 16 images at 8 a step, not 32 rows
    # The same 8 images and their first two captions, as one record each: the base model's scores.
    records = [{**r, "captions": r["captions"][:2]} for r in read_jsonl(d / "synth" / "eval.jsonl")]
    texts = [t for r in records for t in r["captions"]]
    before = np.load(out / "predictions" / "before.npz")
    assert before["image_embeds"].shape[0] == 8 and list(before["texts"]) == texts
    assert list(before["text_to_image"]) == [i for i in range(8) for _ in range(2)]

    from eval.report import report_run

    row = report_run(out)  # `make eval` reads the list file's rows as the same 8 images
    assert row["n_eval"] == 8
    logged = {k: metrics["before"][f"eval_{k}"] for k in row["before"]}
    assert row["before"] == pytest.approx(logged, abs=1e-6)


def test_a_wise_ft_alpha_outside_0_1_is_refused_before_training():
    from recipes.clip_retrieval.train import main

    # Refused while parsing: with no output folder made, and before any model or data is loaded.
    with pytest.raises(ValueError, match=r"--wise_ft_alpha 50: each alpha must be in \[0, 1\]"):
        main(["--wise_ft_alpha", "0.5", "50", "--train_file", "/nonexistent/train.jsonl", "--output_dir",
              "/nonexistent/out"])


def test_a_max_length_below_2_is_refused_before_loading():
    from recipes.clip_retrieval.train import main

    # 1 left CLIP's captions their eos alone (R@1 0), and embed.py refused the run's recorded length.
    with pytest.raises(ValueError, match=r"^--max_length 1: a text needs at least 2 tokens"):
        main(["--max_length", "1", "--model_name_or_path", "/nonexistent/model", "--train_file",
              "/nonexistent/train.jsonl", "--eval_strategy", "no", "--output_dir", "/nonexistent/out"])


def test_the_base_of_an_unfinished_runs_checkpoint_is_read_from_the_run(tmp_path):
    from recipes.clip_retrieval.merge import base_of

    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": "/models/clip"}))
    assert base_of(tmp_path / "run" / "checkpoint-4") == base_of(tmp_path / "run") == ("/models/clip", None)
    with pytest.raises(FileNotFoundError, match="pass --base"):
        base_of(tmp_path)


def test_bf16_weights_with_a_trained_float32_layer_embed_under_autocast(env):
    """--dtype bfloat16 --bf16 with frozen towers and their last layers trained: the trained float32 layers
    meet the frozen bf16 ones when the evaluation embeds, which runs under the training's autocast."""
    d, e, data, _ = env
    r = _run([*data, *FAST, "--max_steps", "1", "--per_device_train_batch_size", "8", "--dtype", "bfloat16",
              "--bf16", "--peft_method", "none", "--freeze_vision_tower", "true",
              "--unfreeze_last_n_vision_layers", "1", "--output_dir", str(d / "bf16")], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(json.loads((d / "bf16" / "metrics.json").read_text())["after"]) >= METRICS


@pytest.mark.slow
def test_clip_with_the_sigmoid_loss_trains_on_two_processes_as_on_one(env):
    """CLIP's fresh sigmoid bias is read by the loss alone, outside forward: DDP must not look for unused
    parameters (it marked the bias ready twice and stopped the first step)."""
    d, e, data, _ = env
    args = [*data, *FAST, "--loss", "sigmoid", "--max_steps", "2", "--save_strategy", "no"]
    r = _run([*args, "--per_device_train_batch_size", "8", "--output_dir", str(d / "sig1")], e)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
           "--main_process_port", "29563", str(RECIPE / "train.py"), *args,
           "--per_device_train_batch_size", "4", "--output_dir", str(d / "sig2")]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(d / "sig2") == pytest.approx(_losses(d / "sig1"), abs=1e-5)
    one, two = load_file(d / "sig1" / "model.safetensors"), load_file(d / "sig2" / "model.safetensors")
    assert one["logit_bias"].item() != -10.0
    torch.testing.assert_close(two["logit_bias"], one["logit_bias"], atol=2e-5, rtol=1e-4)


def test_a_run_resumed_at_its_last_step_is_scored_without_training_more(env):
    """--max_steps 5 is not a whole number of epochs (2 steps each): resumed at checkpoint-5, the Trainer
    would train a sixth step. The run loads it and scores it, as a requeued job's `auto` needs."""
    d = env[0]
    out = d / "resumed_at_end"
    r = _resume_whole_run(env, 5, out, "auto")
    assert "checkpoint-5 is the run's last step (--max_steps 5): scoring it" in r.stderr
    assert not (out / "checkpoint-6").exists()
    metrics, ref = (json.loads((run / "metrics.json").read_text()) for run in (out, d / "whole"))
    assert (metrics["global_step"], metrics["after_step"]) == (5, 5)
    assert metrics["after"] == pytest.approx(ref["after"], abs=1e-6)
    ref_weights, got = load_file(d / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref_weights.keys() == got.keys() and all(torch.equal(got[k], ref_weights[k]) for k in ref_weights)


def test_a_wise_ft_export_says_its_weights_are_blended_with_the_base(env, capsys):
    from recipes.clip_retrieval.merge import main

    d, _, _, _ = env
    main(["--run", str(d / "whole"), "--out", str(d / "wise_export")])
    plain = capsys.readouterr().out
    main(["--run", str(d / "whole"), "--out", str(d / "wise_export_half"), "--wise_ft_alpha", "0.5"])
    blended = capsys.readouterr().out
    assert plain.strip().endswith("the run's weights at step 5 of 5")
    assert blended.strip().endswith("the run's weights at step 5 of 5, blended with its base: "
                                    "0.5 * fine-tuned + 0.5 * base (--wise_ft_alpha 0.5)")
