"""Model + processor loading: dtype, attention kernel, 4/8-bit, and one-line errors for a missing
checkpoint, a missing package or a misspelt processor option."""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor
from transformers.core_model_loading import revert_weight_conversion

from .args import ModelArguments, did_you_mean

MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}
TINY_PREFIX = "tiny:"
# transformers 5.25's torchvision image processor of these families breaks on a batch whose first or last
# sample has no image (a text-only row): they get the PIL one, as where torchvision is not installed.
PIL_IMAGE_PROCESSORS = ("mllama",)


def compute_dtype(model_args: ModelArguments) -> torch.dtype:
    """--dtype, else bf16 on a GPU that has it (fp16 on one that has not), else float32 (the CPU)."""
    if model_args.dtype != "auto":
        return getattr(torch, model_args.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(model_args: ModelArguments) -> str:
    """`compute_dtype` as run.json records it ("bfloat16"): a resume in another dtype is refused."""
    return str(compute_dtype(model_args)).removeprefix("torch.")


def check_mixed_precision(model_args: ModelArguments, training_args) -> None:
    """Refuse half-precision weights without the matching autocast, before anything loads: the float32
    trained weights (`peft_setup.trainable_in_float32`) meet the frozen half-precision ones only under it.
    float16 needs CUDA: on the CPU accelerate turns fp16 autocast off, and the first forward would fail."""
    dtype = compute_dtype(model_args)
    if dtype == torch.float16 and (getattr(training_args, "use_cpu", False) or not torch.cuda.is_available()):
        raise ValueError("--dtype float16 needs a CUDA GPU (on the CPU there is no fp16 autocast): use "
                         "--dtype float32, or --dtype bfloat16 with --bf16.")
    if dtype in MIXED_PRECISION and training_args.mixed_precision != MIXED_PRECISION[dtype]:
        raise ValueError(f"the model computes in {dtype} but mixed precision is "
                         f"{training_args.mixed_precision!r}: the float32 trained weights need "
                         f"{MIXED_PRECISION[dtype]} autocast. Pass --{MIXED_PRECISION[dtype]} "
                         "(accelerate_configs/single_gpu.yaml sets bf16), or --dtype float32.")


def special_strings(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer reads as a special token wherever they stand (bos, eos, pad, added special
    tokens such as <end_of_turn>). Not one character: OpenCLIP-converted CLIP tokenizers name `!` their
    pad token, which would refuse every text with a `!`."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return tuple(sorted(s for s in {*filter(None, tokenizer.all_special_tokens), *added} if len(s) > 1))


def text_reserved(tokenizer, allowed=None) -> tuple[str, ...]:
    """The special strings no text may hold, but the `allowed` ones (--special_text: what the data writes
    on purpose, e.g. grounding tokens), each of which must be one."""
    specials, allowed = special_strings(tokenizer), allowed or ()
    for name in allowed:
        if name not in specials:
            shown = ", ".join(specials[:20]) + (f", ... ({len(specials)} in all)" * (len(specials) > 20))
            raise ValueError(f"--special_text {name!r} is not a special string of the tokenizer (a text "
                             f"holding it reads as text anyway); its special strings: {shown}.")
    return tuple(s for s in specials if s not in allowed)


def answer_text(tokenizer, ids, keep=None) -> str:
    """The text of generated token `ids` without special tokens, but the `keep` ones (--special_text): an
    answer that the data taught to hold them (Qwen-VL's <|box_start|>) is scored and served with them."""
    if not keep:
        return tokenizer.decode(ids, skip_special_tokens=True)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    skipped = (special | set(tokenizer.all_special_ids)) - set(tokenizer.convert_tokens_to_ids(list(keep)))
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return tokenizer.decode([i for i in ids if i not in skipped], skip_special_tokens=False)


def resolve_model_path(path: str) -> str:
    """The folder of `tiny:<name>` (`tiny:clip`: random weights; `tiny:clip-pretrained`), built on first use;
    a local folder by its absolute path (a run records it as its base, for merge from any folder); a Hub id
    unchanged."""
    if not path.startswith(TINY_PREFIX):
        return str(Path(path).resolve()) if Path(path).exists() else path
    from .tiny.models import BUILDERS, tiny_model_path
    from .tiny.pretrain import PRETRAINERS, pretrained_tiny_path

    name = path.removeprefix(TINY_PREFIX)
    base = name.removesuffix("-pretrained")
    if base != name and base in PRETRAINERS:
        return str(pretrained_tiny_path(base))
    if name in BUILDERS:
        return str(tiny_model_path(name))
    known = sorted(BUILDERS) + [f"{n}-pretrained" for n in sorted(PRETRAINERS)]
    raise ValueError(f"unknown tiny model {path!r}; expected tiny: followed by one of {', '.join(known)}")


@contextlib.contextmanager
def loading(*paths: str):
    """Around loading the checkpoints `paths`: a missing one, or one that fails to load, is a one-line
    FileNotFoundError; a package its classes need and that is missing, a one-line ImportError."""
    for path in paths:
        # else it would go to the Hub as a repo id ("name" or "org/name")
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
        if looks_local and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"model path {path!r} does not exist: give a checkpoint or run folder, "
                                    "or a Hub id such as Salesforce/blip2-opt-2.7b")
    try:
        yield
    except FileNotFoundError:
        raise
    except ImportError as e:  # a package its classes need: torchvision for Qwen-VL's video processor, ...
        detail = " ".join(str(e).split())  # transformers' message runs over several lines
        raise ImportError(f"could not load {' or '.join(map(repr, paths))}: {detail}") from e
    except OSError as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hub = ("" if all(Path(p).expanduser().exists() for p in paths) else
               " (a Hub id needs network access or a local copy; HF_HUB_OFFLINE=1 uses the local cache only)")
        raise FileNotFoundError(f"could not load {' or '.join(map(repr, paths))}: {detail}{hub}") from e


def load_processor(path: str | Path, model_type: str, **kwargs):
    """`AutoProcessor.from_pretrained(path, **kwargs)`; the PIL image processor for PIL_IMAGE_PROCESSORS."""
    if model_type in PIL_IMAGE_PROCESSORS:
        kwargs["backend"] = "pil"
    return AutoProcessor.from_pretrained(path, **kwargs)


def load_recipe_processor(path: str, model_args: ModelArguments):
    """The checkpoint's processor with --processor_kwargs, each name checked; loaded before the data (whose
    texts must not hold its special strings) and before a large model."""
    source = dict(revision=model_args.revision, trust_remote_code=model_args.trust_remote_code)
    options = model_args.processor_kwargs or {}
    with loading(path):
        model_type = AutoConfig.from_pretrained(path, **source).model_type
        processor = load_processor(path, model_type, **source, **options)
    if getattr(processor, "tokenizer", None) is None:  # a vision tower's checkpoint: an image processor alone
        raise ValueError(f"{path}: {type(processor).__name__} has no tokenizer: the checkpoint has no text "
                         "model for the recipe to train; give one of the kind its README names.")
    # The processor and its image processor ignore unknown names silently (a misspelt max_pixels would
    # train on full-size images).
    valid = getattr(getattr(processor, "image_processor", None), "valid_kwargs", None)
    known = {*getattr(valid, "__optional_keys__", ()), *getattr(valid, "__required_keys__", ()),
             *inspect.signature(type(processor).__init__).parameters} - {"self", "args", "kwargs"}
    for name in options:
        if name not in known and not hasattr(processor, name):
            hint = did_you_mean(name, known)
            raise ValueError(f"--processor_kwargs {name!r}: not an option of {type(processor).__name__} or "
                             f"its image processor.{hint} They take: {', '.join(sorted(known))}.")
    return processor


def load_model(model_cls, path: str, model_args: ModelArguments, *,
               skip_quantization: list[str] | None = None):
    """`model_cls` from a local folder or Hub id, tiny and real models alike, in --dtype (or 4/8-bit)."""
    kwargs = dict(revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                  dtype=compute_dtype(model_args), attn_implementation=model_args.attn_implementation)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from .quantization import quantization_config, quantized_device_map  # read by quantized runs only

        kwargs["quantization_config"] = quantization_config(model_args, skip_quantization)
        kwargs["device_map"] = quantized_device_map()
    with loading(path):
        return model_cls.from_pretrained(path, **kwargs)


def load_model_and_processor(model_cls, path: str, model_args: ModelArguments, *,
                             skip_quantization: list[str] | None = None):
    """(model, processor); the processor first: a misspelt option stops before a large model loads."""
    processor = load_recipe_processor(path, model_args)
    return load_model(model_cls, path, model_args, skip_quantization=skip_quantization), processor


def full_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of the full checkpoint save_pretrained wrote in `folder`; none for an adapter."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def saved_names(model) -> dict[str, str | None]:
    """{name save_pretrained writes a tensor of `model` under: its name in the model}. Full checkpoints are
    saved under the architecture's original names (`language_model.model.*` for LLaVA); a renaming keeps the
    tensor, so its memory says which of the model's own names it is (tied weights: one memory, several
    names). None: saved converted (split, merged), not renamed."""
    current = model.state_dict()
    names = {(t.data_ptr(), t.shape): k for k, t in reversed(current.items())}
    saved = revert_weight_conversion(model, current)
    return {k: names.get((t.data_ptr(), t.shape)) for k, t in saved.items()}
