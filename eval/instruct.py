"""Instruction-following evaluation: one generation per held-out assistant turn, scored by the kind of answer.

Each assistant turn of an eval conversation is an item: the prompt is the conversation up to the user
turn before it (earlier reference answers as history), the reference is the turn's text. A short
answer (at most `short_answer_words` words in every reference) is scored with VQA accuracy: with one
reference that is exact match after the official VQA normalisation (`eval.vqa`). A longer one (a
description) is scored with CIDEr, BLEU and ROUGE-L (`eval.caption`), corpus-level over the long items.

Item keys are "<row>:<turn>": the row's index in the eval file, counted from 0 over every row (blank lines
are not rows; invalid rows count, so a row skipped with --skip_bad_rows shifts no key), and the turn's
index in its conversation. `python -m eval report` rebuilds the same items from the eval file.
"""

from __future__ import annotations

from .caption import CHARACTER_LANGS, caption_metrics, character_tokens
from .vqa import vqa_accuracy

# LLaVA-1.5's response-format prompt for short answers asks for "a single word or phrase" (Liu et al.,
# 2023, "Improved Baselines with Visual Instruction Tuning"): three words cover such phrases.
SHORT_ANSWER_WORDS = 3
CAPTION_METRICS = ["Bleu", "ROUGE_L", "CIDEr"]
# The record field that holds the row's index in its file (`recipes.common.data.load_records` and
# `eval.report.read_references` set it), which item keys are made of.
ROW = "row"


def word_count(text: str, lang: str = "en") -> int:
    """Words of `text`; characters for unsegmented scripts (Chinese, Japanese, Thai, ...)."""
    return len((character_tokens(text) if lang in CHARACTER_LANGS else text).split())


def is_short(references: list[str], short_answer_words: int = SHORT_ANSWER_WORDS, lang: str = "en") -> bool:
    """Whether an item is scored as a short answer (VQA accuracy) rather than a description (CIDEr)."""
    return max(word_count(r, lang) for r in references) <= short_answer_words


def eval_items(records, short_answer_words: int = SHORT_ANSWER_WORDS, lang: str = "en") -> list[dict]:
    """Instruct records -> one item per assistant turn that follows a user turn.

    Item: {"key", "image" (or None), "images" (a row's several images, or None), "conversations" (the
    turns before the answer), "question" (the last user turn), "references" ([the answer]), "short"}.
    A record's row is its `ROW` field, or without one its position among `records`.
    """
    items = []
    for position, record in enumerate(records):
        row = record.get(ROW)
        row = position if row is None else row
        turns = record["conversations"]
        for t, turn in enumerate(turns):
            if turn["from"] != "gpt" or t == 0 or turns[t - 1]["from"] != "human":
                continue
            # The images of later turns' <image>s are not shown yet (the others lead the first user turn).
            later = sum(u["value"].count("<image>") for u in turns[t:])
            image, images = record.get("image"), record.get("images")
            if later and images is not None:
                images = images[: len(images) - later]
            elif later:
                image = None
            items.append({
                "key": f"{row}:{t}", "image": image, "images": images,
                "conversations": turns[:t],
                "question": turns[t - 1]["value"].replace("<image>", "").strip(),
                "references": [turn["value"]], "short": is_short([turn["value"]], short_answer_words, lang),
            })  # fmt: skip
    return items


def instruct_scores(predictions: dict, items, lang: str = "en", metrics=None,
                    per_sample: bool = False) -> dict:
    """`VQA_accuracy` (percent) over the short items, caption metrics over the others, and both counts.

    `items` are dicts with "key", "references" and "short" (those of `eval_items`); every prediction
    key must be one of theirs. With `per_sample`, also {key: score in [0, 1]} (accuracy or CIDEr).
    """
    by_key = {it["key"]: it for it in items}
    unknown = [k for k in predictions if k not in by_key]
    if unknown:
        raise KeyError(f"{len(unknown)} prediction key(s) are not eval items, e.g. {unknown[0]!r}")
    short = [k for k in predictions if by_key[k]["short"]]
    long = [k for k in predictions if not by_key[k]["short"]]
    scores, samples = {"n_short": len(short), "n_long": len(long)}, {}
    if short:
        acc = vqa_accuracy({k: predictions[k] for k in short},
                           {k: {"answers": by_key[k]["references"]} for k in short})
        scores["VQA_accuracy"] = acc["overall"]
        samples.update({k: v / 100 for k, v in acc["perQuestion"].items()})
    if long:
        caps = caption_metrics({k: predictions[k] for k in long}, {k: by_key[k]["references"] for k in long},
                               lang=lang, metrics=metrics or CAPTION_METRICS, per_sample=per_sample)
        samples.update({k: s["CIDEr"] for k, s in caps.pop("per_sample", {}).items()})
        scores.update(caps)
    if per_sample:
        scores["per_sample"] = samples
    return scores
