"""A run's life cycle as a user meets it: the weights that metrics.json and `make eval` report on, resumed
runs, and recipe folders copied by hand."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from eval.report import report_run, table_lines
from recipes.common.args import GenerationEvalArguments
from recipes.clip_retrieval.trainer import ContrastiveTrainer
from recipes.common.run import train_and_evaluate
from recipes.common.trainer import RecipeTrainer

ROOT = Path(__file__).resolve().parent.parent


class FakeTrainer:
    """What train_and_evaluate asks of a Trainer: a run of 12 steps whose best checkpoint is step 8."""

    scored_on = RecipeTrainer.scored_on  # the real check of saved predictions against the data to score

    def __init__(self, output_dir: Path, load_best: bool = True, resume: str | None = None, keys=("a", "b"),
                 metric: str | None = None):
        self.args = SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume, world_size=1,
                                    load_best_model_at_end=load_best, metric_for_best_model=metric,
                                    eval_strategy="epoch", bf16=False, fp16=False)
        self.trained = False
        self.is_fsdp_enabled = self.is_deepspeed_enabled = False
        self.model = torch.nn.Linear(1, 1)  # something to train
        self.state = SimpleNamespace(global_step=0, best_global_step=None, best_model_checkpoint=None)
        self.generation = SimpleNamespace(records=datasets.Dataset.from_dict({"key": list(keys)}),
                                          args=GenerationEvalArguments())

    def is_world_process_zero(self):
        return True

    def evaluates_heldout(self):
        return True

    def heldout_metrics(self, prefix, name, data=None):
        return {"eval_CIDEr": 0.5}

    def train(self, resume_from_checkpoint=None):
        self.trained = True
        self.state.global_step, self.state.best_global_step = 12, 8
        self.state.best_model_checkpoint = str(Path(self.args.output_dir) / "checkpoint-8")

    def save_model(self):
        pass

    def save_state(self):
        pass


def test_metrics_json_and_make_eval_name_the_step_of_the_weights_scored_after(tmp_path):
    data = make_synthetic("caption", 3, tmp_path / "data", seed=3, progress=False)
    metadata = dict(recipe="blip2_lora_caption", task="caption", lang="en", eval_file=str(data))
    for load_best, step in ((True, "8 of 12"), (False, 12)):
        run = tmp_path / f"run-{load_best}"
        train_and_evaluate(FakeTrainer(run, load_best=load_best), metadata)
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["global_step"], metrics["after_step"]) == (12, 8 if load_best else 12)

        rows = read_jsonl(data)
        (run / "predictions").mkdir()
        write_jsonl(run / "predictions" / "final.jsonl",
                    ({"key": str(data.parent / r["image"]), "prediction": r["captions"][0]} for r in rows))
        row = report_run(run)
        assert row["step"] == step
        assert f"| blip2_lora_caption | {step} | 3/3 |" in table_lines([row])[2]
        assert f", step {step}, task caption" in (run / "report.md").read_text()


def test_after_step_is_the_loaded_checkpoints_when_the_best_evaluation_saved_none(tmp_path, caplog):
    class BestUnsaved(FakeTrainer):  # the best evaluation at step 10 fell between saves (every 4 steps)
        def train(self, resume_from_checkpoint=None):
            super().train()
            self.state.best_global_step = 10
            self.args.save_steps = 4

    run = tmp_path / "run"
    train_and_evaluate(BestUnsaved(run), {"recipe": "blip2_lora_caption", "task": "caption"})
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["after_step"], metrics["global_step"]) == (8, 12)
    assert "the best evaluation, at step 10, has no checkpoint" in caplog.text


def _train(script: Path, *args: str):
    # PYTHONPATH: this checkout's code, as the installed project would be
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_recipe_folder_copied_by_hand_is_refused_before_it_runs_the_originals_code(tmp_path):
    def copied_to(folder: Path):
        shutil.copytree(ROOT / "recipes" / "blip2_lora_caption", folder)
        return _train(folder / "train.py", "--output_dir", str(tmp_path / "out"), "--train_file",
                      "missing.jsonl", "--eval_strategy", "no")

    # into recipes/, and out of it
    for copy, fix in (
            (tmp_path / "recipes" / "my_task", "Rename recipes.blip2_lora_caption to recipes.my_task"),
            (tmp_path / "my_task", "Copy it into the project's recipes/ folder with `make new-recipe")):
        r = copied_to(copy)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert (f"error: {copy / 'train.py'} imports the modules of recipes/blip2_lora_caption, not its own"
                in r.stderr and fix in r.stderr), r.stderr[-3000:]
        assert not (tmp_path / "out").exists()

    # a recipe of another copy of the project than the installed one: a warning, then the run goes on
    other = tmp_path / "clone" / "recipes" / "blip2_lora_caption"
    r = copied_to(other)
    assert (f"{other / 'train.py'} runs the recipes package of {ROOT}, another copy of the project"
            in r.stderr and "error: missing.jsonl" in r.stderr), r.stderr[-3000:]


def _checkpoint(folder: Path) -> None:
    """What a checkpoint to resume from holds for train_and_evaluate (the fake Trainer loads nothing)."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "scheduler.pt").write_bytes(b"")


