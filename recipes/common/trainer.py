"""`RecipeTrainer`: the `transformers.Trainer` subclass every recipe's own Trainer builds on, and the
generation helpers it shares with serving and chat."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PreTrainedModel, Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_pt_utils import LabelSmoother

from data_tools.files import atomic_write_text
from data_tools.jsonl import read_jsonl, write_jsonl

from .args import GenerationEvalArguments, LearningRateArguments
from .lengths import IGNORE_INDEX
from .losses import causal_lm_loss, label_positions_only
from .models import answer_text, full_weight_files, saved_names
from .peft_setup import check_learning_rates, param_groups

logger = logging.getLogger(__name__)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos and the generation_config's (often a chat model's end of turn, e.g. Gemma's)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys([i for i in [tokenizer.eos_token_id, *configured] if i is not None]))


def rank_share(n: int, world_size: int, rank: int) -> tuple[list[int], int]:
    """This rank's contiguous share of `n` items, padded with repeats to the same length on every rank, and
    how many are its own: under FSDP or ZeRO-3 every forward gathers weights, so all ranks run as many."""
    own = np.array_split(np.arange(n), world_size)[rank].tolist()
    return own + [own[-1] if own else 0] * (-(-n // world_size) - len(own)), len(own)


def generate_kwargs(args: GenerationEvalArguments, pad_token_id: int, eos_token_id: int | list[int]) -> dict:
    """`generate()` keyword arguments from the decode options."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                  pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    if args.do_sample:
        kwargs.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p))
                       if v is not None})
    return kwargs


def smoothed_causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None,
                            epsilon: float = 0.0) -> torch.Tensor:
    """A `Trainer.compute_loss_func` for --label_smoothing_factor (`causal_lm_loss`'s cases): the Trainer's
    own smoother shifts the labels only for the classes in its causal-LM table, which holds no VLM."""
    logits = outputs.logits
    if logits.dim() == 2:
        targets = label_positions_only(labels)["shift_labels"]
    else:
        # a prefix the model puts before the labelled text (a soft prompt) has no labels
        labels = torch.nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
        logits, targets = logits[:, :-1], labels[:, 1:]
    smoother = LabelSmoother(epsilon, IGNORE_INDEX)
    return smoother((logits.float(),), targets, num_items_in_batch=num_items_in_batch)


