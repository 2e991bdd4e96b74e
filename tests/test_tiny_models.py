"""Tiny models: built offline, reloaded with the Auto classes, consistent processor and model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer)

from recipes.common.cache import build_once
from recipes.common.tiny import models as tiny_models
from recipes.common.tiny.models import BUILD_VERSIONS, build_tiny, tiny_model_path

REPO = Path(__file__).resolve().parents[1]
# Chinese, accents and an emoji: byte-level BPE must cover all of it without an unknown token.
TEXTS = ["左上角有一个红色的圆。", "a big blue square on the left", "naïve café ☕ 😀"]


@pytest.fixture(scope="module")
def paths(module_cache):
    names = ["blip2-opt", "llava", "clip", "clip-vision", "gpt2"]
    return {name: tiny_model_path(name) for name in names}


def red_square() -> Image.Image:
    return Image.new("RGB", (64, 64), (220, 20, 20))


def test_cache_layout(module_cache, paths):
    for name, path in paths.items():
        assert path == module_cache / "tiny" / f"{name}-v{BUILD_VERSIONS[name]}"
        assert json.loads((path / "tiny_model.json").read_text())["name"] == name
    # Temp build folders are renamed or removed, never left behind.
    built = sorted(p.name for p in (module_cache / "tiny").iterdir() if not p.name.endswith(".lock"))
    assert built == sorted(p.name for p in paths.values())
    assert tiny_model_path("gpt2") == paths["gpt2"]  # second call: cached, not rebuilt


@pytest.mark.parametrize("name", ["blip2-opt", "llava", "clip", "gpt2"])
def test_tokenizer_round_trips_any_unicode(paths, name):
    tok = AutoTokenizer.from_pretrained(paths[name])
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        if name == "clip":  # as OpenAI's: lower-cased, and decoding puts a space after every word end
            assert tok.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
        else:
            assert tok.decode(ids) == text


def test_blip2_opt(paths):
    processor = AutoProcessor.from_pretrained(paths["blip2-opt"])
    model = AutoModelForImageTextToText.from_pretrained(paths["blip2-opt"])
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    assert model.config.text_config.model_type == "opt"
    tok = processor.tokenizer
    texts = ["a red square", "一个红色的正方形"]
    batch = processor(images=[red_square()] * 2, text=texts, padding=True, return_tensors="pt")
    n = model.config.num_query_tokens
    image_id = model.config.image_token_index
    assert image_id == tok.convert_tokens_to_ids("<image>")
    # The processor puts num_query_tokens image tokens, then OPT's bos ("</s>"), then the text.
    assert (batch["input_ids"][:, :n] == image_id).all()
    assert (batch["input_ids"][:, n] == tok.bos_token_id).all()
    assert ((batch["input_ids"] == image_id).sum(1) == n).all()
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    out = model.generate(**processor(images=red_square(), text="a", return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] > n + 2
    out = model.generate(pixel_values=batch["pixel_values"][:1], max_new_tokens=4)  # no prompt at all
    assert out.shape[0] == 1
    # The query tokens start at the scale LAVIS draws them from (transformers' zeros stall training); the
    # vision layers at zero (Blip2VisionConfig's default, kept on purpose: see build_blip2_opt).
    weights = model.state_dict()
    assert 0.01 < weights["query_tokens"].std() < 0.05
    assert 0.01 < weights["qformer.encoder.layer.0.crossattention.attention.key.weight"].std() < 0.05
    assert weights["vision_model.encoder.layers.0.self_attn.qkv.weight"].abs().max() < 1e-6


def test_llava(paths):
    processor = AutoProcessor.from_pretrained(paths["llava"])
    model = AutoModelForImageTextToText.from_pretrained(paths["llava"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is there?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "什么颜色？"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "You describe images.\nUSER: <image>\nWhat is there?\nASSISTANT: A red square.</s>\n"
        "USER: 什么颜色？\nASSISTANT:"
    )
    assert not processor.apply_chat_template(messages[:2]).endswith("ASSISTANT:")
    batch = processor(images=[red_square()], text=[prompt], return_tensors="pt")
    n_expected = (64 // model.config.vision_config.patch_size) ** 2  # "default" strategy drops CLS
    assert model.config.image_seq_length == n_expected
    assert (batch["input_ids"] == model.config.image_token_index).sum() == n_expected
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
    out = model.generate(**batch, max_new_tokens=4)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_clip(paths):
    processor = AutoProcessor.from_pretrained(paths["clip"])
    model = AutoModel.from_pretrained(paths["clip"])
    tok = processor.tokenizer
    assert type(model).__name__ == "CLIPModel" and type(tok).__name__ == "CLIPTokenizer"
    # Pooling takes the first eos; legacy id 2 would switch CLIP to argmax-of-id pooling.
    assert model.config.text_config.eos_token_id == tok.eos_token_id != 2
    batch = processor(images=[red_square()] * 2, text=["a red square", "一个红色的圆 on the left"], padding=True,
                      return_tensors="pt")
    image_features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    text_features = model.get_text_features(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"])
    assert image_features.shape == text_features.pooler_output.shape == (2, model.config.projection_dim)
    text_out = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    first_eos = (batch["input_ids"] == tok.eos_token_id).int().argmax(-1)
    assert first_eos.tolist() == [batch["attention_mask"][i].sum().item() - 1 for i in range(2)]
    torch.testing.assert_close(text_out.pooler_output, text_out.last_hidden_state[torch.arange(2), first_eos])
    long = tok(["word " * 200], truncation=True)["input_ids"][0]
    assert len(long) == 77 and long[-1] == tok.eos_token_id
    assert torch.isfinite(model(**batch, return_loss=True).loss)


def test_clip_vision_and_gpt2(paths):
    image_processor = AutoProcessor.from_pretrained(paths["clip-vision"])
    vision = AutoModel.from_pretrained(paths["clip-vision"])
    assert type(vision).__name__ == "CLIPVisionModel"
    hidden = vision(**image_processor(images=[red_square()], return_tensors="pt")).last_hidden_state
    assert hidden.shape == (1, (64 // 8) ** 2 + 1, vision.config.hidden_size)
    tok = AutoTokenizer.from_pretrained(paths["gpt2"])
    lm = AutoModelForCausalLM.from_pretrained(paths["gpt2"])
    assert type(lm).__name__ == "GPT2LMHeadModel"
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.isfinite(lm(**batch, labels=batch["input_ids"]).loss)


def test_same_seed_same_model(paths, tmp_path):
    rebuilt = build_tiny("blip2-opt", tmp_path / "again", seed=0)
    a = AutoModelForImageTextToText.from_pretrained(paths["blip2-opt"]).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(rebuilt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (paths["blip2-opt"] / "tokenizer.json").read_text() == (rebuilt / "tokenizer.json").read_text()
    other = build_tiny("blip2-opt", tmp_path / "other", seed=1)
    c = AutoModelForImageTextToText.from_pretrained(other).state_dict()
    assert not torch.equal(a["language_projection.weight"], c["language_projection.weight"])


def test_concurrent_builds_share_one_folder(tmp_path):
    """Two processes (a 2-process DDP launch) racing into an empty cache both get the same, complete
    folder."""
    code = "from recipes.common.tiny.models import tiny_model_path; print(tiny_model_path('clip-vision'))"
    env = {**os.environ, "VLM_RECIPES_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    printed = {out.strip().splitlines()[-1] for out, _ in results}
    assert printed == {str(tmp_path / "tiny" / f"clip-vision-v{BUILD_VERSIONS['clip-vision']}")}
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")] == [
        f"clip-vision-v{BUILD_VERSIONS['clip-vision']}"]
    assert AutoModel.from_pretrained(printed.pop()).config.model_type == "clip_vision_model"


RANK_CODE = """
import sys, torch.distributed as dist
from recipes.common.tiny.models import tiny_model_path
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
if rank == 0:
    dist.barrier()  # rank 1 builds first
