"""Tiny image-text-to-text models of today's VLM families, one module per transformers `model_type`.

Each module builds the family's real model class (loaded by `AutoModelForImageTextToText`), its real
processor and image processor classes, and a byte-level BPE tokenizer with the family's special tokens
and a chat template that writes the family's conversation format. `tiny:<model_type>` names them
(`tiny:qwen2_5_vl`, ...), built into the cache on first use like the other tiny models.

A module defines `build(corpus, **overrides) -> (model, processor)`; its build version is in VERSIONS
(bump it whenever the builder changes, so cached copies are rebuilt).
"""

from __future__ import annotations

import importlib
import importlib.util

VERSIONS = {"llava_onevision": 1, "qwen2_5_vl": 1, "qwen3_vl": 1, "smolvlm": 1, "gemma3": 1, "paligemma": 1,
            "mllama": 1, "internvl": 1}


def available() -> tuple[str, ...]:
    """The families whose builder module is present."""
    return tuple(f for f in VERSIONS if importlib.util.find_spec(f"{__name__}.{f}") is not None)


def builder(model_type: str):
    """`build(corpus, **overrides)` of a family; its module is imported on first call."""
    def build(corpus, **overrides):
        return importlib.import_module(f"{__name__}.{model_type}").build(corpus, **overrides)
    return build
