"""Tests for recipes.common.peft_setup on tiny random BLIP-2 / LLaVA / CLIP models built from configs."""

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    T5Config,
)

from recipes.common.args import FreezeArguments, LearningRateArguments, PeftArguments
from recipes.common.peft_setup import (
    apply_freezing,
    apply_lora_and_freezing,
    apply_peft,
    count_parameters,
    default_lora_targets,
    find_components,
    param_groups,
    vision_layer_names,
)
from tests.conftest import lora_module_names

LAYER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
VISION = dict(LAYER, image_size=32, patch_size=8)


def tiny_blip2():
    opt = OPTConfig(vocab_size=100, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    config = Blip2Config(vision_config=VISION, qformer_config=dict(LAYER, encoder_hidden_size=16),
                         text_config=opt.to_dict(), num_query_tokens=4)
    return Blip2ForConditionalGeneration(config)


def tiny_blip2_t5():
    t5 = T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  feed_forward_proj="gated-gelu")
    config = Blip2Config(vision_config=VISION, qformer_config=dict(LAYER, encoder_hidden_size=16),
                         text_config=t5.to_dict(), num_query_tokens=4)
    return Blip2ForConditionalGeneration(config)


def tiny_llava():
    llama = LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, **LAYER)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=llama, image_token_index=99)
    return LlavaForConditionalGeneration(config)


def tiny_clip():
    text = dict(LAYER, vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16))


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def params_under(model, prefix):
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def lora_params(model):
    return {name for name, _ in model.named_parameters() if ".lora_" in name}


# ----------------------------------------------------------------------------------------------- LoRA targets


def test_blip2_default_lora_targets_are_the_opt_decoder_only():
    model = apply_peft(tiny_blip2(), PeftArguments())
    expected = {
        f"language_model.model.decoder.layers.{i}.{leaf}"
        for i in range(2)
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "fc1", "fc2")
    }
    assert set(lora_module_names(model)) == expected  # in particular no vision_model...mlp.fc1
    assert trainable(model) == lora_params(model)


