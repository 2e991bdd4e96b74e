"""Caption data for the soft-prompt captioner: one (image, caption) sample per reference caption.

The model puts its prefix (soft prompt + image vectors) in front of the text itself, so the samples
hold the text only:
    input_ids = prompt + caption + eos        (prompt: the tokenizer's own specials + --prompt, often empty)
    labels    = -100 over the prompt; the caption and eos are learned
and the model adds -100 labels over the prefix. The length budget still counts the prefix
(`prefix_length` = prompt_length + image vectors). Tokenization happens once, before training, so
every truncated or dropped sample is counted; the training collator (recipes/common/captions.py) only opens
images and pads.
"""

from __future__ import annotations


import datasets

from eval.caption import CHARACTER_LANGS
from recipes.common.lengths import LengthReport, fit_to_budget


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
