"""The QLoRA VQA Trainer: VQA outputs at every evaluation, and what a 4-bit run saves."""

from __future__ import annotations

import json
import os

from data_tools.files import atomic_write_text
from eval.vqa import vqa_accuracy
from recipes.common.quantization import save_quantization_config
from recipes.common.trainer import RecipeTrainer


class VqaTrainer(RecipeTrainer):
    """RecipeTrainer for short answers on a quantized base.

    - every evaluation also writes `predictions/<name>.results.json` in the official VQA results
      format ([{"question_id", "answer"}]) and `<name>.vqa.json` (accuracy overall, per answer type
      and per question type);
    - every save writes the base's quantization config next to the adapter, for merge.py.
    """

    def write_predictions(self, predictions: dict, scores: dict, name: str, records=None) -> None:
        super().write_predictions(predictions, scores, name, records)
        folder = os.path.join(self.args.output_dir, "predictions")
        results = [{"question_id": key, "answer": text} for key, text in predictions.items()]
        atomic_write_text(os.path.join(folder, f"{name}.results.json"),
                          json.dumps(results, ensure_ascii=False))
        records = records if records is not None else self.generation.records
        references = {it["key"]: {k: it[k] for k in ("answers", "answer_type", "question_type")}
                      for it in records if it["key"] in predictions}
        breakdown = vqa_accuracy(predictions, references)
        breakdown.pop("perQuestion")  # one number per question: see the predictions file
        atomic_write_text(os.path.join(folder, f"{name}.vqa.json"), json.dumps(breakdown, indent=2))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_quantization_config(self.model, output_dir or self.args.output_dir)
