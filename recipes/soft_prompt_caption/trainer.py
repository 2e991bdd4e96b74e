"""The soft-prompt Trainer: checkpoints that hold only what trains (soft prompt, projection, LoRA), never the
frozen bases."""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from recipes.common.trainer import RecipeTrainer
from recipes.soft_prompt_caption.modeling import load_trained, save_trained


class SoftPromptTrainer(RecipeTrainer):
    """RecipeTrainer that saves and loads the trained parts alone (run folders and checkpoint-N alike).

    Trainer's own save/load handle full state dicts or peft adapters; here the soft prompt is a bare
    parameter and the bases are large, so `_save`, `_load_from_checkpoint` (resume) and
    `_load_best_model` go through `modeling.save_trained` / `load_trained`. Learning rates: --bridge_lr
    for the soft prompt and projection, --lm_lr for LoRA on the LM.
    """

    def __init__(self, *args, image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_processor = image_processor
        # The Trainer takes every forward argument named *label* for a label, the loss_on_label_positions
        # option too: an eval batch, which never holds that, would then get no loss (no eval_loss).
        if self.args.label_names is None:
            self.label_names = ["labels"]

    def label_position_inputs(self, inputs: dict) -> dict:
        # SoftPromptCaptioner.forward puts the prefix in front of the labels first, then keeps their
        # positions.
        return {**inputs, "loss_on_label_positions": True}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_trained(self.accelerator.unwrap_model(self.model), output_dir, state_dict)
        for processor in (self.processing_class, self.image_processor):
            if processor is not None:
                processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trained(self.accelerator.unwrap_model(model if model is not None else self.model),
                     resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
