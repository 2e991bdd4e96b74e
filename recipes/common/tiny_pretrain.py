"""Pre-train a tiny model: the small pre-trained base that the embedded default runs fine-tune.

A real fine-tuning run starts from a pre-trained checkpoint. A tiny model with random weights is no
such start: fine-tuned with LoRA alone (frozen random embeddings and LM head), tiny BLIP-2 ends three
epochs on the synthetic captions at a loss of 5.8 and a held-out CIDEr of 0.46. So the project
pre-trains its own tiny base, as real models are pre-trained, and reproducibly:

- every weight trains (vision encoder, Q-Former, language model), from the random tiny model of
  `tiny_models` (seed 0), on two corpora at each step, neither of them the fine-tuning task:
  1. images with attribute annotations in the style of region annotations (Visual Genome), not
     captions: "top-left: shape circle, colour red, size small; center: shape square, colour blue,
     size large". The images are synthetic shapes scenes from another seed (`PRETRAIN_SEED`), so none
     is a fine-tuning image, though scenes can look alike, as web images do. The base learns what is
     in an image and where. Perfect annotations score a CIDEr of 0.20 against the reference captions,
     so the base's held-out CIDEr before fine-tuning stays low;
  2. text alone for the language model: the captions, VQA questions and answers and instructions
     (English and Chinese) that `synth` writes for the pre-training scenes, without their images,
     as a language model first learns from web text. The base knows the words and grammar of the
     domain but has never been shown which caption goes with which image;
- a fixed recipe (AdamW, warm-up + cosine, batch 32 + 32, gradient clipping), seeded: the same
  versions of torch and transformers on the same kind of CPU give the same weights.

    python -m recipes.common.tiny_pretrain blip2-opt                 # into the cache (what recipes use)
    python -m recipes.common.tiny_pretrain blip2-opt --out /tmp/base --steps 300

The result is saved with `save_pretrained` (model and processor) plus `pretraining.json` (corpus,
settings, loss curve, seconds), and loaded with `from_pretrained` like any checkpoint. Recipes name it
`tiny:blip2-opt-pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from data_tools.synth import draw_scene, make_scene, scene_texts

from .tiny_models import BUILD_VERSION, build_once, cache_root, tiny_model_path

PRETRAIN_VERSION = 1  # bump when the corpus or the recipe below changes
PRETRAIN_SEED = 10_000  # synth seed of the pre-training images; the embedded fine-tuning data uses 0
DEFAULTS = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "warmup": 50, "weight_decay": 0.01, "seed": 0}


def annotation(objects: list[dict]) -> str:
    """Region-annotation style text of a scene: every attribute of every object, in reading order."""
    return "; ".join(
        f"{o['position'].replace(' ', '-')}: shape {o['shape']}, colour {o['color']}, size {o['size']}" for o in objects
    )


def corpus_batch(step: int, batch_size: int, image_size: int = 64) -> tuple[list, list[str]]:
    """Images and annotations of batch `step`: a pure function of (step, index), so any step can be redrawn."""
    images, texts = [], []
    for i in range(step * batch_size, (step + 1) * batch_size):
        objects = make_scene(PRETRAIN_SEED, i, image_size)
        images.append(draw_scene(objects, PRETRAIN_SEED, i, image_size))
        texts.append(annotation(objects))
    return images, texts


def text_corpus(n_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Text-only pre-training corpus: what `synth` writes (captions, VQA, instructions; English and
    Chinese) for `n_scenes` pre-training scenes, shuffled. Like the web text a language model is first
    trained on, it holds the words and grammar of the domain, but no image goes with it."""
    import random

    texts = [t for i in range(n_scenes) for task in ("caption", "vqa", "instruct") for lang in ("en", "zh")
             for t in scene_texts(task, i, lang, PRETRAIN_SEED)]
    random.Random(seed).shuffle(texts)
    return texts


