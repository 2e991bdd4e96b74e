"""The run loop every train.py shares: set-up, data files, then before -> train -> after -> metrics.json.

    setup_run(training_args, model_args)
    train_records, eval_records, test_records = load_data(data_args, "caption", embedded, output_dir)
    ...                                                   # the recipe's own: model, samples, Trainer
    results = train_and_evaluate(trainer, {"recipe": ..., "task": "caption", ...})
    # and run_main(main) as the script's entry point: a bad input ends the run with its message
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

import datasets
import torch
import transformers
from peft import PeftType
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState, set_seed
from transformers.trainer_jit_checkpoint import JITCheckpointCallback
from transformers.training_args import trainer_log_levels

from data_tools.errors import DataError
from data_tools.files import atomic_write_text

from .data import load_records
from .models import check_mixed_precision

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
NO_RESUME = (None, False, "", "false", "False")  # --resume_from_checkpoint values that start afresh
ADAPTER_SETTINGS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                    "use_dora", "use_rslora", "bias", "layers_to_transform", "rank_pattern", "alpha_pattern",
                    "trainable_token_indices")
DECODING = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p")  # recorded in run.json


def setup_run(training_args, model_args=None) -> None:
    """Logging, the seed, and the checks that can fail before anything loads."""
    # Info from one process per node, as the Trainer logs; the others at --log_level_replica (warning).
    replica = trainer_log_levels[training_args.log_level_replica]
    level = logging.INFO if training_args.should_log else replica if replica >= 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity_warning()
    if not training_args.should_log:  # a bar per process of what each does alike (a `map`) says nothing more
        datasets.disable_progress_bars()
    set_seed(training_args.seed)
    check_recipe_code()
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns true: the Trainer would drop the columns the recipe's "
                         "collator reads (image paths, keys); leave it false.")
    check_output_dir(training_args.output_dir, training_args.resume_from_checkpoint)
    # A missing logger package: the Trainer would raise a RuntimeError only once built, after the model loads.
    from transformers.integrations import integration_utils

    for name in training_args.report_to or []:
        available = getattr(integration_utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ImportError(f"--report_to {name}: its package is not installed; pip install {name}, or "
                              "pass --report_to none.")
    if model_args is not None:
        check_mixed_precision(model_args, training_args)


def check_recipe_code() -> None:
    """A recipe folder copied by hand (cp -r) still imports the original's modules (`recipes.<original>.*`):
    edits to the copy's own would change nothing."""
    script = Path(getattr(sys.modules["__main__"], "__file__", None) or ".").resolve()
    if script.name != "train.py":
        return
    mine = script.parent.name
    others = sorted({n.split(".")[1] for n in sys.modules if n.startswith("recipes.")} - {"common", mine})
    if others:
        fix = (f"Rename recipes.{others[0]} to recipes.{mine} in its .py files, or copy it"
               if script.parent.parent.name == "recipes" else "Copy it into the project's recipes/ folder")
        raise ValueError(f"{script} imports the modules of recipes/{others[0]}, not its own: a recipe folder "
                         f"copied by hand still runs the original's code. {fix} with "
                         f"`make new-recipe FROM={others[0]} NAME=...`, which renames its imports.")
    installed = Path(sys.modules["recipes"].__file__).parent.resolve()
    if installed != script.parent.parent:
        logger.warning("%s runs the recipes package of %s, another copy of the project (the installed one): "
                       "`pip install -e .` in this one, or set PYTHONPATH to it", script, installed.parent)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders in `output_dir`, oldest first."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: str | Path) -> int:
    """N of a checkpoint-N folder."""
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1))


def saved_step(checkpoint: str | Path) -> int:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)


def check_output_dir(output_dir: str | Path, resume) -> None:
    """A fresh run refuses a folder holding an earlier run's checkpoint-N folders: its own would mix with
    them, and `--resume_from_checkpoint last` would later pick theirs."""
    if resume in NO_RESUME and (old := checkpoints(output_dir)):
        raise FileExistsError(f"--output_dir {output_dir} holds an earlier run ({old[-1].name}, "
                              f"{len(old)} checkpoint(s)): pass --resume_from_checkpoint last to continue "
                              "it, or give another --output_dir (or delete that folder) to start afresh.")


