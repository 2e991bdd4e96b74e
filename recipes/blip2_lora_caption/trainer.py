"""The captioning Trainer: generation-based evaluation (CIDEr, BLEU, ROUGE-L) and per-module learning rates."""

from __future__ import annotations

from recipes.common.generation_eval import GenerationEvalTrainer
from recipes.common.losses import LabelPositionLoss
from recipes.common.peft_setup import PerModuleLearningRates


class CaptionTrainer(LabelPositionLoss, PerModuleLearningRates, GenerationEvalTrainer):
    """GenerationEvalTrainer whose optimizer gives the vision tower, Q-Former and LM their own learning rates.
    `loss_on_label_positions`: BLIP-2 slices full-length logits for its own loss, so the loss from the kept
    logits is computed by the Trainer (recipes/common/losses.py)."""

    loss_in_model = False
