"""Examples in the docs that state a result or name a file: the result is what the code gives, the file is
the one the documented run writes."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_readme_commands import commands, is_real_training, words

REPO = Path(__file__).resolve().parents[1]


def test_metrics_readme_example_gives_the_result_its_comment_states(tmp_path):
    text = (REPO / "eval" / "metrics" / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    call = re.search(r"^(vqa\.compute\(.*\))\s+# (\{'overall': [0-9.]+)", block, re.MULTILINE)
    assert call, "the example's vqa.compute line states no result"
    stated = ast.literal_eval(call.group(2) + "}")["overall"]
    script = block.replace(call.group(1), f"print({call.group(1)}['overall'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    # from the repository root, as the README's relative path expects
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) == stated


def test_qlora_readme_scores_the_predictions_file_its_vqa_v2_run_writes():
    readme = REPO / "recipes" / "qlora_vqa" / "README.md"
    train = words(next(c for c in commands(readme) if is_real_training(c)))
    eval_file = train[train.index("--eval_file") + 1]
    text = " ".join(readme.read_text().split())
    m = re.search(r"python -m eval vqa --predictions outputs/qlora_vqa/predictions/(\S+)\.jsonl "
                  r"--references (\S+?)`", text)
    assert m and m.group(2) == eval_file
    # A run with an eval file and no test file writes its eval predictions as before/final; the val-*
    # names are only for the eval file of a run that has a test file too (recipes/common/run.py).
    assert "--test_file" not in train
    assert m.group(1) == "final"


def _flags(w: list[str]) -> dict[str, list[str]]:
    """--name value... of a command's words, by name."""
    out, name = {}, None
    for word in w:
        if word.startswith("--"):
            name = word[2:]
            out[name] = []
        elif name is not None:
            out[name].append(word)
    return out


@pytest.mark.parametrize("recipe", ["clip_retrieval", "llava_instruct", "soft_prompt_caption"])
def test_commands_to_measure_a_variant_change_a_config_default(recipe):
    """A "to measure them" command that only restates config.yaml would measure the documented run again."""
    text = (REPO / "recipes" / recipe / "README.md").read_text()
    block = re.search(r"to measure them:\n```bash\n(.*?)```", text, re.DOTALL).group(1)
    config = yaml.safe_load((REPO / "recipes" / recipe / "config.yaml").read_text())
    lines = block.replace("\\\n", " ").splitlines()
    trains = [words(line) for line in lines if "train.py" in line]
    assert trains
    for w in trains:
        w = w[w.index(next(x for x in w if x.endswith("train.py"))) + 1:]
        changed = [name for name, values in _flags(w).items()
                   if name not in ("output_dir", "report_to", "seed")
                   and (any("$" in v for v in values) or name not in config
                        or [str(v) for v in values] != [str(v) for v in (
                            config[name] if isinstance(config[name], list) else [config[name]])])]
        assert changed, f"{recipe}: {' '.join(w)} changes no default of config.yaml"
