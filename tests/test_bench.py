"""bench/ on the tiny models, on the CPU: the harness trains with each recipe's own Trainer on the batches it
reports, the baseline on the same batches, every JSON field is there; the FLOP convention; the real configs.
Timings are never asserted (this is a smoke test, not a benchmark)."""

import json
import tempfile

import pytest
import torch
from PIL import Image

from bench import harness, real_configs
from bench.adapters import ADAPTERS
from bench.data import synthetic_jpeg_records
from bench.flops import Part, peak_tflops, step_flops
from data_tools.jsonl import read_jsonl
from recipes.common.data import load_records

RECIPES = sorted(ADAPTERS)
RUN_FIELDS = {"who", "mode", "trainer", "trainable_parameters", "parameters", "precision", "loaded_as",
              "optimizer_steps", "seconds", "samples", "tokens", "samples_per_s", "tokens_per_s",
              "model_tflop_per_s", "mfu", "peak_allocated_gib", "peak_reserved_gib", "losses", "batch_tokens",
              "batch_shapes"}
TOP_FIELDS = {"recipe", "model", "size", "pad_text_to", "device", "date", "batch_size", "warmup_steps",
              "gradient_accumulation_steps",
              "command", "versions", "flop_convention", "tokens_counted", "baseline_loaded_as",
              "sft_loaded_as", "runs", "notes"}
# The recipes with TRL's SFTTrainer as a second baseline (the generative ones whose model is a transformers
# VLM).
SFT_RECIPES = {"blip2_lora_caption", "llava_instruct", "qlora_vqa"}


pytestmark = pytest.mark.usefixtures("module_cache")  # the tiny models and synthetic JPEGs are built there


def _opts(recipe, **kw):
    return harness.Options(recipe=recipe, device="cpu", size="tiny", steps=2, warmup=1, **kw)


def _prepared(recipe):
    """The device-mode batches and model the harness made for `recipe` (the same seed: the same ones)."""
    adapter = ADAPTERS[recipe]()
    with tempfile.TemporaryDirectory() as tmp:
        return adapter, harness.prepare(adapter, _opts(recipe), "device", tmp, batch_size=4)


@pytest.fixture(scope="module")
def device_runs():
    return {recipe: harness.run(_opts(recipe, mode="device")) for recipe in RECIPES}


def test_every_field_is_in_the_json_and_both_trainers_ran_every_micro_batch(device_runs):
    for recipe, result in device_runs.items():
        assert set(result) == TOP_FIELDS and json.loads(json.dumps(result)) == result
        trl = [("trl", "device")] if recipe in SFT_RECIPES else []
        assert [(r["who"], r["mode"]) for r in result["runs"]] == [("recipe", "device"),
                                                                   ("baseline", "device"), *trl]
        for r in result["runs"]:
            # TRL 1.16 cannot train BLIP-2, nor its QLoRA in float32: a row says so
            if r["who"] == "trl" and "error" in r:
                assert recipe != "llava_instruct" and set(r) == {"who", "mode", "trainer", "error"}, r
                continue
            assert set(r) == RUN_FIELDS, recipe
            # 1 warm-up + 2 timed
            assert len(r["losses"]) == len(r["batch_tokens"]) == len(r["batch_shapes"]) == 3
            assert r["samples"] == 8 and r["tokens"] == sum(r["batch_tokens"][1:])  # the timed steps only
            assert r["mfu"] is None and r["peak_allocated_gib"] is None  # the CPU has neither
        assert result["runs"][0]["trainer"] == ADAPTERS[recipe]().trainer_class().__name__
        assert result["runs"][1]["trainer"] == "Trainer"
        assert (result["sft_loaded_as"] is not None) == (recipe in SFT_RECIPES)
        assert result["notes"] == (["no TRL SFTTrainer baseline: "
                                    + ADAPTERS[recipe].sft_note.split(": ", 1)[1]]
                                   if recipe == "soft_prompt_caption" else [])


