"""Pre-train tiny models: the small pre-trained bases that the embedded default runs fine-tune.

A real fine-tuning run starts from a pre-trained checkpoint. A tiny model with random weights is no
such start: fine-tuned with LoRA alone (frozen random embeddings and LM head), tiny BLIP-2 ends three
epochs on the synthetic captions at a loss of 5.8 and a held-out CIDEr of 0.46, and a frozen random
CLIP or GPT-2 cannot be steered to caption at all. So the project pre-trains its own tiny bases, as
real models are pre-trained, and reproducibly. Two corpora, neither of them a fine-tuning task:

1. images with attribute annotations in the style of region annotations (Visual Genome), not
   captions: "top-left: shape circle, colour red, size small; center: shape square, colour blue,
   size large". The images are synthetic shapes scenes from another seed (`PRETRAIN_SEED`), so none
   is a fine-tuning image, and no scene shows an image of the val or test split of any recipe's embedded
   default (`HELD_OUT_DEFAULTS`, `pretraining_scenes`): not the same objects (shape, colour, size and
   place of each), and not a near duplicate by the rule of `dedup` and `split`. Held-out numbers are on
   scenes a base has never seen. A base learns what is
   in an image and where. Perfect annotations score a CIDEr of 0.20 against the reference captions, so a
   base's held-out CIDEr before fine-tuning stays low;
2. text alone: the captions, VQA questions and answers and instructions (English and Chinese) that
   `synth` writes for the pre-training scenes, without their images, as a language model first learns
   from web text. A base knows the words and grammar of the domain but has never been shown which
   caption goes with which image.

The bases (`tiny:<name>-pretrained` in a recipe's --model_name_or_path):
- `blip2-opt`: its OPT on corpus 2 alone first, then every weight of the tiny BLIP-2 (vision,
  Q-Former, OPT) on corpus 1 (image -> text) with a down-weighted corpus 2 loss at each step;
- `clip`: the tiny CLIP contrastively on corpus 1 (image, annotation) pairs, with hard negatives;
- `clip-vision`: the vision tower of the pre-trained `clip`, alone (a CLIPVisionModel);
- `siglip2`: the tiny SigLIP 2 (NaFlex) on corpus 1 with SigLIP's sigmoid loss, with hard negatives;
- `gpt2`: the tiny GPT-2 on corpus 2;
- `llava`: LLaVA-1.5's starting point: the vision tower of the pre-trained `clip`, a Llama pre-trained
  on corpus 2, and a projector that has not been trained (the llava_instruct recipe's stage 1 does it).

Each is one fixed recipe (AdamW, warm-up + cosine, gradient clipping), seeded: the same versions of
torch and transformers on the same kind of CPU give the same weights.

    python -m recipes.common.tiny.pretrain blip2-opt                 # into the cache (what recipes use)
    python -m recipes.common.tiny.pretrain clip --out /tmp/clip --steps 300

The result is saved with `save_pretrained` (model and processor) plus `pretraining.json` (corpus,
settings, loss curve, seconds), and loaded with `from_pretrained` like any checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.files import atomic_write_text
from data_tools.hashing import COLOUR_TOLERANCE, DEFAULT_NEAR_THRESHOLD, colours_of, phash_of
from data_tools.jsonl import read_jsonl
from data_tools.synth import SHAPES, draw_scene, make_scene, scene_texts

from ..cache import build_once, cache_root
from .models import BUILD_VERSIONS, build_outside_process_group, tiny_model_path

# Bump a base's version when its corpus or recipe changes, and the versions of the bases that start from it.
PRETRAIN_VERSIONS = {"blip2-opt": 3, "clip": 3, "clip-vision": 3, "gpt2": 2, "llava": 3}
PRETRAIN_VERSIONS["siglip2"] = 1
PRETRAIN_SEED = 10_000  # synth seed of the pre-training images; the embedded fine-tuning data uses 0 and 1
# The recipes' embedded defaults, (task, images, seed) as their train.py makes them: llava_instruct's
# stage 1 captions use seed 1, clip_retrieval has 5,000 images (--embedded_images).
HELD_OUT_DEFAULTS = (("caption", 1000, 0), ("vqa", 1000, 0), ("instruct", 1000, 0), ("caption", 1000, 1),
                     ("retrieval", 5000, 0))


def scene_signature(objects: list[dict]) -> tuple:
    """What a scene shows: each object's shape, colour, size and grid position (not its pixel jitter)."""
    return tuple((o["shape"], o["color"], o["size"], o["position"]) for o in objects)


