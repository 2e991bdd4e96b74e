"""clip_retrieval with SigLIP: the sigmoid loss (transformers' SigLIP loss on a plain batch; matches, false
and hard negatives term by term), the loss a checkpoint defaults to, a fresh sigmoid head on CLIP, the tiny
SigLIP / SigLIP 2 models and the collator's padding rule against their processors, what each training mode
trains, the SigLIP 2 pre-training and the SigLIP 2 base config."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from recipes.clip_retrieval.trainer import add_sigmoid_head, default_loss, set_training_mode, sigmoid_loss
from recipes.common.args import FreezeArguments, PeftArguments


def _features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(
        torch.randn(n, d, generator=g), dim=-1
    )


def _reference(images, texts, t, b, image_keys, text_keys, negs=(), neg_keys=(), captions=None):
    """The loss written out pair by pair: -log sigmoid(z * (t * cos + b)), summed, over the images. z = 1
    where the text is one of the image's `captions` (default: its own text) or of the same image file."""
    captions = captions or [{key} for key in text_keys]
    total = 0.0
    for i in range(len(images)):
        for j in range(len(texts)):
            z = 1 if (i == j or image_keys[i] == image_keys[j] or text_keys[j] in captions[i]) else -1
            total += -math.log(1 / (1 + math.exp(-z * (t * float(images[i] @ texts[j]) + b))))
        for m in range(len(negs)):
            z = 1 if neg_keys[m] in captions[i] else -1
            total += -math.log(1 / (1 + math.exp(-z * (t * float(images[i] @ negs[m]) + b))))
    return total / len(images)


def _tiny_siglip(cls_name="SiglipModel"):
    import transformers

    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    text = dict(layer, vocab_size=100, max_position_embeddings=16)
    if cls_name == "SiglipModel":
        config = transformers.SiglipConfig(
            text_config=text, vision_config=dict(layer, image_size=32, patch_size=8)
        )
    else:
        config = transformers.Siglip2Config(
            text_config=text, vision_config=dict(layer, num_patches=16, patch_size=8)
        )
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config)


def test_plain_batch_equals_transformers_siglip_loss():
    model = _tiny_siglip().eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-3.0)
        out = model(
            input_ids=torch.randint(0, 100, (5, 16)), pixel_values=torch.randn(5, 3, 32, 32), return_loss=True
        )
        keys = torch.arange(5)
        ours = sigmoid_loss(
            out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias, keys, keys + 100
        )
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=1e-6)


def test_same_image_or_same_caption_is_a_match_and_hard_negatives_are_negatives():
    images, texts = _features(5, seed=1)
    negs, _ = _features(3, seed=2)
    t, b = torch.tensor([1.2]), torch.tensor([-2.0])
    image_keys = torch.tensor([0, 1, 2, 1, 4])  # items 1 and 3: the same image
    text_keys = torch.tensor([7, 8, 7, 9, 10])  # items 0 and 2: the same caption text
    neg_keys = torch.tensor([20, 9, 21])  # the second negative is item 3's own caption: a match of image 3
    ours = sigmoid_loss(images, texts, t, b, image_keys, text_keys, negs, neg_keys)
    expected = _reference(
        images,
        texts,
        math.exp(1.2),
        -2.0,
        image_keys.tolist(),
        text_keys.tolist(),
        list(negs),
        neg_keys.tolist(),
    )
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    plain = sigmoid_loss(images, texts, t, b, torch.arange(5), torch.arange(5) + 10)
    assert plain.item() == pytest.approx(
        _reference(images, texts, math.exp(1.2), -2.0, list(range(5)), list(range(10, 15))), rel=1e-5
    )
    assert ours.item() != pytest.approx(plain.item(), rel=1e-3)