def workers_ignore_sigterm(worker_id: int, init: Callable | None = None) -> None:
    """A DataLoader `worker_init_fn`: a scheduler's SIGTERM reaches every process, and a worker killed by it
    would end the run before the main process saves its checkpoint (--enable_jit_checkpoint)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def _quiet_workers(loader):
    base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper reads the DataLoader it holds
    if getattr(base.worker_init_fn, "func", None) is not workers_ignore_sigterm:  # not a cached loader
        base.worker_init_fn = functools.partial(workers_ignore_sigterm, init=base.worker_init_fn)
    return loader


@dataclass
class GenerationEval:
    """Generation-based evaluation: the eval `records` (each with a "key"), a `collator` of records ->
    `generate` inputs (left-padded) and their "keys", `score(predictions {key: text}, records)` -> metrics."""

    records: object
    collator: Callable
    score: Callable
    args: GenerationEvalArguments
    tokenizer: object
    special_text: tuple[str, ...] = ()  # --special_text: kept in the answers (answer_text)


def load_full_weights(model, folder: str | Path) -> bool:
    """Load the full weights `save_pretrained` wrote in `folder` into `model`; False where there are none (an
    adapter). They are saved under the architecture's original names (`saved_names`), which the Trainer's
    own reload looks up by the current ones: it would load nothing, with a warning."""
    files = full_weight_files(folder)
    if not isinstance(model, PreTrainedModel) or not files:
        return False
    saved_as, state = saved_names(model), {}
    for file in files:
        for key, tensor in safetensors.torch.load_file(file).items():
            if saved_as.get(key) is None:  # unknown, or saved converted (split, merged), not renamed
                raise ValueError(f"{file}: {key} is not a weight of {type(model).__name__} as it saves them, "
                                 "under its own name: it cannot be loaded back into the model in training.")
            state[saved_as[key]] = tensor
    # every tensor of the model, one name each (tied weights: the name saved_names gives them)
    tensors = {(t.data_ptr(), t.shape): k for k, t in reversed(model.state_dict().items())}
    missing = set(tensors.values()) - set(state)
    if missing:
        raise ValueError(f"{folder}: no weights for {', '.join(sorted(missing)[:3])} ({len(missing)} in all)")
    model.load_state_dict(state, strict=False)
    return True


class RecipeTrainer(Trainer):
    """A Trainer with, each off unless given: generation-based evaluation (`generation`, logged as
    `eval_<metric>` for metric_for_best_model), per-module learning rates (--vision_lr / --bridge_lr /
    --lm_lr) and the loss on label positions only (recipes/common/losses.py)."""

    def __init__(self, *args, generation: GenerationEval | None = None,
                 learning_rates: LearningRateArguments | None = None, loss_on_label_positions: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = generation
        self.learning_rates = learning_rates
        if learning_rates is not None:
            check_learning_rates(self.model, learning_rates)
        self.loss_on_label_positions = loss_on_label_positions
        # A generative model that does not take the Trainer's token count (Qwen-VL) returns each micro-batch's
        # mean loss, which accumulation and processes then average: the Trainer computes the loss instead.
        generative = getattr(self.model, "get_output_embeddings", lambda: None)() is not None
        if not self.model_accepts_loss_kwargs and self.compute_loss_func is None and generative:
            self.compute_loss_func = causal_lm_loss
        # --label_smoothing_factor: the Trainer's smoother would score each position's own token, not the next
        smoothed = self.label_smoother is not None and generative
        if smoothed and self.compute_loss_func in (None, causal_lm_loss):
            self.compute_loss_func = functools.partial(smoothed_causal_lm_loss,
                                                       epsilon=self.args.label_smoothing_factor)

    # Full weights (no adapter) reload under the names the model saved them with: see load_full_weights.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if sharded or not load_full_weights(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not load_full_weights(self.model, best):
            super()._load_best_model()
        else:
            logger.info("loaded the best model, %s (%s %s)", best, self.args.metric_for_best_model,
                        self.state.best_metric)

    def get_train_dataloader(self):
        return _quiet_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return _quiet_workers(super().get_eval_dataloader(eval_dataset))

    def label_position_inputs(self, inputs: dict) -> dict:
        """Inputs for a loss on the label positions' logits alone; where the Trainer computes the loss
        (`compute_loss_func`), the model only keeps those logits."""
        kept = label_positions_only(inputs["labels"])
        if self.compute_loss_func is not None:
            return {**inputs, "logits_to_keep": kept["logits_to_keep"]}
        return {**inputs, **kept}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_on_label_positions and inputs.get("labels") is not None:
            inputs = self.label_position_inputs(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        # With --vision_lr / --bridge_lr / --lm_lr, a parameter group per component; the rest is --optim's.
        rates = self.learning_rates
        if self.optimizer is None and rates is not None and any(
                lr is not None for lr in (rates.vision_lr, rates.bridge_lr, rates.lm_lr)):
            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = (self.optimizer_cls_and_kwargs
                                     or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ValueError(f"--optim {self.args.optim} makes its own parameter groups, so it cannot "
                                 "take --vision_lr / --bridge_lr / --lm_lr: leave those out, or use another "
                                 "--optim.")
            groups = param_groups(opt_model, rates, self.args.learning_rate, self.args.weight_decay,
                                  set(self.get_decay_parameter_names(opt_model)))
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"}  # each group has its own
            self.optimizer = optimizer_cls([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                           **kwargs)
        return super().create_optimizer(model)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # Hooked here, not in evaluate(): Trainer logs these metrics, passes them to callbacks (early
        # stopping) and picks the best checkpoint from them, all after this returns.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if metric_key_prefix == "eval" and self.evaluates_heldout():
            output.metrics.update(self.heldout_metrics(metric_key_prefix))
        return output

    def evaluates_heldout(self) -> bool:
        """Whether `heldout_metrics` has anything to score."""
        return self.generation is not None

    def scored_on(self, predictions: Path, data=None) -> bool:
        """Whether the predictions saved in `predictions` are of `data` (default: the eval records): a run
        resumed with another --eval_max_samples or --max_eval_samples scores "before" again."""
        if not predictions.is_file():
            return True
        records = data if data is not None else self.generation.records
        return {str(r["key"]) for r in read_jsonl(predictions)} == {str(k) for k in records["key"]}

    def heldout_metrics(self, metric_key_prefix: str = "eval", name: str | None = None,
                        data=None) -> dict[str, float]:
        """The task metrics on `data` (default: the eval records): generate, score on rank 0, write
        `predictions/<name>.*` (default `step-<N>`); the same dict on every rank."""
        records = data if data is not None else self.generation.records
        predictions = self.generate_predictions(records)
        scores = {}
        if self.is_world_process_zero():
            scores = {f"{metric_key_prefix}_{k}": float(v)
                      for k, v in self.generation.score(predictions, records).items()}
            self.write_predictions(predictions, scores, name or f"step-{self.state.global_step}", records)
        if self.args.world_size > 1:
            scores = gather_object([scores])[0]  # rank 0's, so that every rank decides the same
        return scores

    @torch.no_grad()
    def generate_predictions(self, records) -> dict:
        """{key: generated text} of every record, each process generating its share."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        indices, own = rank_share(len(records), self.args.world_size, self.args.process_index)
        loader = DataLoader(records.select(indices), batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.generation.collator, num_workers=self.args.dataloader_num_workers,
                            worker_init_fn=workers_ignore_sigterm)
        tok = self.generation.tokenizer
        kwargs = generate_kwargs(self.generation.args, tok.pad_token_id, stop_token_ids(model, tok))
        out = []
        # Under the autocast training uses (none without --bf16/--fp16), where the trained float32 parts meet
        # the frozen half-precision ones: `generate` goes around the one accelerate puts on forward.
        with self.accelerator.autocast():
            for batch in tqdm(loader, desc="generating", disable=not self.is_local_process_zero()):
                keys = batch.pop("keys")
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
                generated = model.generate(**batch, **kwargs)
                new_tokens = generated[:, batch["input_ids"].shape[1]:]  # generate: prompt + continuation
                out += [(key, answer_text(tok, ids, self.generation.special_text))
                        for key, ids in zip(keys, new_tokens)]
        model.train(was_training)
        out = out[:own]
        if self.args.world_size > 1:
            out = gather_object(out)
        return {k: text.strip() for k, text in out}

    def write_predictions(self, predictions: dict, scores: dict, name: str, records=None) -> None:
        """`predictions/<name>.jsonl` and `<name>.metrics.json` (`records`: for a subclass's own)."""
        folder = os.path.join(self.args.output_dir, "predictions")
        os.makedirs(folder, exist_ok=True)
        write_jsonl(os.path.join(folder, f"{name}.jsonl"),
                    ({"key": key, "prediction": text} for key, text in predictions.items()))
        atomic_write_text(os.path.join(folder, f"{name}.metrics.json"), json.dumps(scores, indent=2))
