"""Tiny models of Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and InternVL: built offline, reloaded with the Auto
classes, the family's chat format, image-token counts computed here from the config, training forward and
backward, generation, padded and mixed batches."""

import math

import pytest
import torch
from PIL import Image

# These processors hold a video processor, and transformers builds video processors with torchvision only.
pytest.importorskip("torchvision", reason="the processors of these families need torchvision")

from transformers import AutoModelForImageTextToText, AutoProcessor

from recipes.common.tiny.models import tiny_model_path

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl"]
CLASSES = {  # model, processor, image processor (either backend)
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLImageProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessor"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
                        "LlavaOnevisionImageProcessor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor", "GotOcr2ImageProcessor"),
}
# What the model needs from the processor besides input_ids, attention_mask and pixel_values.
EXTRA_INPUTS = {
    "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen3_vl": {"image_grid_thw", "mm_token_type_ids"},
    "llava_onevision": {"image_sizes", "batch_num_images"},
    "internvl": set(),
}
IMAGE_TOKEN = {"qwen2_5_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>", "llava_onevision": "<image>",
               "internvl": "<IMG_CONTEXT>"}

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
RENDERED = {  # CONVERSATION with add_generation_prompt=True, in each family's format
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  f"<|im_start|>user\n{QWEN_IMAGE}What is this?<|im_end|>\n"
                  "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                  f"<|im_start|>user\n{QWEN_IMAGE}And this?<|im_end|>\n<|im_start|>assistant\n",
    "qwen3_vl": f"<|im_start|>user\n{QWEN_IMAGE}What is this?<|im_end|>\n"
                "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                f"<|im_start|>user\n{QWEN_IMAGE}And this?<|im_end|>\n<|im_start|>assistant\n",
    "llava_onevision": "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
                       "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                       "<|im_start|>user\n<image>\nAnd this?<|im_end|>\n<|im_start|>assistant\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhat is this?<|im_end|>\n"
                "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                "<|im_start|>user\n<IMG_CONTEXT>\nAnd this?<|im_end|>\n<|im_start|>assistant\n",
}
SMALL, LARGE = (64, 64), (128, 96)  # PIL sizes: (width, height)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, module_cache):
    name = request.param
    path = tiny_model_path(name)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return name, model, AutoProcessor.from_pretrained(path)


