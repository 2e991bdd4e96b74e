"""Generated answers keep the special strings a run trained with (--special_text) and lose the others."""

import torch
from transformers import AutoTokenizer

from recipes.common.models import answer_text, resolve_model_path


def test_answers_keep_the_special_text_and_drop_the_other_special_tokens(module_cache):
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny:llava"))
    tok.add_special_tokens({"additional_special_tokens": ["<box>", "</box>"]})
    ids = tok("a <box>(1,2)</box> b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == 11 and ids[-1] == tok.eos_token_id  # <box> and </box> are one token each
    assert answer_text(tok, ids) == tok.decode(ids, skip_special_tokens=True) == "a (1,2) b"
    assert answer_text(tok, ids, ["<box>", "</box>"]) == "a <box>(1,2)</box> b"  # no </s>
    assert answer_text(tok, torch.tensor([tok.bos_token_id, *ids]), ("</box>",)) == "a (1,2)</box> b"
