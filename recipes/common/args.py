"""The recipes' argument dataclasses and `parse_args`: `--config file.yaml` sets defaults (keys are field
names, TrainingArguments' too), command-line flags win."""

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace, UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser


def arg(default, help: str):
    """A dataclass field with its --help text; a list default is copied for each instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def did_you_mean(name: str, choices, cutoff: float = 0.6) -> str:
    """' Did you mean 'a' or 'b'?' for up to 3 `choices` close to a misspelt `name`, else ''."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def check_at_least(args, minimum: int, *names: str) -> None:
    """Refuse a count option below `minimum` (None: unset): it would run on less than asked
    (--max_train_samples 0 reads one row)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}.")


@dataclass
class ModelArguments:
    """Which checkpoint to load and how (dtype, attention kernel, quantization)."""

    model_name_or_path: str | None = arg(
        None, "Hub id or local path of the checkpoint; None = the recipe's embedded tiny model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "dtype to load the weights in; 'auto' = bfloat16 where CUDA is available (float16 on a GPU "
        "without bf16), else float32.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = arg(
        None, "Attention kernel; default: the model's own choice (sdpa where the architecture has it, "
        "e.g. not Gemma 2, which needs eager).")
    load_in_4bit: bool = arg(False, "Load the weights 4-bit quantized (QLoRA; needs bitsandbytes).")
    load_in_8bit: bool = arg(False, "Load the weights 8-bit quantized (needs bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = arg("nf4", "4-bit quantization data type.")
    bnb_4bit_use_double_quant: bool = arg(
        True, "Also quantize the 4-bit quantization constants (saves ~0.4 bit per weight).")
    trust_remote_code: bool = arg(
        False, "Allow running modelling code shipped with the checkpoint. Only for sources you trust.")
    revision: str | None = arg(
        None, "Branch, tag or commit of the checkpoint on the Hub (soft_prompt_caption: of both bases). "
        "Recorded with the run (run.json, adapter_config.json): merge, export, WiSE-FT and serve load the "
        "base at it.")
    processor_kwargs: dict | str | None = arg(
        None, "Options of the checkpoint's processor, saved with the run for merge, serve and chat: a YAML "
        "mapping, or JSON on the command line. E.g. Qwen2.5-VL's image token count, a token per 28 x 28 "
        "pixels: '{\"size\": {\"shortest_edge\": 3136, \"longest_edge\": 401408}}' (4 to 512 tokens); "
        "SmolVLM's tile size: '{\"size\": {\"longest_edge\": 768}}'.")

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set: choose one of them.")
        if isinstance(self.processor_kwargs, str):
            try:
                self.processor_kwargs = json.loads(self.processor_kwargs)
            except ValueError as e:
                raise ValueError(f"--processor_kwargs is not valid JSON: {e}.") from None
        if self.processor_kwargs is not None and not isinstance(self.processor_kwargs, dict):
            raise ValueError(f"--processor_kwargs must be a mapping of option names to values, got "
                             f"{self.processor_kwargs!r}.")


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how long a sample may be."""

    train_file: str | None = arg(None, "Training JSONL file; None = the embedded synthetic data set.")
    eval_file: str | None = arg(
        None, "Validation JSONL file: evaluations during training and the best checkpoint; None = the "
        "embedded data set's val split.")
    test_file: str | None = arg(
        None, "Test JSONL file, seen by neither training nor checkpoint selection: the headline "
        "before/after numbers; None = the embedded data set's test split (with your own --train_file: "
        "none, and the validation file gives them).")
    image_root: str | None = arg(
        None, "Folder the records' image paths are relative to (train and eval files), e.g. "
        "coco/train2017; None = each JSONL file's own folder. Paths that leave it are refused.")
    check_images: Literal["header", "decode", "none"] = arg(
        "header", "Before the first step, check every image: 'header' (it exists, its header reads, its "
        "size is within limits, it is not cut off; fast), 'decode' (decode each one; slow), 'none'. The "
        "eval and test images are decoded unless 'none' (scoring opens each). A bad image is an error naming "
        "file:line, or a counted reject with --skip_bad_rows.")
    max_length: int | None = arg(
        128, "Length budget of a sample in tokens, image / query tokens included. Over it, a caption is "
        "cut, a conversation is cut after its last whole exchange that fits (CLIP: the text is cut before "
        "its eos); a sample with no room left is dropped. The logged length report counts both. none (in "
        "YAML: null) = no budget; CLIP: the text tower's length.")
    skip_bad_rows: bool = arg(
        False, "Drop invalid rows and rows whose image fails --check_images (chat recipes: or that the "
        "processor cannot encode), counted, each written with its reason to <output_dir>/rejects/, instead "
        "of stopping.")
    max_train_samples: int | None = arg(None, "Read at most this many rows of the training file.")
    max_eval_samples: int | None = arg(
        None, "Use at most this many records of the eval and test files: rows, or for caption and retrieval "
        "images (each with all its captions).")
    prompt: str | None = arg(
        None, "Text prompt the caption continues, e.g. 'a photo of'; None = the recipe's default.")
    lang: str = arg(
        "en", "Language of the texts: zh, ja, th, ... are scored on characters; the embedded default is "
        "made in it.")
    special_text: list[str] | None = arg(
        None, "Special strings of the tokenizer that the texts hold on purpose, read as its control tokens, "
        "e.g. Qwen2-VL's grounding tokens '<|object_ref_start|>' '<|object_ref_end|>' '<|box_start|>' "
        "'<|box_end|>'. A text holding any other special string (</s>, <|im_start|>, ...) is a bad row.")

    def __post_init__(self):
        check_at_least(self, 1, "max_length", "max_train_samples", "max_eval_samples")


