"""Logits and the causal-LM loss at the label positions only: the same loss, a fraction of the LM head's work.

A captioning or instruction sample learns only its answer tokens, yet a causal LM projects every position
onto the vocabulary (GPT-2: 768 x 50,257, a third of the model's matmul weights) and keeps those logits,
in float32 for the loss, until the backward pass. transformers 5 causal LMs take `logits_to_keep` (which
positions reach the LM head; a boolean [batch, length] mask keeps each row's own) and pass `shift_labels`
to their loss function (`ForCausalLMLoss`), so the model's own loss runs on exactly the rows that
contribute to it: positions whose next token is a label. Every other row has target -100 and adds nothing
to the sum or to the count, so the loss, and its gradients, are those of the full logits (tests/test_losses.py).

The generative recipes' `--loss_on_label_positions` is `LabelPositionLoss`, a Trainer mixin.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def label_positions_only(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Keyword arguments for a transformers causal LM called with `labels`: logits at label positions only.

        outputs = language_model(inputs_embeds=..., labels=labels, **label_positions_only(labels))

    `outputs.logits` is then [number of label positions, vocab] (flattened across the batch), `outputs.loss` the
    same loss as without these arguments. `labels` are unshifted, as the model takes them.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    keep = shifted != ignore_index
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}


def loss_at_label_positions(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The causal-LM loss from logits a model computed with `logits_to_keep=label_positions_only(labels)[...]`.

    For models that take `logits_to_keep` but compute their loss from full-length logits themselves (BLIP-2
    slices them by the labels' length): call the model without labels, then this. It is transformers'
    `ForCausalLMLoss` on the kept rows: the mean over labels, or the sum / `num_items_in_batch` as the Trainer asks.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    shift_labels = label_positions_only(labels, ignore_index)["shift_labels"]
    return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index, shift_labels=shift_labels)


def _loss_from_kept_logits(outputs, labels, num_items_in_batch=None):
    return loss_at_label_positions(outputs.logits, labels, num_items_in_batch=num_items_in_batch)


class LabelPositionLoss:
    """Trainer mixin (list it before the Trainer class): `loss_on_label_positions=True` in the constructor makes
    every loss (training and eval) come from logits at the label positions only; off, the Trainer is unchanged.

    `loss_in_model = True` (transformers causal LMs, LLaVA): the model gets `labels` and `label_positions_only`'s
    `logits_to_keep` and `shift_labels`, and its own loss runs on the kept rows. `False` (BLIP-2, which slices
    full-length logits for its loss): the model gets `logits_to_keep` without labels, and the loss is computed
    here, through the Trainer's `compute_loss_func` (so its gradient-accumulation and multi-device scaling hold).
    A model that needs its own flag instead overrides `label_position_inputs`.
    """

    loss_in_model = True

    def __init__(self, *args, loss_on_label_positions: bool = False, **kwargs):
        if loss_on_label_positions and not self.loss_in_model:
            kwargs["compute_loss_func"] = _loss_from_kept_logits
        super().__init__(*args, **kwargs)
        self.loss_on_label_positions = loss_on_label_positions

    def label_position_inputs(self, inputs: dict) -> dict:
        kept = label_positions_only(inputs["labels"])
        if self.loss_in_model:
            return {**inputs, **kept}
        return {**inputs, "logits_to_keep": kept["logits_to_keep"]}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_on_label_positions and inputs.get("labels") is not None:
            inputs = self.label_position_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
