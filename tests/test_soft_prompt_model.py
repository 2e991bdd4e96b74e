"""SoftPromptCaptioner on the tiny CLIP vision + GPT-2: prefix layout, exact loss, generation, save/load, what
trains."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from recipes.common.peft_setup import count_parameters
from recipes.common.tiny.models import build_tiny
from recipes.soft_prompt_caption.modeling import (SoftPromptCaptioner, load_trained, save_trained,
                                                  trained_sizes)

M = -100


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return str(build_tiny("clip-vision", d / "vision")), str(build_tiny("gpt2", d / "gpt2"))


def _model(bases, **options):
    torch.manual_seed(0)
    return SoftPromptCaptioner.from_parts(*bases, **options).eval()


def _pixels(n=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_only_soft_prompt_and_projection_train_and_their_sizes_are_printed(bases):
    model = _model(bases)
    # Tiny sizes: GPT-2 hidden 128, CLIP vision hidden 64. CLIP-B/32 + GPT-2 would read 10 x 768 + 768 x 768
    # + 768.
    assert trained_sizes(model) == ("trained: soft_prompt 10 x 128 + projection.weight 128 x 64 "
                                    "+ projection.bias 128 = 9,600 parameters")
    rows = count_parameters(model).rows
    assert (rows["bridge"] == (9600, 9600) and rows["vision"][0] == 0 and rows["language"][0] == 0
            and rows["other"] == (0, 0))
    assert model.soft_prompt.std().item() == pytest.approx(0.02, rel=0.1)  # N(0, 0.02)
    mlp = _model(bases, projection="mlp", prompt_length=0)
    assert count_parameters(mlp).trainable == (
        (64 * 128 + 128) + (128 * 128 + 128))  # linear-GELU-linear, no prompt


def test_prefix_is_soft_prompt_then_image_vectors(bases):
    model = _model(bases, prompt_length=3)
    prefix = model.prefix_embeddings(_pixels())
    assert prefix.shape == (2, 4, 128) and model.config.prefix_length == 4
    assert torch.equal(prefix[:, :3], model.soft_prompt.expand(2, -1, -1))
    pooled = model.vision_model(pixel_values=_pixels()).pooler_output
    torch.testing.assert_close(prefix[:, 3], model.projection(pooled))
    patches = _model(bases, prompt_length=0, vision_features="patches")
    assert (patches.config.prefix_length == 64
            and patches.prefix_embeddings(_pixels()).shape == (2, 64, 128))  # (64 / 8)^2, no CLS


def test_loss_is_cross_entropy_over_the_caption_tokens_only(bases):
    model = _model(bases, prompt_length=3)
    input_ids = torch.tensor([[7, 8, 9, 10, 0], [11, 12, 13, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[M, 8, 9, 10, M],
                           [11, 12, 13, M, M]])  # row 0: a one-token caption prompt, then padding
    out = model(pixel_values=_pixels(), input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 4 + 5, 1500)
    logp = out.logits.log_softmax(-1)
    # Text position j is predicted at sequence position 4 + j - 1: caption token 0 from the last image vector.
    targets = [(b, j) for b in range(2) for j in range(5) if labels[b, j] != M]
    expected = -torch.stack([logp[b, 4 + j - 1, labels[b, j]] for b, j in targets]).mean()
    torch.testing.assert_close(out.loss, expected)
    # The Trainer passes the count of non -100 labels as num_items_in_batch: exactly the targets here.
    summed = model(pixel_values=_pixels(), input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                   num_items_in_batch=torch.tensor(len(targets)))
    torch.testing.assert_close(summed.loss, expected)


def test_greedy_and_beam_generation_continue_the_prefix(bases):
    model = _model(bases, prompt_length=3)
    with torch.no_grad():
        model.soft_prompt.normal_(0, 1.0)  # make the prefix matter for the random LM
    pixels, prompt = _pixels(), torch.tensor([[5, 6], [5, 6]])
    greedy = model.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=5, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(5):  # greedy by hand, a full forward pass per token
            ids = torch.cat([
                ids, model(pixel_values=pixels, input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ids) and torch.equal(greedy[:, :2], prompt)

    beam = model.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=5, num_beams=3,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    with torch.no_grad():
        logp = model(pixel_values=pixels, input_ids=beam.sequences).logits.log_softmax(-1)
    new = beam.sequences[:, 2:]
    # Beam scores are the log-probability of the 5 new tokens per token (length_penalty 1): from our prefix.
    ours = torch.stack([sum(logp[b, 4 + 2 + j - 1, new[b, j]] for j in range(5)) / 5 for b in range(2)])
    torch.testing.assert_close(beam.sequences_scores, ours, atol=1e-4, rtol=1e-4)

    bare = model.generate(pixel_values=pixels, max_new_tokens=3, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert bare.shape == (2, 3)  # no prompt ids: only the caption


def test_save_pretrained_round_trip_and_auto_model(bases, tmp_path):
    model = _model(bases, prompt_length=4, projection="mlp")
    model.save_pretrained(tmp_path / "full")
    again = AutoModel.from_pretrained(tmp_path / "full").eval()
    assert (type(again) is SoftPromptCaptioner
            and (again.config.prompt_length, again.config.projection) == (4, "mlp"))
    assert again.language_model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=_pixels(), input_ids=ids).logits,
                           again(pixel_values=_pixels(), input_ids=ids).logits)
    # GPT-2 ties its output layer to its input embeddings; still tied after loading.
    assert (again.language_model.lm_head.weight.data_ptr()
            == again.language_model.transformer.wte.weight.data_ptr())


def test_trained_parts_alone_on_disk_and_back(bases, tmp_path):
    model = _model(bases)
    with torch.no_grad():
        model.soft_prompt.add_(1.0)
        model.projection.bias.fill_(0.5)
    save_trained(model, tmp_path / "run")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "run" / "trained.safetensors")) == [
        "projection.bias", "projection.weight", "soft_prompt"]
    rebuilt = SoftPromptCaptioner.from_trained(tmp_path / "run").eval()
    ids = torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=_pixels(), input_ids=ids).logits,
                           rebuilt(pixel_values=_pixels(), input_ids=ids).logits)
    other = _model(bases, prompt_length=5)
    with pytest.raises(ValueError, match=r"trained.safetensors: soft_prompt has shape \(10, 128\), "
                                         r"the model \(5, 128\)"):
        load_trained(other, tmp_path / "run")


def test_soft_prompt_from_the_embeddings_of_a_text(bases):
    model = _model(bases, prompt_length=5)
    tokenizer = AutoTokenizer.from_pretrained(bases[1])
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    model.init_soft_prompt_from_text(tokenizer, "a red circle")
    wte = model.language_model.get_input_embeddings().weight
    assert torch.equal(model.soft_prompt, wte[[ids[0], ids[1], ids[2], ids[0], ids[1]]])
    with pytest.raises(ValueError, match="has no tokens"):
        model.init_soft_prompt_from_text(tokenizer, "")


def test_frozen_parts_load_in_the_asked_dtype_and_trained_parts_stay_float32(bases):
    model = SoftPromptCaptioner.from_parts(*bases, dtype=torch.bfloat16)
    assert model.vision_model.dtype == model.language_model.dtype == torch.bfloat16
    assert model.soft_prompt.dtype == model.projection.weight.dtype == torch.float32
    out = model(pixel_values=_pixels(), input_ids=torch.tensor([[5, 6]] * 2),
                labels=torch.tensor([[5, 6]] * 2))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.soft_prompt.grad.dtype == torch.float32 and model.soft_prompt.grad.abs().sum() > 0


def test_a_full_clip_checkpoint_gives_its_vision_tower(bases, tmp_path):
    from transformers import AutoImageProcessor, CLIPModel

    clip = build_tiny("clip", tmp_path / "clip")  # both towers, as openai/clip-vit-base-patch32 on the Hub
    model = SoftPromptCaptioner.from_parts(str(clip), bases[1])
    tower = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    assert ({k: v.shape for k, v in model.vision_model.state_dict().items()}
            == {k: v.shape for k, v in tower.items()})
    assert all(torch.equal(v, tower[k]) for k, v in model.vision_model.state_dict().items())
    assert AutoImageProcessor.from_pretrained(clip).crop_size["height"] == 64


def test_bad_options_are_clear_errors(bases):
    with pytest.raises(ValueError, match="prompt_length must be >= 0, got -1"):
        SoftPromptCaptioner.from_parts(*bases, prompt_length=-1)
    with pytest.raises(ValueError, match=r"projection must be one of \('linear', 'mlp'\), got 'conv'"):
        SoftPromptCaptioner.from_parts(*bases, projection="conv")


def test_sizes_for_clip_b32_and_gpt2():
    """The documented example: 10 x 768 + 768 x 768 (+ bias) with a linear projection; built on the meta
    device."""
    from transformers import CLIPVisionConfig, GPT2Config

    from recipes.soft_prompt_caption.modeling import SoftPromptCaptionerConfig

    with torch.device("meta"):  # CLIPVisionConfig() and GPT2Config() are ViT-B/32 and GPT-2 small
        model = SoftPromptCaptioner(SoftPromptCaptionerConfig(vision_config=CLIPVisionConfig(),
                                                              text_config=GPT2Config()))
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    assert trained_sizes(model) == ("trained: soft_prompt 10 x 768 + projection.weight 768 x 768 "
                                    "+ projection.bias 768 = 598,272 parameters")
    assert count_parameters(model).total == 87_456_000 + 124_439_808 + 598_272


def test_any_causal_lm_works_in_place_of_gpt2(bases, tmp_path):
    # A Llama (rotary positions, untied head, other hidden size) in place of GPT-2: the same prefix, loss and
    # decoding.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1500, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                                 num_attention_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "llama")
    model = _model((bases[0], str(tmp_path / "llama")), prompt_length=2)
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    assert count_parameters(model).trainable == 2 * 96 + 96 * 64 + 96
    input_ids, labels = torch.tensor([[7, 8, 9]]), torch.tensor([[7, 8, 9]])
    out = model(pixel_values=_pixels(1), input_ids=input_ids, labels=labels)
    logp = out.logits.log_softmax(-1)
    torch.testing.assert_close(out.loss,
                               -torch.stack([logp[0, 3 + j - 1, labels[0, j]] for j in range(3)]).mean())
    greedy = model.generate(pixel_values=_pixels(1), input_ids=input_ids, max_new_tokens=3, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    ids = input_ids
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([
                ids, model(pixel_values=_pixels(1), input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids)


def test_activation_checkpointing_recomputes_the_layers_of_both_parts_with_the_same_gradients(bases):
    ids, labels = torch.tensor([[7, 8, 9]]), torch.tensor([[M, 8, 9]])
    grads = []
    for checkpointing in (False, True):
        model = _model(bases, prompt_length=3).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
            assert {type(m).__name__ for m in layers} >= {"CLIPEncoderLayer", "GPT2Block"}
        model(pixel_values=_pixels(1), input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_trained_weights_are_replaced_whole_or_not_at_all(bases, tmp_path, monkeypatch):
    """A save stopped before its file is complete and on disk (a kill, a full disk) leaves the previous
    trained.safetensors as it was and no temp file."""
    from safetensors.torch import load_file

    model = _model(bases)
    save_trained(model, tmp_path)
    before = load_file(tmp_path / "trained.safetensors")
    with torch.no_grad():
        model.soft_prompt.add_(1.0)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_trained(model, tmp_path)
    monkeypatch.undo()
    after = load_file(tmp_path / "trained.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before) and sorted(after) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "trained.safetensors"]


def test_patches_from_images_smaller_than_the_towers_config_are_refused(bases):
    """A tower that takes any image size (DINOv2: config 518 px, its processor 224 px) gives fewer patches
    than the length budget counted: refused, not read with its CLS token as a patch."""
    from transformers import AutoModelForCausalLM, Dinov2Config, Dinov2Model

    tower = Dinov2Model(Dinov2Config(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64))
    model = SoftPromptCaptioner.from_models(tower, AutoModelForCausalLM.from_pretrained(bases[1]),
                                            vision_features="patches")
    assert model.image_features(torch.randn(1, 3, 64, 64)).shape == (1, 64, 32)
    with pytest.raises(ValueError, match=r"gave 17 vectors for 32 x 32 px images, fewer than the 64 patches"):
        model.image_features(torch.randn(1, 3, 32, 32))


def test_a_frozen_soft_prompt_and_projection_are_saved_as_the_run_used_them(bases, tmp_path):
    """--freeze_bridge true with LoRA: the bridge keeps its random start, which no base holds and a reload
    cannot draw again: it is saved, and the rebuilt model is the run's."""
    from peft import LoraConfig, get_peft_model

    model = _model(bases)
    model.soft_prompt.requires_grad_(False)
    model.projection.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    save_trained(model, tmp_path)
    torch.manual_seed(123)  # the rebuild's fresh parts would start elsewhere
    rebuilt = SoftPromptCaptioner.from_trained(tmp_path).eval()
    base = model.get_base_model()
    assert torch.equal(rebuilt.soft_prompt, base.soft_prompt)
    assert torch.equal(rebuilt.projection.weight, base.projection.weight)
    ids = torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixel_values=_pixels(), input_ids=ids).logits,
                                   model.eval()(pixel_values=_pixels(), input_ids=ids).logits)