def check_same_run(output_dir: str | Path, resume: str | None, metadata: dict, write: bool = True) -> bool:
    """`<output_dir>/run.json` holds what a run started with; a resumed run must have the same, else its
    checkpoint and saved "before" scores belong to another experiment. Returns whether run.json recorded
    every setting (an earlier version's may lack some: the run goes on and scores "before" again)."""
    path = Path(output_dir) / "run.json"
    metadata = json.loads(json.dumps(metadata))  # as it reads back (tuples are lists)
    recorded = True
    if resume is not None and path.is_file():
        started = json.loads(path.read_text())
        recorded = all(k in started for k in metadata)
        changed = [c for k, v in metadata.items() if k in started for c in _changes(k, started[k], v)]
        if changed:
            raise ValueError(f"--resume_from_checkpoint: {output_dir} was started with other settings ("
                             f"{'; '.join(changed)}). Resume with the same ones, or give another "
                             "--output_dir.")
    if write:
        atomic_write_text(path, json.dumps(metadata, indent=2))
    return recorded


def _changes(name: str, old, new) -> list[str]:
    """What differs between two settings, by their innermost names (`adapter.default.r 16 -> 8`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(old.keys() | new.keys())
                for change in _changes(f"{name}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [f"{name} {old!r} -> {new!r}"]


def adapter_settings(model) -> dict | None:
    """The settings of `model`'s peft adapters that shape or place their weights: run.json records them, so
    that a resume with others is refused rather than failing (or loading) partway."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    plain = {set: sorted, PeftType: lambda v: v.value}
    return {name: {k: plain.get(type(v), lambda x: x)(v) for k in ADAPTER_SETTINGS
                   if (v := getattr(config, k, None)) is not None} for name, config in configs.items()}


def load_data(data_args, task: str, embedded: Callable[[], dict], output_dir: str | Path,
              task_flags: dict[str, str] | None = None, reserved: tuple[str, ...] = ()):
    """(train, validation or None, test or None) records of the data files, or of the embedded default
    (`embedded()` -> {"train", "val", "test": path}, then set in `data_args`). Rows skipped with
    --skip_bad_rows go to `<output_dir>/rejects/`, not into the user's data folder."""
    if data_args.train_file is None and (data_args.eval_file or data_args.test_file):
        raise ValueError("--eval_file / --test_file without --train_file: give the training file too "
                         "(without any of the three the recipe runs on its embedded synthetic data set).")
    if data_args.test_file and not data_args.eval_file:
        raise ValueError("--test_file needs an --eval_file as well: the validation file picks the checkpoint "
                         "and is what evaluations during training score; the test file is scored before and "
                         "after only.")
    if data_args.train_file is None:
        splits = embedded()
        data_args.train_file, data_args.eval_file, data_args.test_file = (
            str(splits[name]) for name in ("train", "val", "test"))

    def load(path, split, max_rows=None):
        if not path:
            return None
        rejects = Path(output_dir) / "rejects" / f"{split}.rejects.jsonl"
        # Held-out images are decoded, not only their headers read: scoring opens each, and one that does not
        # decode would stop the run there, whatever --skip_bad_rows says. They are few next to training's.
        check = data_args.check_images if split == "train" or data_args.check_images == "none" else "decode"
        return load_records(path, task, image_root=data_args.image_root, check_images=check,
                            skip_bad_rows=data_args.skip_bad_rows, rejects_path=rejects, max_rows=max_rows,
                            task_flags=task_flags, reserved=reserved)

    return (load(data_args.train_file, "train", data_args.max_train_samples),
            first_records(load(data_args.eval_file, "eval"), data_args.max_eval_samples, task),
            first_records(load(data_args.test_file, "test"), data_args.max_eval_samples, task))


def first(records, n: int | None):
    """The first `n` records (all for None or 0; None stays None)."""
    return records.select(range(min(n, len(records)))) if records is not None and n else records


def first_records(records, n: int | None, task: str):
    """`first`, but for caption and retrieval every row of the first `n` images: a cut by rows would leave
    an image with part of its references."""
    if records is None or not n or task not in ("caption", "retrieval"):
        return first(records, n)
    kept, rows = set(), []
    for i, image in enumerate(records["image"]):
        if image in kept or len(kept) < n:
            kept.add(image)
            rows.append(i)
    return records.select(rows)


