"""recipes.common.quantization on a small 4-bit LLaVA (real bitsandbytes CPU kernels): what stays unquantized,
what is upcast (against peft's prepare_model_for_kbit_training), gradients after an evaluation, the CPU
optimizer fall-back; and the exact parameter counts of the 7B memory report."""

import pytest
import torch
from transformers import (BitsAndBytesConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

from recipes.common.args import FreezeArguments, PeftArguments
from recipes.common.peft_setup import apply_freezing, apply_peft, trained_modules_to_save
from recipes.common.quantization import (fall_back_to_cpu_optimizer, is_quantized, keep_4bit_training_layout,
                                         prepare_quantized_for_training, weight_bytes)

# What recipes/qlora_vqa/train.py keeps unquantized (full prefixes: transformers 5 matches names from the
# start).
UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=16, patch_size=8)
    path = tmp_path_factory.mktemp("llava4bit")
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                              image_token_index=127)).save_pretrained(path)
    return path


def load(path, dtype=torch.float32):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=UNQUANTIZED)
    return LlavaForConditionalGeneration.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                         device_map={"": "cpu"})


def lora(model, dropout=0.05):
    freeze = FreezeArguments(freeze_bridge=False)
    model = apply_peft(model, PeftArguments(lora_dropout=dropout,
                                            modules_to_save=trained_modules_to_save(model, freeze)))
    apply_freezing(model, FreezeArguments(freeze_bridge=None))
    return model


def test_only_the_language_model_linears_are_quantized(checkpoint):
    model = load(checkpoint)
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized == {n for n in linears if n.startswith("model.language_model.")} and len(quantized) == 14
    assert not any(is_quantized(p) for n, p in model.named_parameters()
                   if not n.startswith("model.language_model."))


def test_only_what_trains_is_float32_and_frozen_weights_stay_bf16(checkpoint):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = lora(load(checkpoint, torch.bfloat16))
    assert prepare_quantized_for_training(model) > 0
    dtypes = {n: p.dtype for n, p in model.named_parameters() if not is_quantized(p)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert {dtypes[n] for n in trainable} == {torch.float32}
    # vision tower, embeddings, head, norms
    assert {d for n, d in dtypes.items() if n not in trainable} == {torch.bfloat16}

    # peft's prepare_model_for_kbit_training (before get_peft_model, as its docs show) upcasts every frozen
    # weight too.
    theirs = load(checkpoint, torch.bfloat16)
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    theirs = get_peft_model(theirs, model.peft_config["default"])
    ours, peft_bytes = weight_bytes(model), weight_bytes(theirs)
    frozen_numel = sum(p.numel() for n, p in model.named_parameters()
                       if not p.requires_grad and not is_quantized(p))
    assert ours["frozen"] == 2 * frozen_numel and peft_bytes["frozen"] == 4 * frozen_numel
    assert ours["quantized"] == peft_bytes["quantized"] and ours["trainable"] == peft_bytes["trainable"]


def _lora_grads(checkpoint, evaluate_first: bool, guard: bool):
    torch.manual_seed(0)
    model = load(checkpoint)
    if guard:
        keep_4bit_training_layout(model)
    model = lora(model, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # nonzero, so that layer 0 gets a gradient through layer 1
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_after_an_evaluation_gets_the_same_gradients(checkpoint):
    from bitsandbytes.nn.modules import has_avx512bf16

    loss, grads = _lora_grads(checkpoint, evaluate_first=False, guard=True)
    loss_after_eval, grads_after_eval = _lora_grads(checkpoint, evaluate_first=True, guard=True)
    assert torch.equal(loss, loss_after_eval) and grads.keys() == grads_after_eval.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_after_eval[name]), name
    # where bitsandbytes repacks for CPU inference: without the guard, layer 0 gets a wrong gradient
    if has_avx512bf16():
        _, unguarded = _lora_grads(checkpoint, evaluate_first=True, guard=False)
        layer0 = next(n for n in grads if "layers.0.self_attn.q_proj.lora_A" in n)
        assert not torch.allclose(grads[layer0], unguarded[layer0], atol=1e-6)


def test_paged_8bit_adamw_falls_back_to_adamw_torch_on_the_cpu(monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = TrainingArguments(output_dir="unused", optim="paged_adamw_8bit", use_cpu=True, report_to="none")
    assert fall_back_to_cpu_optimizer(args) == "paged_adamw_8bit" and args.optim == "adamw_torch"
    assert fall_back_to_cpu_optimizer(args) is None and args.optim == "adamw_torch"


def test_memory_report_counts_the_7b_architecture_exactly():
    from recipes.qlora_vqa.memory import NF4_DQ_BITS, llava_7b_config, parameter_counts, peak_memory

    counts = parameter_counts(llava_7b_config(), lora_r=16)
    h, i, layers = 4096, 11008, 32
    assert counts["quantized"] == layers * (4 * h * h + 3 * h * i)
    assert counts["lora"] == layers * 16 * (4 * 2 * h + 3 * (h + i))
    assert counts["total"] == 7_063_427_072 and counts["projector"] == 1024 * h + h + h * h + h
    assert NF4_DQ_BITS == pytest.approx(4.127, abs=1e-3)  # QLoRA, section 3
    small, large = (peak_memory(b, 704, per_token_layer=300_000) for b in (4, 16))
    grows = {k for k in small["terms_GB"] if large["terms_GB"][k] > small["terms_GB"][k]}
    assert all("layer" in k or "loss" in k for k in grows) and large["peak_GB"] > small["peak_GB"]
    assert small["peak_GB_with_peft_upcast"] - small["peak_GB"] == pytest.approx(
        2 * counts["unquantized"] / 1e9)
