"""Caption data for BLIP-2: one (image, caption) sample per reference caption, image tokens in front.

input_ids = [<image>] * num_query_tokens + bos + prompt + caption + eos
labels    = -100 over the image tokens, bos and prompt; the caption and eos are learned.
Tokenized once, before training, so every cut is counted; the collator only opens images and pads.
"""

from __future__ import annotations

import datasets

from recipes.common.lengths import IGNORE_INDEX, LengthReport, fit_to_budget


def tokenize_captions(ds: datasets.Dataset, tokenizer, *, image_token_id: int, num_image_tokens: int,
                      prompt: str | None = None,
                      max_length: int | None = None) -> tuple[datasets.Dataset, LengthReport]:
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
        fitted = fit_to_budget(num_image_tokens, prompt_ids, ids + [tokenizer.eos_token_id], max_length,
                               report)
        if fitted is None:
            continue
        text_ids, labels = fitted
        rows.append({"image": image, "input_ids": [image_token_id] * num_image_tokens + text_ids,
                     "labels": [IGNORE_INDEX] * num_image_tokens + labels})
    return datasets.Dataset.from_list(rows), report
