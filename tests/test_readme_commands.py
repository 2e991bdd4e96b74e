"""The READMEs' real-data commands, run as a user would run them on public data.

The commands are read from the Markdown (the ```bash blocks of README.md and recipes/*/README.md), not
copied here, so a documented command that fails fails this module. A user's folder is built once per
module in a temp dir: annotation files in the public formats the commands read (COCO captions, Karpathy's
dataset_coco.json / dataset_flickr30k.json, VQA v2 questions + annotations, LLaVA's mix665k JSON, an
image-text JSONL of one's own) next to, not inside, image folders of real JPEGs, laid out as the commands
expect. `recipes/` and `accelerate_configs/` are linked into it (the user's checkout). Each command runs
there; training commands get overrides appended so that they run on the CPU in seconds (tiny models of the
same architectures, 2 steps, no checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("blip2_lora_caption", "clip_retrieval", "llava_instruct", "qlora_vqa", "soft_prompt_caption")
DATA_TOOLS = ("convert", "validate", "clean", "dedup", "split", "check-leakage", "hash")

# Appended to every documented training command: the CPU, seconds, no checkpoints.
FAST = ["--max_steps", "2", "--bf16", "false", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--max_eval_samples", "4"]
TINY = {  # the real checkpoints cannot be downloaded here: tiny models of the same classes
    "blip2_lora_caption": ["--model_name_or_path", "tiny:blip2-opt", "--max_new_tokens", "4"],
    "clip_retrieval": ["--model_name_or_path", "tiny:clip"],
    "llava_instruct": ["--model_name_or_path", "tiny:llava", "--max_new_tokens", "4"],
    "qlora_vqa": ["--model_name_or_path", "tiny:llava", "--max_new_tokens", "4"],
    "soft_prompt_caption": ["--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2",
                            "--max_new_tokens", "4"],
}


# --- the commands, from the Markdown ------------------------------------------------------------------
def bash_blocks(markdown: Path) -> list[str]:
    """The ```bash blocks of a Markdown file (indented ones too, dedented), in order."""
    blocks = []
    for m in re.finditer(r"^([ \t]*)```bash\n(.*?)^[ \t]*```", markdown.read_text(),
                         re.MULTILINE | re.DOTALL):
        indent = len(m.group(1))
        blocks.append("".join(line[indent:] if line[:indent].isspace() else line
                              for line in m.group(2).splitlines(keepends=True)))
    return blocks


def commands(markdown: Path) -> list[str]:
    """Every command line of its bash blocks, continuation lines joined; comment lines kept (#SBATCH)."""
    out = []
    for block in bash_blocks(markdown):
        line = ""
        for raw in block.splitlines():
            line += raw.rstrip()
            if line.endswith("\\"):
                line = line[:-1] + " "
                continue
            if line.strip():
                out.append(" ".join(line.split()))
            line = ""
    return out


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def is_data_tool(command: str) -> bool:
    w = words(command)
    return w[:3] == ["python", "-m", "data_tools"] and len(w) > 3 and w[3] in DATA_TOOLS


def is_real_training(command: str) -> bool:
    w = words(command)
    return w[:2] == ["accelerate", "launch"] and "--train_file" in w


def option(w: list[str], name: str, default=None):
    return w[w.index(name) + 1] if name in w else default


# --- running them -------------------------------------------------------------------------------------
def env_for(tmp: Path) -> dict:
    """The caller's environment (PYTHONPATH, where the project is not installed, passes through), with the
    module's own model cache: tiny models are built once there."""
    return dict(os.environ, VLM_RECIPES_CACHE=str(tmp / "cache"), TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def argv_of(w: list[str]) -> list[str]:
    """`python ...` and `accelerate launch ...` with this interpreter (the user's PATH is not ours)."""
    if w[0] == "python":
        return [sys.executable, *w[1:]]
    if w[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *w[2:]]
    raise AssertionError(f"unexpected command {w}")


def run(w: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv_of(w), cwd=cwd, env=env_for(cwd), capture_output=True, text=True,
                          timeout=timeout, check=False)


def check(p: subprocess.CompletedProcess, command: str) -> None:
    assert p.returncode == 0, (f"documented command failed (exit {p.returncode}):\n  {command}\n"
                               f"--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-6000:]}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_images_resolve(jsonl: Path, root: Path) -> int:
    """Every record's image (when it has one) is a file under `root`; returns the number of images."""
    rows = read_jsonl(jsonl)
    assert rows, f"{jsonl} is empty"
    n = 0
    for row in rows:
        if row.get("image") is not None:
            assert not os.path.isabs(row["image"]) and ".." not in Path(row["image"]).parts, row
            assert (root / row["image"]).is_file(), f"{jsonl}: {row['image']} is not under {root}"
            n += 1
    return n


def run_data_tool(command: str, cwd: Path) -> None:
    """Run one documented data_tools command and check what it wrote."""
    w = words(command)
    check(run(w, cwd, timeout=300), command)
    sub = w[3]
    if sub == "convert":
        out = cwd / option(w, "--out")
        root = cwd / option(w, "--image-root", str(Path(option(w, "--out")).parent))
        assert_images_resolve(out, root)
        rejects = out.parent / out.name.replace(".jsonl", ".rejects.jsonl")
        assert rejects.read_text() == "", f"the public-format files here are all valid: {rejects.read_text()}"
    elif sub == "clean":
        assert (cwd / option(w, "--out")).exists() and (cwd / option(w, "--rejects")).exists()
    elif sub == "dedup":
        out = cwd / option(w, "--out")
        assert_images_resolve(out, out.parent)
        if "--report" in w:
            assert (cwd / option(w, "--report")).exists()
    elif sub == "split":
        names = option(w, "--names", "train,val,test").split(",")
        n_ratios = len(option(w, "--ratios", "0.8,0.1,0.1").split(","))
        out_dir = cwd / option(w, "--out-dir")
        # split writes paths relative to --out-dir: the recipes' default image root for its outputs
        for name in names[:n_ratios]:
            assert_images_resolve(out_dir / f"{name}.jsonl", out_dir)


def training_argv(command: str, recipe: str) -> list[str]:
    """The documented command with the CPU overrides: accelerate_configs/cpu.yaml for the GPU config (no GPU
    in the tests), tiny models, 2 steps; the flags appended win over the documented ones."""
    w = words(command)
    assert f"recipes/{recipe}/train.py" in w, command
    config = option(w, "--config_file")
    assert config is not None and (ROOT / config).is_file(), command
    w[w.index("--config_file") + 1] = "accelerate_configs/cpu.yaml"
    return [*w, *TINY[recipe], *FAST]


# --- the user's folder ---------------------------------------------------------------------------------
def photo(path: Path, seed: int, size: int = 64) -> None:
    """A small JPEG unlike the others (a random 8x8 colour grid, scaled up): no two are near duplicates."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, "RGB").resize((size, size), Image.NEAREST).save(path, quality=90)


def sentences(i: int, k: int = 2) -> list[str]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    return [f"a {colours[(i + j) % 6]} square next to a {colours[(i + j + 1) % 6]} one" for j in range(k)]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def build_layout(d: Path) -> None:
    seed = iter(range(10_000))
    for name in ("recipes", "accelerate_configs"):  # the user's checkout
        (d / name).symlink_to(ROOT / name, target_is_directory=True)

    # Own data (README "Data tools"): image-text rows, paths relative to data/; img/11.jpg copies img/0.jpg.
    rows = []
    for i in range(12):
        if i < 11:
            photo(d / "data" / "img" / f"{i}.jpg", next(seed))
        rows.append({"image_path": f"img/{i}.jpg", "text": sentences(i, 1)[0]})
    (d / "data" / "img" / "11.jpg").write_bytes((d / "data" / "img" / "0.jpg").read_bytes())
    (d / "data" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # COCO 2017 captions: annotations at the top, images in coco/train2017.
    ids = [9, 25, 30, 34, 36, 42]
    for i in ids:
        photo(d / "coco" / "train2017" / f"{i:012d}.jpg", next(seed))
    write_json(d / "captions_train2017.json", {
        "info": {"description": "COCO 2017 Dataset"}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 64, "width": 64} for i in ids],
        "annotations": [{"image_id": i, "id": 100 * i + j, "caption": c + "\n"}
                        for i in ids for j, c in enumerate(sentences(i, 3))],
    })

    # COCO 2014 images (Karpathy's COCO splits and VQA v2): coco/train2014, coco/val2014.
    coco2014 = {"train2014": [9, 25, 30, 34, 36, 42, 49, 61], "val2014": [42_000 + k for k in range(8)]}
    for folder, image_ids in coco2014.items():
        for i in image_ids:
            photo(d / "coco" / folder / f"COCO_{folder}_{i:012d}.jpg", next(seed))
    karpathy_split = {"train2014": ["train"] * 6 + ["restval"] * 2, "val2014": ["val"] * 4 + ["test"] * 4}
    images = []
    for folder, image_ids in coco2014.items():
        for i, split in zip(image_ids, karpathy_split[folder]):
            images.append({"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "split": split,
                           "cocoid": i, "imgid": len(images), "sentids": [0, 1],
                           "sentences": [{"raw": s, "tokens": s.split(), "imgid": len(images), "sentid": 0}
                                         for s in sentences(i)]})
    write_json(d / "dataset_coco.json", {"dataset": "coco", "images": images})

    # Flickr30k, Karpathy's splits: no filepath; images in flickr30k-images.
    images = []
    for k, split in enumerate(["train"] * 6 + ["val"] * 3 + ["test"] * 3):
        name = f"{1_000_092_795 + k}.jpg"
        photo(d / "flickr30k-images" / name, next(seed))
        images.append({"filename": name, "split": split, "imgid": k, "sentids": [0, 1],
                       "sentences": [{"raw": s, "tokens": s.split(), "imgid": k, "sentid": 0}
                                     for s in sentences(k)]})
    write_json(d / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": images})

    # VQA v2: questions and annotations files per split, images in coco/<split>2014 (above).
    answer_words = ["yes", "no", "2", "red", "square"]
    for folder, image_ids in coco2014.items():
        questions, annotations = [], []
        for i in image_ids:
            for q in range(2):
                qid = i * 1000 + q
                answer = answer_words[(i + q) % 5]
                questions.append({"image_id": i, "question": f"what is in the picture {q}?",
                                  "question_id": qid})
                annotations.append({
                    "question_type": "what is", "multiple_choice_answer": answer, "image_id": i,
                    "answer_type": "yes/no" if answer in ("yes", "no") else "other", "question_id": qid,
                    "answers": [{"answer": answer if a < 8 else "blue", "answer_confidence": "yes",
                                 "answer_id": a + 1} for a in range(10)],
                })
        common = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": folder}
        write_json(d / f"v2_OpenEnded_mscoco_{folder}_questions.json",
                   {**common, "task_type": "Open-Ended", "questions": questions})
        write_json(d / f"v2_mscoco_{folder}_annotations.json", {**common, "annotations": annotations})

    # LLaVA-1.5 mix665k: the JSON at the top, its images under data/llava/{coco/train2017,gqa/images}
    # (LLaVA's data folder); two text-only conversations first (split with seed 0 puts the last row in val).
    rows = [{"id": f"text-{k}", "model": "", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]} for k in range(2)]
    for k in range(30):
        image = f"coco/train2017/{k:012d}.jpg" if k < 20 else f"gqa/images/{2_300_000 + k}.jpg"
        photo(d / "data" / "llava" / image, next(seed))
        rows.append({"id": f"{k:012d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat colours are the squares?"},
            {"from": "gpt", "value": sentences(k, 1)[0]},
            {"from": "human", "value": "How many squares?"}, {"from": "gpt", "value": "Two."}]})
    write_json(d / "llava_v1_5_mix665k.json", rows)

    photo(d / "photo.jpg", next(seed))  # clip_retrieval's search.py --image photo.jpg


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user")
    build_layout(d)
    return d


# --- the tests -----------------------------------------------------------------------------------------
def test_commands_are_found():
    """Each README still documents the commands this module runs (else it would pass by running nothing)."""
    main = commands(ROOT / "README.md")
    assert {words(c)[3] for c in main if is_data_tool(c)} >= {"convert", "validate", "clean", "dedup",
                                                              "split", "check-leakage", "hash"}
    assert "make eval" in " ".join(main)
    for recipe in RECIPES:
        found = commands(ROOT / "recipes" / recipe / "README.md")
        assert sum(map(is_real_training, found)) == 1, recipe
        assert any(words(c)[3] == "convert" for c in found if is_data_tool(c)), recipe
    for readme in [ROOT / "README.md", *(ROOT / "recipes" / r / "README.md" for r in RECIPES)]:
        for block in bash_blocks(readme):
            lines = block.splitlines()
            if any(line.startswith("python -m data_tools ") or "--train_file" in line for line in lines):
                # copyable: the lines of a real-data block fit 110 columns
                assert [line for line in lines if len(line) > 110] == [], readme


def test_main_readme_data_tools(user):
    """README "Data tools": validate, clean, dedup, split, check-leakage on one's own image-text JSONL, then
    convert + validate of COCO captions against coco/train2017, then the hash shards merged by dedup."""
    found = [c for c in commands(ROOT / "README.md") if is_data_tool(c)]
    shards = None
    for c in commands(ROOT / "README.md"):
        if c.startswith("#SBATCH --array="):
            lo, hi = map(int, c.split("=", 1)[1].split("-"))
            shards = range(lo, hi + 1)
    for c in found:
        if "$SLURM_ARRAY_TASK_ID" in c:
            # one job of the array per shard; in-process, not 64 interpreters
            from data_tools.__main__ import main as data_tools_main

            assert shards is not None, "the hash line has no #SBATCH --array above it"
            cwd = Path.cwd()
            os.chdir(user)
            try:
                for i in shards:
                    argv = words(c.replace("$SLURM_ARRAY_TASK_ID", str(i)))[3:]
                    assert data_tools_main(argv) == 0, c
            finally:
                os.chdir(cwd)
            continue
        run_data_tool(c, user)
    data = user / "data"
    # 12 rows, one a copy of another's image: dedup merges them, split keeps 11 images apart
    assert len(read_jsonl(data / "dedup.jsonl")) == 11
    assert sum(len(read_jsonl(data / f"{s}.jsonl")) for s in ("train", "val", "test")) == 11
    assert assert_images_resolve(data / "coco" / "train.jsonl", user / "coco" / "train2017") == 6


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_readme_real_data(user, recipe):
    """A recipe README's real-data block: its data_tools lines, then its training line (CPU overrides)."""
    found = commands(ROOT / "recipes" / recipe / "README.md")
    for c in found:
        if is_data_tool(c):
            run_data_tool(c, user)
    (train,) = [c for c in found if is_real_training(c)]
    w = words(train)
    root = user / option(w, "--image_root", ".")
    for flag in ("--train_file", "--eval_file", "--test_file"):
        if flag in w:
            path = user / option(w, flag)
            # each file's images under the run's image root (default: the file's own folder)
            assert assert_images_resolve(path, root if "--image_root" in w else path.parent) > 0, flag
    p = run(training_argv(train, recipe), user)
    check(p, train)
    out = user / "outputs" / recipe
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_file"] == str((user / option(w, "--train_file")).resolve())
    assert metrics["heldout"] == ("test" if "--test_file" in w else "val")
    assert metrics["global_step"] == 2
    assert (out / "predictions").is_dir()
    if recipe == "clip_retrieval":
        search_commands(found, user)


def search_commands(found: list[str], user: Path) -> None:
    """clip_retrieval's embed.py on the val file of the run, then search.py by text and by image."""
    embed = [c for c in found if "recipes/clip_retrieval/embed.py" in c]
    search = [c for c in found if "recipes/clip_retrieval/search.py" in c]
    assert len(embed) == 1 and len(search) == 2
    w = words(embed[0])
    if not (user / option(w, "--model")).is_dir():
        pytest.fail(f"{option(w, '--model')} was not written by the training run: {embed[0]}")
    check(run(w, user), embed[0])
    for c in search:
        check(run(words(c), user), c)


def test_make_eval(user):
    """`make eval` (= `python -m eval report --outputs outputs`, the Makefile's recipe) on the runs above:
    a report and a gallery with the images in every run folder."""
    assert "make eval" in " ".join(commands(ROOT / "README.md"))
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile[makefile.index("\neval:"):].split("\n\n")[0]
    assert "-m eval report $(if $(RUN),$(RUN),--outputs $(OUT))" in rule, rule
    runs = sorted(p.parent.name for p in (user / "outputs").glob("*/metrics.json"))
    if not runs:
        pytest.skip("no training run in this session (run the whole module)")
    p = run(["python", "-m", "eval", "report", "--outputs", "outputs"], user)
    check(p, "make eval")
    for recipe in runs:
        assert (user / "outputs" / recipe / "report.md").is_file(), recipe
        gallery = (user / "outputs" / recipe / "gallery.html").read_text()
        assert "(image unreadable)" not in gallery, recipe
