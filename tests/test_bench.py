"""bench/ on the tiny models, on the CPU: the harness trains with each recipe's own Trainer on the batches it reports,
the baseline on the same batches, every JSON field is there; the FLOP convention; the real configs. Timings are
never asserted (this is a smoke test, not a benchmark)."""

import json
import tempfile

import pytest
import torch

from bench import harness, real_configs
from bench.adapters import ADAPTERS
from bench.flops import Part, peak_tflops, step_flops

RECIPES = sorted(ADAPTERS)
RUN_FIELDS = {"who", "mode", "trainer", "trainable_parameters", "parameters", "precision", "loaded_as", "optimizer_steps",
              "seconds", "samples", "tokens", "samples_per_s", "tokens_per_s", "model_tflop_per_s", "mfu",
              "peak_allocated_gib", "peak_reserved_gib", "losses", "batch_tokens", "batch_shapes"}
TOP_FIELDS = {"recipe", "size", "pad_text_to", "device", "batch_size", "warmup_steps", "gradient_accumulation_steps",
              "command", "versions", "flop_convention", "tokens_counted", "baseline_loaded_as", "runs", "notes"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A model and data cache of this module's own: the tiny models and synthetic JPEGs are built into it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLM_RECIPES_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


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
        assert [(r["who"], r["mode"]) for r in result["runs"]] == [("recipe", "device"), ("baseline", "device")]
        for r in result["runs"]:
            assert set(r) == RUN_FIELDS, recipe
            assert len(r["losses"]) == len(r["batch_tokens"]) == len(r["batch_shapes"]) == 3  # 1 warm-up + 2 timed
            assert r["samples"] == 8 and r["tokens"] == sum(r["batch_tokens"][1:])  # the timed steps only
            assert r["mfu"] is None and r["peak_allocated_gib"] is None  # the CPU has neither
        assert result["runs"][0]["trainer"] == ADAPTERS[recipe]().trainer_class().__name__
        assert result["runs"][1]["trainer"] == "Trainer"
        assert "trl is not installed" in result["notes"][0]


def test_token_counts_are_the_attention_mask_sums_of_the_premade_batches(device_runs):
    for recipe, result in device_runs.items():
        _, p = _prepared(recipe)
        sums = [int(b["attention_mask"].sum()) for b in p.batches]
        for r in result["runs"]:
            assert r["batch_tokens"] == [sums[i % len(sums)] for i in range(3)], (recipe, r["who"])


def test_the_recorded_loss_is_the_recipe_trainers_loss_and_the_baseline_saw_the_same_batches(device_runs):
    for recipe, result in device_runs.items():
        adapter, p = _prepared(recipe)
        trainer = adapter.trainer_class()(model=p.model, args=p.a.TrainingArguments, train_dataset=p.dataset,
                                          data_collator=p.collator, **adapter.trainer_kwargs(p.tokenizer, p.image_processor, p.a))
        # The harness's first loss, before any update, in train mode: dropout draws from the seed set before train().
        torch.manual_seed(p.a.TrainingArguments.seed)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(p.batches[0])).item()
        recipe_run, baseline_run = result["runs"]
        assert recipe_run["losses"][0] == pytest.approx(loss, rel=1e-5), recipe
        # Same batches, same starting weights (LoRA starts at zero), same loss: BLIP-2's and GPT-2's causal LM loss,
        # and CLIP's own loss, which is the recipe's symmetric InfoNCE when no two captions in a batch are equal.
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
    # frozen -> trained -> frozen: 2NT (nothing trains before it), 6NT, 4NT (the backward pass goes through it).
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 7), torch.nn.Linear(7, 11))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    flops = step_flops(model, [[Part("a", ("0",), 10), Part("b", ("1", "2"), 10)]])
    assert flops == {"a": 2 * 15 * 10, "b": 6 * 35 * 10 + 4 * 77 * 10, "total": 300 + 2100 + 3080}
    # Two chains do not feed each other: the second starts with nothing trained before it.
    assert step_flops(model, [[Part("b", ("1",), 1)], [Part("c", ("2",), 1)]])["c"] == 2 * 77
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Tesla T4") is None


