"""Copy a recipe folder as the starting point of a new recipe, renaming FROM to NAME in its text files.

    python scripts/new_recipe.py --from blip2_lora_caption --name my_task [--recipes-dir recipes] \
[--smoke [-- ARGS]]
    make new-recipe FROM=blip2_lora_caption NAME=my_task          # the same, with --smoke

The copy leaves out __pycache__, outputs and checkpoints. Every occurrence of FROM in its .py, .yaml,
.yml, .md, .txt and .json files becomes NAME (output_dir, launch lines, README title, and the imports of
its own modules, `recipes.FROM.collator` -> `recipes.NAME.collator`), so the copy runs its own code. An
import of another recipe's package (anything but `recipes.common` and `recipes.FROM`) in FROM is reported
as an error and nothing is copied. `--smoke` then trains the copy for 2 steps on the embedded default,
from the repo root the recipes folder is in, writing to `outputs/NAME-smoke` there.
"""

from __future__ import annotations

import argparse
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".json"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "checkpoints", "checkpoint-*")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# A recipe imports recipes.common and its own package, never another recipe's.
RECIPE_IMPORT_RE = re.compile(r"^\s*(?:from|import)\s+recipes\.(?!common\b)(\w+)", re.MULTILINE)
SMOKE_ARGS = ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
              "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy",
              "no", "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "1",
              "--report_to", "none"]


def check_names(source_dir: Path, recipes_dir: Path, src: str, name: str) -> str | None:
    """What is wrong with copying source_dir/src to recipes_dir/name, or None."""
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        return (f"--name {name!r} is not a valid recipe name: use lowercase letters, digits and underscores, "
                f"starting with a letter (e.g. my_task).")
    if recipes_dir.name != "recipes":
        return (f"--recipes-dir {recipes_dir}: a recipe imports its own modules as recipes.{name}.*, so the "
                "copy must go into a folder named recipes (beside recipes/common).")
    if name == "common":
        return "--name common is reserved for the shared code in recipes/common."
    if src == "common":
        return ("--from common: recipes/common is the shared library, not a recipe; copy a recipe such as "
                "blip2_lora_caption.")
    if not (source_dir / src / "train.py").is_file():
        available = sorted(p.parent.name for p in source_dir.glob("*/train.py"))
        return (f"--from {src!r}: no recipe {source_dir / src}/train.py. Recipes there: "
                f"{', '.join(available) or 'none'}.")
    if (recipes_dir / name).exists():
        return (f"--name {name!r}: {recipes_dir / name} already exists; pick another name or remove that "
                "folder.")
    return None


COPY_NOTE = ("> Made with `make new-recipe` from a shipped recipe: what follows, its measured numbers and\n"
             "> its `python -m bench` lines (bench measures the shipped recipes only) are that recipe's\n"
             "> until you rewrite them for your task.\n")


def readme_of_copy(text: str) -> str:
    """The copied README with COPY_NOTE under its title and without its "When you copy it" section."""
    title, _, rest = text.partition("\n")
    if COPY_NOTE in rest:  # a copy of a copy
        return text
    rest = re.sub(r"^## When you copy it\n.*?(?=^## |\Z)", "", rest, flags=re.MULTILINE | re.DOTALL)
    return f"{title}\n\n{COPY_NOTE}{rest}"


def copy_recipe(src_dir: Path, dst_dir: Path, old: str, new: str) -> tuple[list[Path], dict[Path, int]]:
    """Copy src_dir to dst_dir and replace `old` with `new` in file names and text files (the README gets
    `readme_of_copy`); returns (files, renames)."""
    shutil.copytree(src_dir, dst_dir, ignore=IGNORE)
    if (dst_dir / "README.md").is_file():
        readme = dst_dir / "README.md"
        readme.write_text(readme_of_copy(readme.read_text(encoding="utf-8")), encoding="utf-8")
    files, renamed = [], {}
    for path in sorted(p for p in dst_dir.rglob("*") if p.is_file()):
        if old in path.name:
            path = path.rename(path.with_name(path.name.replace(old, new)))
            renamed[path] = 1
        if path.suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8")
                renamed[path] = renamed.get(path, 0) + text.count(old)
        files.append(path)
    return files, renamed


