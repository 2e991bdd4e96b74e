"""clip_retrieval end to end on the random tiny SigLIP 2 (NaFlex) with the sigmoid loss: 2 processes = 1
process with the same global batch (loss and weights), WiSE-FT, LoRA and its merge, embed + search; and the
tiny SigLIP (fixed resolution, SentencePiece) with frozen towers but their last layers."""

import json
import os
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
# SGD without clipping: equal parameters after the steps mean equal gradients (see test_clip_recipe.py).
FAST = [
    "--model_name_or_path",
    "tiny:siglip2",
    "--report_to",
    "none",
    "--per_device_eval_batch_size",
    "16",
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--logging_steps",
    "1",
    "--optim",
    "sgd",
    "--learning_rate",
    "0.1",
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
    "--weight_decay",
    "0",
    "--max_grad_norm",
    "0",
    "--save_strategy",
    "no",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """16 train images (most with hard negatives), 8 eval images, a zero-shot file, a shared model cache, one
    single-process run of 4 steps of 8 pairs."""
    d = tmp_path_factory.mktemp("siglip")
    src = read_jsonl(make_synthetic("retrieval", 24, d / "synth", seed=1, progress=False))
    for r in src[:16:3]:  # images without hard negatives: the processes gather different numbers of texts
        del r["neg_captions"]
    write_jsonl(d / "synth" / "train.jsonl", src[:16])
    write_jsonl(d / "synth" / "eval.jsonl", src[16:])
    write_jsonl(
        d / "synth" / "zs.jsonl", [{"image": r["image"], "label": r["objects"][0]["size"]} for r in src[16:]]
    )
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false")
    data = [
        "--train_file",
        str(d / "synth" / "train.jsonl"),
        "--eval_file",
        str(d / "synth" / "eval.jsonl"),
        "--zero_shot_file",
        str(d / "synth" / "zs.jsonl"),
        "--hard_negatives",
        "true",
    ]
    whole = [*data, "--max_steps", "4", *FAST]
    r = _run(
        [
            *whole,
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(d / "whole"),
            "--wise_ft_alpha",
            "0.5",
        ],
        e,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return d, e, data, whole


def _run(args, env, script="train.py"):
    return subprocess.run(
        [sys.executable, str(RECIPE / script), *args], env=env, capture_output=True, text=True, timeout=600
    )


def _short_run(data, out, env, *extra):
    """train.py for 2 steps of batch 8 on the data into `out`, with `extra` flags."""
    return _run([*data, "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
                 *FAST, *extra], env)


def _losses(run):
    return [
        h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h
    ]


def test_sigmoid_is_the_default_and_wise_ft_interpolates(env):
    d, _, _, _ = env
    metrics = json.loads((d / "whole" / "metrics.json").read_text())
    assert metrics["loss"] == "sigmoid" and metrics["global_step"] == 4 and len(_losses(d / "whole")) == 4
    assert "eval_zero_shot_accuracy" in metrics["after"] and metrics["after"] != metrics["before"]
    base = load_file(d / "cache" / "tiny" / "siglip2-v1" / "model.safetensors")
    tuned, mixed = (
        load_file(d / "whole" / "model.safetensors"),
        load_file(d / "whole" / "wise_ft-0.5" / "model.safetensors"),
    )
    assert tuned["logit_bias"].item() != base["logit_bias"].item() == -10.0  # the bias trains
    for k, w in mixed.items():
        torch.testing.assert_close(w, (base[k] + tuned[k]) / 2, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(env):
    d, e, _, whole = env
    out = d / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
        "--main_process_port",
        "29571",
        str(RECIPE / "train.py"),
        *whole,
        "--loss",
        "sigmoid",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--output_dir",
        str(out),
    ]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = (
        json.loads((d / "whole" / "metrics.json").read_text()),
        json.loads((out / "metrics.json").read_text()),
    )
    assert (two["world_size"], two["global_step"], two["loss"]) == (2, 4, "sigmoid")
    # The loss of every step (each over the 8 images x 8 + hard-negative texts of the global batch) ...
    assert _losses(out) == pytest.approx(_losses(d / "whole"), rel=1e-6, abs=1e-5)
    # ... and the weights after the steps, temperature and bias included: the same gradients.
    ref, got = load_file(d / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    base = load_file(d / "cache" / "tiny" / "siglip2-v1" / "model.safetensors")
    assert max((ref[k] - base[k]).abs().max().item() for k in ref) > 1e-2  # the steps moved the weights
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
    assert two["before"] == pytest.approx(one["before"], abs=1e-6)


def test_lora_merge_embed_and_search(env):
    d, e, data, _ = env
    out = d / "lora"
    r = _short_run(data, out, e, "--peft_method", "lora", "--lora_towers", "vision", "--learning_rate", "2.0")
    assert r.returncode == 0, r.stderr[-4000:]
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".vision_model.encoder.layers." in k and ".lora_" in k for k in adapter)

    from peft import PeftModel
    from transformers import AutoModel

    from recipes.clip_retrieval.merge import export

    merged = AutoModel.from_pretrained(export(str(out), str(d / "lora_merged"))).eval()
    base_path = d / "cache" / "tiny" / "siglip2-v1"
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), out).eval()
    base = AutoModel.from_pretrained(base_path).eval()
    pixels = {
        "pixel_values": torch.randn(3, 64, 192),
        "pixel_attention_mask": torch.ones(3, 64, dtype=torch.long),
        "spatial_shapes": torch.tensor([[8, 8]] * 3),
    }
    with torch.no_grad():
        a, m, b = (x.get_image_features(**pixels).pooler_output for x in (adapted, merged, base))
        torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, b, atol=1e-4)  # training changed the image tower

    # embed.py + search.py with the merged model: the run's own eval embeddings, the top hits by cosine.
    index = d / "index"
    r = _run(
        ["--model", str(d / "whole"), "--file", str(d / "synth" / "eval.jsonl"), "--out", str(index)],
        e,
        "embed.py",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    final = np.load(d / "whole" / "predictions" / "final.npz")
    images, texts = np.load(index / "images.npy"), np.load(index / "texts.npy")
    np.testing.assert_allclose(images, final["image_embeds"], atol=1e-5)
    np.testing.assert_allclose(texts, final["text_embeds"], atol=1e-5)
    meta = json.loads((index / "index.json").read_text())
    r = _run(["--index", str(index), "--query", meta["texts"][3], "--k", "3", "--json"], e, "search.py")
    assert r.returncode == 0, r.stderr[-3000:]
    best = np.argsort(-(images @ texts[3]), kind="stable")[:3]
    assert [h["image"] for h in json.loads(r.stdout)] == [meta["images"][i] for i in best]


def test_siglip_frozen_towers_last_layers_and_softmax_on_request(env):
    d, e, data, _ = env
    out = d / "last"
    r = _short_run(data, out, e, "--model_name_or_path", "tiny:siglip", "--freeze_vision_tower", "true",
                   "--freeze_language_model", "true", "--unfreeze_last_n_vision_layers", "1",
                   "--unfreeze_last_n_text_layers", "1", "--loss", "softmax")
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss"] == "softmax" and "eval_zero_shot_accuracy" in metrics["after"]
    base, tuned = (
        load_file(d / "cache" / "tiny" / "siglip-v1" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(
        k.startswith(
            (
                "vision_model.encoder.layers.1.",
                "vision_model.post_layernorm.",
                "vision_model.head.",
                "text_model.encoder.layers.1.",
                "text_model.final_layer_norm.",
                "text_model.head.",
                "logit_scale",
            )
        )
        for k in changed
    )
    assert torch.equal(base["logit_bias"], tuned["logit_bias"])  # the softmax loss has no bias
