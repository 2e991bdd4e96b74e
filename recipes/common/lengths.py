"""Sample-length budgeting that counts image tokens: text is cut on the text side only, and every cut is counted.

A sample is `[image tokens] + prompt (not learned) + target (learned)`. `max_length` covers all of
it. When it does not fit, the target is truncated; when not even one target token fits after the
image tokens and the prompt, the sample is dropped. Nothing is cut silently: `LengthReport` counts
both, and the recipes print it before training.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class LengthReport:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    target_tokens_cut: int = 0

    def add(self, other: "LengthReport") -> "LengthReport":
        return LengthReport(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    def __str__(self) -> str:
        return (
            f"length budget: {self.samples} samples, {self.truncated} truncated on the text side "
            f"({self.target_tokens_cut} target tokens cut), {self.dropped} dropped (prompt + image tokens alone over budget)"
        )


def fit_to_budget(
    n_image_tokens: int, prompt_ids: list[int], target_ids: list[int], max_length: int | None, report: LengthReport
) -> tuple[list[int], list[int]] | None:
    """Return `(text_ids, labels)` for the text after the image tokens, or None when the sample is dropped.

    `labels` cover the target tokens only; the prompt is -100. The image tokens are not part of
    `text_ids`: the caller puts them in front, and they always fit whole.
    """
    report.samples += 1
    budget = None if max_length is None else max_length - n_image_tokens - len(prompt_ids)
    if budget is not None and budget < 1:
        report.dropped += 1
        return None
    if budget is not None and len(target_ids) > budget:
        report.truncated += 1
        report.target_tokens_cut += len(target_ids) - budget
        target_ids = target_ids[:budget]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)