def _text_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Causal-LM inputs for the language model alone: bos + text + eos, right-padded; loss off on padding."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        attention_mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def _blip2_batch(model, processor, images, texts) -> dict[str, torch.Tensor]:
    """BLIP-2 inputs: query-token placeholders + bos + text + eos; loss on the text and eos only."""
    tok, n_query = processor.tokenizer, model.config.num_query_tokens
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = n_query + max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :n_query] = model.config.image_token_id
        input_ids[i, n_query:n_query + len(x)] = torch.tensor(x)
        labels[i, n_query + 1:n_query + len(x)] = torch.tensor(x[1:])  # not bos: it is always given
        attention_mask[i, :n_query + len(x)] = 1
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain_blip2(out_dir: str | Path, *, base: str | Path | None = None, steps: int = DEFAULTS["steps"],
                   batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], warmup: int = DEFAULTS["warmup"],
                   weight_decay: float = DEFAULTS["weight_decay"], seed: int = DEFAULTS["seed"],
                   log=print) -> Path:
    """Pre-train every weight of a tiny Blip2ForConditionalGeneration on the annotation corpus; save to `out_dir`."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    base = Path(base) if base is not None else tiny_model_path("blip2-opt")
    model = Blip2ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    processor = Blip2Processor.from_pretrained(base)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    texts = text_corpus(seed=seed)
    model.train()
    curve, start = [], time.time()
    for step in range(steps):
        # Each step: a batch of annotated images (every weight) and a batch of text for the language model.
        image_loss = model(**_blip2_batch(model, processor, *corpus_batch(step, batch_size))).loss
        first = step * batch_size % len(texts)
        text_loss = model.language_model(**_text_batch(processor.tokenizer, texts[first:first + batch_size])).loss
        loss = image_loss + text_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            curve.append({"step": step, "image_loss": round(image_loss.item(), 4), "text_loss": round(text_loss.item(), 4)})
            log(f"pre-training tiny BLIP-2: step {step + 1}/{steps}, image-annotation loss {image_loss.item():.3f}, "
                f"text loss {text_loss.item():.3f}, {time.time() - start:.0f} s")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {
        "base": str(base), "corpus": f"synthetic shapes, seed {PRETRAIN_SEED}, attribute annotations (see tiny_pretrain.py)",
        "example": corpus_batch(0, 1)[1][0], "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "seed": seed, "seconds": round(time.time() - start, 1), "loss_curve": curve,
        "pretrain_version": PRETRAIN_VERSION, "build_version": BUILD_VERSION,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=2))
    return out_dir


PRETRAINERS = {"blip2-opt": pretrain_blip2}


def pretrained_tiny_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of the pre-trained tiny model `name` (default settings), pre-trained on first use.

    Concurrent callers (the ranks of a DDP launch) wait for one build instead of each pre-training.
    """
    if name not in PRETRAINERS:
        raise ValueError(f"no pre-training for tiny model {name!r}; expected one of {sorted(PRETRAINERS)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "tiny" / f"{name}-pretrained-v{BUILD_VERSION}.{PRETRAIN_VERSION}"

    def build(tmp: Path) -> None:
        print(f"pre-training the tiny {name} base into {final} (once; about 5 minutes on 2 CPU cores) ...",
              file=sys.stderr, flush=True)
        PRETRAINERS[name](tmp, base=tiny_model_path(name, cache_dir), log=lambda m: print(m, file=sys.stderr, flush=True))

    return build_once(final, build, marker="pretraining.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.common.tiny_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(PRETRAINERS))
    p.add_argument("--out", help="pre-train into this folder (default: the cache, where recipes find it)")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), default=value)
    args = p.parse_args(argv)
    settings = {k: getattr(args, k) for k in DEFAULTS}
    if args.out:
        path = PRETRAINERS[args.name](args.out, **settings)
    elif settings != DEFAULTS:
        p.error("non-default settings need --out: the cache holds the default pre-training only")
    else:
        path = pretrained_tiny_path(args.name)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