def test_token_counts_are_the_attention_mask_sums_of_the_premade_batches(device_runs):
    for recipe, result in device_runs.items():
        _, p = _prepared(recipe)
        sums = [int(b["attention_mask"].sum()) for b in p.batches]
        for r in result["runs"]:
            if r["who"] == "trl":  # its own collator's batches (test_trl_sft_baseline...)
                continue
            assert r["batch_tokens"] == [sums[i % len(sums)] for i in range(3)], (recipe, r["who"])


def test_the_recorded_loss_is_the_recipe_trainers_loss_and_the_baseline_saw_the_same_batches(device_runs):
    for recipe, result in device_runs.items():
        adapter, p = _prepared(recipe)
        trainer = adapter.trainer_class()(model=p.model, args=p.a.TrainingArguments, train_dataset=p.dataset,
                                          data_collator=p.collator,
                                          **adapter.trainer_kwargs(p.tokenizer, p.image_processor, p.a))
        # The harness's first loss, before any update, in train mode: dropout draws from the seed set before
        # train().
        torch.manual_seed(p.a.TrainingArguments.seed)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(p.batches[0])).item()
        recipe_run, baseline_run = result["runs"][:2]
        assert recipe_run["losses"][0] == pytest.approx(loss, rel=1e-5), recipe
        # Same batches, same starting weights (LoRA starts at zero), same loss: BLIP-2's and GPT-2's causal LM
        # loss, and CLIP's own loss, which is the recipe's symmetric InfoNCE when no two captions in a batch
        # are equal.
        assert baseline_run["losses"][0] == pytest.approx(recipe_run["losses"][0], rel=1e-5), recipe
        for shapes, base_shapes in zip(recipe_run["batch_shapes"], baseline_run["batch_shapes"]):
            assert base_shapes == {k: v for k, v in shapes.items() if k in base_shapes}
            assert {"pixel_values", "input_ids", "attention_mask"} <= set(base_shapes)


def test_e2e_mode_trains_through_the_dataloader_on_synthetic_jpegs_with_text_padded_to_a_width():
    result = harness.run(_opts("clip_retrieval", mode="e2e", baseline=False, pad_text_to=77))
    (r,) = result["runs"]
    assert r["mode"] == "e2e" and r["trainer"] == "ContrastiveTrainer" and len(r["losses"]) == 3
    assert all(s["pixel_values"] == [4, 3, 64, 64] and s["input_ids"] == s["attention_mask"] == [4, 77]
               for s in r["batch_shapes"])
    assert 0 < r["tokens"] == sum(r["batch_tokens"][1:]) < 2 * 4 * 77 / 2  # padding is not counted
    assert result["notes"] == []


def test_flops_follow_6_4_2_nt_in_forward_order():
    # frozen -> trained -> frozen: 2NT (nothing trains before it), 6NT, 4NT (the backward pass goes through
    # it).
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 7), torch.nn.Linear(7, 11))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    flops = step_flops(model, [[Part("a", ("0",), 10), Part("b", ("1", "2"), 10)]])
    assert flops == {"a": 2 * 15 * 10, "b": 6 * 35 * 10 + 4 * 77 * 10, "total": 300 + 2100 + 3080}
    # Two chains do not feed each other: the second starts with nothing trained before it.
    assert step_flops(model, [[Part("b", ("1",), 1)], [Part("c", ("2",), 1)]])["c"] == 2 * 77
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Tesla T4") is None


def _qwen2_5_vl_7b_parameters():
    """Qwen2.5-VL-7B-Instruct's parameters summed from the tensor shapes its safetensors hold (config.json's
    dims: the LM 3584 wide, MLP 18944, 28 layers, 28 query and 4 key/value heads of 128, vocab 152064, untied
    head; the ViT 1280 wide, MLP 3420, 32 blocks, patch 2 x 14 x 14, merger 4 x 1280 -> 3584)."""
    d, ffn, kv, vocab = 3584, 18944, 4 * 128, 152064
    attention = (d * d + d) + 2 * (d * kv + kv) + d * d  # q, k, v with biases, o without
    layer = attention + 3 * d * ffn + 2 * d  # gate/up/down, two RMSNorms
    lm = 2 * vocab * d + 28 * layer + d  # embeddings, LM head, final norm
    w, vffn = 1280, 3420
    block = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * (w * vffn + vffn) + (vffn * w + w)
    merger = w + (4 * w * 4 * w + 4 * w) + (4 * w * d + d)  # RMSNorm, then the MLP over 2 x 2 patches
    vision = w * 3 * 2 * 14 * 14 + 32 * block + merger  # Conv3d patch embedding (no bias)
    assert lm + vision == 8_292_166_656  # "8.29B" on the model card
    return lm + vision


