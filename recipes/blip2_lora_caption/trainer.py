"""The captioning Trainer: generation-based evaluation (CIDEr, BLEU, ROUGE-L) and per-module learning rates."""

from __future__ import annotations

from recipes.common.generation_eval import GenerationEvalTrainer
from recipes.common.peft_setup import PerModuleLearningRates


class CaptionTrainer(PerModuleLearningRates, GenerationEvalTrainer):
    """GenerationEvalTrainer whose optimizer gives the vision tower, Q-Former and LM their own learning rates."""
