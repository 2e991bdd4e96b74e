"""TrainingArguments flags that users pass to the recipes: each does what it says, or is refused up front."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from recipes.common.args import parse_recipe_args
from recipes.common.trainer import RecipeTrainer


def _checkpointing_config(folder: Path) -> Path:
    path = folder / "config.yaml"  # as qlora_vqa's config.yaml sets it
    path.write_text("activation_checkpointing: true\n")
    return path


@pytest.mark.parametrize("flags, expected", [
    ([], True),
    (["--gradient_checkpointing", "false"], False),
    (["--gradient_checkpointing=false"], False),
    (["--gradient-checkpointing", "false"], False),  # argparse's dashed spelling of the same flag
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


class _VisionLanguageLM(LlamaForCausalLM):
    """A causal LM under a name outside transformers' causal-LM table, as every VLM class is."""


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return _VisionLanguageLM(config).eval()


@pytest.mark.parametrize("on_label_positions", [False, True])
def test_label_smoothing_scores_the_next_token(tmp_path, tiny_lm, on_label_positions):
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True,
                             report_to="none")
    trainer = RecipeTrainer(model=tiny_lm, args=args, loss_on_label_positions=on_label_positions)
    with torch.no_grad():
        loss = trainer.compute_loss(tiny_lm, {"input_ids": ids, "labels": labels})
        logits = tiny_lm(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("flag, value", [("--label_smoothing_factor", "0.1"),  # its loss would ignore it
                                         ("--neftune_noise_alpha", "5")])  # a crash once training starts
def test_clip_refuses_flags_of_generative_training(tmp_path, flag, value):
    from recipes.clip_retrieval.train import main

    with pytest.raises(ValueError, match=f"^{flag}: "):
        main([flag, value, "--output_dir", str(tmp_path)])


def test_soft_prompt_evaluation_computes_the_loss(tmp_path):
    # the forward's loss_on_label_positions option is not a label: taken for one, no eval batch "had labels"
    from recipes.common.tiny.models import build_tiny
    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner
    from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

    torch.manual_seed(0)
    model = SoftPromptCaptioner.from_parts(str(build_tiny("clip-vision", tmp_path / "vision")),
                                           str(build_tiny("gpt2", tmp_path / "gpt2"))).eval()
    ids = torch.randint(0, 100, (2, 5))
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids,
              "attention_mask": torch.ones_like(ids), "labels": ids}
    trainer = SoftPromptTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"),
                                                                    use_cpu=True, report_to="none"))
    loss, _, _ = trainer.prediction_step(model, dict(inputs), prediction_loss_only=True)
    with torch.no_grad():
        assert loss is not None and loss.item() == pytest.approx(model(**inputs).loss.item())


def test_report_to_a_logger_that_is_not_installed_is_a_one_line_import_error(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    from recipes.common.run import setup_run

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="tensorboard", use_cpu=True,
                             remove_unused_columns=False)
    with pytest.raises(ImportError, match="^--report_to tensorboard: .*--report_to none"):
        setup_run(args)  # before the model loads
