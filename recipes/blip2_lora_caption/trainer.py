"""The captioning Trainer: generation-based evaluation (CIDEr, BLEU, ROUGE-L) and per-module learning rates."""

from __future__ import annotations

import torch

from recipes.common.generation_eval import GenerationEvalTrainer
from recipes.common.peft_setup import param_groups


class CaptionTrainer(GenerationEvalTrainer):
    """GenerationEvalTrainer whose optimizer gives the vision tower, Q-Former and LM their own learning rates."""

    def __init__(self, *args, freeze_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.freeze_args = freeze_args

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.freeze_args is not None:
            groups = param_groups(self.model, self.freeze_args, self.args.learning_rate, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)  # each group carries its own
            self.optimizer = optimizer_cls([{k: v for k, v in g.items() if k != "name"} for g in groups], **optimizer_kwargs)
        return super().create_optimizer()
