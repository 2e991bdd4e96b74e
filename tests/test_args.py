"""Tests for recipes.common.args: YAML defaults, command-line precedence, bool / list / choice parsing."""

import pytest
from transformers import TrainingArguments

from recipes.common.args import (
    DataArguments,
    FreezeArguments,
    GenerationEvalArguments,
    ModelArguments,
    PeftArguments,
    parse_args,
    recipe_argv,
)
from recipes.common.run import resume_checkpoint

ALL = [ModelArguments, DataArguments, PeftArguments, FreezeArguments, GenerationEvalArguments]


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_config():
    model, data, peft, freeze, gen = parse_args(ALL, [])
    assert model.model_name_or_path is None and model.dtype == "auto" and model.attn_implementation is None
    assert (model.bnb_4bit_quant_type == "nf4" and model.bnb_4bit_use_double_quant is True
            and model.trust_remote_code is False)
    assert data.train_file is None and data.skip_bad_rows is False
    assert (peft.peft_method, peft.lora_r, peft.lora_alpha, peft.lora_dropout) == ("lora", 16, 32, 0.05)
    assert peft.lora_target_modules is None and peft.modules_to_save is None
    assert (freeze.freeze_vision_tower is True and freeze.freeze_bridge is None
            and freeze.freeze_language_model is None)
    assert (gen.num_beams, gen.max_new_tokens, gen.do_sample) == (1, 20, False)


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    config = write_yaml(
        tmp_path,
        "lora_r: 8\nlora_alpha: 16\nlearning_rate: 1e-4\noutput_dir: %s\nfreeze_vision_tower: false\n"
        % (tmp_path / "run"),
    )
    model, peft, freeze, training = parse_args(
        [ModelArguments, PeftArguments, FreezeArguments, TrainingArguments],
        ["--config", config, "--lora_r", "4", "--freeze_vision_tower", "true"],
    )
    assert peft.lora_r == 4  # command line wins
    assert peft.lora_alpha == 16  # from the file
    assert freeze.freeze_vision_tower is True
    # PyYAML reads 1e-4 as a string; argparse converts string defaults with the field's type.
    assert training.learning_rate == pytest.approx(1e-4)
    assert training.output_dir == str(tmp_path / "run")


def test_config_flag_may_come_after_other_flags(tmp_path):
    config = write_yaml(tmp_path, "num_beams: 3\n")
    (gen,) = parse_args([GenerationEvalArguments], ["--max_new_tokens", "5", "--config", config])
    assert (gen.num_beams, gen.max_new_tokens) == (3, 5)


def test_unknown_yaml_key_names_file_line_and_close_match(tmp_path):
    config = write_yaml(tmp_path, "lora_r: 8\nlora_alhpa: 16\n")
    with pytest.raises(ValueError) as error:
        parse_args([PeftArguments], ["--config", config])
    message = str(error.value)
    assert f"{config}:2" in message and "'lora_alhpa'" in message and "'lora_alpha'" in message


def test_yaml_may_set_training_arguments_only_when_parsed(tmp_path):
    config = write_yaml(tmp_path, "learning_rate: 0.001\n")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_args([PeftArguments], ["--config", config])


def test_yaml_choice_is_checked(tmp_path):
    config = write_yaml(tmp_path, "dtype: float64\n")
    with pytest.raises(ValueError, match="dtype"):
        parse_args([ModelArguments], ["--config", config])


@pytest.mark.parametrize("line, expected", [
    ("learning_rate: abc", "learning_rate: 'abc' is not a valid value: expected float."),
    ("lora_r: 8.5", "lora_r: '8.5' is not a valid value: expected int."),
    ("lora_r: [8, 16]", "lora_r: expected one value, got ['8', '16']."),
    ("lora_alpha: {a: 1}", "lora_alpha: expected one value, got {'a': 1}."),
    ("freeze_bridge: maybe", "freeze_bridge: 'maybe' is not a valid value: Truthy value expected"),
    ("freeze_vision_tower: maybe",  # a bool whose default is true: its --no_ flag shares the name
     "freeze_vision_tower: 'maybe' is not a valid value: Truthy value expected"),
    ("dtype: float64", "dtype: 'float64' is not one of ['auto', 'float32', 'bfloat16', 'float16']."),
    ("learning_rate: null", "learning_rate: null is not a value this field takes; give one, or remove"),
])
def test_a_yaml_value_of_the_wrong_type_names_the_file_line_and_key(tmp_path, line, expected):
    config = write_yaml(tmp_path, f"seed: 1\n{line}\n")
    with pytest.raises(ValueError) as error:
        parse_args([ModelArguments, PeftArguments, FreezeArguments, TrainingArguments], ["--config", config])
    assert str(error.value).startswith(f"{config}:2: {expected}"), str(error.value)
    assert not str(error.value).endswith("..")


