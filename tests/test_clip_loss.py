"""clip_retrieval's contrastive loss: equal to CLIP's on a plain batch, false negatives and hard negatives exact."""

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
    zero_shot_accuracy,
)


def _features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _reference(images, texts, scale, image_keys, text_keys, negs=(), neg_keys=()):
    """The loss written out term by term: -log softmax over the allowed candidates of each query."""
    n = len(images)

    def term(query, candidates, target):
        logits = [scale * float(query @ c) for c in candidates]
        return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))

    total = 0.0
    for k in range(n):
        allowed = [l for l in range(n) if l == k or (image_keys[l] != image_keys[k] and text_keys[l] != text_keys[k])]
        extra = [negs[m] for m in range(len(negs)) if neg_keys[m] != text_keys[k]]
        total += term(images[k], [texts[l] for l in allowed] + extra, allowed.index(k))  # image -> texts
        total += term(texts[k], [images[l] for l in allowed], allowed.index(k))  # text -> images
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
    assert ours.item() != pytest.approx(contrastive_loss(images, texts, scale, torch.arange(5), torch.arange(5)).item(), rel=1e-3)
    # Every caption the same: nothing is left to contrast with, the loss is exactly 0.
    assert contrastive_loss(images, texts, scale, torch.arange(5), torch.zeros(5, dtype=torch.long)).item() == 0.0


def test_hard_negatives_add_to_the_image_side_only_and_never_a_positive():
    images, texts = _features(4, seed=2)
    negs, _ = _features(3, seed=3)
    scale = torch.tensor(1.5)
    image_keys, text_keys = torch.arange(4), torch.tensor([10, 11, 12, 13])
    neg_keys = torch.tensor([20, 12, 21])  # the second negative is item 2's own caption: not a negative of image 2
    ours = contrastive_loss(images, texts, scale, image_keys, text_keys, negs, neg_keys)
    expected = _reference(images, texts, math.exp(1.5), image_keys.tolist(), text_keys.tolist(), list(negs), neg_keys.tolist())
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    assert ours.item() > contrastive_loss(images, texts, scale, image_keys, text_keys).item()


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
