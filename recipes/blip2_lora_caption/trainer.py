"""The captioning Trainer: the common RecipeTrainer, with BLIP-2's own way to the label-position loss."""

from __future__ import annotations

from recipes.common.losses import causal_lm_loss
from recipes.common.trainer import RecipeTrainer


class CaptionTrainer(RecipeTrainer):
    """BLIP-2 slices full-length logits by the labels' length for its own loss: with
    `loss_on_label_positions`, the loss of the kept logits is the Trainer's `compute_loss_func`."""

    def __init__(self, *args, loss_on_label_positions: bool = False, **kwargs):
        if loss_on_label_positions:
            if kwargs.get("compute_loss_func") is not None:
                raise ValueError("loss_on_label_positions sets compute_loss_func; pass one or the other.")
            kwargs["compute_loss_func"] = causal_lm_loss
        super().__init__(*args, loss_on_label_positions=loss_on_label_positions, **kwargs)