def test_a_yaml_value_is_read_as_the_same_text_on_the_command_line(tmp_path):
    """YAML 1.1 would read `no` as False, 1.10 as 1.1 and 012345 as an octal number; a flag reads text."""
    config = write_yaml(tmp_path, "eval_strategy: no\nrevision: 1.10\nrun_name: 012345\nlearning_rate: 1e-4\n"
                                  "report_to: [none]\nprocessor_kwargs: {size: {height: 32}}\nbf16: no\n")
    model, training = parse_args([ModelArguments, TrainingArguments], ["--config", config, "--use_cpu"])
    assert (training.eval_strategy, model.revision, training.run_name) == ("no", "1.10", "012345")
    assert training.learning_rate == 1e-4 and training.report_to == [] and training.bf16 is False
    assert model.processor_kwargs == {"size": {"height": 32}}


@pytest.mark.parametrize("text, expected", [
    ("lora_r: 4\nseed: 1\nlora_r: 8\n", ":3: 'lora_r' is set twice (first on line 1); keep one of them."),
    ("seed: 1\nlora_r: [1\n", ":3: not valid YAML: expected ',' or ']', but got '<stream end>'."),
    ("seed: 1\nlora_r: a: b\n", ":2: not valid YAML: mapping values are not allowed here."),
])
def test_a_yaml_file_that_does_not_parse_once_names_the_line(tmp_path, text, expected):
    config = write_yaml(tmp_path, text)
    with pytest.raises(ValueError) as error:
        parse_args([PeftArguments, TrainingArguments], ["--config", config])
    assert str(error.value) == config + expected


def test_yaml_values_are_typed_as_on_the_command_line(tmp_path):
    config = write_yaml(tmp_path, "lora_target_modules: q_proj\nlora_dropout: 0\nfreeze_bridge: 'false'\n"
                        "num_beams: '3'\n")
    peft, freeze, gen = parse_args([PeftArguments, FreezeArguments, GenerationEvalArguments],
                                   ["--config", config])
    assert peft.lora_target_modules == ["q_proj"]  # a list of one name, not a regex
    assert peft.lora_dropout == 0.0 and isinstance(peft.lora_dropout, float)
    assert freeze.freeze_bridge is False and gen.num_beams == 3
    config = write_yaml(tmp_path, "max_length: null\nprompt: null\nmodel_name_or_path: null\n")
    model, data = parse_args([ModelArguments, DataArguments], ["--config", config])
    assert data.max_length is None and data.prompt is None and model.model_name_or_path is None


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_args([ModelArguments], ["--config", str(tmp_path / "nope.yaml")])


def test_yaml_must_be_a_mapping(tmp_path):
    config = write_yaml(tmp_path, "- lora_r\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args([PeftArguments], ["--config", config])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--freeze_vision_tower", "false"], False),
        (["--freeze_vision_tower", "no"], False),
        (["--no_freeze_vision_tower"], False),
        (["--freeze_vision_tower"], True),
        ([], True),
    ],
)
def test_bool_flags(argv, expected):
    (freeze,) = parse_args([FreezeArguments], argv)
    assert freeze.freeze_vision_tower is expected


def test_optional_bool_flags():
    (freeze,) = parse_args([FreezeArguments], ["--freeze_bridge", "false", "--freeze_language_model", "true"])
    assert freeze.freeze_bridge is False and freeze.freeze_language_model is True


def test_bare_bool_flag_and_yaml_bool(tmp_path):
    (data,) = parse_args([DataArguments], ["--skip_bad_rows"])
    assert data.skip_bad_rows is True
    (freeze,) = parse_args([FreezeArguments], ["--config", write_yaml(tmp_path, "freeze_bridge: true\n")])
    assert freeze.freeze_bridge is True


def test_lists_from_command_line_and_yaml(tmp_path):
    argv = ["--lora_target_modules", "q_proj", "v_proj", "--modules_to_save", "multi_modal_projector"]
    (peft,) = parse_args([PeftArguments], argv)
    assert (peft.lora_target_modules == ["q_proj", "v_proj"]
            and peft.modules_to_save == ["multi_modal_projector"])
    config = write_yaml(tmp_path, "lora_target_modules: [k_proj, o_proj]\n")
    (peft,) = parse_args([PeftArguments], ["--config", config])
    assert peft.lora_target_modules == ["k_proj", "o_proj"]
    (peft,) = parse_args([PeftArguments], ["--config", config, "--lora_target_modules", "q_proj"])
    assert peft.lora_target_modules == ["q_proj"]


