"""The instruction-tuning Trainer: generation-based evaluation, per-module learning rates, modality-grouped batches."""

from __future__ import annotations

from recipes.common.generation_eval import GenerationEvalTrainer
from recipes.common.losses import LabelPositionLoss
from recipes.common.peft_setup import PerModuleLearningRates
from recipes.common.sampling import ModalityLengthGroupedSampler


class InstructTrainer(LabelPositionLoss, PerModuleLearningRates, GenerationEvalTrainer):
    """GenerationEvalTrainer whose optimizer gives the vision tower, projector and LM their own learning rates,
    and whose `train_sampling_strategy: group_by_length` keeps image and text-only samples in separate batches.
    `loss_on_label_positions`: LLaVA's own loss on the logits of the answer positions only (recipes/common/losses.py)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and "has_image" in dataset.column_names:
            # Per-device batch size: accelerate hands each process whole batches of the sampler's order in turn.
            return ModalityLengthGroupedSampler(dataset[self.args.length_column_name], dataset["has_image"],
                                                self._train_batch_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)
