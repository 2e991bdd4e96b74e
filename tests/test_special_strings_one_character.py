"""Which of a tokenizer's special strings count as control tokens in a text: OpenCLIP-converted CLIP
tokenizers (Stable Diffusion 2's and SDXL's, for one) name `!` their pad token, as OpenCLIP pads with id 0,
the vocabulary's `!`; a caption that ends in `!` is ordinary text, not a control token to refuse."""

import json

from PIL import Image
from transformers import AutoTokenizer

from data_tools.clean import check_rows
from data_tools.errors import DataError
from recipes.common.models import resolve_model_path, special_strings


def _openclip_style_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny:clip"), pad_token="!")


def test_a_one_character_pad_token_is_not_a_special_string():
    tokenizer = _openclip_style_tokenizer()
    assert tokenizer.pad_token == "!" and "!" in tokenizer.all_special_tokens
    assert special_strings(tokenizer) == ("<|endoftext|>", "<|startoftext|>")


def test_a_caption_with_an_exclamation_mark_is_kept(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    path = tmp_path / "train.jsonl"
    rows = [{"image": "a.png", "captions": ["A red square!"]},
            {"image": "a.png", "captions": ["A red <|endoftext|> square"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reserved = special_strings(_openclip_style_tokenizer())
    out = [(line, row.field if isinstance(row, DataError) else row["captions"])
           for line, row, _ in check_rows(path, "retrieval", reserved=reserved, progress=False)]
    assert out == [(1, ["A red square!"]), (2, "captions[0]")]