def test_gradients_reach_temperature_and_bias():
    images, texts = _features(4, seed=3)
    t, b = torch.tensor([math.log(10)], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    sigmoid_loss(images, texts, t, b, torch.arange(4), torch.arange(4) + 10).backward()
    # At b = -10 every pair looks like a non-match: the positives pull the bias up.
    assert b.grad.item() < 0 and t.grad.item() != 0


def test_default_loss_and_a_fresh_sigmoid_head_for_clip():
    from transformers import CLIPConfig, CLIPModel

    siglip = _tiny_siglip()
    assert default_loss(siglip) == "sigmoid" and default_loss(_tiny_siglip("Siglip2Model")) == "sigmoid"
    bias = siglip.logit_bias.detach().clone()
    assert add_sigmoid_head(siglip) is False and torch.equal(siglip.logit_bias, bias)  # the checkpoint's own
    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(layer, vocab_size=100), vision_config=dict(layer, image_size=32, patch_size=8)
        )
    )
    assert default_loss(clip) == "softmax" and not hasattr(clip, "logit_bias")
    assert add_sigmoid_head(clip) is True
    assert clip.logit_scale.item() == pytest.approx(math.log(10)) and clip.logit_bias.item() == -10.0
    assert "logit_bias" in dict(clip.named_parameters()) and "logit_bias" in clip.state_dict()


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls_name", ["SiglipModel", "Siglip2Model"])
def test_frozen_towers_train_their_last_layers_and_heads(cls_name):
    model = _tiny_siglip(cls_name)
    freeze = FreezeArguments(
        freeze_vision_tower=True, freeze_language_model=True, unfreeze_last_n_vision_layers=1
    )
    set_training_mode(model, PeftArguments(peft_method="none"), freeze, unfreeze_last_n_text_layers=2)
    tops = (
        "vision_model.encoder.layers.2.",
        "vision_model.post_layernorm.",
        "vision_model.head.",
        "text_model.encoder.layers.1.",
        "text_model.encoder.layers.2.",
        "text_model.final_layer_norm.",
        "text_model.head.",
    )
    expected = {n for n, _ in model.named_parameters() if n.startswith(tops)} | {"logit_scale", "logit_bias"}
    assert _trainable(model) == expected


@pytest.mark.parametrize("towers", ["vision", "text", "both"])
def test_lora_adapts_the_encoder_layers_attention_not_the_pooling_head(towers):
    model = set_training_mode(
        _tiny_siglip(), PeftArguments(), FreezeArguments(freeze_vision_tower=False), lora_towers=towers
    )
    trained = _trainable(model)
    prefixes = {"vision": ("vision_model",), "text": ("text_model",), "both": ("vision_model", "text_model")}[
        towers
    ]
    assert {n.split(".")[2] for n in trained} == set(prefixes)
    assert all(".encoder.layers." in n and ".self_attn." in n and ".lora_" in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "k_proj", "v_proj", "out_proj"}