def test_regex_target_becomes_a_string(tmp_path):
    (peft,) = parse_args([PeftArguments], ["--lora_target_modules", r".*language_model.*\.q_proj"])
    assert peft.lora_target_modules == r".*language_model.*\.q_proj"
    config = write_yaml(tmp_path, "lora_target_modules: '.*text_model.*(q_proj|v_proj)'\n")
    (peft,) = parse_args([PeftArguments], ["--config", config])
    assert peft.lora_target_modules == ".*text_model.*(q_proj|v_proj)"


def test_numbers_optionals_and_choices():
    model, data, gen = parse_args(
        [ModelArguments, DataArguments, GenerationEvalArguments],
        ["--dtype", "bfloat16", "--max_length", "224", "--temperature", "0.7", "--max_train_samples", "10"],
    )
    assert (model.dtype == "bfloat16" and data.max_length == 224 and gen.temperature == 0.7
            and data.max_train_samples == 10)
    with pytest.raises(SystemExit):
        parse_args([ModelArguments], ["--dtype", "float64"])


def test_unknown_command_line_flag_is_an_error():
    with pytest.raises(ValueError, match="^unknown flag --lora_rank. Did you mean '--lora_r'"):
        parse_args([PeftArguments], ["--lora_rank", "4"])
    with pytest.raises(ValueError, match="^unknown flag --lora_rank. Did you mean '--lora_r'"):
        parse_args([PeftArguments], ["--lora_rank=4"])


@pytest.mark.parametrize("argv", [["--max_len", "64"], ["--max_len", "none"], ["--max_len=none"]])
def test_an_abbreviated_flag_is_refused_naming_the_whole_one(argv):
    # argparse would take --max_len for --max_length, past the checks that read flags by name (none, the
    # deprecated names): so abbreviations are refused, each naming the flag it abbreviates.
    with pytest.raises(ValueError, match="^unknown flag --max_len. Did you mean '--max_length'"):
        parse_args([DataArguments], argv)
    assert parse_args([DataArguments], ["--max-length", "none"])[0].max_length is None  # the dashed name


@pytest.mark.parametrize("flag, value, minimum", [
    ("--max_train_samples", "0", 1), ("--max_eval_samples", "-1", 1), ("--max_length", "0", 1),
    ("--eval_max_samples", "0", 1), ("--num_beams", "0", 1),
    ("--max_new_tokens", "0", 1), ("--unfreeze_last_n_vision_layers", "-1", 0),
])
def test_a_count_below_its_minimum_is_an_error(flag, value, minimum):
    with pytest.raises(ValueError, match=f"^{flag[2:]} must be >= {minimum}, got {value}.$"):
        parse_args(ALL, [flag, value])
    parse_args(ALL, [flag, str(minimum)])  # the minimum itself is fine


def test_4bit_and_8bit_together_is_an_error():
    with pytest.raises(ValueError, match="load_in_4bit"):
        parse_args([ModelArguments], ["--load_in_4bit", "--load_in_8bit"])


def test_all_recipe_dataclasses_parse_together_with_training_arguments(tmp_path):
    # Field names must not collide across the dataclasses (argparse would refuse the duplicate flag).
    *_, training = parse_args(ALL + [TrainingArguments], ["--output_dir", str(tmp_path), "--num_beams", "2"])
    assert training.output_dir == str(tmp_path)