def shuffled_images(records: datasets.Dataset) -> datasets.Dataset:
    """The records with each image (and each of `images`) swapped for another eval image, keys and references
    kept: the "does it look at the image?" check."""
    several = "images" in records.column_names
    images = sorted({im for im in records["image"] if im is not None}
                    | {im for ims in (records["images"] if several else []) for im in ims or ()})
    if len(images) < 2:
        return records
    other = dict(zip(images, images[1:] + images[:1]))

    def swap(r: dict) -> dict:
        out = {"image": other.get(r["image"])}
        if several:
            out["images"] = r["images"] and [other[im] for im in r["images"]]
        return out

    return records.map(swap)


def resume_checkpoint(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names, or None. 'last' (or 'true') is the newest
    complete checkpoint-N (the Trainer writes trainer_state.json last); 'auto' is 'last', or None where
    there is none: one command for a job's every start."""
    if value in NO_RESUME:
        return None
    if value in (True, "last", "true", "True", "auto"):
        found = checkpoints(output_dir)
        for folder in reversed(found):
            try:
                json.loads((folder / "trainer_state.json").read_text())
                return str(folder)
            except (OSError, ValueError):
                logger.warning("skipping %s: no readable trainer_state.json (the run stopped while saving "
                               "it)", folder)
        if value == "auto":
            return None
        incomplete = f" ({len(found)} incomplete)" if found else ""
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in "
                                f"{output_dir}{incomplete}; leave the flag out to start afresh.")
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder.")
    return str(value)


class Stopped(Exception):
    """Training stopped on a signal, its checkpoint saved: the run is to be resumed, not scored."""


class StopOnSignal(TrainerCallback):
    """--enable_jit_checkpoint: on SIGTERM, save a checkpoint at the end of the step under way and stop.
    All processes agree at each step end on whether any got the signal, so all save the same step
    (transformers' JITCheckpointCallback decides in each alone, leaving the others waiting in an
    all-reduce). While held-out data is scored (`scoring`: the message), SIGTERM stops the run at once."""

    def __init__(self):
        self.received, self.stopped_at, self.group, self.scoring = False, None, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        signal.signal(signal.SIGTERM, self.receive)
        if args.world_size > 1:  # the flag goes over gloo, on the CPU: no GPU sync per step
            self.group = torch.distributed.new_group(backend="gloo")

    def receive(self, signum, frame):
        self.received = True
        if self.scoring is not None:
            # The launcher passes the scheduler's SIGTERM on: a second one must not end the process before
            # the message is printed.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Stopped(self.scoring)

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor([int(self.received)])
        if self.group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if flag.item():
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        # Leave the Trainer right after the save: its epoch end would evaluate the stopped step (and might
        # pick it as the best checkpoint), then prune checkpoints for save_total_limit.
        if self.stopped_at is not None and state.global_step < state.max_steps:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise Stopped(f"SIGTERM: training stopped at step {state.global_step} of {state.max_steps} and "
                          f"saved {Path(args.output_dir) / f'checkpoint-{state.global_step}'}. Run the same "
                          "command with --resume_from_checkpoint last (or auto) to go on.")


