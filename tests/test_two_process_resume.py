"""A requeued job under 2 gloo processes (accelerate_configs/multi_cpu.yaml), as a cluster runs it: the same
command with --resume_from_checkpoint auto after the run finished, after its best checkpoint was deleted,
and after SIGTERM during the held-out scoring before and after training (tiny BLIP-2; SIGTERM during
training: tests/test_blip2_recipe.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

# 2 processes: with the family matrix, in `make test-families` (CI), to keep `make test` under 15 minutes
pytestmark = pytest.mark.matrix
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "blip2_lora_caption" / "train.py"
# 16 train images x 5 captions, 4 per process: 10 steps an epoch, so step 5 is mid-epoch.
FAST = ["--model_name_or_path", "tiny:blip2-opt", "--report_to", "none", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16", "--max_new_tokens", "8", "--logging_steps", "1",
        "--lora_dropout", "0", "--learning_rate", "0.01", "--save_strategy", "steps",
        "--resume_from_checkpoint", "auto",
        "--log_level_replica", "info"]  # what each process does: rank 1's info is logged too
BEST = ["--max_steps", "5", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
        "--load_best_model_at_end", "true", "--metric_for_best_model", "CIDEr"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """16 train images, 4 eval images, 100 slow-to-score eval images; a model cache of the module's own."""
    d = tmp_path_factory.mktemp("resume2")
    rows = read_jsonl(make_synthetic("caption", 20, d / "synth", seed=1, progress=False))
    write_jsonl(d / "synth" / "train.jsonl", rows[:16])
    write_jsonl(d / "synth" / "eval.jsonl", rows[16:])
    make_synthetic("caption", 100, d / "big", seed=2, progress=False)
    # PYTHONPATH: this checkout's code in every process the launcher starts
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return d, e


def _cmd(port: int, args, processes: int = 2, script: Path = TRAIN):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", str(port)]
    return [*(launch if processes == 2 else [sys.executable]), str(script), *map(str, args)]


def _run(port: int, args, env, processes: int = 2):
    return subprocess.run(_cmd(port, args, processes), env=env, capture_output=True, text=True, timeout=300)


def _data(d, eval_file="synth/eval.jsonl"):
    return ["--train_file", d / "synth" / "train.jsonl", "--eval_file", d / eval_file]


def _state(run: Path) -> dict:
    return json.loads((run / "trainer_state.json").read_text())


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in _state(run)["log_history"] if "loss" in h]


def _sigterm_when(cmd, env, out: Path, pattern: str, count: int, delay: float):
    """Start `cmd` in a session of its own; SIGTERM the whole group, as a scheduler does, `delay` s after
    `pattern` is in its stderr `count` times. Returns (exit code, stderr)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 240
        while (p.poll() is None and time.time() < deadline
               and len(re.findall(pattern, log.read_text())) < count):
            time.sleep(0.02)
        time.sleep(delay)
        assert p.poll() is None, "the run ended before the signal: " + log.read_text()[-3000:]
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    return p.returncode, log.read_text()


def test_a_finished_run_resumed_with_auto_is_scored_without_training_on_both_processes(env):
    """--max_steps 5 is mid-epoch and not a save step: resumed at checkpoint-5, both processes load it and
    score it. With its best checkpoint deleted: a warning, and the last step's weights are scored."""
    d, e = env
    out = d / "best"
    r = _run(29611, [*_data(d), *FAST, *BEST, "--output_dir", out], e)
    assert r.returncode == 0, r.stderr[-3000:]
    first, state = json.loads((out / "metrics.json").read_text()), _state(out)
    assert (first["global_step"], first["after_step"], first["world_size"]) == (5, 2, 2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]

    r = _run(29611, [*_data(d), *FAST, *BEST, "--output_dir", out], e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("checkpoint-5 is the run's last step (--max_steps 5): scoring it") == 2
    assert json.loads((out / "metrics.json").read_text()) == first and not (out / "checkpoint-6").exists()
    assert _state(out) == state  # its log still ends with the summary `train` wrote (train_loss)
    assert "train_loss" in state["log_history"][-1]

    # The run's folder moved since: its trainer_state.json names the old path of its best checkpoint.
    moved = d / "best-moved"
    shutil.move(out, moved)
    try:
        (moved / "metrics.json").unlink()
        r = _run(29611, [*_data(d), *FAST, *BEST, "--output_dir", moved], e, 1)
        assert r.returncode == 0 and "is gone" not in r.stderr, r.stderr[-3000:]
        assert json.loads((moved / "metrics.json").read_text())["after_step"] == 2
    finally:
        shutil.move(moved, out)

    shutil.rmtree(out / "checkpoint-2")
    shutil.copytree(out, d / "best-one")
    for run, processes in ((out, 2), (d / "best-one", 1)):
        r = _run(29611, [*_data(d), *FAST, *BEST, "--output_dir", run], e, processes)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        warning = f"the best checkpoint {out / 'checkpoint-2'} is gone: the last step's weights are scored"
        assert r.stderr.count(warning) == processes
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["global_step"], metrics["after_step"]) == (5, 5)
        assert _losses(run) == _losses(d / "best") and len(_losses(run)) == 5
        saved, last = (load_file(p / "adapter_model.safetensors") for p in (run, run / "checkpoint-5"))
        assert saved.keys() == last.keys() and all((saved[k] == last[k]).all() for k in saved)
    assert metrics["after"] == json.loads((out / "metrics.json").read_text())["after"]