def test_a_checkpoint_without_optimizer_state_is_refused_before_anything_is_scored(tmp_path):
    """--save_only_model checkpoints: the Trainer would resume with a fresh optimizer and the learning-rate
    schedule restarted, silently. One that ends the run (its last step) is scored, needing neither."""
    _checkpoint(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "scheduler.pt").unlink()
    trainer = FakeTrainer(tmp_path, resume="last")
    trainer.heldout_metrics = None  # nothing is scored
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4 holds no optimizer and learning-rate schedule "
                                                r"state \(scheduler.pt; --save_only_model saves none\)"):
        train_and_evaluate(trainer, {"recipe": "r"})
    assert not trainer.trained and not (tmp_path / "run.json").exists()
    (tmp_path / "checkpoint-4" / "global_step4").mkdir()  # DeepSpeed keeps the optimizer state there
    train_and_evaluate(FakeTrainer(tmp_path, resume="last"), {"recipe": "r"})


def test_a_run_resumed_with_other_eval_samples_scores_before_again_on_them(tmp_path):
    """"before" is reused from the run's start only when it scored the records that "after" scores."""
    for keys, before in ((("a", "b"), 0.1), (("a", "b", "c"), 0.5), (("a",), 0.5)):
        run = tmp_path / "-".join(keys)
        _checkpoint(run / "checkpoint-4")
        (run / "predictions").mkdir()
        write_jsonl(run / "predictions" / "before.jsonl", ({"key": k, "prediction": "x"} for k in "ab"))
        (run / "predictions" / "before.metrics.json").write_text('{"eval_CIDEr": 0.1}')
        results = train_and_evaluate(FakeTrainer(run, resume="last", keys=keys), {"recipe": "r"})
        assert results["before"] == {"eval_CIDEr": before}


def test_a_resumed_retrieval_run_reuses_before_only_for_the_same_images(tmp_path):
    for images, before in ((["a.png", "b.png"], 0.1), (["a.png", "b.png", "c.png"], 0.5)):
        run = tmp_path / str(len(images))
        _checkpoint(run / "checkpoint-4")
        (run / "predictions").mkdir()
        np.savez(run / "predictions" / "before.npz", image_keys=np.asarray(["a.png", "b.png"]))
        (run / "predictions" / "before.metrics.json").write_text('{"eval_CIDEr": 0.1}')
        trainer = FakeTrainer(run, resume="last")
        trainer.generation, trainer.retrieval_dataset = None, SimpleNamespace(images=images)
        trainer.scored_on = ContrastiveTrainer.scored_on.__get__(trainer)  # the retrieval trainer's check
        assert train_and_evaluate(trainer, {"recipe": "r"})["before"] == {"eval_CIDEr": before}