def load_finished(trainer, checkpoint: str, why: str) -> None:
    """Load a checkpoint of the run's last step as `train` would end it, without training (the best
    checkpoint's weights with --load_best_model_at_end), so that a requeued job scores a finished run."""
    logger.info("%s is the run's last step (%s): scoring it, nothing left to train", checkpoint, why)
    state = trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    # as `train` sets them: the saved ones are rank 0's
    state.is_local_process_zero, state.is_world_process_zero = (trainer.is_local_process_zero(),
                                                                trainer.is_world_process_zero())
    try:  # the run's own, where `train` ended: its log ends with the summary (train_loss, runtime)
        ended = json.loads((Path(trainer.args.output_dir) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        ended = {}
    history, logged = ended.get("log_history", []), state.log_history
    if ended.get("global_step") == state.global_step and history[:len(logged)] == logged:
        state.log_history = history
    trainer._load_from_checkpoint(checkpoint)
    best = state.best_model_checkpoint
    here = None if best is None else Path(trainer.args.output_dir) / Path(best).name
    if here is not None and not Path(best).is_dir() and here.is_dir():
        state.best_model_checkpoint = str(here)  # the run's folder moved since: its checkpoint is here
    if state.best_model_checkpoint is not None and not Path(state.best_model_checkpoint).is_dir():
        logger.warning("the best checkpoint %s is gone: the last step's weights are scored",
                       state.best_model_checkpoint)
        state.best_model_checkpoint = None
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        trainer._load_best_model()


def check_best_metric(args, scores: dict) -> None:
    """--metric_for_best_model must be the loss or one of `scores` (the eval data's "before"): else the
    Trainer stops with a KeyError at its first evaluation."""
    metric = args.metric_for_best_model
    if metric is None or args.eval_strategy == "no":
        return
    known = ["loss", *(k.removeprefix("eval_") for k in scores)]
    if metric.removeprefix("eval_") not in known:
        raise ValueError(f"--metric_for_best_model {metric}: the evaluations log {', '.join(known)} "
                         "(names are case-sensitive).")


@contextlib.contextmanager
def scoring(stop: StopOnSignal | None, message: str):
    """Held-out scoring under --enable_jit_checkpoint: SIGTERM stops the run at once with `message`."""
    if stop is not None:
        stop.scoring = message
    try:
        yield
    finally:
        if stop is not None:
            stop.scoring = None


def finished_message(trainer) -> str:
    """What a run stopped after training has saved, and how a resume scores it."""
    step, output_dir = trainer.state.global_step, trainer.args.output_dir
    last = resume_checkpoint("auto", output_dir)
    if last and saved_step(last) == step:
        return (f"training ended at step {step} and is saved ({last}), not scored (no metrics.json). Run the "
                "same command with --resume_from_checkpoint auto to score it without training.")
    return (f"training ended at step {step} and the model is saved in {output_dir}, not scored (no "
            f"metrics.json); no checkpoint holds step {step} (--save_strategy {trainer.args.save_strategy}), "
            "so a resume trains again from the last one.")


def train_and_evaluate(trainer, metadata: dict, *, test=None, results: dict | None = None,
                       shuffled_image_check: bool = False, early_stopping=None,
                       after_training: Callable[[dict], None] | None = None) -> dict:
    """Score the held-out data, train (resuming per --resume_from_checkpoint), save, score again, and write
    metrics.json with `metadata` and the recipe's own `results` (a baseline).

    `test` gives the headline "before" and "after", the eval data (which picks the checkpoint) is scored as
    "val"; without `test` the eval data is the headline. `after_training(results)`: a recipe's own figures.
    """
    args = trainer.args
    check_trainable(trainer)
    resume = resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    early_stopped = add_early_stopping(trainer, early_stopping, resume)
    finished = finished_at(trainer, resume, early_stopped) if resume else None
    if resume and not finished:
        check_resumable(resume)
    stop = add_stop_on_signal(trainer)
    metadata, recorded = record_run(trainer, metadata, resume)
    results = dict(results or {})
    folder = Path(args.output_dir) / "predictions"
    # (result key, predictions name prefix, data): the headline split first.
    splits = [("", "", test), ("val", "val-", None)] if test is not None else [("", "", None)]

    def score(when: str, name: str) -> None:
        for key, prefix, data in splits:
            target = results.setdefault(key, {}) if key else results
            saved = folder / f"{prefix}{name}.metrics.json"
            if (when == "before" and resume and recorded and saved.exists()
                    and trainer.scored_on(folder / f"{prefix}{name}.jsonl", data)):
                target[when] = json.loads(saved.read_text())  # scored when the run first started
            else:
                target[when] = trainer.heldout_metrics("eval", name=f"{prefix}{name}", data=data)

    if trainer.evaluates_heldout():
        with scoring(stop, f"SIGTERM while scoring the held-out data before training: nothing trained"
                           f"{f' since {resume}' if resume else ''}. Run the same command with "
                           "--resume_from_checkpoint auto to go on."):
            score("before", "before")
        check_best_metric(args, results["val"]["before"] if test is not None else results["before"])
    train_resumed(trainer, resume, stop, finished)
    trainer.save_model()  # what trained (adapter, trained modules, or the model) and the processor
    trainer.save_state()  # trainer_state.json: the log of every step and evaluation
    done = stop is not None and finished_message(trainer)
    if stop is not None and stop.received:  # in the last step, or while it loaded or saved: no scoring now
        raise Stopped(f"SIGTERM after training, before its scoring: {done}")
    with scoring(stop, f"SIGTERM while scoring the trained model: {done}"):
        if trainer.evaluates_heldout():
            score("after", "final")
            if shuffled_image_check and trainer.generation is not None:
                records = test if test is not None else trainer.generation.records
                results["after_shuffled_images"] = trainer.heldout_metrics(
                    "eval", name="final-shuffled-images", data=shuffled_images(records))
        if after_training is not None:
            after_training(results)
    if stop is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if trainer.is_world_process_zero():
        write_metrics(trainer, results, metadata, heldout="test" if test is not None else "val")
    return results


def check_trainable(trainer) -> None:
    """Checks that would otherwise fail only after the "before" scoring."""
    if not any(p.requires_grad for p in trainer.model.parameters()):  # else an optimizer error
        raise ValueError("nothing would train: every parameter is frozen. Unfreeze a part (the --freeze_* "
                         "flags) or add LoRA (--peft_method lora).")
    if trainer.evaluates_heldout() and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError("held-out scoring does not run under FSDP or DeepSpeed yet: the Trainer keeps the "
                         "model on the CPU until training starts. Use the single_gpu or ddp config.")


def add_early_stopping(trainer, early_stopping, resume: str | None) -> bool:
    """transformers' EarlyStoppingCallback; a resumed run goes on with the count its checkpoint saved.
    Returns whether that count had ended the run (at the patience: nothing left to train)."""
    if early_stopping is None or not early_stopping.early_stopping_patience:
        return False
    args = trainer.args
    if args.eval_strategy == "no" or args.metric_for_best_model is None:
        raise ValueError("--early_stopping_patience needs evaluations during training (--eval_strategy) "
                         "and the metric they compare (--metric_for_best_model).")
    stopper = EarlyStoppingCallback(early_stopping.early_stopping_patience,
                                    early_stopping.early_stopping_threshold)
    if resume:
        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback", {}).get("attributes", {})
        stopper.early_stopping_patience_counter = saved.get("early_stopping_patience_counter", 0)
    trainer.add_callback(stopper)
    return stopper.early_stopping_patience_counter >= stopper.early_stopping_patience


def add_stop_on_signal(trainer) -> StopOnSignal | None:
    """With --enable_jit_checkpoint, `StopOnSignal` in place of JITCheckpointCallback."""
    if not getattr(trainer.args, "enable_jit_checkpoint", False):
        return None
    stop = StopOnSignal()
    trainer.remove_callback(JITCheckpointCallback)
    signal.signal(signal.SIGTERM, stop.receive)  # for its handler, set when the Trainer was built
    trainer.add_callback(stop)
    return stop


def record_run(trainer, metadata: dict, resume: str | None) -> tuple[dict, bool]:
    """`metadata` with the decode options and absolute paths, checked against run.json and written there."""
    args = trainer.args
    if trainer.generation is not None:  # a resumed run reuses "before": it must decode as this one does
        decoding = trainer.generation.args
        metadata = {**metadata, "decoding": {k: getattr(decoding, k) for k in DECODING}}
    # What trains: a resume with another adapter (or none), other freezing, loads its checkpoint wrongly.
    metadata["adapter"] = adapter_settings(trainer.model)
    metadata["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # The autocast evaluation generates under: chat and serve generate under it too, to answer as it scored.
    metadata["mixed_precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    # Absolute, so that `make eval` finds the data files and images from any folder.
    metadata = {k: str(Path(v).resolve()) if v and (k.endswith("_file") or k == "image_root") else v
                for k, v in metadata.items()}
    recorded = check_same_run(args.output_dir, resume, metadata, write=False)
    if args.world_size > 1:  # all read run.json before it is rewritten: else they differ on scoring "before"
        torch.distributed.barrier()
    if trainer.is_world_process_zero():
        check_same_run(args.output_dir, None, metadata)  # (re)write it
    return metadata, recorded


def finished_at(trainer, resume: str, early_stopped: bool) -> str | None:
    """Why checkpoint `resume` ends the run, with nothing left to train (`early_stopped`: early stopping's
    count saved in it is at the patience), or None. FSDP and DeepSpeed runs always resume through `train`,
    the only one that prepares their model."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return None
    if early_stopped:
        return "early stopping ended the run there"
    max_steps = getattr(trainer.args, "max_steps", -1)
    return f"--max_steps {max_steps}" if max_steps > 0 and saved_step(resume) >= max_steps else None


def check_resumable(checkpoint: str) -> None:
    """A checkpoint trained on holds the optimizer and learning-rate schedule (scheduler.pt, or DeepSpeed's
    global_step* folder): without them the Trainer would go on with a fresh optimizer and the schedule
    restarted from its warm-up, with no word said."""
    folder = Path(checkpoint)
    if not (folder / "scheduler.pt").is_file() and not any(folder.glob("global_step*")):
        raise FileNotFoundError(f"--resume_from_checkpoint: {checkpoint} holds no optimizer and learning-"
                                "rate schedule state (scheduler.pt; --save_only_model saves none), so "
                                "training cannot go on from it. Start afresh in another --output_dir.")


def train_resumed(trainer, resume: str | None, stop: StopOnSignal | None, finished: str | None) -> None:
    """`trainer.train` from `resume`; a checkpoint of the run's last step (`finished`: why it is, from
    `finished_at`) is loaded, not trained on: a resumed Trainer would train one step more where --max_steps
    is not a whole number of epochs, and up to the next evaluation after an early stop."""
    try:
        if resume and finished:
            load_finished(trainer, resume, finished)
        else:
            trainer.train(resume_from_checkpoint=resume)
    except ValueError as e:
        if resume and "parameter group" in str(e):
            raise ValueError(f"{e}: the checkpoint's optimizer has a parameter group per model component "
                             "(a run with --vision_lr, --bridge_lr or --lm_lr, or of an earlier version, "
                             "which always made them) or not; resume with the per-component rates it had "
                             "(one set to --learning_rate makes such groups at the same rates), or without "
                             "them.") from e
        raise
    if stop is not None and stop.stopped_at is not None and stop.stopped_at < trainer.state.max_steps:
        # on_save did not run (save_strategy best, the step no new best): the step was not saved
        raise Stopped(f"SIGTERM: training stopped at step {stop.stopped_at} of {trainer.state.max_steps}; "
                      "its checkpoint was not saved (--save_strategy best). Run the same command with "
                      "--resume_from_checkpoint last (or auto) to go on from the last one.")


def write_metrics(trainer, results: dict, metadata: dict, heldout: str) -> None:
    """metrics.json: `results`, `metadata` and which split and steps they score; logged too."""
    args, state = trainer.args, trainer.state
    # "after" scores the best checkpoint's weights when --load_best_model_at_end loaded them.
    best_loaded = args.load_best_model_at_end and state.best_model_checkpoint
    # The checkpoint loaded, not `best_global_step`: a best evaluation at a step that saved nothing moves
    # only the latter.
    after_step = checkpoint_step(state.best_model_checkpoint) if best_loaded else state.global_step
    if best_loaded and state.best_global_step != after_step:
        logger.warning("the best evaluation, at step %d, has no checkpoint (--save_steps %s): the weights "
                       "scored after training are the best saved one's, step %d. --save_strategy best saves "
                       "every new best.", state.best_global_step, args.save_steps, after_step)
    results.update(metadata, heldout=heldout,
                   heldout_file=metadata.get("test_file" if heldout == "test" else "eval_file"),
                   global_step=state.global_step, after_step=after_step, world_size=args.world_size)
    atomic_write_text(Path(args.output_dir) / "metrics.json", json.dumps(results, indent=2))
    for when in ("before", "after", "after_shuffled_images"):
        if when in results:
            logger.info("held-out %s (%s split%s): %s", when, heldout,
                        f", step {after_step} of {state.global_step}" if when != "before" else "",
                        json.dumps(results[when]))
    logger.info("outputs in %s", args.output_dir)


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: `main()`, then the process group's end. A bad input or a missing package ends
    the run with its message and exit code 2, no traceback (VLM_RECIPES_DEBUG=1 shows it); a SIGTERM stop
    with 143, as the signal would, and Ctrl-C with 130."""
    from accelerate import PartialState

    try:
        main()
    except Stopped as e:
        if PartialState().is_local_main_process:  # every process stopped at the same step
            print(f"\n{e}", file=sys.stderr)  # on a line of its own: the progress bar's is left open
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        if os.environ.get("VLM_RECIPES_DEBUG"):
            raise
        # One write: several processes failing at once would otherwise splice their lines together.
        sys.stderr.write(f"error: {e}\n(VLM_RECIPES_DEBUG=1 shows where it was raised)\n")
        sys.stderr.flush()
        sys.exit(2)
    finally:
        gc.collect()  # the run's DDP model holds the process group: free it first, so that the group ends now
        PartialState().destroy_process_group()
