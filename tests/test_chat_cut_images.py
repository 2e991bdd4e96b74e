"""The length budget cuts a multi-image conversation after the last whole answer that fits and keeps only
the images placed before the cut. Reference: the same record written by hand with only the exchanges the
cut keeps and their images, encoded whole by `tokenize_conversations`; the cut sample must be it, token for
token and label for label, on families whose image tokens expand differently (LLaVA: a fixed count,
SmolVLM: tiles, LLaVA-OneVision: tiles only for a sample's only image; it runs in `make test-families`, its
processor needing torchvision)."""

import pytest
import torch
from PIL import Image

from recipes.common.chat import ChatCollator, chat_encoder, to_messages, tokenize_conversations
from recipes.common.models import load_processor, resolve_model_path

TURNS = [{"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red."},
         {"from": "human", "value": "and this <image> one?"}, {"from": "gpt", "value": "blue, a light blue."},
         {"from": "human", "value": "<image>\nand the last?"}, {"from": "gpt", "value": "green."}]


@pytest.fixture(scope="module", params=["llava", "smolvlm", "llava_onevision"])
def encoder(request):
    try:  # building the tiny model loads its processor too
        processor = load_processor(resolve_model_path(f"tiny:{request.param}"), request.param)
    except (RuntimeError, ImportError) as e:  # LLaVA-OneVision's needs torchvision: make test-families
        if "torchvision" not in str(e).lower():
            raise
        pytest.skip(f"{request.param}'s processor needs torchvision")
    return request.param, chat_encoder(processor)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for colour, size in (("red", (64, 64)), ("blue", (128, 96)), ("green", (96, 64))):
        out.append(str(folder / f"{colour}.png"))
        Image.new("RGB", size, colour).save(out[-1])
    return out


def _one(records, encoder, max_length):
    ds, report = tokenize_conversations(records, encoder, max_length)
    assert len(ds) == 1
    return ds[0], report


def test_a_cut_keeps_the_images_placed_before_it_and_equals_the_record_written_without_the_rest(encoder,
                                                                                                paths):
    name, encoder = encoder
    record = {"images": paths, "conversations": TURNS}
    whole, _ = _one([record], encoder, None)
    n = whole["length"]
    refs = {k: _one([{"images": paths[:k], "conversations": TURNS[: 2 * k]}], encoder, None)[0]
            for k in (1, 2)}
    assert refs[1]["length"] < refs[2]["length"] < n
    for k in (2, 1):
        sample, report = _one([record], encoder, refs[k]["length"])
        assert sample == refs[k] and sample["images"] == paths[:k]
        assert [t for t in sample["labels"] if t != -100] == [t for t in refs[k]["labels"] if t != -100]
        assert (report.samples, report.cut, report.turns_cut, report.dropped) == (1, 1, 3 - k, 0)
        assert report.tokens_cut == n - refs[k]["length"]
        # the collator gives the processor the cut text and the kept images: the same ids, the labels
        batch = ChatCollator(encoder)([sample])
        assert batch["input_ids"][0].tolist() == sample["input_ids"]
        assert batch["labels"][0].tolist() == sample["labels"]
        if name == "llava":  # one pixel_values row per image
            assert batch["pixel_values"].shape[0] == k
    if name == "llava_onevision":
        # A sample's only image is tiled, one of several is not: the first exchange alone is longer than
        # within the whole conversation, so a slice of the whole one would not be what the processor gives.
        full = encoder.encode(to_messages(TURNS, 3), [Image.open(p) for p in paths])
        assert full.turn_ends[0] < refs[1]["length"]
    with pytest.raises(ValueError, match=r"1 conversations, 0 cut .* 1 dropped \(no cut after a whole"):
        tokenize_conversations([record], encoder, refs[1]["length"] - 1)


def test_an_image_only_in_a_later_turn_leaves_a_text_only_first_exchange(encoder, paths):
    name, encoder = encoder
    turns = [{"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red."},
             {"from": "human", "value": "<image>\ndescribe it."}, {"from": "gpt", "value": "a circle."}]
    whole, _ = _one([{"image": paths[0], "conversations": turns}], encoder, None)
    ref, _ = _one([{"image": None, "conversations": turns[:2]}], encoder, None)
    sample, report = _one([{"image": paths[0], "conversations": turns}], encoder, whole["length"] - 1)
    assert sample == ref and sample["images"] == [] and not sample["has_image"]
    assert (report.cut, report.turns_cut, report.dropped) == (1, 1, 0)
    batch = ChatCollator(encoder)([sample])
    assert "pixel_values" not in batch and torch.equal(batch["input_ids"][0], torch.tensor(ref["input_ids"]))
