"""Which weights the merge/export scripts ship: a QLoRA run merged by any recipe's merge.py goes onto the base
it trained against."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from recipes.common.args import FreezeArguments, ModelArguments, PeftArguments
from recipes.common.merge import merge_run
from recipes.common.models import load_model_and_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing
from recipes.common.quantization import (load_quantized_run, prepare_quantized_for_training,
                                         save_quantization_config, unquantized_modules)


@pytest.fixture(scope="module")
def qlora_run(module_cache, tmp_path_factory):
    """A QLoRA run folder as qlora_vqa saves one (adapter + projector copy, quantization_config.json,
    processor), its LoRA weights random instead of trained."""
    run = tmp_path_factory.mktemp("qlora") / "run"
    path = resolve_model_path("tiny:llava")
    model_args = ModelArguments(model_name_or_path=path, load_in_4bit=True)
    model, processor = load_model_and_processor(
        AutoModelForImageTextToText, path, model_args,
        skip_quantization=unquantized_modules(AutoModelForImageTextToText, path, model_args))
    model = apply_lora_and_freezing(model, PeftArguments(), FreezeArguments(freeze_bridge=False))
    prepare_quantized_for_training(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(run)
    processor.save_pretrained(run)
    save_quantization_config(model, run)
    return run


def _logits(model, processor):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
        add_generation_prompt=True)
    image = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    with torch.no_grad():
        return model(**processor(images=[image], text=[text], return_tensors="pt")).logits


def test_merge_run_of_a_qlora_run_adds_the_adapter_to_the_dequantized_base(qlora_run, tmp_path):
    """llava_instruct/merge.py (merge_run) on a QLoRA run: the same model as qlora_vqa/merge.py writes."""
    torch.manual_seed(1)
    adapted, processor = load_quantized_run(qlora_run, AutoModelForImageTextToText)
    expected = _logits(adapted, processor)
    merged = AutoModelForImageTextToText.from_pretrained(
        merge_run(qlora_run, tmp_path / "merged", AutoModelForImageTextToText)).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    torch.manual_seed(1)
    got = _logits(merged, processor)
    # float32 rounding only (the adapter on the unquantized base: 0.48)
    assert (got - expected).abs().max().item() < 1e-4
