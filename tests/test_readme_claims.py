"""Each recipe's README claim about a short run from its shipped base (the "Short run" line of its Numbers
section): 40 steps of 16 on small synthetic sets (seed 1) move the held-out metric by the stated margin.
The claims are read from the READMEs, so a README and its test cannot drift apart."""

import json
import os
import re

import pytest

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from tests.conftest import ROOT, run_script

# recipe -> (task, images made, images trained on, model flags)
RUNS = {
    "blip2_lora_caption": ("caption", 48, 40, ["--model_name_or_path", "tiny:blip2-opt-pretrained"]),
    "soft_prompt_caption": ("caption", 48, 40, []),
    "clip_retrieval": ("retrieval", 48, 40, ["--model_name_or_path", "tiny:clip-pretrained",
                                            "--zero_shot_attribute", "none"]),
    "qlora_vqa": ("vqa", 24, 16, ["--model_name_or_path", "tiny:llava-pretrained"]),
    "llava_instruct": ("instruct", 48, 40, ["--model_name_or_path", "tiny:llava-pretrained",
                                           "--shuffled_image_check", "false"]),
}
CLAIM = re.compile(r"Short run \(tested\): .*?`([\w@]+)` (\d+\.\d+) -> (\d+\.\d+), "
                   r"at least \+(\d+(?:\.\d+)?)")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_a_short_run_from_the_shipped_base_moves_the_metric_as_the_readme_says(recipe, tmp_path):
    readme = (ROOT / "recipes" / recipe / "README.md").read_text()
    found = CLAIM.search(" ".join(readme.split()))
    assert found, f"recipes/{recipe}/README.md has no 'Short run (tested): ...' line"
    metric, before, after, margin = found.group(1), *map(float, found.groups()[1:])
    task, n, n_train, flags = RUNS[recipe]
    rows = read_jsonl(make_synthetic(task, n, tmp_path / "synth", seed=1, progress=False))
    if task == "vqa":  # split by image: 3 questions per image
        train, held = ([r for r in rows if r["image_id"] < n_train],
                       [r for r in rows if r["image_id"] >= n_train])
    else:
        train, held = rows[:n_train], rows[n_train:]
    write_jsonl(tmp_path / "synth" / "train.jsonl", train)
    write_jsonl(tmp_path / "synth" / "eval.jsonl", held)
    out = tmp_path / "run"
    r = run_script(ROOT / "recipes" / recipe / "train.py", [
        "--train_file", tmp_path / "synth" / "train.jsonl", "--eval_file", tmp_path / "synth" / "eval.jsonl",
        "--max_steps", "40", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none",
        "--output_dir", out, *flags], env={**os.environ, "VLM_RECIPES_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    got_before, got_after = metrics["before"][f"eval_{metric}"], metrics["after"][f"eval_{metric}"]
    assert got_after - got_before >= margin, (got_before, got_after)
    # The README's numbers are this run's, up to the rounding of other CPUs.
    assert got_before == pytest.approx(before, abs=max(0.05, 0.1 * before))
    assert got_after == pytest.approx(after, abs=max(0.05, 0.1 * after))