def test_real_configs_have_the_published_parameter_counts():
    from transformers import (Blip2ForConditionalGeneration, CLIPModel, CLIPVisionModel, GPT2LMHeadModel,
                              LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)

    expected = {  # the checkpoints' model cards / safetensors metadata
        "blip2_opt_2_7b": (Blip2ForConditionalGeneration, 3_744_761_856),
        "clip_vit_b32": (CLIPModel, 151_277_313),
        "clip_vit_b32_vision": (CLIPVisionModel, 87_456_000),
        "gpt2_small": (GPT2LMHeadModel, 124_439_808),
        "llava_1_5_7b": (LlavaForConditionalGeneration, 7_063_427_072),
        "qwen2_5_vl_7b": (Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_7b_parameters()),
    }
    for name, (cls, count) in expected.items():
        with torch.device("meta"):
            model = cls._from_config(getattr(real_configs, name)())
        assert sum(p.numel() for p in model.parameters()) == count, name
    # qlora_vqa's memory report computes from its own copy of the LLaVA-1.5-7B config (a recipe imports no
    # bench code).
    from recipes.qlora_vqa.memory import llava_7b_config, parameter_counts

    assert parameter_counts(llava_7b_config(), lora_r=16)["total"] == 7_063_427_072


def test_real_size_builds_on_the_device_and_trains_what_the_recipe_trains():
    """--size real on the meta device (no memory): the recipe's set-up gives the parts the recipe trains."""
    trained, every = {}, {}
    for recipe in RECIPES:
        adapter = ADAPTERS[recipe]()
        a = adapter.parse(harness._recipe_argv(adapter, harness.Options(recipe, device="meta"),
                                               "/nonexistent", 64))
        model, _, image_processor = adapter.build(a, "real", "meta")
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert harness.image_processor_size(image_processor) == (336 if "llava" in model.config.model_type
                                                                 else 224)
        model = adapter.setup(model, a)
        trained[recipe] = {n for n, p in model.named_parameters() if p.requires_grad}
        every[recipe] = {n for n, _ in model.named_parameters()}
        if recipe in ("llava_instruct", "qlora_vqa"):
            # LLaVA-1.5's 576 image tokens, at the id the tiny tokenizer gives `<image>`; the baseline trains
            # the same.
            assert model.config.image_token_id in adapter.encoder.image_ids
            baseline = adapter.baseline(a, "real", "meta")
            assert {n for n, p in baseline.named_parameters() if p.requires_grad} == trained[recipe]
    blip2 = trained["blip2_lora_caption"]
    lora = {n for n in blip2 if ".lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    assert all(".modules_to_save." in n and (".qformer." in n or ".language_projection." in n)
               for n in blip2 - lora)
    assert trained["clip_retrieval"] == every["clip_retrieval"]  # a full fine-tune, the temperature included
    assert trained["soft_prompt_caption"] == {"soft_prompt", "projection.weight", "projection.bias"}
    # Stage 2 at the benchmark shape: LoRA r=16 on the 7 linears of each of the 32 Llama layers, and the
    # projector.
    for recipe in ("llava_instruct", "qlora_vqa"):
        lora = {n for n in trained[recipe] if ".lora_" in n}
        assert len(lora) == 32 * 7 * 2 and all(".model.language_model.layers." in n for n in lora)
        assert trained[recipe] - lora == {
            f"base_model.model.model.multi_modal_projector.modules_to_save.default.{n}"
            for n in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}