def test_llava_default_lora_targets_are_the_llama_decoder_only():
    model = apply_peft(tiny_llava(), PeftArguments())
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = {f"model.language_model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves}
    assert set(lora_module_names(model)) == expected  # the CLIP vision tower's q_proj... stay untouched


@pytest.mark.parametrize(
    "components, towers",
    [(None, ("vision_model", "text_model")), (("vision",), ("vision_model",)),
     (("language",), ("text_model",))],
)
def test_clip_default_lora_targets_per_tower(components, towers):
    model = apply_peft(tiny_clip(), PeftArguments(), components=components)
    expected = {
        f"{tower}.encoder.layers.{i}.self_attn.{proj}"
        for tower in towers
        for i in range(2)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    assert set(lora_module_names(model)) == expected


def test_default_targets_regex():
    assert default_lora_targets(tiny_blip2()) == (r"(?:language_model)\..*\."
                                                  r"(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2)")
    # lm_head is a leaf, not a container of targets, so it is not part of the prefix.
    assert default_lora_targets(tiny_llava()).startswith(r"(?:model\.language_model)\..*\.(?:q_proj|")
    with pytest.raises(ValueError, match="'bridge'"):
        default_lora_targets(tiny_llava(), components=("bridge",))


def test_blip2_flan_t5_default_lora_targets():
    model = apply_peft(tiny_blip2_t5(), PeftArguments())
    names = lora_module_names(model)
    assert {name.rsplit(".", 1)[-1] for name in names} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert all(name.startswith("language_model.") for name in names)
    assert "language_model.decoder.block.0.layer.1.EncDecAttention.q" in names


def test_explicit_target_names_and_regex():
    model = apply_peft(tiny_clip(), PeftArguments(lora_target_modules=["visual_projection",
                                                                       "text_projection"]))
    assert set(lora_module_names(model)) == {"visual_projection", "text_projection"}
    model = apply_peft(tiny_blip2(), PeftArguments(lora_target_modules=r"qformer\..*\.query"))
    assert set(lora_module_names(model)) == {
        "qformer.encoder.layer.0.attention.attention.query",
        "qformer.encoder.layer.0.crossattention.attention.query",
        "qformer.encoder.layer.1.attention.attention.query",
    }


def test_typo_target_raises_with_suggestion():
    with pytest.raises(ValueError) as error:
        apply_peft(tiny_blip2(), PeftArguments(lora_target_modules=["q_prj"]))
    message = str(error.value)
    assert "'q_prj'" in message and "Did you mean 'q_proj'" in message and "'out_proj'" in message


def test_typo_next_to_a_valid_target_is_still_an_error():
    # peft alone would wrap q_proj and silently ignore the typo.
    with pytest.raises(ValueError, match="'v_prj'"):
        apply_peft(tiny_llava(), PeftArguments(lora_target_modules=["q_proj", "v_prj"]))


def test_regex_matching_nothing_raises():
    with pytest.raises(ValueError, match="matches no module"):
        apply_peft(tiny_llava(), PeftArguments(lora_target_modules=r"language_model\..*\.out_proj"))


def test_unknown_modules_to_save_raises():
    with pytest.raises(ValueError, match="modules_to_save.*'projector'"):
        apply_peft(tiny_llava(), PeftArguments(modules_to_save=["projector"]))


def test_peft_method_none_returns_model_unchanged():
    model = tiny_clip()
    assert apply_peft(model, PeftArguments(peft_method="none")) is model


# --------------------------------------------------------------------------------------------------- freezing


def test_lora_plus_last_vision_layer_blip2():
    model = apply_peft(tiny_blip2(), PeftArguments())
    apply_freezing(model, FreezeArguments(freeze_vision_tower=True, unfreeze_last_n_vision_layers=1,
                                          freeze_language_model=True))
    last_layer = params_under(model, "base_model.model.vision_model.encoder.layers.1.")
    assert last_layer and trainable(model) == lora_params(model) | last_layer


def test_no_lora_train_bridge_only_blip2():
    model = tiny_blip2()
    apply_freezing(model, FreezeArguments(freeze_vision_tower=True, freeze_bridge=False,
                                          freeze_language_model=True))
    assert trainable(model) == (params_under(model, "qformer.") | params_under(model, "language_projection.")
                                | {"query_tokens"})


def test_no_lora_defaults_train_everything_but_the_vision_tower():
    model = tiny_llava()
    apply_freezing(model, FreezeArguments())
    assert trainable(model) == ({n for n, _ in model.named_parameters()}
                                - params_under(model, "model.vision_tower."))


def test_llava_last_n_counts_from_the_feature_layer():
    # vision_feature_layer=-2: the last layer's output is never used, so "last 1" is the one before it.
    model = tiny_llava()
    assert vision_layer_names(model) == ["model.vision_tower.encoder.layers.0"]
    apply_freezing(model, FreezeArguments(unfreeze_last_n_vision_layers=1, freeze_bridge=True,
                                          freeze_language_model=True))
    assert trainable(model) == params_under(model, "model.vision_tower.encoder.layers.0.")
    with pytest.raises(ValueError, match="uses only 1 layers"):
        apply_freezing(model, FreezeArguments(unfreeze_last_n_vision_layers=2))


def test_mllama_last_vision_layers_are_its_global_encoders(module_cache):
    """Mllama's vision tower runs a local encoder, then a global one of the same layers: the last layers are
    the global encoder's, not the end of the longer local list."""
    from transformers import AutoModelForImageTextToText

    from recipes.common.models import resolve_model_path

    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny:mllama"))
    vision = "model.vision_model."
    assert vision_layer_names(model) == [f"{vision}transformer.layers.0", f"{vision}transformer.layers.1",
                                         f"{vision}global_transformer.layers.0"]
    apply_freezing(model, FreezeArguments(unfreeze_last_n_vision_layers=2, freeze_bridge=True,
                                          freeze_language_model=True))
    assert trainable(model) == (params_under(model, f"{vision}transformer.layers.1.")
                                | params_under(model, f"{vision}global_transformer.layers.0."))


def test_llava_unfrozen_vision_layer_gets_gradients():
    model = tiny_llava()
    apply_freezing(model, FreezeArguments(unfreeze_last_n_vision_layers=1, freeze_bridge=True,
                                          freeze_language_model=True))
    image_tokens = (32 // 8) ** 2  # "default" strategy drops the CLS token
    input_ids = torch.tensor([[1] + [99] * image_tokens + [5, 6, 7]])
    loss = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32), labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # Why the last layer is skipped: it gets no gradient at all (and would trip DDP's unused-parameter check).
    assert all(p.grad is None for p in model.model.vision_tower.encoder.layers[1].parameters())


def test_lora_stays_trainable_when_its_component_is_frozen():
    model = apply_peft(tiny_clip(), PeftArguments(), components=("vision",))
    apply_freezing(model, FreezeArguments(freeze_vision_tower=True, freeze_language_model=True))
    assert trainable(model) == lora_params(model) and lora_params(model)


def test_modules_to_save_projector_trains_with_lora():
    model = apply_peft(tiny_llava(), PeftArguments(modules_to_save=["multi_modal_projector"]))
    apply_freezing(model, FreezeArguments())
    projector_copy = params_under(model, "base_model.model.model.multi_modal_projector.modules_to_save.")
    assert projector_copy and trainable(model) == lora_params(model) | projector_copy


def test_components_from_structure():
    llava = find_components(apply_peft(tiny_llava(), PeftArguments()))
    assert llava.of("base_model.model.model.vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert llava.of("lm_head.weight") == "language" and llava.output == "lm_head"
    assert llava.bridge == ("model.multi_modal_projector",)
    blip2 = find_components(tiny_blip2())
    assert blip2.bridge == ("query_tokens", "qformer", "language_projection")
    assert blip2.of("language_model.lm_head.weight") == "language"
    clip = find_components(tiny_clip())
    assert (clip.of("logit_scale"), clip.of("text_projection.weight")) == ("other", "language")
    assert clip.output is None and clip.bridge == ()


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="no transformers config"):
        apply_freezing(torch.nn.Linear(2, 2), FreezeArguments())


# --------------------------------------------------------------------------------------- counts, param groups


@pytest.mark.parametrize("build", [tiny_blip2, tiny_llava, tiny_clip])
def test_counts_per_component_sum_to_total(build):
    model = apply_peft(build(), PeftArguments())
    apply_freezing(model, FreezeArguments(unfreeze_last_n_vision_layers=1))
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.rows["vision"][0] > 0 and counts.rows["language"][0] > 0
    assert "language" in str(counts) and f"{counts.total:,}" in str(counts)


def test_lora_with_a_trained_bridge_counts_the_model_as_it_computes_and_says_what_stays(caplog):
    """Under LoRA the Q-Former trains as a peft copy, counted once; the query tokens, a bare parameter peft
    cannot save, stay frozen, with a warning."""
    model = tiny_blip2()
    base = sum(p.numel() for p in model.parameters())
    peft_args, freeze_args = PeftArguments(), FreezeArguments(freeze_bridge=False)
    with caplog.at_level("WARNING"):
        model = apply_lora_and_freezing(model, peft_args, freeze_args)
    assert peft_args.modules_to_save == ["language_projection", "qformer"]
    assert "query_tokens stays as loaded" in caplog.text
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    copies = {n.replace(".modules_to_save.default.", "."): p.numel() for n, p in model.named_parameters()
              if ".modules_to_save.default." in n}
    counts = count_parameters(model)
    assert counts.total == base + lora
    assert counts.trainable == lora + sum(copies.values())
    assert not model.get_base_model().query_tokens.requires_grad


def test_counts_exact_for_blip2_without_lora():
    model = tiny_blip2()
    apply_freezing(model, FreezeArguments(freeze_vision_tower=True, freeze_bridge=True,
                                          freeze_language_model=False))
    counts = count_parameters(model)
    numel = lambda prefix: sum(p.numel() for n, p in model.named_parameters()  # noqa: E731
                               if n.startswith(prefix))
    bridge = numel("qformer.") + numel("language_projection.") + numel("query_tokens")
    assert counts.rows == {
        "vision": (0, numel("vision_model.")),
        "bridge": (0, bridge),
        "language": (numel("language_model."), numel("language_model.")),
        "other": (0, 0),
    }


def _trainer_decay(model) -> set[str]:
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not use `self`


def test_param_groups_learning_rates_and_decay(tmp_path):
    from transformers import TrainingArguments

    from recipes.clip_retrieval.trainer import ContrastiveTrainer

    model = tiny_clip()
    apply_freezing(model, FreezeArguments(freeze_vision_tower=False, freeze_language_model=False))
    learning_rates = LearningRateArguments(vision_lr=1e-5, lm_lr=2e-5)
    trainer = ContrastiveTrainer(model=model, learning_rates=learning_rates, args=TrainingArguments(
        str(tmp_path), learning_rate=1e-4, weight_decay=0.1, use_cpu=True, report_to=[]))
    decay = set(trainer.get_decay_parameter_names(model))
    assert decay == _trainer_decay(model) - {"logit_scale"}  # CLIP's temperature: never decayed
    groups = param_groups(model, learning_rates, base_lr=1e-4, weight_decay=0.1, decay=decay)
    by_name = {g["name"]: g for g in groups}
    assert {name: (g["lr"], g["weight_decay"]) for name, g in by_name.items()} == {
        "vision": (1e-5, 0.1), "vision_no_decay": (1e-5, 0.0),
        "language": (2e-5, 0.1), "language_no_decay": (2e-5, 0.0),
        "other_no_decay": (1e-4, 0.0),  # logit_scale: base lr, never decayed
    }
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable(model))  # each trainable parameter exactly once
    assert all("bias" in n or "norm" in n
               for n in map(lambda p: names[id(p)], by_name["vision_no_decay"]["params"]))
    assert ("vision_model.encoder.layers.0.layer_norm1.weight"
            in [names[id(p)] for p in by_name["vision_no_decay"]["params"]])
    # The trainer's optimizer holds exactly these groups' settings, parameter by parameter.
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in trainer.create_optimizer().param_groups
                for p in g["params"]}
    assert settings == {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_param_groups_only_trainable_and_bridge_lr():
    model = apply_peft(tiny_llava(), PeftArguments(modules_to_save=["multi_modal_projector"]))
    apply_freezing(model, FreezeArguments())
    groups = param_groups(model, LearningRateArguments(bridge_lr=3e-3), base_lr=1e-4, weight_decay=0.0,
                          decay=_trainer_decay(model))
    assert {g["name"]: g["lr"] for g in groups} == {"bridge": 3e-3, "bridge_no_decay": 3e-3, "language": 1e-4}


def test_lora_and_freezing_saves_every_trained_module(tmp_path):
    """Vision layers unfrozen under LoRA go into modules_to_save, so the adapter folder holds what trained."""
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    from recipes.common.tiny.models import tiny_model_path

    path = tiny_model_path("blip2-opt")
    peft_args, freeze_args = PeftArguments(lora_r=4), FreezeArguments(freeze_bridge=False,
                                                                      unfreeze_last_n_vision_layers=1)
    model = apply_lora_and_freezing(Blip2ForConditionalGeneration.from_pretrained(path), peft_args,
                                    freeze_args)
    assert peft_args.modules_to_save == ["language_projection", "qformer", "vision_model.encoder.layers.1"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or ".modules_to_save." in n for n in trained)
    assert any("vision_model.encoder.layers.1." in n for n in trained)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vision_model.encoder.layers.1." in n and p.requires_grad:
                p.add_(1.0)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(path), tmp_path)
    got, want = reloaded.state_dict(), model.state_dict()
    changed = [k for k in want if "vision_model.encoder.layers.1." in k and ".modules_to_save." in k]
    assert changed and all(torch.equal(got[k], want[k]) for k in changed)
    with pytest.raises(ValueError, match="peft_method none"):
        apply_lora_and_freezing(Blip2ForConditionalGeneration.from_pretrained(path), PeftArguments(),
                                FreezeArguments(freeze_language_model=False))