def test_resume_last_is_the_newest_complete_checkpoint(tmp_path):
    # 5 < 20 though '5' > '20'; 30: no state; 40: cut
    for step, state in [(5, "{}"), (10, "{}"), (20, "{}"), (30, None), (40, '{"log_hist')]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint name
    (tmp_path / "checkpoint-100").write_text("")  # a file, not a folder
    assert resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-20")
    assert resume_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-20")
    assert resume_checkpoint("true", tmp_path) == str(tmp_path / "checkpoint-20")
    assert resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-20")
    assert resume_checkpoint(None, tmp_path) is None and resume_checkpoint("false", tmp_path) is None
    assert resume_checkpoint(str(tmp_path / "checkpoint-10"), "elsewhere") == str(tmp_path / "checkpoint-10")

    with pytest.raises(FileNotFoundError, match="no such folder"):
        resume_checkpoint(str(tmp_path / "checkpoint-7"), tmp_path)
    for step in (5, 10, 20):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint-N folder in .* \(5 incomplete\)"):
        resume_checkpoint("last", tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N folder"):
        resume_checkpoint("last", tmp_path / "never_ran")
    # 'auto': a job's first start, or one whose only checkpoints were cut while saving, starts afresh
    assert resume_checkpoint("auto", tmp_path) is None
    assert resume_checkpoint("auto", tmp_path / "never_ran") is None


def test_recipe_argv_adds_the_default_config_and_use_cpu_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe_argv(["--lora_r", "8"], "r/config.yaml") == [
        "--config", "r/config.yaml", "--lora_r", "8", "--use_cpu"]
    assert recipe_argv(["--config", "mine.yaml", "--use_cpu"], "r/config.yaml") == [
        "--config", "mine.yaml", "--use_cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert recipe_argv([], "r/config.yaml") == ["--config", "r/config.yaml"]


def test_processor_kwargs_from_json_on_the_command_line_or_a_yaml_mapping(tmp_path):
    size = {"size": {"shortest_edge": 3136, "longest_edge": 401408}}
    (cli,) = parse_args([ModelArguments], ["--processor_kwargs", '{"size": {"shortest_edge": 3136, '
                                           '"longest_edge": 401408}}'])
    config = write_yaml(tmp_path, "processor_kwargs:\n  size:\n    shortest_edge: 3136\n"
                                  "    longest_edge: 401408\n")
    (yaml_,) = parse_args([ModelArguments], ["--config", config])
    assert cli.processor_kwargs == yaml_.processor_kwargs == size
    with pytest.raises(ValueError, match="--processor_kwargs is not valid JSON"):
        parse_args([ModelArguments], ["--processor_kwargs", "{size: 3}"])
    with pytest.raises(ValueError, match=r"--processor_kwargs must be a mapping .*, got \[1\]"):
        parse_args([ModelArguments], ["--processor_kwargs", "[1]"])


def test_none_on_the_command_line_takes_back_a_value_of_a_field_that_may_be_none(tmp_path):
    from recipes.clip_retrieval.train import RetrievalArguments

    config = write_yaml(tmp_path, "max_length: 64\nlora_target_modules: [k_proj]\nfreeze_bridge: true\n"
                                  "wise_ft_alpha: [0.25, 0.5]\nprompt: a photo of\n")
    types = [DataArguments, PeftArguments, FreezeArguments, RetrievalArguments]
    data, peft, freeze, retrieval = parse_args(types, ["--config", config])
    assert (data.max_length, peft.lora_target_modules, freeze.freeze_bridge, retrieval.wise_ft_alpha) == (
        64, ["k_proj"], True, [0.25, 0.5])
    data, peft, freeze, retrieval = parse_args(types, [
        "--config", config, "--max_length", "none", "--lora_target_modules=null", "--freeze_bridge", "None",
        "--wise_ft_alpha", "none", "--prompt", "none"])
    assert (data.max_length, peft.lora_target_modules, freeze.freeze_bridge, retrieval.wise_ft_alpha) == (
        None, None, None, None)
    assert data.prompt == "none"  # text: a prompt may be the word itself
    with pytest.raises(SystemExit):  # a field that may not be None still refuses the word
        parse_args([PeftArguments], ["--lora_r", "none"])
    # Given twice, the last wins as argparse's rule has it; a value then none would keep the value: refused.
    assert parse_args([DataArguments], ["--max_length", "none", "--max_length", "64"])[0].max_length == 64
    with pytest.raises(ValueError, match="^--max_length is given a value and then none: give it once"):
        parse_args([DataArguments], ["--max_length", "64", "--max_length", "none"])


def test_a_config_of_ones_own_keeps_the_columns_the_collators_read(tmp_path):
    from recipes.common.args import parse_recipe_args
    from recipes.common.run import setup_run

    empty = write_yaml(tmp_path, "")
    args = parse_recipe_args(["--config", empty, "--output_dir", str(tmp_path / "run")], empty,
                             (DataArguments, TrainingArguments))
    assert args.training.remove_unused_columns is False  # the Trainer's default, True, drops image paths
    args = parse_recipe_args(["--config", empty, "--output_dir", str(tmp_path / "run"),
                              "--remove_unused_columns", "true"], empty, (DataArguments, TrainingArguments))
    with pytest.raises(ValueError, match="--remove_unused_columns true: the Trainer would drop the columns"):
        setup_run(args.training)


@pytest.mark.parametrize("flags, named", [
    (["--lora_target_modules", "q_proj"], "--lora_target_modules applies"),
    (["--use_dora", "true", "--use_rslora", "true"], "--use_dora, --use_rslora apply"),
    (["--modules_to_save", "lm_head"], "--modules_to_save applies"),
])
def test_lora_options_without_lora_are_refused(flags, named):
    # peft_method none trains without peft: these would be ignored
    with pytest.raises(ValueError, match=f"^{named} to LoRA, which is off"):
        parse_args([PeftArguments], ["--peft_method", "none", *flags])
    assert parse_args([PeftArguments], flags)[0].peft_method == "lora"


def test_a_feature_folder_without_the_feature_cache_is_refused():
    from recipes.common.args import FeatureCacheArguments

    with pytest.raises(ValueError, match="^--vision_feature_dir is used by --cache_vision_features, which "
                                         "is off"):
        parse_args([FeatureCacheArguments], ["--vision_feature_dir", "/tmp/features"])
    assert parse_args([FeatureCacheArguments], ["--vision_feature_dir", "/tmp/f", "--cache_vision_features",
                                                "true"])[0].vision_feature_dir == "/tmp/f"


@pytest.mark.parametrize("recipe, flags, refused", [
    ("blip2_lora_caption", ["--peft_method", "none", "--lora_alpha", "64"], "--lora_alpha applies"),
    # clip_retrieval's config.yaml turns LoRA off: a rank alone would have trained every weight instead
    ("clip_retrieval", ["--lora_r=8", "--lora_dropout", "0.1"], "--lora_r, --lora_dropout apply"),
    ("clip_retrieval", ["--lora-alpha", "8"], "--lora_alpha applies"),  # the parser's dashed alias
    ("clip_retrieval", ["--peft_method", "lora", "--lora_r", "8"], None),
    ("blip2_lora_caption", ["--lora_r", "8"], None),
])
def test_lora_numbers_on_the_command_line_need_lora(recipe, flags, refused):
    from pathlib import Path

    from recipes.common.args import GENERATIVE_ARGUMENTS, parse_recipe_args

    config = Path(__file__).resolve().parent.parent / "recipes" / recipe / "config.yaml"
    types = (*GENERATIVE_ARGUMENTS, TrainingArguments)
    if recipe == "clip_retrieval":
        from recipes.clip_retrieval.train import RetrievalArguments

        types = (*GENERATIVE_ARGUMENTS, RetrievalArguments, TrainingArguments)
    argv = [*flags, "--output_dir", "/nonexistent/out"]
    if refused is None:
        args = parse_recipe_args(argv, config, types)
        assert args.peft.lora_r == 8
    else:
        with pytest.raises(ValueError, match=f"^{refused} to LoRA, which is off"):
            parse_recipe_args(argv, config, types)


@pytest.mark.parametrize("recipe", ["blip2_lora_caption", "clip_retrieval", "llava_instruct", "qlora_vqa",
                                    "soft_prompt_caption"])
def test_a_loss_picked_as_the_best_models_metric_is_minimised(recipe, monkeypatch):
    # The recipes' config.yaml names a metric to maximise and leaves greater_is_better to TrainingArguments,
    # which reads it from the metric's name: set there, a --metric_for_best_model loss kept the worst model.
    import importlib

    train = importlib.import_module(f"recipes.{recipe}.train")

    class Parsed(Exception):
        pass

    def parsed(training, *_):
        raise Parsed(training)

    monkeypatch.setattr(train, "setup_run", parsed)
    for flags, metric, greater in (([], None, True), (["--metric_for_best_model", "loss"], "loss", False)):
        with pytest.raises(Parsed) as e:
            train.main(["--output_dir", "/nonexistent/out", *flags])
        training = e.value.args[0]
        assert metric in (None, training.metric_for_best_model) and training.greater_is_better is greater


def test_a_train_file_alone_needs_eval_strategy_no_which_turns_off_the_best_model(tmp_path):
    from pathlib import Path

    from recipes.common.args import GENERATIVE_ARGUMENTS, FeatureCacheArguments, parse_recipe_args

    config = Path(__file__).resolve().parent.parent / "recipes" / "blip2_lora_caption" / "config.yaml"
    types = (*GENERATIVE_ARGUMENTS, FeatureCacheArguments, TrainingArguments)
    argv = ["--train_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"^--train_file without --eval_file: --eval_strategy epoch"):
        parse_recipe_args(argv, config, types)
    # config.yaml keeps the best evaluation's checkpoint: with no evaluations (and not set by a flag), off
    args = parse_recipe_args([*argv, "--eval_strategy", "no"], config, types)
    assert args.training.eval_strategy == "no" and args.training.load_best_model_at_end is False
    with pytest.raises(ValueError, match="load_best_model_at_end requires the save and eval strategy"):
        parse_recipe_args([*argv, "--eval_strategy=no", "--load_best_model_at_end", "true"], config, types)
