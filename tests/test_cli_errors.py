"""The recipes' command-line tools end a bad path or option with a one-line error and exit code 2, no
traceback, and write nothing: merge/export, chat, and two recipe options (train.py's data errors are in the
recipes' own tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "merge, run missing": ("recipes/qlora_vqa/merge.py --run {tmp}/none --out {tmp}/out",
                           "none: no such folder"),
    "merge, not a run": ("recipes/blip2_lora_caption/merge.py --run {tmp} --out {tmp}/out",
                         "no adapter_config.json or config.json"),
    "export, run missing": ("recipes/soft_prompt_caption/export.py --run {tmp}/none --out {tmp}/out",
                            "no trained.safetensors"),
    "clip export, run missing": ("recipes/clip_retrieval/merge.py --run {tmp}/none --out {tmp}/out",
                                 "none' does not exist"),
    "chat, image missing": ("recipes/llava_instruct/chat.py --model tiny:llava --image {tmp}/a.png "
                            "--prompt hi", "a.png: field 'image': image file does not exist"),
    "chat, model missing": ("recipes/llava_instruct/chat.py --model {tmp}/none --prompt hi",
                            "none' does not exist"),
    "clip, a negative layer count": ("recipes/clip_retrieval/train.py --output_dir {tmp}/out "
                                     "--unfreeze_last_n_text_layers -1",
                                     "unfreeze_last_n_text_layers must be >= 0, got -1."),
    "llava, a negative word count": ("recipes/llava_instruct/train.py --output_dir {tmp}/out "
                                    "--short_answer_words -1", "short_answer_words must be >= 0, got -1."),
    "llava, a quantized base": ("recipes/llava_instruct/train.py --output_dir {tmp}/out --load_in_4bit true",
                                "--load_in_4bit / --load_in_8bit are not supported by llava_instruct"),
    "soft prompt, a negative length": ("recipes/soft_prompt_caption/train.py --output_dir {tmp}/out "
                                       "--prompt_length -1", "prompt_length must be >= 0, got -1."),
    "chat, Hub id offline": ("recipes/llava_instruct/chat.py --model no-such-org/no-such-model --prompt hi",
                             "could not load 'no-such-org/no-such-model': "),
}


def _error_line(command: str, tmp_path: Path) -> str:
    """The one `error:` line of `command` (run offline, HOME in tmp_path), which must exit with code 2."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, *command.format(tmp=tmp_path).split()], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_path_is_one_line_and_exit_code_2(case, tmp_path):
    command, message = CASES[case]
    assert message in _error_line(command, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".cache") == []


def test_a_checkpoint_folder_without_weights_is_one_line(tmp_path):
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "ckpt")
    error = _error_line("recipes/llava_instruct/chat.py --model {tmp}/ckpt --prompt hi", tmp_path)
    assert f"could not load '{tmp_path}/ckpt': " in error and "model.safetensors" in error, error
    assert "Hub id" not in error  # a local folder: no hint about network access


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed here")
def test_a_model_whose_processor_needs_a_missing_package_is_one_line(tmp_path):
    """A Qwen2.5-VL checkpoint (transformers' own ImportError) and a tiny Qwen3-VL (the builder's), where
    torchvision, which their video processors need, is not installed."""
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig().save_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen" / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen2_5_VLProcessor",
        "image_processor": {"image_processor_type": "Qwen2VLImageProcessor"},
        "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor"}}))
    (tmp_path / "t.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                                    {"from": "gpt", "value": "hello"}]}))
    train = ("recipes/llava_instruct/train.py --output_dir {tmp}/out --train_file {tmp}/t.jsonl "
             "--eval_strategy no --model_name_or_path")
    error = _error_line(f"{train} {{tmp}}/qwen", tmp_path)
    assert error.startswith(f"error: could not load '{tmp_path}/qwen': Qwen2VLVideoProcessor requires the "
                            "Torchvision library"), error
    error = _error_line(f"{train} tiny:qwen3_vl", tmp_path)
    assert error.startswith("error: tiny:qwen3_vl needs torchvision"), error


def test_merging_an_unfinished_run_names_its_newest_checkpoint_and_a_full_one_says_so(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from recipes.common.merge import merge_run

    for step in (3, 12):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no final model: the run did not finish\. Give one of "
                                                r"its checkpoints instead, e\.g\. .*run/checkpoint-12,"):
        merge_run(tmp_path / "run", tmp_path / "out", LlavaForConditionalGeneration)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="trained without LoRA and is already a full checkpoint"):
        merge_run(tmp_path / "full", tmp_path / "out", LlavaForConditionalGeneration)
