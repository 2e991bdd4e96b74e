"""clip_retrieval resumed with other zero-shot prompts: refused, since the saved "before" zero-shot accuracy
was scored with the prompts the run started with and would be compared with an "after" scored with others."""

import json
import os
import subprocess
import sys
from pathlib import Path

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

TRAIN = Path(__file__).resolve().parent.parent / "recipes" / "clip_retrieval" / "train.py"


def test_a_resume_with_other_zero_shot_templates_is_refused(tmp_path):
    src = read_jsonl(make_synthetic("retrieval", 12, tmp_path / "synth", seed=1, progress=False))
    write_jsonl(tmp_path / "synth" / "train.jsonl", src[:8])
    write_jsonl(tmp_path / "synth" / "eval.jsonl", src[8:])
    write_jsonl(tmp_path / "synth" / "zs.jsonl", [{"image": r["image"], "label": r["objects"][0]["size"]}
                                                  for r in src[8:]])
    env = dict(os.environ, VLM_RECIPES_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "run"
    args = ["--model_name_or_path", "tiny:clip", "--report_to", "none", "--output_dir", str(out),
            "--train_file", str(tmp_path / "synth" / "train.jsonl"),
            "--eval_file", str(tmp_path / "synth" / "eval.jsonl"),
            "--zero_shot_file", str(tmp_path / "synth" / "zs.jsonl"), "--per_device_train_batch_size", "4",
            "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
            "--load_best_model_at_end", "false", "--wise_ft_alpha", "none"]

    def run(*extra):
        return subprocess.run([sys.executable, str(TRAIN), *args, *extra], env=env, capture_output=True,
                              text=True, timeout=600)

    first = run("--zero_shot_templates", "size {label}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["zero_shot_templates"] == ["size {label}"]
    checkpoint = str(out / "checkpoint-1")
    resumed = run("--zero_shot_templates", "a {label} shape", "--resume_from_checkpoint", checkpoint)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()
    assert any(line.startswith("error: --resume_from_checkpoint") and "zero_shot_templates ['size {label}'] "
               "-> ['a {label} shape']" in line for line in last), resumed.stderr[-3000:]
    # The same prompts resume.
    again = run("--zero_shot_templates", "size {label}", "--resume_from_checkpoint", checkpoint)
    assert again.returncode == 0, again.stderr[-3000:]