def test_dora_learns_magnitudes_and_merges_and_rslora_scales_by_the_root_of_the_rank():
    torch.manual_seed(0)
    model = apply_peft(tiny_llava(), PeftArguments(lora_r=4, lora_alpha=8, use_dora=True))
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert magnitudes and len(magnitudes) == len(lora_module_names(model))
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    adapted = model(input_ids=ids).logits
    torch.testing.assert_close(model.merge_and_unload()(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)
    rs = apply_peft(tiny_llava(), PeftArguments(lora_r=4, lora_alpha=8, use_rslora=True))
    layer = next(m for m in rs.modules() if hasattr(m, "lora_A"))
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


def test_the_optimizer_is_the_trainers_own_without_per_component_rates(tmp_path):
    """No --vision_lr / --bridge_lr / --lm_lr: RecipeTrainer's optimizer is exactly transformers.Trainer's.
    With one: its groups, in the optimizer class and arguments the Trainer would use (here its
    `optimizer_cls_and_kwargs`); one that makes its own groups is refused."""
    from transformers import Trainer, TrainingArguments

    from recipes.common.trainer import RecipeTrainer

    model = apply_peft(tiny_llava(), PeftArguments(modules_to_save=["multi_modal_projector"]))
    args = TrainingArguments(str(tmp_path), learning_rate=1e-4, weight_decay=0.1, use_cpu=True, report_to=[])

    def groups(optimizer):
        return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]

    ours = RecipeTrainer(model=model, args=args, learning_rates=LearningRateArguments()).create_optimizer()
    theirs = Trainer(model=model, args=args).create_optimizer()
    assert type(ours) is type(theirs) and groups(ours) == groups(theirs) and ours.defaults == theirs.defaults

    sgd = (torch.optim.SGD, {"lr": 1e-4, "momentum": 0.9})
    optimizer = RecipeTrainer(model=model, args=args, learning_rates=LearningRateArguments(bridge_lr=3e-3),
                              optimizer_cls_and_kwargs=sgd).create_optimizer()
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-4, 3e-3]

    def factory():  # what transformers calls an optimizer factory (Muon, Dion): it groups the model itself
        return lambda model, **kwargs: torch.optim.SGD(model.parameters(), **kwargs)

    trainer = RecipeTrainer(model=model, args=args, learning_rates=LearningRateArguments(bridge_lr=3e-3),
                            optimizer_cls_and_kwargs=(factory, {"lr": 1e-4}))
    with pytest.raises(ValueError, match="makes its own parameter groups, so it cannot take --vision_lr"):
        trainer.create_optimizer()


def test_a_rate_for_a_part_that_does_not_train_is_named_in_a_warning(tmp_path, caplog):
    from transformers import TrainingArguments

    from recipes.common.peft_setup import check_learning_rates
    from recipes.common.trainer import RecipeTrainer

    model = apply_peft(tiny_llava(), PeftArguments())  # LoRA on the LM; vision tower and projector frozen
    rates = LearningRateArguments(vision_lr=1e-5, bridge_lr=1e-3, lm_lr=1e-4)
    assert check_learning_rates(model, rates) == ["--vision_lr", "--bridge_lr"]
    assert check_learning_rates(model, LearningRateArguments(lm_lr=1e-4)) == []
    caplog.clear()
    RecipeTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                  learning_rates=rates)
    assert "--vision_lr, --bridge_lr: nothing trains in that part of the model" in caplog.text
