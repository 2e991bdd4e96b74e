"""A run on a half-precision base (bf16, the default on a GPU) trains its parts in float32 and saves them so:
loaded to answer (chat.py, serve; one adapter added to another's base), they are float32 again, with the
saved values, as when the run scored; the frozen base stays bf16."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from recipes.common.merge import load_run, with_adapter
from recipes.common.models import resolve_model_path
from recipes.common.peft_setup import trainable_in_float32


@pytest.fixture(scope="module")
def base_path(module_cache):
    return resolve_model_path("tiny:llava")


def _trained(model, seed: int):
    """`model` as training leaves it: what trains cast to float32, then moved by steps far below bf16's
    resolution of its values (rounded to bf16, they would be lost)."""
    assert trainable_in_float32(model) > 0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 1e-4)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _save(model, base_path, folder):
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(base_path).save_pretrained(folder)
    return folder


def _lora_run(base_path, folder, seed: int):
    base = LlavaForConditionalGeneration.from_pretrained(base_path, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"],
                                            modules_to_save=["multi_modal_projector"]))
    return _trained(model, seed), _save(model, base_path, folder)


def _assert_as_trained(model, trained: dict, rename=lambda name: name):
    loaded = dict(model.named_parameters())
    assert any("modules_to_save" in n or "projector" in n for n in trained)
    for name, value in trained.items():
        assert loaded[rename(name)].dtype == torch.float32, name
        assert torch.equal(loaded[rename(name)], value), name
    frozen = [p for n, p in loaded.items() if "layers.0.mlp" in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_a_lora_run_on_a_bf16_base_loads_its_trained_modules_in_float32(base_path, tmp_path):
    trained, run = _lora_run(base_path, tmp_path / "run", seed=0)
    model, _ = load_run(run, AutoModelForImageTextToText, "bfloat16")
    _assert_as_trained(model, trained)
    # a second run's adapter on the same base, as serve adds it
    second, run2 = _lora_run(base_path, tmp_path / "run2", seed=1)
    with_adapter(model, run2, "adapter_1")
    _assert_as_trained(model, second, lambda name: name.replace(".default.", ".adapter_1."))
    _assert_as_trained(model, trained)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_a_full_weight_run_on_a_bf16_base_loads_what_trained_in_float32(base_path, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(base_path, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)  # e.g. llava_instruct --stage pretrain
    trained = _trained(model, seed=2)
    run = _save(model, base_path, tmp_path / "full")
    with safe_open(run / "model.safetensors", "pt") as f:  # saved as trained: mixed dtypes
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32", "BF16"}
    loaded, _ = load_run(run, AutoModelForImageTextToText, "bfloat16")
    _assert_as_trained(loaded, trained)
    # One saved in float32 throughout (merge.py --dtype float32) loads in the dtype asked for.
    loaded.to(torch.float32).save_pretrained(tmp_path / "f32")
    AutoProcessor.from_pretrained(base_path).save_pretrained(tmp_path / "f32")
    as_asked, _ = load_run(tmp_path / "f32", AutoModelForImageTextToText, "bfloat16")
    assert {p.dtype for p in as_asked.parameters()} == {torch.bfloat16}
