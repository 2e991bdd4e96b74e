"""Training throughput and peak memory of a ViT-B/32-sized CLIP under the clip_retrieval loss; prints a Markdown row.

    python -m bench.clip_train_step                                  # GPU: batch 1024, bf16 autocast, AdamW
    python -m bench.clip_train_step --batch 8 --steps 2 --warmup 1   # a quick check on the CPU

The model is `CLIPModel(CLIPConfig())`: transformers' default CLIP config is the architecture of
openai/clip-vit-base-patch32 (ViT-B/32 at 224 px, 12-layer 512-wide text tower, 512-d projection),
here with random weights, so nothing is downloaded. Inputs are random pixels and 77-token random
texts (CLIP's longest), already on the device: the number is the model + loss + optimizer step, not
data loading. One process; the recipe's `contrastive_loss` with all-distinct keys (a plain CLIP batch).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel selection, allocator)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype (weights stay float32)")
    p.add_argument("--text_length", type=int, default=77)
    args = p.parse_args(argv)
    from transformers import CLIPConfig, CLIPModel

    from recipes.clip_retrieval.trainer import contrastive_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    size, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
    pixels = torch.randn(args.batch, 3, size, size, device=device)
    ids = torch.randint(0, vocab - 1, (args.batch, args.text_length), device=device)
    ids[:, -1] = model.config.text_config.eos_token_id  # CLIP pools the text at its eos
    keys = torch.arange(args.batch, device=device)

    def step():
        with torch.autocast(device, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32"):
            out = model(input_ids=ids, pixel_values=pixels)
            loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, keys, keys)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "-"
    print("| device | batch | dtype | pairs/s | peak memory (allocated) |\n|---|---:|---|---:|---:|")
    precision = "float32" if args.dtype == "float32" else f"{args.dtype} autocast"
    print(f"| {name} | {args.batch} | {precision} | {args.batch * args.steps / seconds:,.1f} | {peak} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
