"""llava_instruct training throughput on one GPU: the LLaVA-1.5-7B architecture with random weights, bf16.

    python -m bench.llava_instruct_gpu                    # LoRA r=128 on every LM linear layer, 1024 tokens, batch 4
    python -m bench.llava_instruct_gpu --batch 8 --steps 20
    python -m bench.llava_instruct_gpu --tiny             # a few seconds on the CPU: checks the script, measures nothing

Trains as the recipe's stage 2 does (the projector in full, LoRA on q/k/v/o/gate/up/down of every Llama
layer, vision tower frozen), on sequences of 576 image tokens + 448 text tokens with labels on the text,
with and without gradient checkpointing. Prints one Markdown row per setting: tokens/s (padding-free
sequences, so every token counts) and the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from recipes.common.args import FreezeArguments, PeftArguments
from recipes.common.peft_setup import apply_freezing, apply_peft, trained_modules_to_save


def llava_15_7b_config(tiny: bool = False):
    """LlavaConfig's defaults are LLaVA-1.5-7B's architecture (CLIP ViT-L/14 at 336 px, a 7B Llama); the vocabulary
    of llava-hf/llava-1.5-7b-hf is 32064 (Llama's 32000 + `<image>` + padding)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)
        text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=16)
    return LlavaConfig(text_config={"model_type": "llama", "vocab_size": 32064})


def measure(config, *, batch: int, seq: int, steps: int, lora_r: int, checkpointing: bool, device: str) -> dict:
    from transformers import LlavaForConditionalGeneration

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    freeze = FreezeArguments(freeze_vision_tower=True, freeze_bridge=False)
    peft = PeftArguments(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                         modules_to_save=trained_modules_to_save(model, freeze))
    model = apply_peft(model, peft)
    freeze.freeze_bridge = None  # peft made the projector copy trainable
    apply_freezing(model, freeze)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    n_image, side = config.image_seq_length, config.vision_config.image_size
    text = seq - n_image
    input_ids = torch.randint(3, config.image_token_index, (batch, seq), device=device)
    input_ids[:, 1:1 + n_image] = config.image_token_index
    labels = input_ids.clone()
    labels[:, :1 + n_image + text // 4] = -100  # image tokens and a prompt are not learned
    pixel_values = torch.randn(batch, 3, side, side, device=device, dtype=dtype)

    def step():
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens_per_s": batch * seq * steps / seconds, "peak_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llava_instruct_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora_r", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, to check the script")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("needs a GPU (or --tiny)")
    config = llava_15_7b_config(args.tiny)
    seq = min(args.seq, 64) if args.tiny else args.seq
    print(f"| {'device':<24} | batch | seq | LoRA r | gradient checkpointing | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)"
    for checkpointing in (False, True):
        try:
            r = measure(config, batch=args.batch, seq=seq, steps=args.steps, lora_r=args.lora_r,
                        checkpointing=checkpointing, device=device)
            cells = f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f}"
        except torch.OutOfMemoryError:
            cells = "out of memory | -"
        print(f"| {name} | {args.batch} | {seq} | {args.lora_r} | {'yes' if checkpointing else 'no'} | {cells} |", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
