"""Caption data for the soft-prompt captioner: one (image, caption) sample per reference caption.

The model puts its prefix (soft prompt + image vectors) in front of the text itself, so the samples
hold the text only:
    input_ids = prompt + caption + eos        (prompt: the tokenizer's own specials + --prompt, often empty)
    labels    = -100 over the prompt; the caption and eos are learned
and the model adds -100 labels over the prefix. The length budget still counts the prefix
(`prefix_length` = prompt_length + image vectors). Tokenization happens once, before training, so
every truncated or dropped sample is counted; the collator only opens images and pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from data_tools.images import load_image
from eval.caption import CHARACTER_LANGS
from recipes.common.feature_cache import VisionFeatureCache
from recipes.common.lengths import IGNORE_INDEX, LengthReport, fit_to_budget


def tokenize_captions(
    ds: datasets.Dataset,
    tokenizer,
    *,
    prefix_length: int,
    prompt: str | None = None,
    max_length: int | None = None,
    lang: str = "en",
) -> tuple[datasets.Dataset, LengthReport]:
    """Caption records -> one tokenized sample per caption (text only), labels on the caption and eos."""
    prompt_ids = tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
    # After a prompt the caption is a new word: a space in English, none where words are not spaced.
    separator = "" if not prompt or lang in CHARACTER_LANGS else " "
    images, captions = [], []
    for row in ds:
        for caption in row["captions"]:
            images.append(row["image"])
            captions.append(separator + caption.strip())
    target_ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    report, rows = LengthReport(), []
    for image, ids in zip(images, target_ids):
        fitted = fit_to_budget(prefix_length, prompt_ids, ids + [tokenizer.eos_token_id], max_length, report)
        if fitted is not None:
            rows.append({"image": image, "input_ids": fitted[0], "labels": fitted[1]})
    return datasets.Dataset.from_list(rows), report


def pixel_values(image_processor, paths: list[str]) -> torch.Tensor:
    """Open the images (RGB, EXIF-aware, errors naming the file) and preprocess them."""
    return image_processor([load_image(p) for p in paths], return_tensors="pt")["pixel_values"]


@dataclass
class CaptionCollator:
    """Training batches: pixel values and the right-padded text (padding is -100 in labels, 0 in the mask).

    With a `feature_cache`, `pixel_values` holds each image's cached `image_features` instead (3-D), which the
    model takes as they are (recipes/common/feature_cache.py).
    """

    image_processor: object
    pad_token_id: int
    feature_cache: VisionFeatureCache | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        paths = [f["image"] for f in features]
        images = self.feature_cache.get(paths) if self.feature_cache is not None else pixel_values(self.image_processor, paths)
        return {"pixel_values": images, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class CaptionPromptCollator:
    """Eval records -> `generate` inputs: pixel values, the prompt ids (the same for all: no padding), keys."""

    image_processor: object
    tokenizer: object
    prompt: str | None = None

    def __call__(self, records: list[dict]) -> dict:
        ids = self.tokenizer(self.prompt or "", add_special_tokens=True)["input_ids"]
        n = len(records)
        return {
            "pixel_values": pixel_values(self.image_processor, [r["image"] for r in records]),
            # dtype given: with no prompt the ids are empty, and torch.tensor([[]]) would be float.
            "input_ids": torch.tensor([ids] * n, dtype=torch.long).reshape(n, len(ids)),
            "attention_mask": torch.ones((n, len(ids)), dtype=torch.long),
            "keys": [r["image"] for r in records],
        }


def caption_scores(predictions: dict, records, lang: str = "en") -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr of the predictions against each record's captions (METEOR is slow)."""
    from eval.caption import caption_metrics

    references = {r["image"]: r["captions"] for r in records}
    return caption_metrics(predictions, references, lang=lang, metrics=["Bleu", "ROUGE_L", "CIDEr"])