@functools.lru_cache(maxsize=2)
def held_out_images(root: Path) -> tuple[frozenset, np.ndarray, np.ndarray]:
    """Every val and test image of the embedded defaults in cache `root` (built on first use): their
    scene signatures, perceptual hashes and colour grids (`data_tools.hashing`: the rule of `dedup`)."""
    from ..data import embedded_dataset

    signatures, hashes, colours = set(), [], []
    for task, n, seed in HELD_OUT_DEFAULTS:
        splits = embedded_dataset(task, n=n, seed=seed)
        for split in ("val", "test"):
            for r in read_jsonl(splits[split]):
                if "objects" not in r:  # a text-only conversation
                    continue
                signatures.add(scene_signature(r["objects"]))
                with Image.open(splits[split].parent / r["image"]) as im:
                    rgb = im.convert("RGB")
                hashes.append(phash_of(rgb))
                colours.append(colours_of(rgb))
    return (frozenset(signatures), np.array(hashes, np.uint64),
            np.frombuffer(b"".join(colours), np.uint8).reshape(len(colours), -1))


def _near_held_out(images: list, hashes: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """For each image, whether it is a near duplicate of a held-out image (pHash within 4 bits and the
    colour grids within tolerance)."""
    mine = np.array([phash_of(im) for im in images], np.uint64)
    near = np.bitwise_count(mine[:, None] ^ hashes[None, :]) <= DEFAULT_NEAR_THRESHOLD
    out = np.zeros(len(images), bool)
    for i, j in zip(*np.nonzero(near)):
        a = np.frombuffer(colours_of(images[i]), np.uint8).astype(np.int16)
        out[i] |= bool(np.abs(a - colours[j].astype(np.int16)).max() <= COLOUR_TOLERANCE)
    return out


def _scan(count: int, start: int = 0, root: Path | None = None) -> list[int]:
    """The first `count` scene indices of `PRETRAIN_SEED` from `start` on that show no held-out image: not
    the same objects, and not a near duplicate (drawn and hashed, 2,048 at a time)."""
    signatures, hashes, colours = held_out_images(root or cache_root())
    found: list[int] = []
    while len(found) < count:
        batch = [i for i in range(start, start + 2048)
                 if scene_signature(make_scene(PRETRAIN_SEED, i)) not in signatures]
        images = [draw_scene(make_scene(PRETRAIN_SEED, i), PRETRAIN_SEED, i) for i in batch]
        found.extend(i for i, near in zip(batch, _near_held_out(images, hashes, colours)) if not near)
        start += 2048
    return found[:count]


POOL_SIZE = 192_000  # the most scenes a default pre-training draws: CLIP's 3,000 steps x 64
POOL_VERSION = 1  # bump when the held-out defaults or the rule change


@functools.lru_cache(maxsize=2)
def _pool(root: Path) -> list[int]:
    """The first POOL_SIZE pre-training scenes: shipped with the project (`ship_pool`), or found once into
    the cache."""
    name = f"pretraining-scenes-v{POOL_VERSION}"
    folder = shipped_base(name) or root / "tiny" / name
    build_once(folder, lambda tmp: np.save(tmp / "scenes.npy", np.array(_scan(POOL_SIZE, root=root))),
               marker="scenes.npy")
    return np.load(folder / "scenes.npy").tolist()


def pretraining_scenes(count: int) -> list[int]:
    """The first `count` scene indices of `PRETRAIN_SEED` that show no val or test image of an embedded
    default (`_scan`); the first `POOL_SIZE` are found once and cached."""
    pool = _pool(cache_root())
    if count > len(pool):
        pool = pool + _scan(count - len(pool), start=pool[-1] + 1)
    return pool[:count]


def annotation(objects: list[dict]) -> str:
    """Region-annotation style text of a scene: every attribute of every object, in reading order."""
    return "; ".join(
        f"{o['position'].replace(' ', '-')}: shape {o['shape']}, colour {o['color']}, size {o['size']}"
        for o in objects
    )


def corpus_batch(step: int, batch_size: int, image_size: int = 64) -> tuple[list, list[str]]:
    """Images and annotations of batch `step`: a pure function of (step, index), so any step can be
    redrawn."""
    images, texts = [], []
    for i in pretraining_scenes((step + 1) * batch_size)[step * batch_size:]:
        objects = make_scene(PRETRAIN_SEED, i, image_size)
        images.append(draw_scene(objects, PRETRAIN_SEED, i, image_size))
        texts.append(annotation(objects))
    return images, texts


def text_corpus(n_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Text-only pre-training corpus: what `synth` writes (captions, VQA, instructions; English and
    Chinese) for `n_scenes` pre-training scenes, shuffled. Like the web text a language model is first
    trained on, it holds the words and grammar of the domain, but no image goes with it."""
    texts = [t for i in pretraining_scenes(n_scenes) for task in ("caption", "vqa", "instruct")
             for lang in ("en", "zh") for t in scene_texts(task, i, lang, PRETRAIN_SEED)]
    random.Random(seed).shuffle(texts)
    return texts


def _text_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Causal-LM inputs for the language model alone: bos + text + eos, right-padded; loss off on padding.

    bos is put in front where the tokenizer adds none (GPT-2's: its `<|endoftext|>` then separates texts
    as it separates GPT-2's training documents), so the first word is learned too.
    """
    bos = tokenizer.bos_token_id
    ids = [tokenizer(t)["input_ids"] for t in texts]
    ids = [(x if bos is None or x[:1] == [bos] else [bos] + x) + [tokenizer.eos_token_id] for x in ids]
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
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": labels}


def _train(params, losses_at, *, steps: int, lr: float, warmup: int, weight_decay: float, seed: int, log,
           what: str, weights: dict[str, float] | None = None) -> tuple[list[dict], float]:
    """The one pre-training loop: AdamW, linear warm-up then cosine to zero, gradients clipped at norm 1.

    `params`: parameters, or optimizer parameter groups (dicts). `losses_at(step)` returns {name: loss
    tensor}; their sum, each times its `weights` entry (default 1), is minimised. The curve records
    the losses unweighted. Returns (loss curve, seconds).
    """
    weights = weights or {}
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    params = [p for g in groups for p in g["params"]]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, start = [], time.time()
    for step in range(steps):
        losses = losses_at(step)
        sum(weights.get(k, 1.0) * v for k, v in losses.items()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            values = {k: round(v.item(), 4) for k, v in losses.items()}
            curve.append({"step": step, **values})
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in values.items())
            log(f"pre-training {what}: step {step + 1}/{steps}, {shown}, {time.time() - start:.0f} s")
    return curve, round(time.time() - start, 1)


def _decay_groups(model) -> list[dict]:
    """Weight decay on the matrices only: not on biases, norms, a temperature or a logit bias."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save(model, processor, out_dir: str | Path, record: dict) -> Path:
    """save_pretrained the model and its processor, plus pretraining.json (settings, loss curve, versions)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {**record, "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return out_dir


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on `logits` [images, texts], text i being image i's; texts past the images are
    extra negatives, in the image-to-text direction only."""
    labels = torch.arange(logits.shape[0])
    image_to_text = torch.nn.functional.cross_entropy(logits, labels)
    text_to_image = torch.nn.functional.cross_entropy(logits[:, : len(labels)].T, labels)
    return (image_to_text + text_to_image) / 2


def pretrain_blip2(out_dir: str | Path, *, base: str | Path | None = None, steps: int = 2000,
                   text_steps: int = 500, text_weight: float = 0.2, text_batch_size: int = 32,
                   batch_size: int = 32, lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.01,
                   seed: int = 0, log=print) -> Path:
    """Pre-train a tiny Blip2ForConditionalGeneration in two stages; save to `out_dir`.

    1. `text_steps` steps of its OPT alone on the text corpus (a language model is trained on text
       before it meets images);
    2. `steps` steps of every weight on annotated images (`batch_size` a step), plus the text loss on
       `text_batch_size` texts times `text_weight`, so that the LM keeps the words of captions, which
       the annotations do not use.

    Why this mix (measured: teacher-forced accuracy of the attribute words on unseen pre-training
    scenes, and held-out CIDEr after fine-tuning with the recipe's config.yaml): with the text loss at
    full weight from the first step (version 1), the LM predicts annotations from their words and
    hardly from the image (colour 0.21, shape 0.26; fine-tuned CIDEr 0.83 to 1.01 depending on the
    run); with no text loss at all, colour is read (0.98) but the LM forgets the caption words that
    annotations lack and fine-tuning starts at a loss of 10 (CIDEr 0.80). Text first, then images with
    the text loss at 0.2 on 32 texts a step (these defaults), with 1 thread: colour 0.96, size 0.97, shape
    0.23 (about chance: the tiny vision tower does not learn shapes in this budget), fine-tuned CIDEr 0.99
    after one epoch, 1.26 after six; with 2 threads (another order of float sums, `make demo`): colour
    0.79, size 0.90, shape 0.27, CIDEr 1.12. It is a narrow road: with 8 texts a step instead of 32, colour
    0.33 and CIDEr
    0.83; with 1,500 image steps, CIDEr 1.09; with the text loss only in the last 500 steps, 0.99.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    base = Path(base) if base is not None else tiny_model_path("blip2-opt")
    model = Blip2ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    processor = Blip2Processor.from_pretrained(base)
    texts = text_corpus(seed=seed)
    model.train()

    def text_loss(first: int, size: int) -> torch.Tensor:
        first %= len(texts)
        return model.language_model(**_text_batch(processor.tokenizer, texts[first:first + size])).loss

    settings = dict(lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed, log=log)
    text_curve, text_seconds = _train(model.language_model.parameters(),
                                      lambda step: {"text_loss": text_loss(step * batch_size, batch_size)},
                                      steps=text_steps, what="tiny BLIP-2, stage 1 (text)", **settings)

    def losses_at(step: int) -> dict:
        # Each step: a batch of annotated images (every weight) and a batch of text for the language model.
        image_loss = model(**_blip2_batch(model, processor, *corpus_batch(step, batch_size))).loss
        texts_seen = text_steps * batch_size + step * text_batch_size
        return {"image_loss": image_loss, "text_loss": text_loss(texts_seen, text_batch_size)}

    curve, seconds = _train(model.parameters(), losses_at, steps=steps, weights={"text_loss": text_weight},
                            what="tiny BLIP-2, stage 2 (images)", **settings)
    return _save(model, processor, out_dir, {
        "base": str(base),
        "corpus": f"synthetic shapes, seed {PRETRAIN_SEED}, attribute annotations (see "
                  "recipes/common/tiny/pretrain.py)", "example": corpus_batch(0, 1)[1][0],
        "text_steps": text_steps, "steps": steps, "text_weight": text_weight,
        "text_batch_size": text_batch_size, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "seed": seed, "seconds": round(text_seconds + seconds, 1),
        "text_loss_curve": text_curve, "loss_curve": curve})


def shape_negative(index: int) -> str:
    """The annotation of pre-training scene `index` with one object's shape changed: a hard negative."""
    objects = [dict(o) for o in make_scene(PRETRAIN_SEED, index)]
    rng = random.Random(f"shape-negative:{index}")
    o = rng.choice(objects)
    o["shape"] = rng.choice([s for s in SHAPES if s != o["shape"]])
    return annotation(objects)


def pretrain_clip(out_dir: str | Path, *, base: str | Path | None = None, steps: int = 3000,
                  batch_size: int = 64, lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.1,
                  hard_negatives: bool = True, seed: int = 0, log=print) -> Path:
    """Pre-train a tiny CLIPModel contrastively on (image, attribute annotation) pairs; save to `out_dir`.

    CLIP's loss (symmetric InfoNCE over the batch, learnable temperature; Radford et al. 2021,
    "Learning Transferable Visual Models From Natural Language Supervision", sec. 2.3). Weight decay 0.1
    as in that paper's ViT training (appendix F); none on the temperature. With `hard_negatives`, each
    image also meets its own annotation with one shape changed (`shape_negative`), in the image-to-text
    direction, as NegCLIP adds hard negative captions (Yuksekgonul et al. 2023, "When and why
    vision-language models behave like bags-of-words"): colour, size and position tell a batch apart
    long before shape is learned, and without them shape gets little gradient.
    """
    from transformers import CLIPModel, CLIPProcessor

    base = Path(base) if base is not None else tiny_model_path("clip")
    model = CLIPModel.from_pretrained(base, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(base)
    model.train()

    def losses_at(step: int) -> dict:
        images, texts = corpus_batch(step, batch_size)
        scenes = pretraining_scenes((step + 1) * batch_size)[step * batch_size:]
        negatives = [shape_negative(i) for i in scenes] if hard_negatives else []
        inputs = processor(text=texts + negatives, images=images, padding=True, return_tensors="pt")
        # logits_per_image: images x (texts + negatives), scaled by the temperature
        return {"contrastive_loss": contrastive_loss(model(**inputs).logits_per_image)}

    groups = _decay_groups(model)
    curve, seconds = _train(groups, losses_at, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay,
                            seed=seed, log=log, what="tiny CLIP")
    return _save(model, processor, out_dir, {
        "base": str(base),
        "corpus": f"synthetic shapes, seed {PRETRAIN_SEED}, (image, attribute annotation) pairs",
        "example": corpus_batch(0, 1)[1][0],
        "hard_negative_example": shape_negative(pretraining_scenes(1)[0]) if hard_negatives else None,
        "steps": steps,
        "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "seed": seed,
        "seconds": seconds, "loss_curve": curve, "logit_scale": round(model.logit_scale.exp().item(), 2)})


def sigmoid_loss(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on `logits` [images, texts] (t * cos + b): -sum log sigmoid(z * logit) / images, z = +1
    where `match`, else -1 (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1)."""
    sign = match.to(logits.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(sign * logits).sum() / logits.shape[0]


def pretrain_siglip2(out_dir: str | Path, *, base: str | Path | None = None, steps: int = 200,
                     batch_size: int = 64, lr: float = 1e-3, warmup: int = 20, weight_decay: float = 0.1,
                     hard_negatives: bool = True, seed: int = 0, log=print) -> Path:
    """Pre-train a tiny Siglip2Model (NaFlex) with the sigmoid loss on (image, attribute annotation) pairs,
    with the shape hard negatives of `pretrain_clip`; save to `out_dir`.

    Every image against every annotation of the batch and every hard negative; an annotation is a match of
    each image it describes (identical annotations of two scenes are both matches). Temperature and bias
    start at the paper's t' = log 10, b = -10 (the tiny model's own) and train, without weight decay.
    Texts are padded to 64 on the tokenizer's side, as the Siglip2Processor pads them; images go through the
    checkpoint's image processor (8 px patches, at most 64). The shipped base: 200 steps, sigmoid loss 11.84
    -> 3.63, 799 s on 2 CPU cores shared with other jobs (load average about 9; 4.5 min of CPU time).
    """
    from transformers import Siglip2Model, Siglip2Processor

    base = Path(base) if base is not None else tiny_model_path("siglip2")
    model = Siglip2Model.from_pretrained(base, dtype=torch.float32)
    processor = Siglip2Processor.from_pretrained(base)
    length = model.config.text_config.max_position_embeddings
    model.train()

    def losses_at(step: int) -> dict:
        images, texts = corpus_batch(step, batch_size)
        scenes = pretraining_scenes((step + 1) * batch_size)[step * batch_size:]
        negatives = [shape_negative(i) for i in scenes] if hard_negatives else []
        tokens = processor.tokenizer(texts + negatives, padding="max_length", max_length=length,
                                     truncation=True, return_tensors="pt")
        out = model(**processor.image_processor(images, return_tensors="pt"), **tokens)
        everything = texts + negatives
        match = torch.tensor([[a == b for b in everything] for a in texts])
        return {"sigmoid_loss": sigmoid_loss(out.logits_per_image, match)}

    groups = _decay_groups(model)
    curve, seconds = _train(groups, losses_at, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay,
                            seed=seed, log=log, what="tiny SigLIP 2")
    return _save(model, processor, out_dir, {
        "base": str(base),
        "corpus": f"synthetic shapes, seed {PRETRAIN_SEED}, (image, attribute annotation) pairs",
        "example": corpus_batch(0, 1)[1][0],
        "hard_negative_example": shape_negative(pretraining_scenes(1)[0]) if hard_negatives else None,
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
        "seed": seed, "seconds": seconds, "loss_curve": curve,
        "logit_scale": round(model.logit_scale.exp().item(), 2),
        "logit_bias": round(model.logit_bias.item(), 2)})


def _lm_losses(model, tokenizer, texts: list[str], batch_size: int):
    """`losses_at` for a causal LM trained on `texts`, batch after batch."""
    def losses_at(step: int) -> dict:
        first = step * batch_size % len(texts)
        return {"text_loss": model(**_text_batch(tokenizer, texts[first:first + batch_size])).loss}
    return losses_at


def pretrain_gpt2(out_dir: str | Path, *, base: str | Path | None = None, steps: int = 1500,
                  batch_size: int = 32, lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.01,
                  seed: int = 0, log=print) -> Path:
    """Pre-train a tiny GPT2LMHeadModel on the text-only corpus (captions, questions, instructions); save to
    `out_dir`."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    base = Path(base) if base is not None else tiny_model_path("gpt2")
    model = GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.train()
    losses_at = _lm_losses(model, tokenizer, text_corpus(seed=seed), batch_size)
    curve, seconds = _train(model.parameters(), losses_at, steps=steps, lr=lr, warmup=warmup,
                            weight_decay=weight_decay, seed=seed, log=log, what="tiny GPT-2")
    return _save(model, tokenizer, out_dir, {
        "base": str(base), "corpus": f"texts of synthetic shapes scenes, seed {PRETRAIN_SEED}, no images",
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
        "seed": seed, "seconds": seconds, "loss_curve": curve})


def export_clip_vision(out_dir: str | Path, *, clip: str | Path | None = None, log=print) -> Path:
    """The vision tower of the pre-trained tiny CLIP as a standalone CLIPVisionModel + CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

    clip = Path(clip) if clip is not None else pretrained_tiny_path("clip")
    full = CLIPModel.from_pretrained(clip, dtype=torch.float32)
    vision = CLIPVisionModel(full.config.vision_config)
    vision.load_state_dict(full.vision_model.state_dict())
    return _save(vision, CLIPImageProcessor.from_pretrained(clip), out_dir, {
        "base": str(clip), "corpus": "none: the vision tower of the pre-trained tiny CLIP, unchanged"})


def pretrain_llava(out_dir: str | Path, *, base: str | Path | None = None, clip: str | Path | None = None,
                   steps: int = 1500, batch_size: int = 32, lr: float = 1e-3, warmup: int = 50,
                   weight_decay: float = 0.01, seed: int = 0, log=print) -> Path:
    """LLaVA-1.5's starting point at toy size: the pre-trained tiny CLIP's vision tower, a Llama language
    model pre-trained here on the text-only corpus, and the untrained projector of the tiny LLaVA (Liu et
    al. 2023, "Improved Baselines with Visual Instruction Tuning": stage 1 then trains the projector)."""
    from transformers import CLIPModel, LlavaForConditionalGeneration, LlavaProcessor

    base = Path(base) if base is not None else tiny_model_path("llava")
    clip = Path(clip) if clip is not None else pretrained_tiny_path("clip")
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(base)
    tower = CLIPModel.from_pretrained(clip, dtype=torch.float32).vision_model
    model.model.vision_tower.load_state_dict(tower.state_dict())  # same CLIPVisionConfig: an exact copy
    lm_params = [p for n, p in model.named_parameters()
                 if n.startswith(("model.language_model.", "lm_head."))]
    model.train()
    # A text-only forward (no pixel_values) runs the language model alone.
    losses_at = _lm_losses(model, processor.tokenizer, text_corpus(seed=seed), batch_size)
    curve, seconds = _train(lm_params, losses_at, steps=steps, lr=lr, warmup=warmup,
                            weight_decay=weight_decay, seed=seed, log=log, what="tiny LLaVA language model")
    return _save(model, processor, out_dir, {
        "base": str(base), "vision_tower": f"copied from {clip}",
        "corpus": f"language model: texts of synthetic shapes scenes, seed {PRETRAIN_SEED}, no images; "
                  "projector: untrained", "steps": steps, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "weight_decay": weight_decay, "seed": seed, "seconds": seconds,
        "loss_curve": curve})


PRETRAINERS = {"blip2-opt": pretrain_blip2, "clip": pretrain_clip, "clip-vision": export_clip_vision,
               "gpt2": pretrain_gpt2, "llava": pretrain_llava}
PRETRAINERS["siglip2"] = pretrain_siglip2
# What each pre-trained base starts from: the random tiny model of `tiny.models`, or another pre-trained base.
STARTS_FROM = {"blip2-opt": {"base": "blip2-opt"}, "clip": {"base": "clip"},
               "clip-vision": {"clip": "clip-pretrained"}, "gpt2": {"base": "gpt2"},
               "llava": {"base": "llava", "clip": "clip-pretrained"}}
STARTS_FROM["siglip2"] = {"base": "siglip2"}


def _version(name: str) -> str:
    return f"v{BUILD_VERSIONS[name]}.{PRETRAIN_VERSIONS[name]}"


# Bases shipped with the project (exact copies of `pretrained_tiny_path`'s builds, checked by SHA-256), so
# that every machine fine-tunes the same weights: pre-training is thousands of steps, and CPUs with other
# vector units (AVX2, AVX-512) round their sums differently, which that many steps turn into other weights.
SHIPPED = Path(__file__).resolve().parent / "bases"


def shipped_base(folder_name: str) -> Path | None:
    """The shipped copy of a pre-trained base (or of the scene list), after checking every file's SHA-256
    against MANIFEST.json; None when the project ships none of that name and version."""
    return _verified(SHIPPED / folder_name)


@functools.lru_cache(maxsize=None)
def _verified(folder: Path) -> Path | None:
    manifest = folder.parent / "MANIFEST.json"
    if not folder.is_dir() or not manifest.exists():
        return None
    expected = json.loads(manifest.read_text()).get(folder.name) or {}
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.iterdir()) if p.is_file()}
    if found != expected:
        bad = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ValueError(f"{folder}: {', '.join(bad)} do not match {manifest} (a damaged or edited copy); "
                         "restore them with git, or delete the folder to pre-train the base again.")
    return folder


def ship(name: str) -> Path:
    """Copy the cache's pre-trained base `name` (or "scenes": the pre-training scenes) into SHIPPED, its
    files' SHA-256 into MANIFEST.json."""
    if name == "scenes":
        _pool(cache_root())
        source = cache_root() / "tiny" / f"pretraining-scenes-v{POOL_VERSION}"
    else:
        source = pretrained_tiny_path(name, shipped=False)
    target = SHIPPED / source.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    manifest_path = SHIPPED / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest = {k: v for k, v in manifest.items() if k.rsplit("-v", 1)[0] != source.name.rsplit("-v", 1)[0]}
    manifest[target.name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in sorted(target.iterdir()) if p.is_file()}
    atomic_write_text(manifest_path, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    _verified.cache_clear()
    return target


def pretrained_tiny_path(name: str, cache_dir: str | Path | None = None, *, shipped: bool = True) -> Path:
    """Folder of the pre-trained tiny model `name` (default settings): the project's shipped copy, or the
    cache's, pre-trained on first use.

    What it starts from (STARTS_FROM) is built first, also on first use. Concurrent callers (the ranks
    of a DDP launch) wait for one build instead of each pre-training.
    """
    if name not in PRETRAINERS:
        raise ValueError(f"no pre-training for tiny model {name!r}; expected one of {sorted(PRETRAINERS)}")
    folder_name = f"{name}-pretrained-{_version(name)}"
    if shipped and (copy := shipped_base(folder_name)) is not None:
        return copy
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "tiny" / folder_name

    def build(tmp: Path) -> None:
        starts = {arg: (pretrained_tiny_path(dep[: -len("-pretrained")], cache_dir, shipped=shipped)
                        if dep.endswith("-pretrained") else tiny_model_path(dep, cache_dir))
                  for arg, dep in STARTS_FROM[name].items()}
        print(f"pre-training the tiny {name} base into {final} (once; a few minutes on 2 CPU cores) ...",
              file=sys.stderr, flush=True)
        PRETRAINERS[name](tmp, **starts, log=lambda m: print(m, file=sys.stderr, flush=True))

    build_outside_process_group("recipes.common.tiny.pretrain", name, final, "pretraining.json", root)
    return build_once(final, build, marker="pretraining.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.common.tiny.pretrain",
                                description=__doc__.split("\n")[0])
    p.add_argument("name", choices=[*sorted(PRETRAINERS), "scenes"],
                   help="a base, or 'scenes' (with --ship: the list of pre-training scenes)")
    p.add_argument("--out", help="pre-train into this folder (default: the cache, where recipes find it)")
    p.add_argument("--ship", action="store_true",
                   help="pre-train into the cache (if not there), then copy it into "
                        "recipes/common/tiny/bases with its SHA-256 sums: the base every clone then uses")
    for key, kind in (("steps", int), ("text_steps", int), ("text_weight", float), ("text_batch_size", int),
                      ("batch_size", int), ("lr", float), ("warmup", int), ("weight_decay", float),
                      ("seed", int)):
        p.add_argument(f"--{key}", type=kind, help="default: the pre-trainer's own")
    args = p.parse_args(argv)
    if args.name == "scenes":
        if not args.ship:
            p.error("scenes goes with --ship")
        print(ship("scenes"))
        return 0
    settings = {k: v for k, v in vars(args).items() if k not in ("name", "out", "ship") and v is not None}
    known = inspect.signature(PRETRAINERS[args.name]).parameters
    if unknown := [k for k in settings if k not in known]:
        p.error(f"{args.name} takes no --{' --'.join(unknown)}")
    if args.out:
        path = PRETRAINERS[args.name](args.out, **settings)
    elif settings:
        p.error("non-default settings need --out: the cache holds the default pre-training only")
    elif args.ship:
        path = ship(args.name)
    else:
        path = pretrained_tiny_path(args.name)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