_REGEX_CHARS = re.compile(r"[.*+?^$()\[\]{}|\\]")


def _lora_off(flags: list[str]) -> ValueError:
    return ValueError(f"{', '.join(flags)} appl{'ies' if len(flags) == 1 else 'y'} to LoRA, which is off "
                      "(--peft_method none): add --peft_method lora, or leave them out.")


@dataclass
class PeftArguments:
    """Parameter-efficient fine-tuning (LoRA) settings."""

    peft_method: Literal["lora", "none"] = arg(
        "lora", "'lora' trains low-rank adapters; 'none' trains the unfrozen weights directly.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = arg(
        None, "Module names to wrap with LoRA (e.g. q_proj v_proj), or one regular expression matched "
        "against full module names, or 'all-linear'; None = the architecture's default (every linear "
        "layer of a generative model's language model, the attention projections of an encoder).")
    modules_to_save: list[str] | None = arg(
        None, "Modules trained in full and saved next to the adapter, e.g. multi_modal_projector.")
    use_dora: bool = arg(False, "DoRA: a learned magnitude per output feature beside the low-rank direction "
                         "update (Liu et al., 2024); merges like LoRA.")
    use_rslora: bool = arg(False, "Scale by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r "
                           "(rank-stabilized LoRA, Kalajdzievski, 2023): for large ranks.")

    def __post_init__(self):
        names = ("lora_target_modules", "modules_to_save", "use_dora", "use_rslora")
        lora_only = [f"--{name}" for name in names if getattr(self, name)]
        if lora_only and self.peft_method == "none":
            raise _lora_off(lora_only)
        # A regex flag arrives as a one-element list (nargs="+"); peft reads a regex from a plain string.
        targets = self.lora_target_modules
        if isinstance(targets, list) and len(targets) == 1 and (
                _REGEX_CHARS.search(targets[0]) or targets[0] == "all-linear"):
            self.lora_target_modules = targets[0]


@dataclass
class FreezeArguments:
    """Which parts of the model train; None leaves a part as it is (frozen under LoRA, trained without)."""

    freeze_vision_tower: bool = arg(True, "Freeze the vision encoder.")
    unfreeze_last_n_vision_layers: int = arg(
        0, "With a frozen vision tower, still train its last N encoder layers (the last N it actually uses, "
        "in the order they run: Mllama's global encoder last).")
    freeze_bridge: bool | None = arg(
        None, "Freeze the vision-language bridge (BLIP-2 Q-Former + projection, LLaVA projector); None = "
        "leave it as it is (frozen under LoRA, trained without); recipes set it in config.yaml.")
    freeze_language_model: bool | None = arg(
        None, "Freeze the language model (CLIP: the text tower) except its LoRA weights; None = frozen "
        "with LoRA, trained without.")

    def __post_init__(self):
        check_at_least(self, 0, "unfreeze_last_n_vision_layers")


