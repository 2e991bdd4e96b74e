"""Soft-prompt caption samples: text-only sequences, exact labels, and a length budget that counts the
prefix."""

import datasets
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from recipes.common.captions import CaptionCollator
from recipes.common.captions import CaptionPromptCollator
from recipes.soft_prompt_caption.collator import tokenize_captions

VOCAB = ["<|endoftext|>", "a", "photo", "of", "red", "circle", "blue", "square", "红", "色", "圆", "一张", "照片"]
EOS = PAD = 0
M = -100


@pytest.fixture(scope="module")
def tokenizer():
    """GPT-2 conventions: no special tokens added, <|endoftext|> is eos and pad."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _ds(tmp_path, captions=("a red circle", "blue square")):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "r.png")
    return datasets.Dataset.from_list([{"image": str(tmp_path / "r.png"), "captions": list(captions)}])


def test_samples_hold_the_text_only_with_labels_on_caption_and_eos(tokenizer, tmp_path):
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11)
    assert len(ds) == 2  # one sample per reference caption
    assert (ds[0]["input_ids"], ds[0]["labels"]) == ([1, 4, 5, EOS], [1, 4, 5, EOS])  # all learned: no prompt
    assert (ds[1]["input_ids"], ds[1]["labels"]) == ([6, 7, EOS], [6, 7, EOS])
    assert (report.samples, report.truncated, report.dropped) == (2, 0, 0)
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11, prompt="a photo of")
    assert ds[0]["input_ids"] == [1, 2, 3, 1, 4, 5, EOS] and ds[0]["labels"] == [M, M, M, 1, 4, 5, EOS]


def test_budget_counts_the_prefix_and_cuts_only_the_caption(tokenizer, tmp_path):
    # 11 prefix positions (10 soft prompt + 1 image) + 3 prompt tokens leave 2 of "a red circle <eos>" within
    # 16.
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11, prompt="a photo of",
                                   max_length=16)
    assert ds[0]["input_ids"] == [1, 2, 3, 1, 4] and ds[0]["labels"] == [M, M, M, 1, 4]
    assert (report.truncated, report.target_tokens_cut, report.dropped) == (2, 3, 0)
    # The prefix and prompt alone fill the budget: dropped and counted.
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11, prompt="a photo of",
                                   max_length=14)
    assert len(ds) == 0 and (report.samples, report.dropped) == (2, 2)
    # With all 64 patches as image vectors, the same budget drops everything.
    _, report = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=74, max_length=64)
    assert report.dropped == 2


def test_chinese_caption_after_a_prompt_gets_no_space(tokenizer, tmp_path):
    ds, _ = tokenize_captions(_ds(tmp_path, ["红 色 圆"]), tokenizer, prefix_length=1, prompt="一张 照片", lang="zh")
    assert ds[0]["input_ids"] == [11, 12, 8, 9, 10, EOS] and ds[0]["labels"] == [M, M, 8, 9, 10, EOS]


def test_collators_pad_right_and_give_generate_an_empty_prompt_as_long_ids(tokenizer, tmp_path):
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    batch = CaptionCollator(processor, PAD)([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["input_ids"].tolist() == [[1, 4, 5, EOS], [6, 7, EOS, PAD]]
    # eos learned, padding (the same id) not
    assert batch["labels"].tolist() == [[1, 4, 5, EOS], [6, 7, EOS, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    records = [{"key": str(tmp_path / "r.png"), "image": str(tmp_path / "r.png"), "captions": ["x"]}] * 3
    gen = CaptionPromptCollator(processor, tokenizer)(records)
    assert (gen["input_ids"].shape == (3, 0) and gen["input_ids"].dtype == torch.long
            and gen["attention_mask"].shape == (3, 0))
    gen = CaptionPromptCollator(processor, tokenizer, prompt="a photo of")(records)
    assert gen["input_ids"].tolist() == [[1, 2, 3]] * 3 and gen["keys"] == [str(tmp_path / "r.png")] * 3


def test_unreadable_image_is_a_clear_error(tokenizer, tmp_path):
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, prefix_length=11)
    (tmp_path / "r.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"r\.png.*not a readable image"):
        CaptionCollator(CLIPImageProcessor(), PAD)([ds[0]])
