"""Training LoRA on a 4/8-bit base (QLoRA): what gets upcast, the optimizer, and the export.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen LM
weights in NF4 with double quantization, trains LoRA adapters on every linear layer of the LM in
16/32-bit, and pages the optimizer state. The pieces a recipe needs:

- `quantization_config`: the `BitsAndBytesConfig` that `models.load_model_and_processor` loads with;
- `prepare_quantized_for_training`: peft's `prepare_model_for_kbit_training` casts every
  non-quantized weight to float32, frozen ones included: on LLaVA-1.5-7B the vision tower, embeddings,
  LM head and projector (587 M weights) go from 2 to 4 bytes each, +1.17 GB that buys nothing, since
  under bf16 autocast their matmuls run in bf16 anyway. Here only what the optimizer updates (LoRA
  weights, `modules_to_save` copies such as the projector) is float32; everything frozen stays in the
  compute dtype it was loaded in. Activation checkpointing is `TrainingArguments.activation_checkpointing`,
  non-reentrant by default in transformers 5, so no input-embedding gradient hook is needed either;
- `fall_back_to_cpu_optimizer`: paged / 8-bit bitsandbytes optimizers need CUDA;
- `save_quantization_config`: how the base was loaded, saved with the adapter, for `merge.py`'s
  `load_quantized_run` and `merge_quantized_run`: the adapter was trained against the *dequantized* 4-bit
  weights, not the original ones, so merging dequantizes the base exactly as the training forward did and
  adds the LoRA deltas to that; the merged model then gives the outputs of base + adapter up to float
  rounding (and the rounding of the saved dtype).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, BitsAndBytesConfig

from .args import ModelArguments
from .models import compute_dtype, loading
from .peft_setup import find_components, trainable_in_float32

logger = logging.getLogger(__name__)

# Written next to the adapter of every checkpoint: the base must be re-quantized the same way to merge or
# reload it.
QUANTIZATION_FILE = "quantization_config.json"


def quantization_config(model_args: ModelArguments,
                        skip_modules: list[str] | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for --load_in_4bit / --load_in_8bit; `skip_modules` stay unquantized.

    Give full module-name prefixes ("model.vision_tower"): transformers 5 matches a skip name from the
    start of a module's name or as its suffix, so a bare "vision_tower" leaves the tower quantized.
    """
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype(model_args),
            llm_int8_skip_modules=skip_modules,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return None


def unquantized_modules(model_cls, path: str, model_args: ModelArguments) -> list[str]:
    """Full module names QLoRA keeps in 16/32-bit: the vision tower, the bridge and the LM head, found from
    the model's structure (`peft_setup.find_components`) on an empty copy built on the meta device.

    They are small next to the LM (4% and 0.3% of LLaVA-1.5-7B for the tower and projector), and the LM head
    decides every output token.
    """
    with loading(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                            revision=model_args.revision)
    with torch.device("meta"):
        empty = model_cls.from_config(config, trust_remote_code=model_args.trust_remote_code)
    parts = find_components(empty)
    return [*parts.vision, *parts.bridge, parts.output]


def is_quantized(param: torch.Tensor) -> bool:
    """Whether `param` holds bitsandbytes-quantized weights (4-bit `Params4bit` or 8-bit `Int8Params`)."""
    return param.__class__.__name__ in ("Params4bit", "Int8Params")


def keep_4bit_training_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers were told.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's `Linear4bit` rewrites its weight in place the first
    time it runs in eval mode without gradients: absmax rounded to bf16, double quantization undone,
    and from then on a matmul kernel without autograd. A training step after an evaluation then
    computes with other weights, and no gradient flows back through the frozen 4-bit layers, so the
    LoRA weights get wrong gradients (tests/test_qlora_quantization.py shows it for layer 0).
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def prepare_quantized_for_training(model: torch.nn.Module) -> int:
    """Make a (LoRA-wrapped) quantized model trainable without upcasting what stays frozen.

    Call after `apply_peft` and `apply_freezing`. Casts the trainable parameters to float32 and
    returns how many tensors were cast: a bf16 weight would lose every update smaller than 2^-8 of
    its value, and there are few of them (40 M LoRA weights on a 7B LM). Frozen weights only feed the
    forward, where autocast decides the matmul dtype, so upcasting them costs memory and buys
    nothing. Also keeps the 4-bit layers in their training layout (`keep_4bit_training_layout`).
    """
    keep_4bit_training_layout(model)
    return trainable_in_float32(model)


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights, split into quantized (with their quantization constants), frozen and trainable.

    Shared tensors (tied weights, the quantization code tables bitsandbytes may share) count once.
    """
    seen, out = set(), {"quantized": 0, "frozen": 0, "trainable": 0}

    def add(kind: str, tensor: torch.Tensor) -> None:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            out[kind] += tensor.numel() * tensor.element_size()

    for param in model.parameters():
        if is_quantized(param):
            add("quantized", param)
            state = getattr(param, "quant_state", None)  # 4-bit: absmax and code table, and the nested ones
            for part in (state, getattr(state, "state2", None)):
                for tensor in (getattr(part, "absmax", None), getattr(part, "code", None)):
                    if isinstance(tensor, torch.Tensor):
                        add("quantized", tensor)
            scales = getattr(param, "SCB", None)  # 8-bit: one scale per row
            if isinstance(scales, torch.Tensor):
                add("quantized", scales)
        else:
            add("trainable" if param.requires_grad else "frozen", param)
    return out


# Optimizers whose state lives in bitsandbytes' CUDA kernels (paged = CUDA unified memory).
_BNB_OPTIMIZER_MARKERS = ("8bit", "paged", "4bit")


def fall_back_to_cpu_optimizer(training_args) -> str | None:
    """On a machine without CUDA, replace a paged / 8-bit bitsandbytes optimizer with adamw_torch.

    Returns the name of the replaced optimizer (and logs it), or None when nothing changed.
    """
    from transformers.training_args import OptimizerNames

    name = str(getattr(training_args.optim, "value", training_args.optim))
    if torch.cuda.is_available() or not any(marker in name for marker in _BNB_OPTIMIZER_MARKERS):
        return None
    training_args.optim = OptimizerNames.ADAMW_TORCH
    logger.info("optim %s needs CUDA (bitsandbytes paged / 8-bit state): using adamw_torch on this CPU", name)
    return name


def save_quantization_config(model: torch.nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write how the base was loaded (its BitsAndBytesConfig and dtype) to `folder`, next to a saved adapter.

    Returns the file, or None for an unquantized base, after removing any such file in `folder`.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(base.config, "quantization_config", None)
    path = Path(folder) / QUANTIZATION_FILE
    if config is None:
        # One an earlier quantized run left in the same output_dir would make merge and chat quantize the
        # base that this adapter trained on unquantized.
        path.unlink(missing_ok=True)
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    saved = {"dtype": str(base.dtype).removeprefix("torch."), "quantization_config": config}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return path


def quantized_device_map() -> dict:
    """The whole quantized model on this process's GPU (bitsandbytes quantizes while loading), or the CPU."""
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}
