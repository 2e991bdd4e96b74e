"""The length budget of `[image tokens] + prompt + target` samples (the target is cut to fit; a sample
whose image tokens and prompt leave no room is dropped; `LengthReport` counts both), and padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
            f"({self.target_tokens_cut} target tokens cut), {self.dropped} dropped (prompt + image tokens "
            "alone over budget)"
        )


def fit_to_budget(
    n_image_tokens: int, prompt_ids: list[int], target_ids: list[int], max_length: int | None,
    report: LengthReport
) -> tuple[list[int], list[int]] | None:
    """`(text_ids, labels)` of the text after the image tokens (labels: the target's only), or None when
    the sample is dropped."""
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


def pad_batch(features: list[dict], pad_token_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and (when the features have them) `labels` (-100 over padding) as
    [batch, longest] tensors, padded on the right (training) or left (generation prompts)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), width), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
    if "labels" in features[0]:
        batch["labels"] = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        batch["input_ids"][i, span] = torch.tensor(f["input_ids"], dtype=torch.long)
        batch["attention_mask"][i, span] = 1
        if "labels" in batch:
            batch["labels"][i, span] = torch.tensor(f["labels"], dtype=torch.long)
    return batch