print(tiny_model_path("clip-vision"))
if rank == 1:
    dist.barrier()
dist.destroy_process_group()
"""


def test_a_rank_other_than_0_of_a_process_group_builds_a_complete_model(tmp_path):
    """transformers' save_pretrained writes weights on global rank 0 only once a process group is up; the
    rank that builds first (here rank 1) still leaves a folder with the weights."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "VLM_RECIPES_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_CODE, str(rank), port], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    folder = Path(results[1][0].strip().splitlines()[-1])
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert AutoModel.from_pretrained(folder).config.model_type == "clip_vision_model"


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    """If another process renamed its build into place first, ours is dropped and theirs returned."""
    final = tmp_path / "tiny" / f"clip-vision-v{BUILD_VERSIONS['clip-vision']}"

    def build_while_another_process_wins(name, out_dir, seed=0):
        build_tiny(name, final, seed=seed)  # the other process, finishing first
        return build_tiny(name, out_dir, seed=seed)

    monkeypatch.setattr(tiny_models, "build_tiny", build_while_another_process_wins)
    assert tiny_model_path("clip-vision", cache_dir=tmp_path) == final
    assert [p.name for p in final.parent.iterdir()
            if not p.name.endswith(".lock")] == [final.name]  # ours was removed


def test_a_build_leaves_the_callers_random_states_as_they_were(tmp_path):
    """A recipe seeds, then finds or builds its base (pre-training seeds and draws), then initialises what it
    trains: a first run on a fresh machine must train like every later one."""
    import random

    import numpy as np

    def build(folder: Path) -> None:
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        torch.rand(5), random.random(), np.random.rand()
        (folder / "tiny_model.json").write_text("{}")

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    build_once(tmp_path / "model", build)
    assert (tmp_path / "model" / "tiny_model.json").exists() and draws() == expected
