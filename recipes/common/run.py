"""The run loop every train.py shares: set-up, data files, then before -> train -> after -> metrics.json.

    setup_run(training_args, model_args)                 # logging, seed, dtype vs mixed-precision check
    train_records, eval_records = load_data(data_args, "caption", embedded=...)
    ...                                                   # the recipe's own: model, samples, Trainer
    results = train_and_evaluate(trainer, {"recipe": ..., "task": "caption", ...})
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import datasets
import transformers
from transformers import set_seed

from data_tools.files import atomic_write_text

from .args import resume_checkpoint
from .data import load_records
from .models import check_mixed_precision

logger = logging.getLogger(__name__)


def setup_run(training_args, model_args=None) -> None:
    """Logging, the seed, and (given `model_args`) the check that the load dtype has its autocast."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    if model_args is not None:
        check_mixed_precision(model_args, training_args)


def load_data(data_args, task: str,
              embedded: Callable[[], dict]) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train records, eval records or None) from --train_file / --eval_file.

    Without --train_file the embedded default is made (`embedded()` -> {"train": path, "val": path, ...})
    and its files are put into `data_args`, so that metrics.json names them. Rows hold image paths, not
    pixels.
    """
    if data_args.train_file is None:
        splits = embedded()
        data_args.train_file, data_args.eval_file = (str(splits["train"]),
                                                     data_args.eval_file or str(splits["val"]))
    train = load_records(data_args.train_file, task, skip_bad_rows=data_args.skip_bad_rows,
                         max_rows=data_args.max_train_samples)
    evaluation = None
    if data_args.eval_file:
        evaluation = load_records(data_args.eval_file, task, skip_bad_rows=data_args.skip_bad_rows,
                                  max_rows=data_args.max_eval_samples)
    return train, evaluation


def shuffled_images(records: datasets.Dataset) -> datasets.Dataset:
    """The records with every image replaced by another eval image (the distinct images rotated by one),
    text-only records unchanged: the "does it look at the image?" check. Keys and references stay."""
    images = sorted({im for im in records["image"] if im is not None})
    if len(images) < 2:
        return records
    other = dict(zip(images, images[1:] + images[:1]))
    return records.map(lambda r: {"image": other.get(r["image"])})


def train_and_evaluate(trainer, metadata: dict, *, results: dict | None = None,
                       shuffled_image_check: bool = False,
                       after_training: Callable[[dict], None] | None = None) -> dict:
    """Score the eval set, train (resuming per --resume_from_checkpoint), save, score again; write
    metrics.json.

    `results` may hold figures the recipe computed before (a baseline). With `shuffled_image_check`, the
    final model is scored again on the eval records with their images swapped ("after_shuffled_images").
    `after_training(results)` adds the recipe's own post-training figures. `metadata` (recipe, task,
    model, files, ...) goes into metrics.json, which `python -m eval report` (make eval) reads.
    """
    args = trainer.args
    results = dict(results or {})
    # 'last': the newest complete one
    resume = resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    evaluates = trainer.evaluates_heldout()
    before_file = Path(args.output_dir) / "predictions" / "before.metrics.json"
    if evaluates and resume and before_file.exists():
        results["before"] = json.loads(before_file.read_text())  # scored when the run first started
    elif evaluates:
        results["before"] = trainer.heldout_metrics("eval", name="before")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # what trained (adapter, trained modules, or the model) and the processor
    if evaluates:
        results["after"] = trainer.heldout_metrics("eval", name="final")
        if shuffled_image_check and trainer.generation is not None:
            records = trainer.generation.records
            trainer.generation.records = shuffled_images(records)
            results["after_shuffled_images"] = trainer.heldout_metrics("eval", name="final-shuffled-images")
            trainer.generation.records = records
    if after_training is not None:
        after_training(results)
    if trainer.is_world_process_zero():
        results.update(metadata, global_step=trainer.state.global_step, world_size=args.world_size)
        atomic_write_text(Path(args.output_dir) / "metrics.json", json.dumps(results, indent=2))
        for when, metrics in results.items():
            if isinstance(metrics, dict) and when != "length_budget":
                logger.info("held-out %s: %s", when, json.dumps(metrics))
        logger.info("outputs in %s", args.output_dir)
    return results
