"""bench/ on Qwen2.5-VL (`python -m bench llava_instruct --model qwen2_5_vl`): the real size's FLOPs per part
against a count by hand from the published dims, what trains at real size, the real size's 4-bit path, and
a tiny CPU run in which the recipe's Trainer, the plain Trainer and TRL's SFTTrainer each train every
micro-batch.

transformers' Qwen2.5-VL processor holds a video processor, which needs torchvision: without it these tests
skip, loudly (`make test-families` runs them in a venv that has it).
"""

import importlib.util
import math
import tempfile

import pytest

if importlib.util.find_spec("torchvision") is None:  # before the imports below, which take seconds
    pytest.skip("SKIPPED LOUDLY: the Qwen2.5-VL bench needs torchvision (its processor's video processor); "
                "make test-families runs these tests", allow_module_level=True)

import torch

from bench import harness
from bench.adapters import ADAPTERS
from bench.flops import step_flops

QWEN = "qwen2_5_vl"
# Qwen2.5-VL-7B-Instruct's dims (config.json): LM, ViT and merger
D, FFN, KV, VOCAB, LAYERS = 3584, 18944, 4 * 128, 152064, 28
W, VFFN, BLOCKS = 1280, 3420, 32


def _opts(recipe, **kw):
    return harness.Options(recipe=recipe, model=QWEN, device="cpu", size="tiny", steps=2, warmup=1, **kw)


@pytest.fixture(scope="module")
def tiny_run():
    return harness.run(_opts("llava_instruct", mode="device"))


def test_real_size_flops_per_sample_are_2nt_vision_6nt_merger_4nt_lm_plus_lora():
    """A 448 x 448 px image is 32 x 32 patches of 14 px (one frame pair: 1024 positions in the ViT) and 256
    merged tokens; the tower is frozen with nothing before it (2NT), the merger trains (6NT), the LM is frozen
    after it (4NT) with LoRA r=16 on its 7 linears (6NT)."""
    result = harness.count_flops(harness.Options("llava_instruct", model=QWEN, size="real", batch_size=2,
                                                 device_batches=1))
    patches, merged = (448 // 14) ** 2, (448 // 28) ** 2
    vision = W * 3 * 2 * 14 * 14 + BLOCKS * (W * 3 * W + W * W + 3 * W * VFFN)  # patch Conv3d, qkv, proj, MLP
    merger = 4 * W * 4 * W + 4 * W * D
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, FFN), (D, FFN), (FFN, D)]  # q k v o gate up down
    lm = LAYERS * sum(i * o for i, o in shapes) + D * VOCAB  # the LM head included
    lora = LAYERS * sum(16 * (i + o) for i, o in shapes)
    tokens = result["tokens_per_sample"]
    assert merged < tokens <= 832  # the image's tokens and text, within --max_length
    expected = {"vision": 2 * vision * patches, "bridge": 6 * merger * merged,
                "language": (4 * lm + 6 * lora) * tokens}
    for part, flops in expected.items():
        assert result["gflop_per_sample"][part] == pytest.approx(flops / 1e9, rel=1e-9), part
    assert result["model"] == QWEN


@pytest.mark.parametrize("recipe", ["llava_instruct", "qlora_vqa"])
def test_real_size_trains_lora_on_the_lm_and_the_merger_and_the_baseline_the_same(recipe):
    adapter = harness.make_adapter(harness.Options(recipe, model=QWEN))
    argv = harness._recipe_argv(adapter, harness.Options(recipe, device="meta"), "/nonexistent", 8)
    a = adapter.parse(argv)
    model, _, image_processor = adapter.build(a, "real", "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.config.image_token_id in adapter.encoder.image_ids  # the tiny tokenizer's <|image_pad|>
    assert (image_processor.patch_size, image_processor.merge_size) == (14, 2)
    model = adapter.setup(model, a)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trained if ".lora_" in n}
    assert len(lora) == LAYERS * 7 * 2 and all(".model.language_model.layers." in n for n in lora)
    assert trained - lora and all(".model.visual.merger.modules_to_save." in n for n in trained - lora)
    baseline = adapter.baseline(a, "real", "meta")
    assert {n for n, p in baseline.named_parameters() if p.requires_grad} == trained