@dataclass
class LearningRateArguments:
    """A learning rate per component of the model (the optimizer's parameter groups)."""

    vision_lr: float | None = arg(None, "Learning rate of the vision tower; None = learning_rate.")
    bridge_lr: float | None = arg(None, "Learning rate of the bridge; None = learning_rate.")
    lm_lr: float | None = arg(None, "Learning rate of the language model / text tower; None = learning_rate.")


@dataclass
class LossArguments:
    """How the generative recipes compute their loss."""

    loss_on_label_positions: bool = arg(
        False, "Compute the LM's logits and loss at the label (answer, caption) positions only: the same "
        "loss with less LM-head work and memory (recipes/common/losses.py).")


@dataclass
class FeatureCacheArguments:
    """Cached outputs of a frozen vision tower (blip2_lora_caption, soft_prompt_caption)."""

    cache_vision_features: bool = arg(
        False, "With a frozen vision tower, run it once per image before training and train on its stored "
        "output (recipes/common/feature_cache.py).")
    vision_feature_dir: str | None = arg(
        None, "Where the cached features go (a subfolder per model, processor and image set, reused by "
        "later runs); None = <output_dir>/vision_features.")

    def __post_init__(self):
        if self.vision_feature_dir is not None and not self.cache_vision_features:
            raise ValueError("--vision_feature_dir is used by --cache_vision_features, which is off: add "
                             "--cache_vision_features true, or leave it out.")


@dataclass
class GenerationEvalArguments:
    """Decoding settings of the generation-based evaluation (captioning, VQA, instruction following)."""

    num_beams: int = arg(1, "Beam width; 1 = greedy (or sampling with do_sample).")
    max_new_tokens: int = arg(20, "Maximum number of generated tokens per sample.")
    do_sample: bool = arg(False, "Sample instead of greedy / beam decoding.")
    temperature: float | None = arg(None, "Sampling temperature; None = the model's default.")
    top_p: float | None = arg(None, "Nucleus sampling threshold; None = the model's default.")
    eval_max_samples: int | None = arg(
        None, "Generate for at most this many records of the eval and of the test data (generation is slow); "
        "the loss evaluation still takes every eval sample. --max_eval_samples cuts the files for both.")
    shuffled_image_check: bool = arg(
        False, "After training, evaluate again with each eval image swapped for another one: a model that "
        "looks at the image scores lower; one that answers from the text alone scores the same.")

    def __post_init__(self):
        check_at_least(self, 1, "num_beams", "max_new_tokens", "eval_max_samples")


@dataclass
class EarlyStoppingArguments:
    """Stopping when the evaluations stop improving (transformers' EarlyStoppingCallback)."""

    early_stopping_patience: int | None = arg(
        None, "Stop after this many evaluations in a row that do not beat the best --metric_for_best_model "
        "by more than --early_stopping_threshold; None = train to the end.")
    early_stopping_threshold: float = arg(0.0, "How much an evaluation must beat the best by to count.")

    def __post_init__(self):
        check_at_least(self, 1, "early_stopping_patience")


# What every generative recipe parses (then its own dataclasses, and TrainingArguments last).
GENERATIVE_ARGUMENTS = (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments,
                        LossArguments, GenerationEvalArguments, EarlyStoppingArguments)


def _yaml_keys(path: Path, text: str) -> dict[str, tuple[int, yaml.Node]]:
    """The line and value node of each top-level key; a key given twice is refused (YAML keeps the last)."""
    node = yaml.compose(text)
    keys = {}
    for key, value in node.value if isinstance(node, yaml.MappingNode) else []:
        if key.value in keys:
            raise ValueError(f"{path}:{key.start_mark.line + 1}: {key.value!r} is set twice (first on line "
                             f"{keys[key.value][0]}); keep one of them.")
        keys[key.value] = key.start_mark.line + 1, value
    return keys


