"""clip_retrieval records --special_text in run.json, as the chat recipes do: a resume with other allowed
strings (other rows kept) is refused by the run.json check, and the run says what its data could hold."""

import json

import pytest

from recipes.common.run import check_same_run

COMMON = ["--report_to", "none", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
          "--load_best_model_at_end", "false", "--per_device_train_batch_size", "4", "--use_cpu", "true",
          "--max_eval_samples", "8"]


def test_clip_retrieval_records_special_text_and_a_resume_with_other_ones_is_refused(tmp_path):
    from recipes.clip_retrieval.train import main

    out = tmp_path / "out"
    main(["--model_name_or_path", "tiny:clip", *COMMON, "--output_dir", str(out),
          "--special_text", "<|endoftext|>"])
    started = json.loads((out / "run.json").read_text())
    assert started["special_text"] == ["<|endoftext|>"]
    with pytest.raises(ValueError, match=r"special_text \['<\|endoftext\|>'\] -> None"):
        check_same_run(out, str(out / "checkpoint-1"), {**started, "special_text": None}, write=False)


@pytest.mark.parametrize("recipe, flags", [
    ("blip2_lora_caption", ["--model_name_or_path", "tiny:blip2-opt"]),
    ("soft_prompt_caption", ["--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2"]),
])
def test_the_captioning_recipes_record_special_text(tmp_path, recipe, flags):
    import importlib

    main = importlib.import_module(f"recipes.{recipe}.train").main
    out = tmp_path / "out"
    main([*flags, *COMMON, "--output_dir", str(out), "--special_text", "<|endoftext|>" if "gpt2" in flags[-1]
          else "</s>", "--eval_max_samples", "2"])
    assert json.loads((out / "run.json").read_text())["special_text"] == [
        "<|endoftext|>" if recipe == "soft_prompt_caption" else "</s>"]
