"""The QLoRA VQA Trainer: generation-based VQA evaluation, per-module learning rates, and what a 4-bit run saves."""

from __future__ import annotations

import json
import os

from eval.vqa import vqa_accuracy
from recipes.common.generation_eval import GenerationEvalTrainer
from recipes.common.losses import LabelPositionLoss
from recipes.common.peft_setup import PerModuleLearningRates
from recipes.common.quantization import save_quantization_config


class VqaTrainer(LabelPositionLoss, PerModuleLearningRates, GenerationEvalTrainer):
    """GenerationEvalTrainer for short answers on a quantized base.

    - the optimizer gives the vision tower, projector and LM their own learning rates;
    - generation runs under the mixed-precision autocast that training uses: the trainable float32
      projector is fed bf16 vision features, and `generate` bypasses the autocast accelerate puts
      around the wrapped model's forward;
    - every evaluation also writes `predictions/<name>.results.json` in the official VQA results
      format ([{"question_id", "answer"}]) and `<name>.vqa.json` (accuracy overall, per answer type
      and per question type);
    - every save writes the base's quantization config next to the adapter, for merge.py;
    - `loss_on_label_positions`: LLaVA's own loss on the logits of the answer positions only.
    """

    def generate_predictions(self, records) -> dict:
        with self.accelerator.autocast():
            return super().generate_predictions(records)

    def _write_predictions(self, predictions: dict, scores: dict, name: str) -> None:
        super()._write_predictions(predictions, scores, name)
        folder = os.path.join(self.args.output_dir, "predictions")
        with open(os.path.join(folder, f"{name}.results.json"), "w", encoding="utf-8") as f:
            json.dump([{"question_id": key, "answer": text} for key, text in predictions.items()], f, ensure_ascii=False)
        references = {it["key"]: {k: it[k] for k in ("answers", "answer_type", "question_type")}
                      for it in self.generation_dataset if it["key"] in predictions}
        breakdown = vqa_accuracy(predictions, references)
        breakdown.pop("perQuestion")  # one number per question: see the predictions file
        with open(os.path.join(folder, f"{name}.vqa.json"), "w") as f:
            json.dump(breakdown, f, indent=2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_quantization_config(self.model, output_dir or self.args.output_dir)