def test_sigterm_while_scoring_before_or_after_training_stops_at_once_and_the_resume_goes_on(env):
    """--enable_jit_checkpoint: SIGTERM during the held-out scoring (generation, which saves nothing) ends
    the run at once with one line and exit code 143; after "after", the resume scores without training."""
    d, e = env
    out = d / "scoring"
    args = [*_data(d, "big/caption.jsonl"), *FAST, "--max_steps", "5", "--save_steps", "2",
            "--eval_strategy", "no", "--load_best_model_at_end", "false", "--enable_jit_checkpoint",
            "--per_device_eval_batch_size", "1", "--max_new_tokens", "20", "--output_dir", out]
    code, err = _sigterm_when(_cmd(29613, args), e, out, r"generating: +0%", 1, 0.3)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert err.count("\nSIGTERM while scoring the held-out data before training: nothing trained. Run the "
                     "same command with --resume_from_checkpoint auto to go on.\n") == 1, err[-3000:]
    assert not list(out.glob("checkpoint-*"))

    code, err = _sigterm_when(_cmd(29613, args), e, out, r"generating: +0%", 2, 0.3)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert err.count(f"\nSIGTERM while scoring the trained model: training ended at step 5 and is saved "
                     f"({out / 'checkpoint-5'}), not scored (no metrics.json). Run the same command with "
                     "--resume_from_checkpoint auto to score it without training.\n") == 1, err[-3000:]
    assert not (out / "metrics.json").exists()

    r = _run(29613, args, e)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("checkpoint-5 is the run's last step (--max_steps 5): scoring it") == 2
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 5 and len(_losses(out)) == 5


RACE = '''
import sys, time
from pathlib import Path
from accelerate import PartialState
from recipes.common import run
from tests.test_run_lifecycle import FakeTrainer

state = PartialState(cpu=True)
if state.process_index == 1:  # the slower process reads run.json after the main one could rewrite it
    found = run.resume_checkpoint
    run.resume_checkpoint = lambda *a: (time.sleep(1), found(*a))[1]
trainer = FakeTrainer(Path(sys.argv[1]), resume="last")
trainer.args.world_size = 2
trainer.is_world_process_zero = lambda: state.process_index == 0
print(f"rank {state.process_index} before", run.train_and_evaluate(trainer, {"recipe": "r"})["before"])
state.destroy_process_group()
'''


def test_both_processes_decide_alike_whether_a_resumed_run_scores_before_again(env, tmp_path):
    """A run.json of an earlier version (no decoding) makes the resume score "before" again: the main
    process rewrites run.json, and a slower one must not read the new one and reuse "before" alone (it
    would skip the generation the other waits in)."""
    e = env[1]
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-4" / "scheduler.pt").write_bytes(b"")  # one to go on from (nothing trains here)
    (out / "predictions").mkdir()
    write_jsonl(out / "predictions" / "before.jsonl", ({"key": k, "prediction": "x"} for k in "ab"))
    (out / "predictions" / "before.metrics.json").write_text('{"eval_CIDEr": 0.1}')
    (out / "run.json").write_text('{"recipe": "r"}')
    (tmp_path / "race.py").write_text(RACE)
    r = subprocess.run(_cmd(29617, [out], script=tmp_path / "race.py"), env=e, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(re.findall(r"rank \d before .*", r.stdout)) == [
        "rank 0 before {'eval_CIDEr': 0.5}", "rank 1 before {'eval_CIDEr': 0.5}"], r.stdout
