"""clip_retrieval's trainer parts: the loss (CLIP's on a plain batch; false and hard negatives exact), the
temperature clamp, the zero-shot classifier, and which weights each training mode trains."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from recipes.clip_retrieval.trainer import (
    LOGIT_SCALE_MAX,
    ClampLogitScale,
    class_embeddings,
    contrastive_loss,
    gather_with_local_grad,
    set_training_mode,
    zero_shot_accuracy,
)
from recipes.common.args import FreezeArguments, PeftArguments


def _features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))


def _reference(images, texts, scale, image_keys, text_keys, negs=(), neg_keys=(), captions=None):
    """The loss written out term by term: -log softmax over the allowed candidates of each query. A text is
    no negative of an image it describes: one of the image's `captions` (default: its own text), or a text of
    the same image file."""
    n = len(images)
    captions = captions or [{key} for key in text_keys]

    def term(query, candidates, target):
        logits = [scale * float(query @ c) for c in candidates]
        return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))

    def describes(text, image):
        return image_keys[text] == image_keys[image] or text_keys[text] in captions[image]

    total = 0.0
    for k in range(n):
        texts_of_k = [l for l in range(n) if l == k or not describes(l, k)]
        extra = [negs[m] for m in range(len(negs)) if neg_keys[m] not in captions[k]]
        total += term(images[k], [texts[l] for l in texts_of_k] + extra, texts_of_k.index(k))  # image->texts
        images_of_k = [l for l in range(n) if l == k or not describes(k, l)]
        total += term(texts[k], [images[l] for l in images_of_k], images_of_k.index(k))  # text -> images
    return total / (2 * n)


def test_plain_batch_equals_clips_own_loss():
    images, texts = _features(6)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    keys = torch.arange(6)
    ours = contrastive_loss(images, texts, logit_scale, keys, keys + 100)
    theirs = image_text_contrastive_loss(logit_scale.exp() * texts @ images.T)  # transformers' CLIPModel loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_same_caption_or_same_image_is_not_a_negative():
    images, texts = _features(5, seed=1)
    scale = torch.tensor(2.0)
    image_keys = torch.tensor([0, 1, 2, 1, 4])  # items 1 and 3: the same image
    text_keys = torch.tensor([7, 8, 7, 9, 10])  # items 0 and 2: the same caption text
    ours = contrastive_loss(images, texts, scale, image_keys, text_keys)
    expected = _reference(images, texts, math.exp(2.0), image_keys.tolist(), text_keys.tolist())
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    assert ours.item() != pytest.approx(
        contrastive_loss(images, texts, scale, torch.arange(5), torch.arange(5)).item(), rel=1e-3)
    # Every caption the same: nothing is left to contrast with, the loss is exactly 0.
    assert contrastive_loss(images, texts, scale, torch.arange(5),
                            torch.zeros(5, dtype=torch.long)).item() == 0.0


def test_hard_negatives_add_to_the_image_side_only_and_never_a_positive():
    images, texts = _features(4, seed=2)
    negs, _ = _features(3, seed=3)
    scale = torch.tensor(1.5)
    image_keys, text_keys = torch.arange(4), torch.tensor([10, 11, 12, 13])
    # the second negative is item 2's own caption: not a negative of image 2
    neg_keys = torch.tensor([20, 12, 21])
    ours = contrastive_loss(images, texts, scale, image_keys, text_keys, negs, neg_keys)
    expected = _reference(images, texts, math.exp(1.5), image_keys.tolist(), text_keys.tolist(), list(negs),
                          neg_keys.tolist())
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    assert ours.item() > contrastive_loss(images, texts, scale, image_keys, text_keys).item()


def test_a_caption_of_an_image_not_drawn_for_the_batch_is_not_its_negative():
    """Image 1's other caption is item 0's text, and image 3's is the first hard negative: neither is pushed
    away from it. Text 0 is still a negative of images 2 and 3 (one direction only)."""
    images, texts = _features(4, seed=4)
    negs, _ = _features(2, seed=5)
    scale = torch.tensor(1.5)
    image_keys, text_keys, neg_keys = torch.arange(4), torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21])
    captions = [{10}, {11, 10}, {12}, {13, 20, 14}]
    padded = torch.tensor([sorted(c) + [-1] * (3 - len(c)) for c in captions])
    ours = contrastive_loss(images, texts, scale, image_keys, text_keys, negs, neg_keys, caption_keys=padded)
    expected = _reference(images, texts, math.exp(1.5), image_keys.tolist(), text_keys.tolist(), list(negs),
                          neg_keys.tolist(), captions)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    drawn_only = contrastive_loss(images, texts, scale, image_keys, text_keys, negs, neg_keys)
    assert ours.item() != pytest.approx(drawn_only.item(), rel=1e-3)
    assert drawn_only.item() == pytest.approx(
        _reference(images, texts, math.exp(1.5), image_keys.tolist(), text_keys.tolist(), list(negs),
                   neg_keys.tolist()), rel=1e-5)


def test_single_process_gather_is_the_identity_and_keeps_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_local_grad(x)
    y.sum().backward()
    assert y is x and torch.equal(x.grad, torch.ones(3, 4))


def test_logit_scale_is_clamped_at_ln_100_after_a_step():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(5.3))
    ClampLogitScale().on_optimizer_step(None, None, None, model=model)
    assert model.logit_scale.item() == pytest.approx(math.log(100)) and LOGIT_SCALE_MAX == math.log(100)
    model.logit_scale.data.fill_(3.0)
    ClampLogitScale().on_optimizer_step(None, None, None, model=model)
    assert model.logit_scale.item() == 3.0


def test_zero_shot_classifier_averages_templates_and_takes_the_nearest_class():
    import numpy as np

    # Class 0's two templates average to the x axis, class 1's to the y axis.
    prompts = [np.array([[1.0, 0.2], [1.0, -0.2]]), np.array([[0.3, 1.0], [-0.3, 1.0]])]
    classes = class_embeddings(prompts)
    np.testing.assert_allclose(classes, [[1, 0], [0, 1]], atol=1e-7)
    images = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert zero_shot_accuracy(images, classes, [0, 1, 1]) == pytest.approx(2 / 3)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    text = dict(layer, vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=dict(layer, image_size=32, patch_size=8),
                                projection_dim=16))


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_full_fine_tune_trains_everything_and_frozen_towers_only_their_last_layers_and_heads():
    model = _tiny_clip()
    set_training_mode(model, PeftArguments(peft_method="none"),
                      FreezeArguments(freeze_vision_tower=False, freeze_language_model=False))
    assert _trainable(model) == {name for name, _ in model.named_parameters()}

    model = _tiny_clip()
    freeze = FreezeArguments(freeze_vision_tower=True, freeze_language_model=True,
                             unfreeze_last_n_vision_layers=1)
    set_training_mode(model, PeftArguments(peft_method="none"), freeze, unfreeze_last_n_text_layers=2)
    tops = ("vision_model.encoder.layers.2.", "vision_model.post_layernorm.", "visual_projection.",
            "text_model.encoder.layers.1.", "text_model.encoder.layers.2.", "text_model.final_layer_norm.",
            "text_projection.")
    assert _trainable(model) == ({n for n, _ in model.named_parameters() if n.startswith(tops)}
                                 | {"logit_scale"})
    with pytest.raises(ValueError, match="the text tower has only 3 layers"):
        set_training_mode(_tiny_clip(), PeftArguments(peft_method="none"), freeze,
                          unfreeze_last_n_text_layers=4)


@pytest.mark.parametrize("towers, prefix",
                         [("vision", "vision_model."), ("text", "text_model."), ("both", "")])
def test_lora_adapts_the_attention_of_the_chosen_towers_only(towers, prefix):
    model = set_training_mode(_tiny_clip(), PeftArguments(), FreezeArguments(freeze_vision_tower=False),
                              lora_towers=towers)
    trained = _trainable(model)
    assert trained and all(".lora_" in n and f"base_model.model.{prefix}" in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {
        "q_proj", "k_proj", "v_proj", "out_proj"}  # ...q_proj.lora_A.default.weight
    if towers == "both":
        assert {n.split(".")[2] for n in trained} == {"vision_model", "text_model"}


def test_lora_refuses_to_unfreeze_base_layers_it_would_not_save():
    with pytest.raises(ValueError, match="--unfreeze_last_n_vision_layers: would train base weights, "
                                         "which a LoRA adapter does not save"):
        set_training_mode(_tiny_clip(), PeftArguments(), FreezeArguments(unfreeze_last_n_vision_layers=1))


def test_lora_towers_with_explicit_targets_is_refused_not_ignored():
    """--lora_towers picks the default targets: with --lora_target_modules it would be silently ignored."""
    peft = PeftArguments(lora_target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="--lora_towers vision with --lora_target_modules"):
        set_training_mode(_tiny_clip(), peft, FreezeArguments(), "vision")
    model = set_training_mode(_tiny_clip(), peft, FreezeArguments(), "both")
    assert {n.split(".")[2] for n in _trainable(model)} == {"vision_model", "text_model"}
