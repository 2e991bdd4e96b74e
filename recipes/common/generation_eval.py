"""Generation-based evaluation inside training: generate on the eval set, score with `eval`, log, save.

`GenerationEvalTrainer` runs the usual loss evaluation, then generates on its
`generation_dataset` (split across processes), scores the texts with the recipe's `score_fn`, logs
the metrics as `eval_<name>` (so `metric_for_best_model: CIDEr` works), and writes
`predictions/step-<N>.jsonl` in the run folder at every evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import Trainer

from .args import GenerationEvalArguments


def generate_kwargs(args: GenerationEvalArguments, pad_token_id: int, eos_token_id: int) -> dict:
    """`generate()` keyword arguments from the decode options."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                  pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    if args.do_sample:
        kwargs.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
    return kwargs


class GenerationEvalTrainer(Trainer):
    """A Trainer whose `evaluate` also generates and scores text.

    generation_dataset: the eval records (one per image or question), each with a "key".
    generation_collator: records -> model inputs for `generate` (left-padded prompts) plus "keys".
    score_fn: (predictions {key: text}, records) -> {metric: value}.
    """

    def __init__(self, *args, generation_dataset=None, generation_collator=None, score_fn: Callable | None = None,
                 generation_args: GenerationEvalArguments | None = None, decode_tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_dataset = generation_dataset
        self.generation_collator = generation_collator
        self.score_fn = score_fn
        self.generation_args = generation_args or GenerationEvalArguments()
        self.decode_tokenizer = decode_tokenizer

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        # Hooked here, not in evaluate(): Trainer logs these metrics, passes them to callbacks (early
        # stopping) and picks the best checkpoint from them, all after this returns.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_dataset is not None and metric_key_prefix == "eval":
            output.metrics.update(self.generation_metrics(metric_key_prefix))
        return output

    def generation_metrics(self, metric_key_prefix: str = "eval", name: str | None = None) -> dict[str, float]:
        """Generate on the generation dataset, score it on rank 0, write predictions; the same dict on every rank.

        The predictions go to `predictions/<name>.jsonl` (default `step-<global step>`); the recipes
        name the ones before and after fine-tuning "before" and "final", which `python -m eval report` reads.
        """
        predictions = self.generate_predictions(self.generation_dataset)
        scores = {}
        if self.is_world_process_zero():
            scores = {f"{metric_key_prefix}_{k}": float(v) for k, v in self.score_fn(predictions, self.generation_dataset).items()}
            self._write_predictions(predictions, scores, name or f"step-{self.state.global_step}")
        if self.args.world_size > 1:
            scores = gather_object([scores])[0]  # rank 0's, so that every rank decides the same
        return scores

    @torch.no_grad()
    def generate_predictions(self, records) -> dict:
        """Generate one text per record on every process's share; return {key: text} gathered on all ranks."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        shard = records.shard(num_shards=self.args.world_size, index=self.args.process_index, contiguous=True)
        loader = DataLoader(shard, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.generation_collator)
        tok = self.decode_tokenizer
        kwargs = generate_kwargs(self.generation_args, tok.pad_token_id, tok.eos_token_id)
        out = []
        for batch in tqdm(loader, desc="generating", disable=not self.is_local_process_zero()):
            keys = batch.pop("keys")
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            generated = model.generate(**batch, **kwargs)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]  # generate returns prompt + continuation
            out += list(zip(keys, tok.batch_decode(new_tokens, skip_special_tokens=True)))
        model.train(was_training)
        if self.args.world_size > 1:
            out = gather_object(out)
        return {k: text.strip() for k, text in out}

    def _write_predictions(self, predictions: dict, scores: dict, name: str) -> None:
        folder = os.path.join(self.args.output_dir, "predictions")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for key, text in predictions.items():
                f.write(json.dumps({"key": key, "prediction": text}, ensure_ascii=False) + "\n")
        with open(os.path.join(folder, f"{name}.metrics.json"), "w") as f:
            json.dump(scores, f, indent=2)
