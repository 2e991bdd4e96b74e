"""Tiny models of the SmolVLM, Gemma 3, PaliGemma and Llama 3.2 Vision (mllama) families.

Each is built offline, loaded back through the Auto classes, and checked against its family's format:
the chat template's exact output, the number of image tokens the processor inserts (computed here from
the config), a training step, generation and a padded batch.
"""

import math

import pytest
import torch
from PIL import Image

from recipes.common.tiny.models import build_tiny

FAMILIES = ["smolvlm", "gemma3", "paligemma", "mllama"]
CHAT_FAMILIES = ["smolvlm", "gemma3", "mllama"]

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]},
]
# The families' formats, written out by hand (model doc pages and the Instruct checkpoints' templates).
RENDERED = {
    "smolvlm": "<|im_start|>System: You are terse.<end_of_utterance>\n"
               "User:<image>What is this?<end_of_utterance>\n"
               "Assistant: A red circle.<end_of_utterance>\n"
               "User: And this one?<image><end_of_utterance>\n"
               "Assistant: A blue square.<end_of_utterance>\n",
    "gemma3": "<bos><start_of_turn>user\nYou are terse.\n\n<start_of_image>What is this?<end_of_turn>\n"
              "<start_of_turn>model\nA red circle.<end_of_turn>\n"
              "<start_of_turn>user\nAnd this one?<start_of_image><end_of_turn>\n"
              "<start_of_turn>model\nA blue square.<end_of_turn>\n",
    "mllama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA red circle.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd this one?<|image|><|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA blue square.<|eot_id|>",
}
GENERATION_PROMPT = {"smolvlm": "Assistant:", "gemma3": "<start_of_turn>model\n",
                     "mllama": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
END_OF_TURN = {"smolvlm": "<end_of_utterance>", "gemma3": "<end_of_turn>", "paligemma": "<eos>",
               "mllama": "<|eot_id|>"}
MODEL_CLASS = {"smolvlm": "SmolVLMForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration", "mllama": "MllamaForConditionalGeneration"}
# SmolVLMProcessor needs a video processor, which needs torchvision: the tiny model uses the Idefics3
# processor SmolVLM's extends (same image splitting and prompt expansion).
PROCESSOR_CLASS = {"smolvlm": "Idefics3Processor", "gemma3": "Gemma3Processor",
                   "paligemma": "PaliGemmaProcessor", "mllama": "MllamaProcessor"}
IMAGE_PROCESSOR_CLASS = {"smolvlm": "SmolVLMImageProcessorPil", "gemma3": "Gemma3ImageProcessorPil",
                         "paligemma": "SiglipImageProcessorPil", "mllama": "MllamaImageProcessorPil"}


def _image(size, color):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (model, processor), built once and loaded back through the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = {}
    for name in FAMILIES:
        path = build_tiny(name, tmp_path_factory.mktemp(name))
        out[name] = (AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path))
    return out


def _inputs(name, processor, texts, images, suffix=None):
    """Processor outputs as tensors; a rendered chat already holds the bos, so none is added."""
    if name == "paligemma":
        return processor(text=texts, images=images, suffix=suffix, padding=True, return_tensors="pt")
    return processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")


def _labels(name, inputs):
    if name == "paligemma":
        return inputs["labels"]
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def _model_inputs(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_as_the_real_classes(built, name):
    model, processor = built[name]
    assert model.config.model_type == name
    assert type(model).__name__ == MODEL_CLASS[name]
    assert type(processor).__name__ == PROCESSOR_CLASS[name]
    # the PIL image processor, or its torchvision twin where torchvision is installed
    assert type(processor.image_processor).__name__ in (IMAGE_PROCESSOR_CLASS[name],
                                                        IMAGE_PROCESSOR_CLASS[name].removesuffix("Pil"))
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids(
        END_OF_TURN[name])
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN[name]) in (eos if isinstance(eos, list) else [eos])
    assert 1000 < len(tokenizer) <= model.get_input_embeddings().num_embeddings
    if name == "paligemma":
        assert processor.chat_template is None  # prefix + suffix, no conversation format
    else:
        assert processor.chat_template


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_chat_template_writes_the_family_format(built, name):
    _, processor = built[name]
    assert processor.apply_chat_template(CONVERSATION) == RENDERED[name]
    prompt = processor.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
    # Everything before the last answer, ending in the generation prompt. SmolVLM's is "Assistant:" while
    # a rendered answer follows "Assistant: ": the space belongs to the answer's first token.
    assert prompt == RENDERED[name].rsplit(GENERATION_PROMPT[name], 1)[0] + GENERATION_PROMPT[name]


def _expected_image_tokens(name, model, processor, size):
    """Image placeholder tokens one image of `size` (w, h) takes in the text, from the config alone."""
    config = model.config
    if name == "smolvlm":
        vision = config.vision_config
        per_view = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        longest = processor.image_processor.size["longest_edge"]
        tile = processor.image_processor.max_image_size["longest_edge"]
        w, h = size
        # The longest edge goes to `longest` (other edge kept in ratio, rounded up to even), then both
        # edges up to whole tiles; more than one tile means tiles + the global view.
        if w >= h:
            w, h = longest, int(longest * h / w) + int(longest * h / w) % 2
        else:
            w, h = int(longest * w / h) + int(longest * w / h) % 2, longest
        tiles = math.ceil(h / tile) * math.ceil(w / tile)
        return per_view * (tiles + 1 if tiles > 1 else 1)
    if name == "gemma3":
        return config.mm_tokens_per_image
    if name == "paligemma":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return 1  # mllama: the image enters through cross-attention; one <|image|> marks where