def recipe_imports(src_dir: Path) -> list[str]:
    """Imports of other recipes' packages in a recipe's .py files, as 'file:line: ...'."""
    problems = []
    for path in sorted(src_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in RECIPE_IMPORT_RE.finditer(text):
            if m.group(1) == src_dir.name:
                continue
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{path}:{line}: imports the recipe package recipes.{m.group(1)}; a recipe "
                            f"imports its own modules (recipes.{src_dir.name}.*) and shared code from "
                            "recipes.common, so that a copy runs its own code.")
    return problems


def smoke(dst_dir: Path, name: str, extra: list[str]) -> tuple[int, Path]:
    """Train the copy for 2 steps on the embedded default, from its repo root; returns (exit code,
    output_dir)."""
    root = dst_dir.parent.parent
    out = root / "outputs" / f"{name}-smoke"
    cmd = [sys.executable, str(dst_dir / "train.py"), *SMOKE_ARGS, "--output_dir", str(out), *extra]
    print(f"smoke run: {' '.join(cmd)}", flush=True)
    # The copy's repo root first, so that `recipes.<name>` is the copy wherever the project is installed from.
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=root, env=env).returncode, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="the recipe to copy, e.g. blip2_lora_caption")
    p.add_argument("--name", required=True, help="the new recipe's folder name, e.g. my_task")
    p.add_argument("--recipes-dir", type=Path, default=REPO_ROOT / "recipes",
                   help="where the copy goes (default: recipes/)")
    p.add_argument("--source-dir", type=Path, default=None, help="where FROM is (default: --recipes-dir)")
    p.add_argument("--smoke", action="store_true", help="train the copy for 2 steps on the embedded default")
    p.add_argument("smoke_args", nargs="*", help="after --: more arguments for the smoke run's train.py")
    args = p.parse_args(argv)
    # The folder's name, as the imports and paths to rename spell it: FROM=blip2_lora_caption/ (a shell's
    # completion) or recipes/blip2_lora_caption would rename nothing.
    args.src = Path(args.src).name
    recipes_dir = args.recipes_dir.resolve()
    source_dir = (args.source_dir or args.recipes_dir).resolve()

    error = check_names(source_dir, recipes_dir, args.src, args.name)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problems = recipe_imports(source_dir / args.src)
    if problems:
        print(f"error: a copy of {args.src} would not run unchanged; nothing was copied. Fix the recipe "
              "first:", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in problems), file=sys.stderr)
        return 1

    dst = recipes_dir / args.name
    files, renamed = copy_recipe(source_dir / args.src, dst, args.src, args.name)
    print(f"copied {source_dir / args.src} -> {dst}:")
    for f in files:
        print(f"  {f.relative_to(dst)}"
              + (f"  ({renamed[f]} x {args.src} -> {args.name})" if f in renamed else ""))
    for f in files:
        # NAME may contain FROM (my_qlora_vqa): only a mention outside NAME is one left over
        if args.src.encode() in f.read_bytes().replace(args.name.encode(), b""):
            print(f"warning: {f} still mentions {args.src!r} (only {', '.join(sorted(TEXT_SUFFIXES))} files "
                  "are rewritten)")

    rel = dst.relative_to(recipes_dir.parent)  # e.g. recipes/my_task, as typed from the repo root
    launch = f"accelerate launch --config_file accelerate_configs/cpu.yaml {rel}/train.py"
    if args.smoke:
        code, out = smoke(dst, args.name, args.smoke_args)
        if code != 0:
            print(f"error: the smoke run of {rel}/train.py failed with exit code {code} (output above); "
                  f"the copy stays in {dst} for you to fix.", file=sys.stderr)
            return code
        print(f"smoke run passed (exit code 0): 2 training steps, outputs in {out}")
        print(f"{rel} is ready: edit {rel}/collator.py, config.yaml and README.md, then run {launch}")
    print(f"""next steps:
  {rel}/collator.py   your data format: records -> input_ids, pixel_values, attention_mask, labels
  {rel}/config.yaml   defaults (output_dir, LoRA, learning rate, evaluation metric)
  {rel}/train.py      the model class and the task, if they change
  {rel}/README.md     the task, data format, launch lines and measured numbers
  run: {launch}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
