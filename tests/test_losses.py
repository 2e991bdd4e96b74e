"""recipes/common/losses.py: logits at label positions only give the same loss and gradients, through a plain
causal LM and through the generative recipes' Trainers with --loss_on_label_positions
(recipes/common/trainer.py RecipeTrainer)."""

import pytest
import torch

from recipes.common.losses import label_positions_only
from recipes.common.models import resolve_model_path


pytestmark = pytest.mark.usefixtures("module_cache")


def _assert_grads_close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Sums over other rows in another order (and thread split): float32 rounding relative to the
    # gradient's scale.
    assert b.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def _loss_and_grads(model, params, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, [p.grad.clone() for p in params]


def test_the_mask_keeps_the_positions_whose_next_token_is_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    kwargs = label_positions_only(labels)
    assert kwargs["logits_to_keep"].tolist() == [[False, True, True, False, False],
                                                 [True, False, False, False, False]]
    assert kwargs["shift_labels"].tolist() == [5, 6, 7]


@pytest.mark.parametrize("num_items_in_batch", [None, 17])  # mean over labels, or the Trainer's sum / count
def test_a_causal_lm_gives_the_same_loss_and_gradients_from_fewer_logits(num_items_in_batch):
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
    full, full_grads = _loss_and_grads(model, params, input_ids=ids, attention_mask=mask, labels=labels,
                                       **extra)
    kept, kept_grads = _loss_and_grads(model, params, input_ids=ids, attention_mask=mask, labels=labels,
                                       **extra, **label_positions_only(labels))
    assert (full.logits.shape[:2] == (3, 12)
            and kept.logits.shape == (int((labels[:, 1:] != -100).sum()), 1500))
    # The same sum over the same rows, added in another order: equal to float32 rounding.
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-6, atol=0)
    for a, b in zip(kept_grads, full_grads):
        _assert_grads_close(a, b)


