"""TrainingArguments flags that users pass to the recipes: each does what it says, or is refused up front."""

from pathlib import Path

import pytest
from transformers import TrainingArguments

from recipes.common.args import parse_recipe_args


def _checkpointing_config(folder: Path) -> Path:
    path = folder / "config.yaml"  # as qlora_vqa's config.yaml sets it
    path.write_text("activation_checkpointing: true\n")
    return path


@pytest.mark.parametrize("flags, expected", [
    ([], True),
    (["--gradient_checkpointing", "false"], False),
    (["--gradient_checkpointing=false"], False),
    (["--activation_checkpointing", "false"], False),
])
def test_gradient_checkpointing_on_the_command_line_wins_over_the_config_file(tmp_path, flags, expected):
    args = parse_recipe_args([*flags, "--output_dir", str(tmp_path)], _checkpointing_config(tmp_path),
                             (TrainingArguments,))
    assert args.training.activation_checkpointing is expected
    assert args.training.gradient_checkpointing is expected


def test_gradient_checkpointing_and_its_new_name_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="deprecated name of --activation_checkpointing"):
        parse_recipe_args(["--gradient_checkpointing", "true", "--activation_checkpointing", "false",
                           "--output_dir", str(tmp_path)], _checkpointing_config(tmp_path),
                          (TrainingArguments,))