def test_flops_of_the_real_soft_prompt_captioner_are_2nt_vision_6nt_projection_4nt_lm():
    from transformers import CLIPVisionModel, GPT2LMHeadModel

    result = harness.count_flops(harness.Options("soft_prompt_caption", size="real", batch_size=8,
                                                 device_batches=1))
    with torch.device("meta"):
        vision = CLIPVisionModel._from_config(real_configs.clip_vit_b32_vision())
        lm = GPT2LMHeadModel._from_config(real_configs.gpt2_small())
    def matmul(model):  # Linear, patch-embedding Conv2d and GPT-2's Conv1D weights, the tied LM head included
        kinds = (torch.nn.Linear, torch.nn.Conv2d)
        return sum(m.weight.numel() for m in model.modules()
                   if isinstance(m, kinds) or type(m).__name__ == "Conv1D")

    # the prefix: 10 soft prompt vectors + 1 pooled image vector
    text_tokens = result["tokens_per_sample"] + 11
    expected = {"vision": 2 * matmul(vision) * 50, "bridge": 6 * 768 * 768,
                "language": 4 * matmul(lm) * text_tokens}
    for part, flops in expected.items():
        assert result["gflop_per_sample"][part] == pytest.approx(flops / 1e9, rel=1e-9), part


@pytest.mark.parametrize("recipe", ["blip2_lora_caption", "soft_prompt_caption"])
def test_a_frozen_vision_tower_records_no_graph_so_no_grad_would_save_nothing(recipe):
    """The 2NT of bench/flops.py, and why wrapping the frozen tower in torch.no_grad is not a lever: autograd
    records nothing there already, while the trained part after it does record (its output carries a
    grad_fn)."""
    adapter, p = _prepared(recipe)
    base = p.model.get_base_model() if hasattr(p.model, "get_base_model") else p.model
    after = base.qformer if recipe == "blip2_lora_caption" else base.projection
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, key=key: outputs.setdefault(key, o))
             for key, m in (("vision", base.vision_model), ("after", after))]
    p.model.train()
    loss = p.model(**p.batches[0]).loss
    for h in hooks:
        h.remove()
    vision = outputs["vision"].last_hidden_state
    after = outputs["after"] if torch.is_tensor(outputs["after"]) else outputs["after"].last_hidden_state
    assert vision.grad_fn is None and not vision.requires_grad
    assert after.grad_fn is not None and loss.requires_grad


def test_fused_adamw_reaches_the_recipes_per_module_parameter_groups():
    adapter = ADAPTERS["blip2_lora_caption"]()
    opts = _opts("blip2_lora_caption", recipe_argv=["--optim", "adamw_torch_fused", "--bridge_lr", "0.0005"])
    with tempfile.TemporaryDirectory() as tmp:
        p = harness.prepare(adapter, opts, "device", tmp, batch_size=4)
        trainer = adapter.trainer_class()(model=p.model, args=p.a.TrainingArguments, train_dataset=p.dataset,
                                          data_collator=p.collator, **adapter.trainer_kwargs(None, None, p.a))
        optimizer = trainer.create_optimizer()
    assert optimizer.defaults["fused"] is True
    # bridge, bridge no-decay, LM
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.0005, 0.0005, 0.001]


def test_the_real_size_4bit_path_quantizes_as_the_recipes_loader_and_counts_flops_unpacked():
    """qlora_vqa at --size real quantizes random weights in memory (bench.adapters.load_quantized); on the
    tiny LLaVA the same path gives the recipe's 4-bit model (its loader, from the checkpoint's files) weight
    for weight."""
    from transformers import LlavaForConditionalGeneration

    from bench.adapters import load_quantized, unquantized
    from recipes.common.args import ModelArguments
    from recipes.common.models import load_model_and_processor, resolve_model_path

    adapter = ADAPTERS["qlora_vqa"]()
    args, path = ModelArguments(load_in_4bit=True), resolve_model_path("tiny:llava")
    skip = adapter.skip_quantization(path, args)  # train.py's: found from the model's structure
    assert skip == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    recipes_own, _ = load_model_and_processor(LlavaForConditionalGeneration, path, args,
                                              skip_quantization=skip)
    plain, _ = load_model_and_processor(LlavaForConditionalGeneration, path, ModelArguments())
    assert unquantized(plain) == skip  # what --size real keeps 16-bit
    ours = load_quantized(plain, args, skip, "cpu")
    theirs = dict(recipes_own.named_parameters())
    assert ({n: (p.dtype, p.shape) for n, p in ours.named_parameters()}
            == {n: (p.dtype, p.shape) for n, p in theirs.items()})
    assert all(torch.equal(p, theirs[n]) for n, p in ours.named_parameters())
    q_proj = ours.model.language_model.layers[0].self_attn.q_proj
    # NF4 with double quantization
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.nested
    assert type(ours.model.multi_modal_projector.linear_1) is torch.nn.Linear  # the recipe's skip list
    # 6NT/4NT/2NT count a 4-bit weight at its full in x out, not its packed bytes.
    chain = [[Part("language", ("model.language_model",), 100)]]
    ours.requires_grad_(False)
    plain.requires_grad_(False)
    assert step_flops(ours, chain) == step_flops(plain, chain) == {
        "language": 2 * 100 * 2 * (4 * 128 * 128 + 3 * 128 * 256),
        "total": 2 * 100 * 2 * (4 * 128 * 128 + 3 * 128 * 256)}
    assert harness._parameters(ours)[1] == harness._parameters(plain)[1]