def _synthetic(tmp_path, n=6):
    from data_tools.jsonl import read_jsonl
    from data_tools.synth import make_synthetic

    rows = read_jsonl(make_synthetic("retrieval", n, tmp_path / "synth", seed=1, progress=False))
    return [str(tmp_path / "synth" / r["image"]) for r in rows], [r["captions"][0] for r in rows]


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_tiny_models_load_through_auto_classes_and_the_collator_pads_as_the_processor(
    name, tmp_path, monkeypatch
):
    """The real classes round-trip through AutoModel / AutoProcessor; the collator's batch (texts padded to
    64 on the tokenizer's side, NaFlex patches with their mask and grid) is what the model's processor makes,
    and the embeddings are the model's own features of it."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from recipes.clip_retrieval.collator import collator_for, pools_at_eos, tokenize_texts
    from recipes.clip_retrieval.trainer import embed_images, embed_texts
    from recipes.common.models import resolve_model_path

    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path(f"tiny:{name}")
    model, processor = AutoModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    classes = {
        "siglip": ("SiglipModel", "SiglipProcessor", "SiglipTokenizer"),
        "siglip2": ("Siglip2Model", "Siglip2Processor", "Siglip2Tokenizer"),
    }[name]
    assert (type(model).__name__, type(processor).__name__, type(processor.tokenizer).__name__) == classes
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0
    assert not pools_at_eos(model)

    paths, captions = _synthetic(tmp_path)
    collator = collator_for(model, processor.tokenizer, processor.image_processor)
    ids = tokenize_texts(captions, processor.tokenizer, 64, pooled_at_eos=False)
    texts = collator.texts(ids)
    expected = processor.tokenizer(
        captions, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    assert texts.keys() == expected.keys() and texts["input_ids"].shape == (len(captions), 64)
    for k in texts:
        assert torch.equal(texts[k], expected[k]), k
    # The image processor as the checkpoint configures it (Siglip2Processor's call would impose its own
    # 16 px patches and 256 patches on any checkpoint).
    images = collator.images(paths)
    by_processor = processor.image_processor(
        [Image.open(p).convert("RGB") for p in paths], return_tensors="pt"
    )
    assert images.keys() == by_processor.keys()
    for k in images:
        assert torch.equal(images[k], by_processor[k]), k
    if name == "siglip2":
        assert set(images) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
        assert images["spatial_shapes"].tolist() == [[8, 8]] * len(paths)  # 64 px, 8 px patches
    with torch.no_grad():
        own_images = F.normalize(model.get_image_features(**images).pooler_output, dim=-1).numpy()
        own_texts = F.normalize(model.get_text_features(**expected).pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(embed_images(model, collator, paths, 4, "cpu"), own_images, atol=1e-6)
    np.testing.assert_allclose(embed_texts(model, collator, ids, 4, "cpu"), own_texts, atol=1e-6)
    # A text longer than max_length is cut as the tokenizer cuts it, and counted.
    from recipes.clip_retrieval.collator import TextLengthReport

    report = TextLengthReport()
    long = tokenize_texts([" ".join(captions)], processor.tokenizer, 8, report, pooled_at_eos=False)
    assert long == processor.tokenizer([" ".join(captions)], truncation=True, max_length=8)["input_ids"]
    assert len(long[0]) == 8 and report.truncated == 1 and report.tokens_cut > 0


def test_siglip2_base_real_config_has_its_parameter_count():
    from transformers import SiglipModel

    from bench import real_configs

    with torch.device("meta"):
        model = SiglipModel._from_config(real_configs.siglip2_base_patch16_224())
    assert sum(p.numel() for p in model.parameters()) == 375_187_970  # the model card's 375M
    assert (
        model.config.text_config.max_position_embeddings == 64
        and model.config.vision_config.image_size == 224
    )


def test_siglip2_pretraining_learns_with_the_sigmoid_loss(tmp_path):
    from transformers import AutoModel

    from recipes.common.tiny import pretrain as tiny_pretrain
    from recipes.common.tiny.models import tiny_model_path

    base = tiny_model_path("siglip2", tmp_path / "cache")
    out = tiny_pretrain.pretrain_siglip2(
        tmp_path / "siglip2", base=base, steps=25, batch_size=8, warmup=3, log=lambda m: None
    )
    record = json.loads((out / "pretraining.json").read_text())
    curve = record["loss_curve"]
    # 8 images x (8 annotations + 8 hard negatives) at b = -10: about 1 (the match) x 10 per image at first.
    assert curve[0]["sigmoid_loss"] > 8 and curve[-1]["sigmoid_loss"] < 0.6 * curve[0]["sigmoid_loss"]
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "Siglip2Model" and model.logit_bias.item() != -10.0
    assert tiny_pretrain.STARTS_FROM["siglip2"] == {"base": "siglip2"}


def test_a_caption_of_an_image_not_drawn_for_the_batch_is_a_match():
    """Image 1's other caption is item 0's text, image 3's the first hard negative: z = +1 for those pairs
    only (text 0 against image 2 stays -1)."""
    images, texts = _features(4, seed=4)
    negs, _ = _features(2, seed=5)
    t, b = torch.tensor([1.2]), torch.tensor([-2.0])
    image_keys, text_keys, neg_keys = torch.arange(4), torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21])
    captions = [{10}, {11, 10}, {12}, {13, 20, 14}]
    padded = torch.tensor([sorted(c) + [-1] * (3 - len(c)) for c in captions])
    ours = sigmoid_loss(images, texts, t, b, image_keys, text_keys, negs, neg_keys, caption_keys=padded)
    expected = _reference(images, texts, math.exp(1.2), -2.0, image_keys.tolist(), text_keys.tolist(),
                          list(negs), neg_keys.tolist(), captions)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    assert ours.item() != pytest.approx(
        sigmoid_loss(images, texts, t, b, image_keys, text_keys, negs, neg_keys).item(), rel=1e-3)