def image(size, color=(220, 20, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


def user_turn(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def count(inputs, processor, token: str) -> int:
    return int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def expected_image_tokens(name: str, config, size: tuple[int, int]) -> int:
    """Image tokens of one image alone in its sample, from the config (and the tile grids worked out by
    hand)."""
    width, height = size
    vision = config.vision_config
    if name in ("qwen2_5_vl", "qwen3_vl"):
        # Resized to the nearest multiple of patch * merge px per side (64x64 and 128x96 already are, and lie
        # within the processor's pixel bounds), then one token per merge x merge patches.
        patch, merge = vision.patch_size, vision.spatial_merge_size
        rows, cols = round(height / (patch * merge)) * merge, round(width / (patch * merge)) * merge
        return rows * cols // merge**2
    if name == "llava_onevision":
        n = vision.image_size // vision.patch_size  # features per tile side
        # 64x64 fits the 1x1 tile grid; 128x96 the 2x2 one (the largest pinpoint, 128x128), whose 2n x 2n
        # features are cropped back to the image's 4:3 shape: 2n * 96 / 128 rows. One newline token per
        # row, plus the n x n features of the whole-image tile.
        grid = {SMALL: 1, LARGE: 2}[size]
        cols = grid * n
        rows = round(cols * height / width)
        return rows * cols + rows + n * n
    # InternVL: 32 px tiles on the grid closest to the image's aspect ratio, at most 6 tiles: 64x64 -> 2x2
    # (a tie with 1x1, won by more tiles while they cover under twice the image), 128x96 -> 3 wide x 2 high;
    # plus a thumbnail tile. Each tile: (image_size / patch_size)^2 patches, pixel-shuffled by
    # downsample_ratio per side.
    tiles = {SMALL: 2 * 2, LARGE: 3 * 2}[size] + 1
    per_tile = (vision.image_size[0] // vision.patch_size[0]) ** 2 * config.downsample_ratio**2
    return int(tiles * per_tile)


def test_loads_with_auto_classes(family):
    name, model, processor = family
    model_class, processor_class, image_processor_class = CLASSES[name]
    assert model.config.model_type == name
    assert type(model).__name__ == model_class
    assert type(processor).__name__ == processor_class
    assert type(processor.image_processor).__name__.removesuffix("Pil") == image_processor_class
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert model.config.get_text_config().vocab_size == len(tok) < 2000


def test_chat_template_renders_family_format(family):
    name, _, processor = family
    assert (processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
            == RENDERED[name])
    # Without the generation prompt the text ends with the last turn's end.
    assert processor.apply_chat_template(CONVERSATION, tokenize=False).endswith("And this?<|im_end|>\n")
    # Every special token of the format is one token, not split by the BPE.
    for token in ("<|im_start|>", "<|im_end|>", IMAGE_TOKEN[name]):
        assert processor.tokenizer.tokenize(token) == [token]


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_image_token_count(family, size):
    name, model, processor = family
    text = processor.apply_chat_template(user_turn("Describe."), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[image(size)], return_tensors="pt")
    expected = expected_image_tokens(name, model.config, size)
    assert 16 <= expected <= 72
    assert count(inputs, processor, IMAGE_TOKEN[name]) == expected
    assert EXTRA_INPUTS[name] <= set(inputs)
    if name == "internvl":  # each image is wrapped in <img> ... </img>
        assert count(inputs, processor, "<img>") == count(inputs, processor, "</img>") == 1
    # The processor's own count for an image size agrees.
    assert processor._get_num_multimodal_tokens(image_sizes=[size[::-1]])["num_image_tokens"] == [expected]


def test_image_counts_differ_by_size(family):
    name, model, _ = family
    assert (expected_image_tokens(name, model.config, SMALL)
            != expected_image_tokens(name, model.config, LARGE))


def test_two_images_train_and_generate(family):
    name, model, processor = family
    text = processor.apply_chat_template(CONVERSATION, tokenize=False)
    images = [image(SMALL), image(LARGE, (20, 20, 220))]
    # LLaVA-OneVision: images nested per sample, so the processor and the model both treat a sample with
    # several images as such (whole-image tile and a newline per image).
    inputs = processor(text=text, images=[images] if name == "llava_onevision" else images,
                       return_tensors="pt")
    if name == "llava_onevision":
        n = model.config.vision_config.image_size // model.config.vision_config.patch_size
        assert count(inputs, processor, "<image>") == 2 * (n * n + 1)
    else:
        expected = sum(expected_image_tokens(name, model.config, s) for s in (SMALL, LARGE))
        assert count(inputs, processor, IMAGE_TOKEN[name]) == expected
    model.zero_grad()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss) and 4 < loss.item() < 12  # about ln(vocab size) at random init
    loss.backward()
    vision_grads = [p.grad for n, p in model.named_parameters()
                    if ("visual" in n or "vision" in n) and p.grad is not None]
    assert vision_grads and any(g.abs().sum() > 0 for g in vision_grads)  # the loss reaches the vision tower
    model.zero_grad()

    prompt = processor.apply_chat_template(user_turn("What is this?"), add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=prompt, images=[image(LARGE)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def _mixed_batch(name, processor, rows, padding_side):
    """(the rows' generation prompts, the processor's padded batch of them) for (text, image or None) rows."""
    texts = [processor.apply_chat_template(user_turn(t, images=int(img is not None)),
                                           add_generation_prompt=True, tokenize=False) for t, img in rows]
    images = [img for _, img in rows if img is not None]
    if name == "llava_onevision":
        images = [[img] if img is not None else [] for _, img in rows]
    return texts, processor(text=texts, images=images, padding=True, padding_side=padding_side,
                            return_tensors="pt")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_matches_single_samples(family, padding_side):
    """Images of different sizes and a text-only row in one padded batch: each row's logits equal those of
    the row alone (M-RoPE positions of Qwen included, which the model computes from mm_token_type_ids and the
    attention mask)."""
    name, model, processor = family
    rows = [("What is this?", image(SMALL)), ("What shape is in the picture here?", image(LARGE)),
            ("Say hello.", None)]
    texts, batch = _mixed_batch(name, processor, rows, padding_side)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # every row is padded but the longest
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        assert torch.isfinite(out.loss)
        for i, (text, img) in enumerate(zip(texts, (img for _, img in rows))):
            alone = processor(text=text, images=None if img is None else [img], return_tensors="pt")
            logits = model(**alone).logits[0]
            mask = batch["attention_mask"][i].bool()
            assert torch.allclose(out.logits[i][mask], logits, atol=1e-4), (name, i)


def test_positions_need_mm_token_type_ids(family):
    """Qwen: without `mm_token_type_ids` the model cannot place image tokens on the 2-D grid (Qwen2.5-VL
    silently falls back to 1-D positions, Qwen3-VL refuses); the training code must pass it through."""
    name, model, processor = family
    if name not in ("qwen2_5_vl", "qwen3_vl"):
        pytest.skip("no M-RoPE")
    text = processor.apply_chat_template(user_turn("What is this?"), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=text, images=[image(LARGE)], return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs).logits
        inputs.pop("mm_token_type_ids")
        if name == "qwen3_vl":
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                model(**inputs)
        else:
            assert not torch.allclose(model(**inputs).logits, full, atol=1e-4)
    assert math.isfinite(full.sum().item())


def test_left_padded_batch_generates_as_single_rows(family):
    """Generation-based evaluation batches left-padded prompts: each row's greedy continuation is the row's
    own (with an image of another size and a text-only row beside it)."""
    name, model, processor = family
    rows = [("What is this?", image(SMALL)),
            ("What shape is in the picture here?", image(LARGE, (20, 20, 220))), ("Say hello.", None)]
    texts, batch = _mixed_batch(name, processor, rows, "left")
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, width:]
    for i, (text, (_, img)) in enumerate(zip(texts, rows)):
        alone = processor(text=text, images=None if img is None else [img], return_tensors="pt")
        own = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert out[i, : len(own)].tolist() == own.tolist(), (name, i)