def _flag_text(node: yaml.Node, parsed):
    """A YAML value as the text its flag would get (YAML 1.1 reads `no` as False, 1.10 as 1.1, 012 as 10);
    a plain null is None, a list goes item by item, a mapping stays as YAML reads it."""
    if isinstance(node, yaml.ScalarNode):
        return None if node.style is None and node.value in ("", "~", "null", "Null", "NULL") else node.value
    if isinstance(node, yaml.SequenceNode):
        return [_flag_text(item, value) for item, value in zip(node.value, parsed)]
    return parsed


def _typed(action: argparse.Action, value, where: str, hint):
    """`value` (`_flag_text`) converted and checked as its flag would be on the command line (argparse
    checks only those); null, a list or a mapping only where the field's type `hint` takes one."""
    kinds = {get_origin(option) or option for option in _options(hint)}
    if value is None and type(None) not in kinds:
        raise ValueError(f"{where}: null is not a value this field takes; give one, or remove the line.")
    listed = action.nargs in ("+", "*")
    for shape in (dict, list):
        if isinstance(value, shape) and shape not in kinds and not (shape is list and listed):
            raise ValueError(f"{where}: expected one value, got {value!r}.")
    if value is None or isinstance(value, dict) or action.type is None:
        return value
    if isinstance(value, list) and not listed:
        return value  # a list for a field read from one string (report_to, fsdp): the field takes it as is
    items = value if isinstance(value, list) else [value]
    try:
        items = [action.type(item) for item in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        expected = str(e) if isinstance(e, argparse.ArgumentTypeError) else f"expected {action.type.__name__}"
        raise ValueError(f"{where}: {value!r} is not a valid value: {expected.rstrip('.')}.") from None
    for item in items:
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: {item!r} is not one of {list(action.choices)}.")
    return items if listed else items[0]


def load_yaml_config(path: str | Path, actions: dict[str, argparse.Action], hints: dict[str, object]) -> dict:
    """The defaults a YAML file sets, by argument name, each read as its flag would read it (`hints`: the
    fields' type hints); errors name the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of 'field: value' lines at the top level, got "
                         f"{type(values).__name__}.")
    keys = _yaml_keys(path, text)
    for key in values:
        if key not in actions:
            line = keys[key][0] if key in keys else "?"
            raise ValueError(f"{path}:{line}: unknown key {key!r}.{did_you_mean(str(key), actions)} Keys "
                             "must be argument names (see --help); fix or remove the line.")
    out = {}
    for key, parsed in values.items():
        line, node = keys[key]
        out[key] = _typed(actions[key], _flag_text(node, parsed), f"{path}:{line}: {key}", hints[key])
    return out


def _options(hint) -> tuple:
    """The types a field's hint allows: (int, NoneType) for `int | None`."""
    return get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)


def _command_line_nulls(argv: list[str], actions: dict[str, argparse.Action],
                        hints: dict[str, object]) -> tuple[list[str], dict[str, None]]:
    """Take `--name none` (or null) out of `argv` as a None default, for a field that may be None and is not
    text: it takes back a config.yaml value (--max_length none)."""
    nullable = {flag: name for name, action in actions.items() if type(None) in _options(hints[name])
                and str not in _options(hints[name]) for flag in action.option_strings}
    rest, nulls, valued, i = [], {}, set(), 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if flag in nullable and value in ("none", "None", "null"):
            if nullable[flag] in valued:  # argparse's last-wins would keep the value: refused, not kept
                raise ValueError(f"{flag} is given a value and then {value}: give it once.")
            nulls[nullable[flag]] = None
            i += 1 if eq else 2
        else:
            if flag in nullable:
                valued.add(nullable[flag])
            rest.append(argv[i])
            i += 1
    return rest, nulls