@pytest.mark.parametrize("name", FAMILIES)
def test_image_token_counts(built, name):
    model, processor = built[name]
    image_token = {"smolvlm": "<image>", "gemma3": "<image_soft_token>", "paligemma": "<image>",
                   "mllama": "<|image|>"}[name]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    config_id = model.config.image_token_index if name == "mllama" else model.config.image_token_id
    assert image_token_id == config_id
    marker = {"smolvlm": "<image>", "gemma3": "<start_of_image>", "paligemma": "<image>",
              "mllama": "<|image|>"}[name]
    # Counts as designed for the synthetic data's 64 px images (and bigger ones).
    literal = {"smolvlm": {(64, 64): 20, (128, 96): 20, (128, 32): 12},
               "gemma3": {(64, 64): 16, (128, 96): 16}, "paligemma": {(64, 64): 64, (128, 96): 64},
               "mllama": {(64, 64): 1, (128, 96): 1}}[name]
    for size, count in literal.items():
        inputs = processor(text=[f"{marker}hi"], images=[_image(size, "red")], return_tensors="pt")
        found = int((inputs["input_ids"] == image_token_id).sum())
        assert found == _expected_image_tokens(name, model, processor, size) == count, size
        if name == "mllama":
            # Tiles of 64 px on a canvas of at most 2: a square 64 px image fits one tile, 128x96 needs two.
            assert inputs["aspect_ratio_mask"].sum().item() == {(64, 64): 1, (128, 96): 2}[size]
            assert inputs["pixel_values"].shape == (
                1, 1, processor.image_processor.max_image_tiles, 3, 64, 64)
        if name == "smolvlm":
            views = inputs["pixel_attention_mask"].flatten(2).any(-1).sum().item()
            assert views * 4 == count  # 4 tokens per 64 px view
        if name in ("gemma3", "paligemma"):
            with torch.no_grad():
                features = model.get_image_features(pixel_values=inputs["pixel_values"])
            features = getattr(features, "pooler_output", features)
            assert features.reshape(-1, model.config.text_config.hidden_size).shape[0] == count


def _training_batch(name, processor, samples):
    """Processor outputs for (conversation or PaliGemma prefix, images, PaliGemma suffix) samples."""
    images = [i for _, i, _ in samples]
    if name == "paligemma":
        return _inputs(name, processor, [t for t, _, _ in samples], images, suffix=[s for _, _, s in samples])
    return _inputs(name, processor, [processor.apply_chat_template(conv) for conv, _, _ in samples], images)


def _samples(name):
    """Two samples: one with two images (64x64 and 128x96), one with one image."""
    two = [_image((64, 64), "red"), _image((128, 96), "blue")]
    one = [_image((64, 64), "green")]
    if name == "paligemma":
        return [("<image><image>answer en what is left?", two, "a red circle"),
                ("<image>caption en", one, "green")]
    short = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]
    return [(CONVERSATION, two, None), (short, one, None)]


@pytest.mark.parametrize("name", FAMILIES)
def test_train_step_with_two_images(built, name):
    model, processor = built[name]
    inputs = _training_batch(name, processor, _samples(name)[:1])
    bos = processor.tokenizer.bos_token_id
    if name in ("gemma3", "mllama"):
        assert inputs["input_ids"][0, 0] == bos and inputs["input_ids"][0, 1] != bos
    if name in ("gemma3", "paligemma"):
        assert "token_type_ids" in inputs  # needed in training: image / prefix attention
    if name == "paligemma":
        ids, labels = inputs["input_ids"][0], inputs["labels"][0]
        text = processor.tokenizer.decode(ids)
        assert text == "<image>" * 128 + "<bos>answer en what is left?\na red circle<eos>"
        assert processor.tokenizer.decode(ids[labels != -100]) == "a red circle<eos>"
        assert torch.equal(labels != -100, inputs["token_type_ids"][0] == 1)
    model.train()
    model.zero_grad()
    loss = model(**_model_inputs(inputs), labels=_labels(name, inputs)).loss
    assert torch.isfinite(loss) and loss.item() > 1.0
    loss.backward()
    head = model.get_output_embeddings().weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
    model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(built, name):
    model, processor = built[name]
    image = _image((64, 64), "red")
    if name == "paligemma":
        inputs = processor(text=["<image>caption en"], images=[image], return_tensors="pt")
        inputs.pop("labels")
    else:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
            add_generation_prompt=True)
        inputs = _inputs(name, processor, [prompt], [image])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_matches_single_rows(built, name):
    """A right-padded batch of two samples gives each row the logits it gets alone."""
    model, processor = built[name]
    samples = _samples(name)
    batch = _training_batch(name, processor, samples)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # row 2 is padded
    with torch.no_grad():
        logits = model(**_model_inputs(batch)).logits
        for row, sample in enumerate(samples):
            alone = _training_batch(name, processor, [sample])
            n = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][row, :n], alone["input_ids"][0])
            single = model(**_model_inputs(alone)).logits
            torch.testing.assert_close(logits[row, :n], single[0], atol=1e-4, rtol=1e-4)
