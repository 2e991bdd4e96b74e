"""Peak GPU memory of one QLoRA training step on LLaVA-1.5-7B: computed, not measured on a GPU.

    python recipes/qlora_vqa/memory.py                                  # micro-batch 4 and 16, 704 tokens, \
r=16
    python recipes/qlora_vqa/memory.py --batch 8 --tokens 2048 --lora_r 64 --json
    python recipes/qlora_vqa/memory.py --tiny    # measured: weight bytes of the tiny 4-bit LLaVA, ours vs \
peft's upcast

What is exact and what is estimated:
- parameter counts are exact: the llava-hf/llava-1.5-7b-hf architecture (CLIP ViT-L/14-336, 2-layer GELU
  projector, Vicuna-7B v1.5 = Llama-2-7B with a 32,064-token vocabulary; values of its config.json) is
  built on the meta device, which allocates nothing;
- NF4 with double quantization stores 4 + 8/64 + 32/(64*256) = 4.127 bits per quantized weight
  (Dettmers et al., 2023, "QLoRA", section 3: blocks of 64 weights, 8-bit absmax in blocks of 256);
- the activations of one decoder layer are measured: one Llama-2-7B-sized decoder layer runs on this
  CPU under bf16 autocast, with its linear layers frozen and LoRA (with dropout) on all seven, as in
  training, and the tensors autograd saves for backward are summed, per token (fused SDPA attention
  keeps no seq x seq matrix, so this is linear in tokens). A frozen 4-bit linear saves no activation
  for backward, like the frozen 16-bit one measured here. An overestimate for a GPU: peft feeds the
  LoRA inputs in float32 unless CUDA autocast is on (2 bytes more per element, ~70 of the ~340 KB per
  token);
- activation checkpointing keeps each layer's input (bf16) and recomputes one layer at a time; the
  backward of that layer is assumed to need as much again for its gradients (an estimate);
- the loss: transformers' causal-LM loss upcasts the logits of every position to float32; the
  backward of its log-softmax holds three float32 (tokens x vocabulary) tensors (estimate: 12 bytes);
- the frozen vision tower's inputs need no gradient, so autograd keeps nothing of it;
- not counted: the CUDA context (~0.5 GB), allocator fragmentation, the image-token masks and
  position tables (small).
The peak is weights + LoRA weights and gradients + optimizer state + checkpointed layer inputs +
the larger of (one layer's recompute and backward, the loss block).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

GB = 1e9
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Optimizer state bytes per trained weight: AdamW keeps two moments; bitsandbytes' 8-bit AdamW stores them
# in 8 bits with block-wise constants (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization").
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_torch": 8}


def llava_7b_config() -> LlavaConfig:
    """The llava-hf/llava-1.5-7b-hf architecture (its config.json; the text config is Llama-2-7B's
    defaults)."""
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def parameter_counts(config: LlavaConfig, lora_r: int) -> dict[str, int]:
    """Exact weight counts: the quantized LM linear layers, everything else (unquantized), and the LoRA
    weights."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    counts = {"quantized": 0, "unquantized": 0, "vision": 0, "projector": 0, "lora": 0}
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")
                and name.endswith(LORA_TARGETS)):
            counts["quantized"] += module.weight.numel()
            counts["lora"] += lora_r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    counts["unquantized"] = total - counts["quantized"]
    counts["vision"] = sum(p.numel() for p in model.model.vision_tower.parameters())
    counts["projector"] = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    counts["total"] = total
    return counts