def test_real_configs_have_the_published_parameter_counts():
    from transformers import (Blip2ForConditionalGeneration, CLIPModel, CLIPVisionModel, GPT2LMHeadModel,
                              LlavaForConditionalGeneration)

    expected = {  # the checkpoints' model cards / safetensors metadata
        "blip2_opt_2_7b": (Blip2ForConditionalGeneration, 3_744_761_856),
        "clip_vit_b32": (CLIPModel, 151_277_313),
        "clip_vit_b32_vision": (CLIPVisionModel, 87_456_000),
        "gpt2_small": (GPT2LMHeadModel, 124_439_808),
        "llava_1_5_7b": (LlavaForConditionalGeneration, 7_063_427_072),
    }
    for name, (cls, count) in expected.items():
        with torch.device("meta"):
            model = cls._from_config(getattr(real_configs, name)())
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_real_size_builds_on_the_device_and_trains_what_the_recipe_trains():
    """--size real on the meta device (no memory): the recipe's set-up gives the parts the recipe trains."""
    trained, every = {}, {}
    for recipe in RECIPES:
        adapter = ADAPTERS[recipe]()
        a = adapter.parse(harness._recipe_argv(adapter, harness.Options(recipe, device="meta"), "/nonexistent", 64))
        model, _, image_processor = adapter.build(a, "real", "meta")
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert harness.image_processor_size(image_processor) == 224
        model = adapter.setup(model, a)
        trained[recipe] = {n for n, p in model.named_parameters() if p.requires_grad}
        every[recipe] = {n for n, _ in model.named_parameters()}
    blip2 = trained["blip2_lora_caption"]
    lora = {n for n in blip2 if ".lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    assert all(".modules_to_save." in n and (".qformer." in n or ".language_projection." in n) for n in blip2 - lora)
    assert trained["clip_retrieval"] == every["clip_retrieval"]  # a full fine-tune, the temperature included
    assert trained["soft_prompt_caption"] == {"soft_prompt", "projection.weight", "projection.bias"}


def test_flops_of_the_real_soft_prompt_captioner_are_2nt_vision_6nt_projection_4nt_lm():
    from transformers import CLIPVisionModel, GPT2LMHeadModel

    result = harness.count_flops(harness.Options("soft_prompt_caption", size="real", batch_size=8, device_batches=1))
    with torch.device("meta"):
        vision = CLIPVisionModel._from_config(real_configs.clip_vit_b32_vision())
        lm = GPT2LMHeadModel._from_config(real_configs.gpt2_small())
    def matmul(model):  # Linear, patch-embedding Conv2d and GPT-2's Conv1D weights, the tied LM head included
        kinds = (torch.nn.Linear, torch.nn.Conv2d)
        return sum(m.weight.numel() for m in model.modules() if isinstance(m, kinds) or type(m).__name__ == "Conv1D")

    text_tokens = result["tokens_per_sample"] + 11  # the prefix: 10 soft prompt vectors + 1 pooled image vector
    expected = {"vision": 2 * matmul(vision) * 50, "bridge": 6 * 768 * 768, "language": 4 * matmul(lm) * text_tokens}
    for part, flops in expected.items():
        assert result["gflop_per_sample"][part] == pytest.approx(flops / 1e9, rel=1e-9), part


@pytest.mark.parametrize("recipe", ["blip2_lora_caption", "soft_prompt_caption"])
def test_a_frozen_vision_tower_records_no_graph_so_no_grad_would_save_nothing(recipe):
    """The 2NT of bench/flops.py, and why wrapping the frozen tower in torch.no_grad is not a lever: autograd records
    nothing there already, while the trained part after it does record (its output carries a grad_fn)."""
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
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.0005, 0.0005, 0.001]  # bridge, bridge no-decay, LM