def test_chat_samples_are_filled_to_the_length_budget_with_the_next_conversations():
    from bench.data import fill_conversations
    from data_tools.records import IMAGE_TOKEN
    from recipes.common.chat import tokenize_conversations

    adapter, p = _prepared("llava_instruct")
    records = adapter.conversations(load_records(synthetic_jpeg_records("instruct", 6, 64), "instruct"), p.a)
    max_length = p.a.DataArguments.max_length
    filled = fill_conversations(records, adapter.encoder, max_length)
    for i, row in enumerate(filled):
        n = len(records[i]["conversations"])
        assert row["image"] == records[i]["image"] and row["conversations"][:n] == records[i]["conversations"]
        after = records[(i + 1) % len(records)]["conversations"]
        assert [t["from"] for t in row["conversations"][n:n + len(after)]] == [t["from"] for t in after]
        assert all(IMAGE_TOKEN not in t["value"] for t in row["conversations"][n:])
    # Every filled conversation runs over the budget, and the recipe's budget cuts each after its last whole
    # turn that fits: never shorter than the conversation alone (which fits), at most max_length.
    dataset, report = tokenize_conversations(filled, adapter.encoder, max_length)
    alone = tokenize_conversations(records, adapter.encoder, max_length)[0]["length"]
    assert report.cut == report.samples == 6 and report.dropped == 0
    assert (all(a <= n <= max_length for a, n in zip(alone, dataset["length"]))
            and sum(dataset["length"]) > sum(alone))


def test_vqa_records_that_share_an_image_get_one_jpeg():
    from pathlib import Path

    path = synthetic_jpeg_records("vqa", 6, 64)
    rows = read_jsonl(path)
    assert len({r["image"] for r in rows}) == 2  # 3 questions per image
    assert all((Path(path).parent / r["image"]).is_file() and r["image"].endswith(".jpg") for r in rows)