# TrainingArguments' deprecated names and their replacements; it reads an old name only if the new is unset.
RENAMED = {"gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def _given(argv: list[str]) -> set[str]:
    """The field names `argv`'s flags set (`--lora-r`, the parser's dashed alias, is lora_r)."""
    return {a.split("=", 1)[0].removeprefix("--").replace("-", "_") for a in argv if a.startswith("--")}


def _old_names_win(argv: list[str], values: dict, actions: dict[str, argparse.Action]) -> None:
    """A deprecated name on the command line drops its new name from the config file's `values`, which
    TrainingArguments would silently keep; both names on the command line are refused."""
    given = _given(argv)
    for old, new in RENAMED.items():
        if old in given and new in given:
            raise ValueError(f"--{old} is the deprecated name of --{new}: give one of them.")
        if old in given and old in actions:
            values.pop(new, None)


def _no_evaluations_no_best_model(argv: list[str], values: dict) -> None:
    """`--eval_strategy no` on the command line drops the config file's load_best_model_at_end (there is no
    best evaluation to keep, and TrainingArguments would refuse the pair) unless the command line sets it."""
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if flag in ("--eval_strategy", "--eval-strategy") and value == "no" and (
                "load_best_model_at_end" not in _given(argv)):
            values.pop("load_best_model_at_end", None)


def _check_flags(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated flags (--max_len): argparse takes them, past the checks here that read flags by
    name."""
    known = parser._option_string_actions
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            names = [o for o in known if o.startswith("--") and "-" not in o[2:]]
            raise ValueError(f"unknown flag {flag}.{did_you_mean(flag, names)} See --help.")


def recipe_argv(argv: list[str] | None, default_config: str | Path) -> list[str]:
    """`argv` with the recipe's config.yaml unless `--config` is given, and `--use_cpu` without a GPU
    (TrainingArguments picks its device while parsing: else 2 CPU processes train two copies)."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv.append("--use_cpu")
    return argv


def _attribute(cls) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Arguments")).lower()


# Recipe defaults that differ from TrainingArguments': the collators read columns (image paths) the Trainer
# would drop.
RECIPE_DEFAULTS = {"remove_unused_columns": False}


def parse_recipe_args(argv: list[str] | None, default_config: str | Path, types) -> SimpleNamespace:
    """A recipe's arguments, an attribute per dataclass: `args.model`, `args.learning_rate`, ..."""
    argv = recipe_argv(argv, default_config)
    args = SimpleNamespace(**{_attribute(cls): value for cls, value in
                              zip(types, parse_args(types, argv, defaults=RECIPE_DEFAULTS))})
    # LoRA's numbers have defaults (and config.yaml values), so only the command line shows they were meant.
    given = _given(argv)
    lora = [f"--{name}" for name in ("lora_r", "lora_alpha", "lora_dropout") if name in given]
    if lora and getattr(getattr(args, "peft", None), "peft_method", None) == "none":
        raise _lora_off(lora)
    data, training = getattr(args, "data", None), getattr(args, "training", None)
    if data is not None and training is not None and data.train_file and not data.eval_file and (
            training.eval_strategy != "no"):  # else the Trainer refuses it, once the model has loaded
        raise ValueError(f"--train_file without --eval_file: --eval_strategy {training.eval_strategy.value} "
                         "evaluates during training; give an --eval_file (held-out data, which also picks "
                         "the best checkpoint), or pass --eval_strategy no to train without evaluations.")
    return args


def parse_args(dataclass_types, argv: list[str] | None = None, defaults: dict | None = None) -> tuple:
    """One instance per dataclass type, in order: `defaults`, overridden by `--config file.yaml`, then by
    `argv`'s flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    dataclass_types = list(dataclass_types)

    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    config_args, remaining = config_parser.parse_known_args(argv)

    parser = HfArgumentParser(dataclass_types)
    # For --help only; it was taken out of `remaining`.
    parser.add_argument("--config", default=None,
                        help="YAML file of defaults for any of the arguments below.")

    actions = {}
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)  # not a bool's --no_<name>, which comes second
    hints = {name: hint for dc in dataclass_types for name, hint in get_type_hints(dc).items()}
    _check_flags(remaining, parser)
    values = {} if config_args.config is None else load_yaml_config(config_args.config, actions, hints)
    _old_names_win(remaining, values, actions)
    _no_evaluations_no_best_model(remaining, values)
    remaining, nulls = _command_line_nulls(remaining, actions, hints)
    for key in {**values, **nulls}:
        actions[key].required = False
    parser.set_defaults(**{**(defaults or {}), **values, **nulls})

    # look_for_args_file=False: a stray `<script>.args` file must not change the run.
    outputs = parser.parse_args_into_dataclasses(remaining, look_for_args_file=False)
    return tuple(outputs[: len(dataclass_types)])
