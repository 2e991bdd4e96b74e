"""Caption data for BLIP-2: one (image, caption) sample per reference caption, image tokens in front.

input_ids = [<image>] * num_query_tokens + bos + prompt + caption + eos
labels    = -100 over the image tokens, bos and prompt; the caption and eos are learned.
Tokenization (and the length budget) happens once, before training, so every truncated or dropped
sample is counted exactly; the collator only opens images and pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from data_tools.images import load_image
from recipes.common.feature_cache import VisionFeatureCache
from recipes.common.lengths import IGNORE_INDEX, LengthReport, fit_to_budget


def tokenize_captions(
    ds: datasets.Dataset,
    tokenizer,
    *,
    image_token_id: int,
    num_image_tokens: int,
    prompt: str | None = None,
    max_length: int | None = None,
) -> tuple[datasets.Dataset, LengthReport]:
    """Caption records -> one tokenized training sample per caption, with labels on the caption only."""
    prompt_ids = tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
    images, captions = [], []
    for row in ds:
        for caption in row["captions"]:
            images.append(row["image"])
            captions.append(f" {caption.strip()}" if prompt else caption.strip())
    target_ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    report, rows = LengthReport(), []
    for image, ids in zip(images, target_ids):
        fitted = fit_to_budget(num_image_tokens, prompt_ids, ids + [tokenizer.eos_token_id], max_length, report)
        if fitted is None:
            continue
        text_ids, labels = fitted
        rows.append(
            {
                "image": image,
                "input_ids": [image_token_id] * num_image_tokens + text_ids,
                "labels": [IGNORE_INDEX] * num_image_tokens + labels,
            }
        )
    return datasets.Dataset.from_list(rows), report


@dataclass
class CaptionCollator:
    """Opens the images (RGB, EXIF-aware, errors naming the file) and right-pads the token sequences.

    With a `feature_cache`, `pixel_values` holds the frozen vision tower's cached output for each image
    instead (batch, positions, hidden), which the tower passes through (recipes/common/feature_cache.py).
    """

    image_processor: object
    pad_token_id: int
    feature_cache: VisionFeatureCache | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None:
            pixel_values = self.feature_cache.get([f["image"] for f in features])
        else:
            pixel_values = self.image_processor([load_image(f["image"]) for f in features], return_tensors="pt")["pixel_values"]
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class CaptionPromptCollator:
    """Eval records -> `generate` inputs: image tokens + bos + prompt (the same for all: no padding), and keys."""

    image_processor: object
    tokenizer: object
    image_token_id: int
    num_image_tokens: int
    prompt: str | None = None

    def __call__(self, records: list[dict]) -> dict:
        prompt_ids = self.tokenizer(self.prompt or "", add_special_tokens=True)["input_ids"]
        ids = [self.image_token_id] * self.num_image_tokens + prompt_ids
        n = len(records)  # every record has the same prompt, so no padding is needed
        return {
            "pixel_values": self.image_processor([load_image(r["image"]) for r in records], return_tensors="pt")["pixel_values"],
            "input_ids": torch.tensor([ids] * n),
            "attention_mask": torch.ones((n, len(ids)), dtype=torch.long),
            "keys": [r["image"] for r in records],
        }


def caption_scores(predictions: dict, records, lang: str = "en") -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr of the predictions against each record's captions (METEOR is slow)."""
    from eval.caption import caption_metrics

    references = {r["image"]: r["captions"] for r in records}
    return caption_metrics(predictions, references, lang=lang, metrics=["Bleu", "ROUGE_L", "CIDEr"])
