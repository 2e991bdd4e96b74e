"""recipes/common/losses.py: logits at label positions only give the same loss and gradients, through a plain causal LM
and through soft_prompt_caption's --loss_on_label_positions."""

import pytest
import torch

from recipes.common.losses import label_positions_only
from recipes.common.models import resolve_model_path


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLM_RECIPES_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _loss_and_grads(model, params, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, [p.grad.clone() for p in params]


def test_the_mask_keeps_the_positions_whose_next_token_is_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    kwargs = label_positions_only(labels)
    assert kwargs["logits_to_keep"].tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert kwargs["shift_labels"].tolist() == [5, 6, 7]


@pytest.mark.parametrize("num_items_in_batch", [None, 17])  # mean over labels, or the Trainer's sum / count
def test_a_causal_lm_gives_the_same_loss_and_gradients_from_fewer_logits(tiny_cache, num_items_in_batch):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(resolve_model_path("tiny:gpt2"), resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 5:] = 0, 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    params = [model.lm_head.weight, model.transformer.h[0].attn.c_attn.weight]
    full, full_grads = _loss_and_grads(model, params, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    kept, kept_grads = _loss_and_grads(model, params, input_ids=ids, attention_mask=mask, labels=labels, **extra,
                                       **label_positions_only(labels))
    assert full.logits.shape[:2] == (3, 12) and kept.logits.shape == (int((labels[:, 1:] != -100).sum()), 1500)
    # The same sum over the same rows, added in another order: equal to float32 rounding.
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-6, atol=0)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_soft_prompt_trainer_option_gives_the_same_loss_and_gradients(tiny_cache, tmp_path):
    from transformers import TrainingArguments

    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner
    from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

    model = SoftPromptCaptioner.from_parts(resolve_model_path("tiny:clip-vision"), resolve_model_path("tiny:gpt2"),
                                           prompt_length=4)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 9))
    labels = ids.clone()
    labels[0, :2], labels[1, 6:] = -100, -100  # a prompt; padding
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": labels}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    out = {}
    for flag in (False, True):
        trainer = SoftPromptTrainer(model=model, args=args, loss_on_label_positions=flag)
        model.eval()  # no dropout: both passes see the same network
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=(labels != -100).sum())
        loss.backward()
        out[flag] = (loss.detach(), [model.soft_prompt.grad.clone(), model.projection.weight.grad.clone()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=0)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_blip2_gives_the_same_loss_from_logits_kept_at_label_positions(tiny_cache):
    """BLIP-2 takes `logits_to_keep` but slices full-length logits for its own loss: run it without labels and
    compute the loss with `loss_at_label_positions` (what a CaptionTrainer.compute_loss override would do)."""
    from transformers import Blip2ForConditionalGeneration

    from recipes.common.losses import loss_at_label_positions

    model = Blip2ForConditionalGeneration.from_pretrained(resolve_model_path("tiny:blip2-opt")).eval()
    n_query = model.config.num_query_tokens
    torch.manual_seed(0)
    text = torch.randint(4, 1000, (2, 7))
    ids = torch.cat([torch.full((2, n_query), model.config.image_token_id), text], dim=1)
    labels = ids.clone()
    labels[:, : n_query + 2] = -100  # image tokens and a prompt
    labels[1, -2:] = -100  # padding
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n = (labels != -100).sum()
    params = [model.language_projection.weight, model.language_model.lm_head.weight]
    full, full_grads = _loss_and_grads(model, params, **inputs, labels=labels, num_items_in_batch=n)
    model.zero_grad()
    out = model(**inputs, logits_to_keep=label_positions_only(labels)["logits_to_keep"])
    loss = loss_at_label_positions(out.logits, labels, num_items_in_batch=n)
    loss.backward()
    assert out.logits.shape[0] == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, full.loss, rtol=1e-6, atol=0)
    for p, g in zip(params, full_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