def _trainer_loss_and_grads(trainer_class, model, inputs: dict, params, tmp_path, **trainer_kwargs) -> dict:
    """The recipe Trainer's `compute_loss` (the training step's loss) and gradients, without and with the
    option."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    n = (inputs["labels"] != -100).sum()  # the Trainer's num_items_in_batch for causal LMs
    out = {}
    for flag in (False, True):
        trainer = trainer_class(model=model, args=args, loss_on_label_positions=flag, **trainer_kwargs)
        model.eval()  # no dropout: both passes see the same network
        model.zero_grad()
        loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True, num_items_in_batch=n)
        loss.backward()
        out[flag] = (loss.detach(), [p.grad.clone() for p in params])
        # On: one row of logits per position whose next token is a label (flattened; every label here has a
        # position before it, image or prefix tokens at least); off: [batch, length, vocab].
        n_label_rows = int((inputs["labels"] != -100).sum())
        assert outputs.logits.shape[:-1] == ((n_label_rows,) if flag else (2, outputs.logits.shape[1]))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=0)
    for a, b in zip(out[True][1], out[False][1]):
        _assert_grads_close(a, b)
    return out


def test_soft_prompt_trainer_option_gives_the_same_loss_and_gradients(tmp_path):
    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner
    from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

    model = SoftPromptCaptioner.from_parts(resolve_model_path("tiny:clip-vision"),
                                           resolve_model_path("tiny:gpt2"), prompt_length=4)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 9))
    labels = ids.clone()
    labels[0, :2], labels[1, 6:] = -100, -100  # a prompt; padding
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids,
              "attention_mask": torch.ones_like(ids), "labels": labels}
    _trainer_loss_and_grads(SoftPromptTrainer, model, inputs, [model.soft_prompt, model.projection.weight],
                            tmp_path)


def _image_text_batch(image_token_id: int, n_image: int, text_length: int = 7) -> dict:
    """Two samples: the image tokens, a prompt of 2 tokens, an answer; the second right-padded by 2."""
    torch.manual_seed(0)
    text = torch.randint(4, 1000, (2, text_length))
    ids = torch.cat([torch.full((2, n_image), image_token_id), text], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : n_image + 2] = -100
    return {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": ids, "attention_mask": mask,
            "labels": labels}


def test_blip2_caption_trainer_option_gives_the_same_loss_and_gradients(tmp_path):
    """BLIP-2 slices full-length logits for its own loss: the CaptionTrainer computes it from the kept
    ones."""
    from transformers import Blip2ForConditionalGeneration

    from recipes.blip2_lora_caption.trainer import CaptionTrainer

    model = Blip2ForConditionalGeneration.from_pretrained(resolve_model_path("tiny:blip2-opt"))
    inputs = _image_text_batch(model.config.image_token_id, model.config.num_query_tokens)
    params = [model.language_projection.weight, model.language_model.lm_head.weight,
              model.qformer.layernorm.weight]
    _trainer_loss_and_grads(CaptionTrainer, model, inputs, params, tmp_path)


def test_llava_instruct_trainer_option_gives_the_same_loss_and_gradients(tmp_path):
    """LLaVA under LoRA: its own loss on the kept logits (`shift_labels`), through PEFT's wrapper."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from recipes.llava_instruct.trainer import InstructTrainer

    base = LlavaForConditionalGeneration.from_pretrained(resolve_model_path("tiny:llava"))
    n_image = base.config.image_seq_length
    model = get_peft_model(base,
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    params = [p for name, p in model.named_parameters() if p.requires_grad][:2]
    _trainer_loss_and_grads(InstructTrainer, model, _image_text_batch(base.config.image_token_id, n_image),
                            params, tmp_path)


def test_blip2_option_trains_to_the_same_weights_under_gradient_accumulation(tmp_path):
    """The BLIP-2 loss computed by the Trainer (compute_loss_func) is normalised over the whole accumulated
    batch, as the model's own: two optimizer steps of two micro-batches of unequal label counts end at the
    same weights."""
    from transformers import Blip2ForConditionalGeneration, TrainingArguments

    from recipes.blip2_lora_caption.trainer import CaptionTrainer

    base = Blip2ForConditionalGeneration.from_pretrained(resolve_model_path("tiny:blip2-opt"))
    batch = _image_text_batch(base.config.image_token_id, base.config.num_query_tokens)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 2  # 4 samples, 5 and 3 labels

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    weights = {}
    for flag in (False, True):
        model = Blip2ForConditionalGeneration.from_pretrained(resolve_model_path("tiny:blip2-opt"))
        model.requires_grad_(False)
        model.language_projection.requires_grad_(True)
        args = TrainingArguments(output_dir=str(tmp_path / str(flag)), use_cpu=True, report_to="none",
                                 max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                                 logging_strategy="no", save_strategy="no", remove_unused_columns=False,
                                 dataloader_drop_last=True, seed=0)
        CaptionTrainer(model=model, args=args, train_dataset=samples, data_collator=collate,
                       loss_on_label_positions=flag).train()
        weights[flag] = model.language_projection.weight.detach().clone()
    start = base.language_projection.weight.detach()
    assert not torch.allclose(weights[False], start)
    torch.testing.assert_close(weights[True] - start, weights[False] - start, rtol=1e-4, atol=1e-7)


def _tiny_qwen2_5_vl():
    """A random Qwen2.5-VL of toy size (text-only batches need no processor): a model whose class sets
    `accepts_loss_kwargs = False`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  patch_size=14)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def test_a_model_that_takes_no_token_count_trains_as_one_batch_under_gradient_accumulation(tmp_path):
    """Qwen2.5-VL returns each micro-batch's mean loss (its class sets accepts_loss_kwargs = False), which
    accumulation would weight per micro-batch: RecipeTrainer computes the loss itself (`causal_lm_loss`), so
    two micro-batches of 6 and 2 labels take the step that one batch of both takes."""
    from transformers import TrainingArguments

    from recipes.common.losses import causal_lm_loss
    from recipes.common.trainer import RecipeTrainer

    ids = torch.randint(4, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :2], labels[1, :6] = -100, -100  # 6 and 2 labels
    samples = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
               for i in range(2)]

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    start = _tiny_qwen2_5_vl().lm_head.weight.detach().clone()
    steps = {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = _tiny_qwen2_5_vl()
        args = TrainingArguments(output_dir=str(tmp_path / str(batch_size)), use_cpu=True, report_to="none",
                                 max_steps=1, per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
                                 remove_unused_columns=False, seed=0)
        trainer = RecipeTrainer(model=model, args=args, train_dataset=samples, data_collator=collate)
        assert trainer.compute_loss_func is causal_lm_loss
        trainer.train()
        steps[batch_size] = model.lm_head.weight.detach() - start
    assert steps[2].abs().max() > 0
    torch.testing.assert_close(steps[1], steps[2], rtol=1e-4, atol=1e-7)
