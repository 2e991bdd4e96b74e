"""Tiny image-text-to-text models of today's VLM families, one module per transformers `model_type`.

Each module builds the family's real model class (loaded by `AutoModelForImageTextToText`), its real
processor and image processor classes, and a byte-level BPE tokenizer with the family's special tokens
and a chat template that writes the family's conversation format. `tiny:<model_type>` names them
(`tiny:qwen2_5_vl`, ...), built into the cache on first use like the other tiny models.

A module defines `BUILD_VERSION` (bump when its builder changes) and
`build(corpus, **overrides) -> (model, processor)`.
"""

from __future__ import annotations

import importlib
import importlib.util

FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm", "gemma3", "paligemma", "mllama",
            "internvl")


def _module(model_type: str):
    return importlib.import_module(f"{__name__}.{model_type}")


def available() -> tuple[str, ...]:
    """The families whose builder module is present."""
    return tuple(f for f in FAMILIES if importlib.util.find_spec(f"{__name__}.{f}") is not None)


def build_version(model_type: str) -> int:
    return _module(model_type).BUILD_VERSION


def builder(model_type: str):
    return _module(model_type).build
