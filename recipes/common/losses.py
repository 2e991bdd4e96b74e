"""The causal-LM loss at the label positions only. A sample learns only its answer tokens, yet a causal LM
projects every position onto the vocabulary and keeps those float32 logits until the backward pass;
transformers 5 causal LMs take `logits_to_keep` and `shift_labels`, so the LM head runs on the label
positions alone, for the same loss and gradients (tests/test_losses.py)."""

from __future__ import annotations

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from .lengths import IGNORE_INDEX


def label_positions_only(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments that make a causal LM called with the (unshifted) `labels` compute its logits
    ([label positions, vocab], flattened across the batch) and its loss at the label positions only."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = shifted != IGNORE_INDEX
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """A `Trainer.compute_loss_func`: transformers' `ForCausalLMLoss` of full logits ([batch, length, vocab])
    or of logits kept at the label positions ([positions, vocab])."""
    logits = outputs.logits
    if logits.dim() == 2:
        return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch=num_items_in_batch,
                               shift_labels=label_positions_only(labels)["shift_labels"])
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