def test_tiny_run_the_recipe_the_baseline_and_trl_train_every_micro_batch(tiny_run):
    result = tiny_run
    assert result["model"] == QWEN and result["recipe"] == "llava_instruct"
    assert [(r["who"], "error" in r) for r in result["runs"]] == [("recipe", False), ("baseline", False),
                                                                  ("trl", False)]
    adapter = ADAPTERS["llava_instruct"](QWEN)
    with tempfile.TemporaryDirectory() as tmp:
        p = harness.prepare(adapter, _opts("llava_instruct"), "device", tmp, batch_size=4)
    sums = [int(b["attention_mask"].sum()) for b in p.batches]
    image_id = p.model.config.image_token_id
    for b in p.batches:  # 64 x 64 px: 8 x 8 patches of 8 px, 16 merged tokens per image
        assert b["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
        assert ((b["input_ids"] == image_id).sum(1) == 16).all()
    recipe_run, baseline_run, trl_run = result["runs"]
    for r in result["runs"]:
        assert len(r["losses"]) == 3 and r["samples"] == 8 and r["tokens"] == sum(r["batch_tokens"][1:])
        assert all(math.isfinite(loss) and loss > 0 for loss in r["losses"])
        assert r["trainable_parameters"] == recipe_run["trainable_parameters"]
    for r in (recipe_run, baseline_run):
        assert r["batch_tokens"] == [sums[i % 2] for i in range(3)]
        assert all(s["image_grid_thw"] == [4, 3] and s["mm_token_type_ids"] == s["input_ids"]
                   for s in r["batch_shapes"])
    # The same batches, the same starting weights (LoRA B = 0): the same first loss.
    assert baseline_run["losses"][0] == pytest.approx(recipe_run["losses"][0], rel=1e-5)
    # TRL's collator over the same samples and images: its batches hold the same image patches.
    assert all(s["image_grid_thw"] == [4, 3] for s in trl_run["batch_shapes"])
    assert all(s["pixel_values"] == list(p.batches[i % 2]["pixel_values"].shape)
               for i, s in enumerate(trl_run["batch_shapes"]))
    # The recipe's FLOP chain reads the image grid: 64 patches per image in the tower, 16 in the merger.
    parts = step_flops(p.model, adapter.flop_chains(p.model, p.batches[0]))
    tower = ("base_model.model.model.visual.patch_embed", "base_model.model.model.visual.blocks")
    vision = sum(m.weight.numel() for n, m in p.model.named_modules()
                 if n.startswith(tower) and isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))
    assert parts["vision"] == 2 * vision * 4 * 64


def test_the_real_size_4bit_path_on_qwen_keeps_what_train_py_keeps_16_bit():
    """qlora_vqa --model qwen2_5_vl at --size real quantizes random weights in memory: on the tiny Qwen2.5-VL
    that gives the recipe loader's 4-bit model weight for weight, the ViT, its merger and the LM head
    16-bit."""
    from transformers import AutoModelForImageTextToText

    from bench.adapters import load_quantized, unquantized
    from recipes.common.args import ModelArguments
    from recipes.common.models import load_model_and_processor, resolve_model_path

    adapter = ADAPTERS["qlora_vqa"](QWEN)
    args, path = ModelArguments(load_in_4bit=True), resolve_model_path("tiny:qwen2_5_vl")
    skip = adapter.skip_quantization(path, args)
    assert skip == ["model.visual", "model.visual.merger", "lm_head"]
    recipes_own, _ = load_model_and_processor(AutoModelForImageTextToText, path, args, skip_quantization=skip)
    plain, _ = load_model_and_processor(AutoModelForImageTextToText, path, ModelArguments())
    assert unquantized(plain) == skip
    ours = load_quantized(plain, args, skip, "cpu")
    theirs = dict(recipes_own.named_parameters())
    assert {n: (p.dtype, p.shape) for n, p in ours.named_parameters()} == {
        n: (p.dtype, p.shape) for n, p in theirs.items()}
    assert all(torch.equal(p, theirs[n]) for n, p in ours.named_parameters())
    assert type(ours.model.language_model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(ours.model.visual.merger.mlp[0]) is torch.nn.Linear
    assert type(ours.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