def _saved_bytes(n_layers: int, text: LlamaConfig, tokens: int, lora_r: int, lora_dropout: float) -> int:
    """Bytes autograd saves in a forward of an `n_layers` Llama (frozen bf16 base, LoRA on all linears, bf16
    autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    config = LlamaConfig(**{**text.to_dict(), "num_hidden_layers": n_layers, "vocab_size": 8})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # values do not matter, only what autograd keeps
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout,
                                             target_modules=list(LORA_TARGETS)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    embeds = torch.randn(1, tokens, text.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack,
                                                                                               lambda t: t):
        model(inputs_embeds=embeds)
    return sum(seen.values())


def layer_bytes_per_token(text: LlamaConfig, lora_r: int, lora_dropout: float,
                          tokens: tuple[int, int] = (16, 48)) -> float:
    """Activation bytes one decoder layer keeps for backward, per token.

    One layer = a 2-layer minus a 1-layer model; per token = the slope between two lengths, which
    leaves out what does not grow with tokens (the bf16 copies autocast makes of the LoRA weights).
    """
    layer = [_saved_bytes(2, text, t, lora_r, lora_dropout) - _saved_bytes(1, text, t, lora_r, lora_dropout)
             for t in tokens]
    return (layer[1] - layer[0]) / (tokens[1] - tokens[0])


def peak_memory(batch: int, tokens: int, lora_r: int = 16, lora_dropout: float = 0.05,
                optim: str = "paged_adamw_8bit", per_token_layer: float | None = None) -> dict:
    """The memory terms (GB) of one training step at micro-batch `batch` x `tokens`, and their peak sum."""
    config = llava_7b_config()
    text = config.text_config
    counts = parameter_counts(config, lora_r)
    if per_token_layer is None:
        per_token_layer = layer_bytes_per_token(text, lora_r, lora_dropout)
    n = batch * tokens
    quantized = counts["quantized"] * NF4_DQ_BITS / 8
    terms = {
        "weights, 4-bit LM (NF4 + double quant)": quantized,
        "weights, bf16 (vision, projector, embeddings, LM head, norms)": 2 * counts["unquantized"],
        "LoRA weights + gradients (float32)": 8 * counts["lora"],
        f"optimizer state ({optim})": OPTIMIZER_BYTES[optim] * counts["lora"],
        "checkpointed layer inputs (bf16)": text.num_hidden_layers * n * text.hidden_size * 2,
    }
    # Transient, one after the other: only the larger of the two adds to the peak.
    terms["one layer recomputed + its backward (transient)"] = 2 * per_token_layer * n
    terms["loss: float32 logits, log-softmax + gradient (transient)"] = 12 * n * text.vocab_size
    *steady, recompute, loss = terms.values()
    peak = sum(steady) + max(recompute, loss)
    weights_16bit = 2 * counts["total"]
    return {
        "batch": batch, "tokens": tokens, "lora_r": lora_r, "parameters": counts,
        "layer_activation_bytes_per_token": per_token_layer,
        "terms_GB": {k: v / GB for k, v in terms.items()},
        "peak_GB": peak / GB,
        # Same step with every weight in bf16 (plain 16-bit LoRA), and with peft's
        # prepare_model_for_kbit_training, which upcasts every non-quantized weight to float32 (+2 bytes
        # each).
        "peak_GB_16bit_lora": (peak - quantized - 2 * counts["unquantized"] + weights_16bit) / GB,
        "peak_GB_with_peft_upcast": (peak + 2 * counts["unquantized"]) / GB,
    }


def tiny_weight_bytes(model: str = "tiny:llava-pretrained") -> dict:
    """Weight bytes of `model` in 4-bit with bf16 compute, set up for training (LoRA + projector, as
    config.yaml) by this recipe's `prepare_quantized_for_training` and by peft's
    `prepare_model_for_kbit_training`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from recipes.common.args import FreezeArguments, ModelArguments, PeftArguments
    from recipes.common.models import load_model_and_processor, resolve_model_path
    from recipes.common.peft_setup import apply_freezing, apply_peft, trained_modules_to_save
    from recipes.common.quantization import prepare_quantized_for_training, weight_bytes

    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]  # train.py's UNQUANTIZED
    args, path = ModelArguments(load_in_4bit=True, dtype="bfloat16"), resolve_model_path(model)
    ours, _ = load_model_and_processor(LlavaForConditionalGeneration, path, args, skip_quantization=skip)
    modules = trained_modules_to_save(ours, FreezeArguments(freeze_bridge=False))
    ours = apply_peft(ours, PeftArguments(modules_to_save=modules))
    apply_freezing(ours, FreezeArguments(freeze_bridge=None))
    prepare_quantized_for_training(ours)
    theirs, _ = load_model_and_processor(LlavaForConditionalGeneration, path, args, skip_quantization=skip)
    theirs = get_peft_model(prepare_model_for_kbit_training(theirs), ours.peft_config["default"])
    return {"this recipe": weight_bytes(ours), "peft prepare_model_for_kbit_training": weight_bytes(theirs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--tokens", type=int, default=704, help="sequence length: 576 image tokens + the text")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--optim", default="paged_adamw_8bit", choices=sorted(OPTIMIZER_BYTES))
    p.add_argument("--json", action="store_true")
    p.add_argument("--tiny", action="store_true", help="measure the tiny 4-bit LLaVA's weight bytes instead")
    args = p.parse_args(argv)
    if args.tiny:
        print(json.dumps(tiny_weight_bytes(), indent=2))
        return 0
    torch.manual_seed(0)
    per_token = layer_bytes_per_token(llava_7b_config().text_config, args.lora_r, args.lora_dropout)
    rows = [peak_memory(b, args.tokens, args.lora_r, args.lora_dropout, args.optim, per_token)
            for b in args.batch]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    counts = rows[0]["parameters"]
    print(f"LLaVA-1.5-7B: {counts['total']:,} weights, {counts['quantized']:,} in 4-bit, LoRA "
          f"r={args.lora_r}: {counts['lora']:,}; one decoder layer keeps {per_token / 1024:.1f} KiB per "
          "token for backward")
    print("| term (GB) | " + " | ".join(f"micro-batch {r['batch']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for term in rows[-1]["terms_GB"]:
        print(f"| {term} | " + " | ".join(f"{r['terms_GB'][term]:.2f}" for r in rows) + " |")
    peaks = (("peak_GB", "**peak, QLoRA (this recipe): steady terms + the larger transient**"),
             ("peak_GB_with_peft_upcast", "peak, QLoRA with peft's fp32 upcast"),
             ("peak_GB_16bit_lora", "peak, 16-bit LoRA, same shapes"))
    for key, label in peaks:
        print(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
