"""Logits and the causal-LM loss at the label positions only: the same loss, a fraction of the LM head's work.

A captioning or instruction sample learns only its answer tokens, yet a causal LM projects every position
onto the vocabulary (GPT-2: 768 x 50,257, a third of the model's matmul weights) and keeps those logits,
in float32 for the loss, until the backward pass. transformers 5 causal LMs take `logits_to_keep` (which
positions reach the LM head; a boolean [batch, length] mask keeps each row's own) and pass `shift_labels`
to their loss function (`ForCausalLMLoss`), so the model's own loss runs on exactly the rows that
contribute to it: positions whose next token is a label. Every other row has target -100 and adds nothing
to the sum or to the count, so the loss, and its gradients, are those of the full logits
(tests/test_losses.py).

The generative recipes' `--loss_on_label_positions` is an option of `RecipeTrainer`
(recipes/common/trainer.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def label_positions_only(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Keyword arguments for a transformers causal LM called with `labels`: logits at label positions only.

        outputs = language_model(inputs_embeds=..., labels=labels, **label_positions_only(labels))

    `outputs.logits` is then [number of label positions, vocab] (flattened across the batch), `outputs.loss`
    the same loss as without these arguments. `labels` are unshifted, as the model takes them.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    keep = shifted != ignore_index
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}


def loss_at_label_positions(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The causal-LM loss from logits a model computed with
    `logits_to_keep=label_positions_only(labels)[...]`.

    For models that take `logits_to_keep` but compute their loss from full-length logits themselves (BLIP-2
    slices them by the labels' length): call the model without labels, then this. It is transformers'
    `ForCausalLMLoss` on the kept rows: the mean over labels, or the sum / `num_items_in_batch` as the Trainer
    asks.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    shift_labels = label_positions_only(labels, ignore_index)["shift_labels"]
    return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index, shift_labels=shift_labels)


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """A `Trainer.compute_loss_func` for causal LMs: transformers' `ForCausalLMLoss` of the model's logits,
    full ([batch, length, vocab]) or kept at the label positions ([positions, vocab], `label_positions_only`):
    the mean over labels, or the sum / `num_items_in_batch` as the Trainer asks."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.logits
    if logits.dim() == 2:
        return loss_at_label_positions(logits, labels, num_items_in_batch)
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
