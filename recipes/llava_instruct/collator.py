"""What is specific to visual instruction tuning: stage-1 caption conversations and the held-out eval items.

Prompt building, assistant-only labels, the length budget and the collators are shared with other
LLaVA-style recipes in `recipes.common.chat`; the scoring of the items is `eval.instruct`.

Stage 1 (`--stage pretrain`) trains the projector on captions, as LLaVA turns image-caption pairs
into single-turn conversations: a brief-description request, answered with the caption (Liu et al.,
2023, "Visual Instruction Tuning", sections 3 and 4.2: stage 1, pre-training for feature alignment).
The requests below are ours.
"""

from __future__ import annotations

import random

import datasets

from data_tools.records import IMAGE_TOKEN
from eval.instruct import eval_items

BRIEF_REQUESTS = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "What does this image show? Answer in one sentence.",
    "Write a one-sentence description of the image.",
)


def _caption_turns(request: str, caption: str | None = None) -> list[dict]:
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{request}"}]
    return turns + ([{"from": "gpt", "value": caption}] if caption is not None else [])


def caption_conversations(records: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Caption records -> one single-turn conversation per reference caption, the request drawn per sample
    (and the record's line, for errors)."""
    rows = []
    for i, record in enumerate(records):
        for j, caption in enumerate(record["captions"]):
            request = random.Random(f"{seed}:{i}:{j}").choice(BRIEF_REQUESTS)
            rows.append({"image": record["image"], "line": record.get("line"),
                         "conversations": _caption_turns(request, caption.strip())})
    return datasets.Dataset.from_list(rows)


def caption_eval_items(records: datasets.Dataset) -> list[dict]:
    """One eval item per image, keyed by its path (as `eval report` keys captions): the first request, and the
    captions of every row of that image (files with one row per caption have several)."""
    captions: dict[str, list[str]] = {}
    for r in records:
        captions.setdefault(r["image"], []).extend(r["captions"])
    return [{"key": image, "image": image, "conversations": _caption_turns(BRIEF_REQUESTS[0]),
             "question": BRIEF_REQUESTS[0], "references": refs, "short": False}
            for image, refs in captions.items()]


def generation_items(task: str, records: datasets.Dataset, short_answer_words: int,
                     lang: str) -> datasets.Dataset:
    """The eval items to generate for: per assistant turn (instruct records) or per image (caption
    records)."""
    items = (caption_eval_items(records) if task == "caption"
             else eval_items(records, short_answer_words, lang))
    if not items:
        raise ValueError("the eval file has no assistant turn that answers a user turn: nothing to evaluate")
    return datasets.Dataset.from_list(items)
