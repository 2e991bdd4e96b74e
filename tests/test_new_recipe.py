"""scripts/new_recipe.py: the copy is renamed, bad requests are refused, and the copy trains from another
repo root."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "new_recipe.py"
SOURCE = ROOT / "recipes" / "blip2_lora_caption"


@pytest.fixture
def fake_root(tmp_path):
    """A repo root holding only links to the shared code, so a copy can only run if it imports nothing
    else."""
    (tmp_path / "recipes").mkdir()
    for rel in ("data_tools", "eval", "recipes/common", "recipes/__init__.py"):
        if (ROOT / rel).exists():
            (tmp_path / rel).symlink_to(ROOT / rel)
    return tmp_path


def new_recipe(root, *args, env=None, source_dir=ROOT / "recipes"):
    cmd = [sys.executable, str(SCRIPT), "--recipes-dir", str(root / "recipes"),
           "--source-dir", str(source_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)


def test_copy_renames_every_mention_and_leaves_out_run_files(fake_root, tmp_path_factory):
    source = tmp_path_factory.mktemp("src")
    shutil.copytree(SOURCE, source / "blip2_lora_caption", ignore=shutil.ignore_patterns("__pycache__"))
    expected = {p.name for p in (source / "blip2_lora_caption").iterdir()}
    for leftover in ("__pycache__/train.cpython-312.pyc", "outputs/run/metrics.json",
                     "checkpoint-2/model.safetensors"):
        (source / "blip2_lora_caption" / leftover).parent.mkdir(parents=True, exist_ok=True)
        (source / "blip2_lora_caption" / leftover).write_text("blip2_lora_caption")
    r = new_recipe(fake_root, "--from", "blip2_lora_caption", "--name", "my_task", source_dir=source)
    assert r.returncode == 0, r.stderr
    copy = fake_root / "recipes" / "my_task"
    assert {"train.py", "collator.py", "trainer.py", "config.yaml", "README.md"} <= expected
    assert {p.name for p in copy.iterdir()} == expected  # no __pycache__, outputs or checkpoints
    for path in copy.iterdir():
        assert "blip2_lora_caption" not in path.read_text(), path
    assert yaml.safe_load((copy / "config.yaml").read_text())["output_dir"] == "outputs/my_task"
    readme = (copy / "README.md").read_text()
    assert readme.startswith("# my_task:") and "\n> Made with `make new-recipe` from a shipped" in readme
    assert "## When you copy it" in (SOURCE / "README.md").read_text() and "When you copy it" not in readme
    assert readme.count("\n## ") == (SOURCE / "README.md").read_text().count("\n## ") - 1
    spec = importlib.util.spec_from_file_location("new_recipe", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.readme_of_copy(readme) == readme  # a copy of a copy gets no second note
    assert "recipes/my_task/train.py" in (copy / "train.py").read_text()
    assert "from recipes.my_task.collator import" in (copy / "train.py").read_text()  # its own modules
    # renamed files carry a count, the others none
    assert "config.yaml  (" in r.stdout and "trainer.py\n" in r.stdout
    assert "recipes/my_task/collator.py" in r.stdout and "recipes/my_task/README.md" in r.stdout  # next steps


@pytest.mark.parametrize("spelled", ["blip2_lora_caption/", "./blip2_lora_caption"])
def test_from_spelled_as_a_path_copies_and_renames_that_recipe(fake_root, spelled):
    name = "slash_task" if spelled.endswith("/") else "dot_task"
    r = new_recipe(fake_root, "--from", spelled, "--name", name)
    assert r.returncode == 0, r.stderr
    train = (fake_root / "recipes" / name / "train.py").read_text()
    assert "blip2_lora_caption" not in train and f"from recipes.{name}.collator import" in train


@pytest.mark.parametrize(
    "src, name, message",
    [
        ("blip2_lora_caption", "My-Task", "'My-Task' is not a valid recipe name"),
        ("blip2_lora_caption", "2task", "'2task' is not a valid recipe name"),
        ("blip2_lora_caption", "existing", "already exists"),
        ("no_such_recipe", "my_task", "--from 'no_such_recipe': no recipe"),
        ("common", "my_task", "recipes/common is the shared library, not a recipe"),
    ],
)
def test_bad_requests_are_refused_and_name_the_problem(fake_root, src, name, message):
    (fake_root / "recipes" / "existing").mkdir()
    r = new_recipe(fake_root, "--from", src, "--name", name)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (fake_root / "recipes" / name).exists() or name == "existing"


def test_a_recipe_importing_another_recipe_package_is_reported_and_not_copied(fake_root, tmp_path_factory):
    source = tmp_path_factory.mktemp("src")
    (source / "old_task").mkdir()
    train = ('"""old_task."""\nimport os\nfrom recipes.old_task.collator import CaptionCollator\n'
             'from recipes.other_task.trainer import OtherTrainer\n')
    (source / "old_task" / "train.py").write_text(train)
    r = new_recipe(fake_root, "--from", "old_task", "--name", "my_task", source_dir=source)
    assert r.returncode == 1 and "nothing was copied" in r.stderr
    assert f"{source / 'old_task' / 'train.py'}:4: imports the recipe package recipes.other_task" in r.stderr
    assert ":3:" not in r.stderr  # its own package is what a recipe imports
    assert not (fake_root / "recipes" / "my_task").exists()


def test_copy_trains_two_steps_from_another_repo_root(fake_root, tmp_path_factory):
    # One cache (tiny model + embedded data) for the whole pytest session; PYTHONPATH unset: the smoke run
    # puts the copy's repo root first, so `recipes.my_task` is the copy, and recipes.common its links.
    cache = tmp_path_factory.getbasetemp() / "vlm-recipes-cache"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLM_RECIPES_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    # random weights: no pre-training in tests
    r = new_recipe(fake_root, "--from", "blip2_lora_caption", "--name", "my_task", "--smoke", "--",
                   "--model_name_or_path", "tiny:blip2-opt", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "smoke run passed (exit code 0)" in r.stdout and "recipes/my_task is ready" in r.stdout
    out = fake_root / "outputs" / "my_task-smoke"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


def test_a_recipes_dir_not_named_recipes_is_refused_before_copying(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--recipes-dir", str(tmp_path / "mine"), "--source-dir",
                        str(ROOT / "recipes"), "--from", "blip2_lora_caption", "--name", "my_task"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--recipes-dir {tmp_path / 'mine'}: a recipe imports its own modules as recipes.my_task" \
        in r.stderr
    assert not (tmp_path / "mine").exists()


def test_a_name_containing_the_original_one_warns_only_of_files_left_unrenamed(fake_root, tmp_path_factory):
    source = tmp_path_factory.mktemp("src")
    shutil.copytree(SOURCE, source / "blip2_lora_caption", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "blip2_lora_caption" / "notes.cfg").write_text("blip2_lora_caption")  # not a text suffix
    r = new_recipe(fake_root, "--from", "blip2_lora_caption", "--name", "my_blip2_lora_caption",
                   source_dir=source)
    assert r.returncode == 0, r.stderr
    copy = fake_root / "recipes" / "my_blip2_lora_caption"
    assert "from recipes.my_blip2_lora_caption.collator import" in (copy / "train.py").read_text()
    assert [line for line in r.stdout.splitlines() if line.startswith("warning:")] == [
        f"warning: {copy / 'notes.cfg'} still mentions 'blip2_lora_caption' (only .json, .md, .py, .txt, "
        ".yaml, .yml files are rewritten)"]