def test_a_run_out_of_gpu_memory_is_a_row_and_the_other_runs_still_happen(monkeypatch):
    def run(adapter, who, *args):
        if who == "recipe":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")
        return dict(device_run, who=who)

    device_run = {**{k: 0 for k in RUN_FIELDS}, "mode": "device", "trainer": "Trainer", "optimizer_steps": 2,
                  "samples_per_s": 1.0, "mfu": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
    monkeypatch.setattr(harness, "_run", run)
    result = harness.run(_opts("clip_retrieval", mode="device"))
    assert result["runs"][0] == {"who": "recipe", "mode": "device", "trainer": "ContrastiveTrainer",
                                 "error": "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"}
    assert result["runs"][1]["who"] == "baseline"
    table = harness.markdown(result)
    assert ("| device | ContrastiveTrainer | out of memory: CUDA out of memory. Tried to allocate 20.00 GiB "
            "| | | | | | |" in table)
    assert "recipe / baseline" not in table  # no ratio without both


def test_trl_sft_baseline_trains_the_recipes_samples_through_trls_own_collator_and_loss(device_runs):
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    result = device_runs["llava_instruct"]
    recipe_run, baseline_run, trl_run = result["runs"]
    assert trl_run["trainer"] == "SFTTrainer" and trl_run["loaded_as"] == result["sft_loaded_as"]
    # the same LoRA targets and projector
    assert trl_run["trainable_parameters"] == baseline_run["trainable_parameters"]
    adapter, p = _prepared("llava_instruct")
    sft = adapter.sft(p.a, "tiny", "cpu", p.records)
    # The recipe's samples (filled conversations) in the recipe's order: the same images and the same answers.
    assert [r["images"] for r in sft.rows] == [x["images"] for x in p.dataset]
    rows = datasets.Dataset.from_list(sft.rows).cast_column("images", datasets.Sequence(datasets.Image()))
    collate = DataCollatorForVisionLanguageModeling(sft.processor)
    batches = [collate([dict(rows[i]) for i in range(k * 4, k * 4 + 4)]) for k in range(2)]
    # Cut as the recipe cuts, to the whole turns that fit: TRL's rows are within the length budget too.
    assert all(int(n) <= p.a.DataArguments.max_length for b in batches for n in b["attention_mask"].sum(1))
    assert trl_run["batch_tokens"] == [int(batches[i % 2]["attention_mask"].sum()) for i in range(3)]
    # TRL labels every non-pad token, so its batches are not the recipe's, but hold the same image tokens.
    image_id = sft.model.config.image_token_id
    assert all(int((b["input_ids"] == image_id).sum()) == int((q["input_ids"] == image_id).sum())
               for b, q in zip(batches, p.batches))
    # The first recorded loss is TRL's fused-head loss on the first batch: the model's own mean token loss
    # (LoRA B = 0).
    with torch.no_grad():
        loss = sft.model(**batches[0]).loss.item()
    assert trl_run["losses"][0] == pytest.approx(loss, rel=1e-4)


def test_without_trl_the_sft_baseline_is_a_note(monkeypatch):
    monkeypatch.setattr(harness, "_trl_installed", lambda: False)
    result = harness.run(_opts("blip2_lora_caption", mode="device"))
    assert [r["who"] for r in result["runs"]] == ["recipe", "baseline"]
    assert result["notes"] == ["TRL's SFTTrainer baseline skipped: trl is not installed "
                               "(bench/requirements.txt lists it)."]


def test_trl_rows_at_real_size_have_the_real_models_image_tokens():
    """--size real on the meta device: TRL's collator, through the processor, writes as many image tokens as
    the real model fills (BLIP-2 OPT-2.7B's 32 queries, LLaVA-1.5's 576 patches), at the id its config looks
    for."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    for recipe, n_image_tokens in [("blip2_lora_caption", 32), ("llava_instruct", 576)]:
        adapter = ADAPTERS[recipe]()
        a = adapter.parse(harness._recipe_argv(adapter, harness.Options(recipe, device="meta"),
                                               "/nonexistent", 2))
        adapter.build(a, "real", "meta")  # llava: the encoder its rows are filled with
        records = load_records(synthetic_jpeg_records(adapter.task, 2, 64), adapter.task)
        sft = adapter.sft(a, "real", "meta", records)
        rows = [{**r, "images": [Image.open(p) for p in r["images"]]} for r in sft.rows[:2]]
        batch = DataCollatorForVisionLanguageModeling(sft.processor,
                                                      completion_only_loss="prompt" in rows[0])(rows)
        side = sft.model.config.vision_config.image_size
        assert batch["pixel_values"].shape[-2:] == (side, side)
        assert ((batch["input_ids"] == sft.model.config.image_token_id).sum(1)
                == n_image_tokens).all(), recipe


@pytest.mark.parametrize("recipe, cached_shape", [
    ("blip2_lora_caption", [4, 65, 64]),  # the tiny tower's output
    ("soft_prompt_caption", [4, 1, 64])])  # its pooled image_features
def test_cached_vision_features_the_recipe_trains_on_them_and_the_baselines_on_pixels(tmp_path, recipe,
                                                                                      cached_shape):
    result = harness.run(_opts(recipe, mode="device", recipe_argv=[
        "--cache_vision_features", "true", "--vision_feature_dir", str(tmp_path)]))
    recipe_run, baseline_run = result["runs"][:2]
    assert recipe_run["batch_shapes"][0]["pixel_values"] == cached_shape
    assert baseline_run["batch_shapes"][0]["pixel_values"] == [4, 3, 64, 64]
    assert recipe_run["batch_tokens"] == baseline_run["batch_tokens"]  # the same samples
    # The same first loss as the plain model running its tower on the pixels (LoRA starts at zero).
    assert recipe_run["losses"][0] == pytest.approx(baseline_run["losses"][0], rel=1e-5)
    assert any(n.startswith("vision features of 2 distinct images computed") for n in result["notes"])
    # The tower does no work in a step: no vision FLOPs for the recipe; the rest is the same per sample.
    adapter = ADAPTERS[recipe]()
    model, _, _ = adapter.build(adapter.parse([*adapter.tiny_argv, "--use_cpu", "true"]), "tiny", "cpu")
    live = {"pixel_values": torch.zeros(4, 3, 64, 64), "attention_mask": torch.ones(4, 20)}
    cached = {**live, "pixel_values": torch.zeros(cached_shape)}
    live_parts, cached_parts = (step_flops(model, adapter.flop_chains(model, b)) for b in (live, cached))
    assert cached_parts["vision"] == 0 < live_parts["vision"]
    assert cached_parts["total"] == pytest.approx(live_parts["total"] - live_parts["vision"])


def test_padding_free_label_position_recipe_batches_against_padded_baselines_and_trl_e2e():
    """llava_instruct with both batch levers: the recipe trains on one-row batches and logits of the label
    positions, the baselines on the padded batches of the same samples; same tokens, same first loss (LoRA
    B = 0). In e2e mode TRL's SFTTrainer trains too (the recipe's group_by_length sampler cannot read TRL's
    rows: it gets the random one)."""
    levers = ["--padding_free", "true", "--loss_on_label_positions", "true"]
    device = harness.run(_opts("llava_instruct", mode="device", recipe_argv=levers))
    recipe_run, baseline_run, trl_run = device["runs"]
    assert "error" not in trl_run
    assert all(s["input_ids"] == s["position_ids"] == [1, n] and "attention_mask" not in s
               for s, n in zip(recipe_run["batch_shapes"], recipe_run["batch_tokens"]))
    assert all(s["input_ids"][0] == 4 for s in baseline_run["batch_shapes"])
    assert recipe_run["batch_tokens"] == baseline_run["batch_tokens"]  # no padding counted on either side
    assert recipe_run["samples"] == baseline_run["samples"] > len(recipe_run["batch_shapes"])  # not 1 a row
    assert recipe_run["losses"][0] == pytest.approx(baseline_run["losses"][0], rel=1e-5)
    e2e = harness.run(_opts("llava_instruct", mode="e2e"))
    assert [(r["who"], "error" in r) for r in e2e["runs"]] == [("recipe", False), ("baseline", False),
                                                               ("trl", False)]


def test_model_is_for_the_chat_recipes_only():
    with pytest.raises(SystemExit) as e:
        harness.main(["clip_retrieval", "--model", "qwen2_5_vl", "--flops"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="--model is for the chat recipes"):
        harness.make_adapter(harness.Options("blip2_lora_caption", model="llava"))
    assert harness.make_adapter(harness.Options("qlora_vqa")).chat.name == "llava"  # the default
    assert harness.make_adapter(harness.Options("llava_instruct", model="qwen2_5_vl")).tiny_argv[:2] == (
        "--model_name_or_path", "tiny:qwen2_5_vl")


def test_a_baseline_that_cannot_run_the_options_is_a_row_saying_why_after_the_recipes_run(capsys):
    result = harness.run(_opts("clip_retrieval", mode="device", recipe_argv=["--peft_method", "lora"]))
    recipe_run, baseline_run = result["runs"]
    assert "error" not in recipe_run and recipe_run["samples"] > 0
    assert baseline_run["error"].startswith("the clip_retrieval baseline is a full fine-tune")
    # An option the measurement refuses: one line, exit code 2, before any run.
    with pytest.raises(SystemExit) as exit:
        harness.main(["blip2_lora_caption", "--flops", "--", "--cache_vision_features", "true"])
    assert exit.value.code == 2 and "Traceback" not in capsys.readouterr().err
