"""soft_prompt_caption options that cannot apply are refused before anything is loaded, not ignored."""

import pytest

from recipes.soft_prompt_caption import train

# Were an option let through, the run would be short: the tests fail fast on code that ignores it.
SHORT = ["--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2", "--report_to", "none",
         "--max_steps", "1", "--max_train_samples", "4", "--eval_strategy", "no", "--save_strategy", "no",
         "--load_best_model_at_end", "false", "--max_eval_samples", "2"]


def test_prompt_init_text_without_a_soft_prompt_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt_init_text 'a picture of' needs a soft prompt"):
        train.main([*SHORT, "--output_dir", str(tmp_path), "--prompt_length", "0",
                    "--prompt_init_text", "a picture of"])


def test_trust_remote_code_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--trust_remote_code is not supported by soft_prompt_caption"):
        train.main([*SHORT, "--output_dir", str(tmp_path), "--trust_remote_code", "true"])


@pytest.mark.parametrize("flags", [["--lora_target_modules", "c_attn"], ["--use_dora", "true"],
                                   ["--modules_to_save", "language_model.lm_head", "--use_rslora", "true"]])
def test_lora_options_without_lora_are_refused(tmp_path, flags):
    named = ", ".join(f for f in flags if f.startswith("--"))
    with pytest.raises(ValueError, match=f"^{named} appl(y|ies) to LoRA, which is off"):
        train.main([*SHORT, "--output_dir", str(tmp_path), *flags])
