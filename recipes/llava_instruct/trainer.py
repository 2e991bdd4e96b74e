"""The instruction-tuning Trainer: the common RecipeTrainer with modality-grouped batches."""

from __future__ import annotations

from recipes.common.sampling import ModalityLengthGroupedSampler
from recipes.common.trainer import RecipeTrainer


class InstructTrainer(RecipeTrainer):
    """RecipeTrainer whose `train_sampling_strategy: group_by_length` keeps image and text-only samples in
    separate batches (LLaVA-1.5's modality-grouped sampler)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modality_sampler = None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and "has_image" in dataset.column_names:
            # Per-device batch size: accelerate hands each process whole batches of the sampler's order in
            # turn.
            self.modality_sampler = ModalityLengthGroupedSampler(
                dataset[self.args.length_column_name], dataset["has_image"], self._train_batch_size,
                seed=self.args.seed if self.args.data_seed is None else self.args.data_seed)
            return self.modality_sampler
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # A run resumed mid-epoch on several processes holds the sampler one wrapper deeper (accelerate's
        # skip_first_batches) than the Trainer's set_epoch reaches: without this it would replay epoch 0.
        if self.modality_sampler is not None:
            self.modality_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)
