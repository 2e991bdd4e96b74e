"""Every image-text-to-text family through both chat recipes, as a user runs them: train.py on 1 and on 2 CPU
processes (the same global batch gives the same losses), merge.py, then chat.py on the merged folder, which
answers what the run (adapter + base, the 4-bit base for QLoRA) answers.

18 cells of about 30 s: marked `matrix`, left out of `make test` and run by `make test-families` (CI), in an
environment with torchvision, which four of the families' processors need; without it those cells skip with
a message.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.matrix

FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm", "gemma3", "paligemma", "mllama",
            "internvl")
NEEDS_TORCHVISION = ("llava_onevision", "qwen2_5_vl", "qwen3_vl", "internvl")
RECIPES = {"llava_instruct": "instruct", "qlora_vqa": "vqa"}
QUESTION = "what colour is the shape?"


@pytest.fixture(scope="module")
def data(recipe_env):
    """One folder and model cache for the module (each tiny model is built once), with instruct and vqa
    data."""
    d, env = recipe_env("matrix", "instruct", 24, 16)
    vqa, _ = recipe_env("matrix-vqa", "vqa", 24, 16)
    return {"instruct": d / "synth", "vqa": vqa / "synth"}, d, env


def _launch(config: str, recipe: str, args: list, env: dict, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / config), "--main_process_port", str(port),
           str(ROOT / "recipes" / recipe / "train.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _losses(run) -> list[float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def _chat_cli(model, image, env) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "llava_instruct" / "chat.py"),
                        "--model", str(model), "--image", str(image), "--prompt", QUESTION,
                        "--max_new_tokens", "6"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def _run_answer(run, recipe: str, image) -> str:
    """The greedy answer of the trained run itself (not the merge), through chat.answer, asked as the run
    trained (a qlora_vqa run's --answer_prompt after the question)."""
    from transformers import AutoModelForImageTextToText

    from data_tools.images import load_image
    from data_tools.records import IMAGE_TOKEN
    from recipes.common.chat import chat_encoder, with_answer_prompt
    from recipes.common.merge import load_quantized_run, trained_with
    from recipes.llava_instruct.chat import answer, load

    if recipe == "qlora_vqa":
        model, processor = load_quantized_run(run, AutoModelForImageTextToText)
    else:
        model, processor = load(str(run))
    question = with_answer_prompt(QUESTION, trained_with(run, "answer_prompt"))
    if recipe == "qlora_vqa":  # the reference must ask what the merged folder's chat.py asks
        assert question != QUESTION
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}]
    return answer(model, processor, chat_encoder(processor), turns, load_image(image), max_new_tokens=6)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_train_on_one_and_two_processes_merge_and_chat(data, name, recipe, monkeypatch):
    if name in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"SKIPPED LOUDLY: tiny:{name}'s processor needs torchvision, which is not installed here "
                    "(`make test-families` makes an environment with it)")
    folders, d, env = data
    task = RECIPES[recipe]
    out = d / f"{recipe}-{name}"
    # The random sampler and no LoRA dropout: llava_instruct's modality batches and dropout masks are drawn
    # per process, so only these make 2 x 1 samples the same batches as 1 x 2.
    common = ["--model_name_or_path", f"tiny:{name}", "--train_file", folders[task] / "train.jsonl",
              "--eval_file", folders[task] / "eval.jsonl", "--max_steps", "3", "--logging_steps", "1",
              "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
              "--max_new_tokens", "4", "--eval_max_samples", "4", "--report_to", "none",
              "--lora_dropout", "0", "--train_sampling_strategy", "random", "--shuffled_image_check", "false"]
    port = 29600 + 2 * FAMILIES.index(name) + list(RECIPES).index(recipe) * 20
    one = _launch("cpu.yaml", recipe,
                  [*common, "--per_device_train_batch_size", "2", "--output_dir", out / "one"], env, port)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _launch("multi_cpu.yaml", recipe,
                  [*common, "--per_device_train_batch_size", "1", "--output_dir", out / "two"], env, port + 1)
    assert two.returncode == 0, two.stderr[-4000:]
    metrics = [json.loads((out / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert [(m["world_size"], m["global_step"]) for m in metrics] == [(1, 3), (2, 3)]
    losses = [_losses(out / run) for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4), losses

    r = subprocess.run([sys.executable, str(ROOT / "recipes" / recipe / "merge.py"),
                        "--run", str(out / "one"), "--out", str(out / "merged"), "--dtype", "float32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "merged" / "config.json").exists() and not (out / "merged" / "adapter_config.json").exists()

    image = json.loads((folders[task] / "eval.jsonl").read_text().splitlines()[0])["image"]
    image = folders[task] / image
    merged_answer = _chat_cli(out / "merged", image, env)
    monkeypatch.setenv("VLM_RECIPES_CACHE", env["VLM_RECIPES_CACHE"])  # the run's base is in that cache
    assert merged_answer == _run_answer(out / "one", recipe, image)