def test_a_run_resumed_with_other_decoding_is_refused(tmp_path):
    """"before" is reused on resume: it must have been decoded as "after" will be."""
    train_and_evaluate(FakeTrainer(tmp_path), {"recipe": "r"})
    assert json.loads((tmp_path / "run.json").read_text())["decoding"]["max_new_tokens"] == 20
    _checkpoint(tmp_path / "checkpoint-4")
    trainer = FakeTrainer(tmp_path, resume="last")
    trainer.generation.args = GenerationEvalArguments(max_new_tokens=30)
    changed = r"was started with other settings \(decoding.max_new_tokens 20 -> 30\)"
    with pytest.raises(ValueError, match=changed):
        train_and_evaluate(trainer, {"recipe": "r"})


def test_a_run_started_by_an_earlier_version_resumes_and_scores_before_again(tmp_path):
    """Its run.json lacks the decoding: the resume is not refused, but its "before" is not comparable."""
    (tmp_path / "run.json").write_text('{"recipe": "r"}')
    _checkpoint(tmp_path / "checkpoint-4")
    (tmp_path / "predictions").mkdir()
    write_jsonl(tmp_path / "predictions" / "before.jsonl", ({"key": k, "prediction": "x"} for k in "ab"))
    (tmp_path / "predictions" / "before.metrics.json").write_text('{"eval_CIDEr": 0.1}')
    results = train_and_evaluate(FakeTrainer(tmp_path, resume="last"), {"recipe": "r"})
    assert results["before"] == {"eval_CIDEr": 0.5}
    assert "decoding" in json.loads((tmp_path / "run.json").read_text())


def test_a_metric_for_best_model_the_evaluations_do_not_log_is_an_error_before_training(tmp_path):
    for metric in ("CIDEr", "eval_CIDEr", "loss"):
        train_and_evaluate(FakeTrainer(tmp_path / metric, metric=metric), {"recipe": "r"})
    trainer = FakeTrainer(tmp_path / "cider", metric="cider")
    with pytest.raises(ValueError, match=r"^--metric_for_best_model cider: the evaluations log loss, CIDEr "):
        train_and_evaluate(trainer, {"recipe": "r"})
    assert not trainer.trained


def test_the_demo_summary_names_the_step_of_the_weights_scored_after(tmp_path):
    metrics = {"recipe": "blip2_lora_caption", "heldout": "test", "heldout_file": "test.jsonl",
               "global_step": 12, "after_step": 8, "before": {"eval_CIDEr": 0.2},
               "after": {"eval_CIDEr": 0.6}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_summary.py"), str(tmp_path)],
                         capture_output=True, text=True).stdout
    assert "(test.jsonl), 12 steps; after: step 8, the best checkpoint (checkpoints are chosen" in out
    assert "CIDEr            0.200     0.600" in out


def test_bench_refuses_a_json_file_in_no_folder_before_it_runs(tmp_path, capsys):
    from bench import harness

    target = tmp_path / "no" / "result.json"
    with pytest.raises(SystemExit) as exit_:
        harness.main(["blip2_lora_caption", "--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup",
                      "1", "--mode", "device", "--no-baseline", "--json", str(target)])
    assert exit_.value.code == 2 and f"--json {target}: no folder {target.parent}" in capsys.readouterr().err


def test_fsdp_and_deepspeed_runs_stop_before_anything_when_they_would_score_held_out_data(tmp_path):
    for sharded in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        trainer = FakeTrainer(tmp_path / sharded)
        setattr(trainer, sharded, True)
        with pytest.raises(ValueError, match="held-out scoring does not run under FSDP or DeepSpeed yet"):
            train_and_evaluate(trainer, {"recipe": "test"})
        assert not trainer.trained and not (tmp_path / sharded / "run.json").exists()


def test_a_stopped_run_and_ctrl_c_end_with_their_exit_codes_and_one_line(capsys):
    from recipes.common.run import Stopped, run_main

    for raised, code, line in ((Stopped("SIGTERM: training stopped at step 3 of 9"), 143,
                                "\nSIGTERM: training stopped at step 3 of 9\n"),
                               (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)\n")):
        def main():
            raise raised

        with pytest.raises(SystemExit) as exit:
            run_main(main)
        assert exit.value.code == code and capsys.readouterr().err == line
