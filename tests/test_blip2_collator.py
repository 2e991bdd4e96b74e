"""BLIP-2 caption samples: exact label masking and the image-token-aware length budget."""

import datasets
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BlipImageProcessor, PreTrainedTokenizerFast

from recipes.blip2_lora_caption.collator import tokenize_captions
from recipes.common.captions import CaptionCollator

VOCAB = ["<pad>", "</s>", "<unk>", "<image>", "a", "photo", "of", "red", "circle", "blue", "square"]
IMG, BOS, EOS, PAD = 3, 1, 1, 0
M = -100


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                       special_tokens=[("</s>", BOS)])  # OPT: bos is </s>
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _ds(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "r.png")
    return datasets.Dataset.from_list([{"image": str(tmp_path / "r.png"),
                                        "captions": ["a red circle", "blue square"]}])


def test_labels_cover_the_caption_and_eos_only(tokenizer, tmp_path):
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=3,
                                   prompt="a photo of")
    assert len(ds) == 2  # one sample per reference caption
    assert ds[0]["input_ids"] == [IMG, IMG, IMG, BOS, 4, 5, 6, 4, 7, 8, EOS]
    assert ds[0]["labels"] == [M, M, M, M, M, M, M, 4, 7, 8, EOS]
    assert ds[1]["labels"] == [M, M, M, M, M, M, M, 9, 10, EOS]
    assert (report.samples, report.truncated, report.dropped) == (2, 0, 0)
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=2)
    assert ds[0]["input_ids"] == [IMG, IMG, BOS, 4, 7, 8, EOS] and ds[0]["labels"] == [M, M, M, 4, 7, 8, EOS]


def test_budget_counts_image_tokens_and_cuts_only_the_caption(tokenizer, tmp_path):
    # 3 image + 4 prompt tokens leave 2 of the 4 caption tokens (a red circle </s>) within 9.
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=3,
                                   prompt="a photo of", max_length=9)
    assert ds[0]["input_ids"] == [IMG, IMG, IMG, BOS, 4, 5, 6, 4, 7] and ds[0]["labels"][-2:] == [4, 7]
    assert ds[1]["input_ids"] == [IMG, IMG, IMG, BOS, 4, 5, 6, 9, 10]
    assert (report.truncated, report.target_tokens_cut, report.dropped) == (2, 3, 0)
    # Image tokens + prompt alone fill the budget: dropped and counted, never cut through image tokens.
    ds, report = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=3,
                                   prompt="a photo of", max_length=7)
    assert len(ds) == 0 and (report.samples, report.dropped) == (2, 2)
    assert "2 dropped" in str(report)


def test_collator_pads_right_and_loads_images(tokenizer, tmp_path):
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=2)
    batch = CaptionCollator(BlipImageProcessor(size={"height": 16, "width": 16}), PAD)([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["input_ids"].tolist() == [[IMG, IMG, BOS, 4, 7, 8, EOS], [IMG, IMG, BOS, 9, 10, EOS, PAD]]
    assert batch["labels"][1].tolist() == [M, M, M, 9, 10, EOS, M]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]


def test_unreadable_image_is_a_clear_error(tokenizer, tmp_path):
    ds, _ = tokenize_captions(_ds(tmp_path), tokenizer, image_token_id=IMG, num_image_tokens=2)
    (tmp_path / "r.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"r\.png.*not a readable image"):
        CaptionCollator(BlipImageProcessor(size={"height": 16, "width": 16}), PAD)([ds[0]])
