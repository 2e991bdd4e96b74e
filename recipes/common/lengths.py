"""The length budget of `[image tokens] + prompt + target` samples, and padding. The target is cut to fit; a
sample whose image tokens and prompt leave no room is dropped; `LengthReport` counts both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100


@dataclass
class LengthReport:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    target_tokens_cut: int = 0

    def __str__(self) -> str:
        return (f"length budget: {self.samples} samples, {self.truncated} truncated on the text side "
                f"({self.target_tokens_cut} target tokens cut), {self.dropped} dropped "
                "(prompt + image tokens alone over budget)")


def fit_to_budget(n_image_tokens: int, prompt_ids: list[int], target_ids: list[int], max_length: int | None,
                  report: LengthReport) -> tuple[list[int], list[int]] | None:
    """`(text_ids, labels)` of the text after the image tokens (labels: the target's only), or None when
    the sample is dropped."""
    report.samples += 1
    if max_length is not None:
        budget = max_length - n_image_tokens - len(prompt_ids)
        if budget < 1:
            report.dropped += 1
            return None
        if len(target_ids) > budget:
            report.truncated += 1
            report.target_tokens_cut += len(target_ids) - budget
            target_ids = target_ids[:budget]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)


def pad_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` (-100 over padding), right-padded to the longest."""
    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                            padding_value=value)

    ids = [f["input_ids"] for f in features]
    return {"input_ids": pad(ids, pad_token_id), "attention_mask": pad([[1] * len(r) for r in ids], 0),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX)}
