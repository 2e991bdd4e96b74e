"""Pre-training of the tiny BLIP-2 base: corpus, learning, reproducibility, caching, and no leak into the fine-tuning data."""

import json

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from data_tools.hashing import content_hash
from data_tools.synth import make_scene
from recipes.common.tiny import pretrain as tiny_pretrain
from recipes.common.models import resolve_model_path
from recipes.common.tiny.models import tiny_model_path
from recipes.common.tiny.pretrain import _train, annotation, corpus_batch, pretrain_blip2, pretrained_tiny_path, text_corpus


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_path("blip2-opt", tmp_path_factory.mktemp("cache"))


def test_annotation_names_every_attribute_in_reading_order():
    objects = [{"shape": "circle", "color": "red", "size": "small", "position": "top left"},
               {"shape": "cross", "color": "blue", "size": "large", "position": "bottom right"}]
    assert annotation(objects) == ("top-left: shape circle, colour red, size small; "
                                   "bottom-right: shape cross, colour blue, size large")
    images, texts = corpus_batch(3, 4)
    assert len(images) == 4 and texts[1] == annotation(make_scene(tiny_pretrain.PRETRAIN_SEED, 13))
    assert corpus_batch(3, 4)[1] == texts  # any batch can be redrawn


def test_text_corpus_is_captions_questions_and_instructions_in_both_languages():
    texts = text_corpus(n_scenes=20)
    assert any(t.startswith("there are") or t.startswith("an image of") for t in texts)
    assert any("?" in t for t in texts) and any("图" in t for t in texts)
    assert text_corpus(n_scenes=20) == texts and text_corpus(n_scenes=20, seed=1) != texts


def test_pretraining_learns_and_is_reproducible(base, tmp_path):
    a = pretrain_blip2(tmp_path / "a", base=base, steps=40, text_steps=20, batch_size=8, lr=2e-3, warmup=5,
                       log=lambda m: None)
    record = json.loads((a / "pretraining.json").read_text())
    text_first, text_last = record["text_loss_curve"][0], record["text_loss_curve"][-1]  # stage 1: the LM on text
    assert text_last["step"] == 19 and set(text_last) == {"step", "text_loss"}
    assert text_last["text_loss"] < 0.85 * text_first["text_loss"]
    first, last = record["loss_curve"][0], record["loss_curve"][-1]  # stage 2: images, text loss at 0.2
    assert last["step"] == 39 and last["image_loss"] < 0.7 * first["image_loss"] and last["text_loss"] < text_first["text_loss"]
    assert (record["text_steps"], record["steps"], record["text_weight"]) == (20, 40, 0.2)
    model = Blip2ForConditionalGeneration.from_pretrained(a)  # an ordinary checkpoint
    before = Blip2ForConditionalGeneration.from_pretrained(base)
    for name in ("vision_model.embeddings.patch_embedding.weight", "query_tokens",
                 "language_model.model.decoder.embed_tokens.weight"):  # every part trained
        assert not torch.equal(model.state_dict()[name], before.state_dict()[name]), name
    b = pretrain_blip2(tmp_path / "b", base=base, steps=40, text_steps=20, batch_size=8, lr=2e-3, warmup=5,
                       log=lambda m: None)
    other = Blip2ForConditionalGeneration.from_pretrained(b).state_dict()
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items())


def test_train_loop_minimises_the_weighted_sum_and_records_the_losses_unweighted():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    losses = lambda step: {"a": (w - 3).pow(2).sum(), "b": (w + 3).pow(2).sum()}  # noqa: E731
    curve, _ = _train([w], losses, steps=400, lr=0.05, warmup=1, weight_decay=0.0, seed=0, log=lambda m: None,
                      what="test", weights={"b": 0.25})
    assert curve[0] == {"step": 0, "a": 4.0, "b": 16.0}
    assert w.item() == pytest.approx(1.8, abs=0.02)  # argmin of (w - 3)^2 + 0.25 (w + 3)^2 = (3 - 0.75) / 1.25


def test_cached_base_is_built_once_and_named_tiny_pretrained(base, tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(out, base, log):  # the cache logic, not the training, is under test here
        calls.append(base)
        pretrain_blip2(out, base=base, steps=2, batch_size=2, log=log)

    monkeypatch.setitem(tiny_pretrain.PRETRAINERS, "blip2-opt", fake_pretrain)
    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path))
    path = pretrained_tiny_path("blip2-opt")
    assert path.name.startswith("blip2-opt-pretrained-v") and (path / "pretraining.json").exists()
    assert resolve_model_path("tiny:blip2-opt-pretrained") == str(path) and len(calls) == 1
    assert resolve_model_path("tiny:blip2-opt") == str(tmp_path / "tiny" / base.name)
    assert resolve_model_path("Salesforce/blip2-opt-2.7b") == "Salesforce/blip2-opt-2.7b"
    with pytest.raises(ValueError, match="blip2-opt-pretrained"):
        resolve_model_path("tiny:blip3")


def test_pretraining_images_are_not_fine_tuning_images(tmp_path):
    """The embedded default's images (seed 0) never appear among the pre-training images."""
    from data_tools.synth import make_synthetic

    images, _ = corpus_batch(0, 1000)
    pre = set()
    for i, im in enumerate(images):
        im.save(tmp_path / f"p{i}.png")
        pre.add(content_hash(tmp_path / f"p{i}.png"))
    fine = make_synthetic("caption", 1000, tmp_path / "fine", seed=0, progress=False).parent / "images"
    assert len(pre) == 1000 and not pre & {content_hash(p) for p in fine.glob("*.png")}


def test_clip_pretraining_learns_and_exports_its_vision_tower(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    base = tiny_model_path("clip", tmp_path / "cache")
    clip = tiny_pretrain.pretrain_clip(tmp_path / "clip", base=base, steps=80, batch_size=16, warmup=5,
                                       log=lambda m: None)
    curve = json.loads((clip / "pretraining.json").read_text())["loss_curve"]
    assert curve[-1]["contrastive_loss"] < 0.85 * curve[0]["contrastive_loss"]  # from (ln 32 + ln 16) / 2: 16 texts + 16 hard negatives
    vision = tiny_pretrain.export_clip_vision(tmp_path / "vision", clip=clip, log=lambda m: None)
    full, alone = CLIPModel.from_pretrained(clip).vision_model.state_dict(), CLIPVisionModel.from_pretrained(vision).state_dict()
    assert full.keys() == alone.keys() and all(torch.equal(full[k], alone[k]) for k in full)
    assert not torch.equal(alone["embeddings.patch_embedding.weight"],
                           CLIPModel.from_pretrained(base).vision_model.state_dict()["embeddings.patch_embedding.weight"])


def test_language_model_pretraining_gpt2_and_llava(tmp_path):
    from transformers import AutoTokenizer, CLIPModel, GPT2LMHeadModel, LlavaForConditionalGeneration

    cache = tmp_path / "cache"
    gpt2 = tiny_pretrain.pretrain_gpt2(tmp_path / "gpt2", base=tiny_model_path("gpt2", cache), steps=30, batch_size=8,
                                       lr=3e-3, warmup=5, log=lambda m: None)
    curve = json.loads((gpt2 / "pretraining.json").read_text())["loss_curve"]
    assert curve[-1]["text_loss"] < 0.7 * curve[0]["text_loss"]
    GPT2LMHeadModel.from_pretrained(gpt2), AutoTokenizer.from_pretrained(gpt2)  # an ordinary checkpoint

    clip = tiny_model_path("clip", cache)  # any CLIP with the same vision config will do here
    base = tiny_model_path("llava", cache)
    llava = tiny_pretrain.pretrain_llava(tmp_path / "llava", base=base, clip=clip, steps=10, batch_size=8, warmup=2,
                                         log=lambda m: None)
    after, before = (LlavaForConditionalGeneration.from_pretrained(p).state_dict() for p in (llava, base))
    tower = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    assert all(torch.equal(after[f"model.vision_tower.{k}"], v) for k, v in tower.items())  # the CLIP tower, as is
    projector = [k for k in after if k.startswith("model.multi_modal_projector.")]
    assert projector and all(torch.equal(after[k], before[k]) for k in projector)  # left for stage 1
    assert not torch.equal(after["model.language_model.embed_tokens.weight"], before["model.language_model.embed_tokens.weight"])


def test_text_batches_start_with_bos_whatever_the_tokenizer():
    from transformers import AutoTokenizer

    for name in ("gpt2", "blip2-opt"):  # GPT-2's tokenizer adds no bos, OPT's does
        tok = AutoTokenizer.from_pretrained(tiny_model_path(name))
        batch = tiny_pretrain._text_batch(tok, ["a red circle", "a blue square in the middle"])
        assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()
        n = int(batch["attention_mask"][0].sum())
        assert batch["input_ids"][0, n - 1] == tok.eos_token_id and (batch["labels"][0, n:] == -100).all()
        assert (batch["input_ids"][0, 1:n - 1] == torch.tensor(tok("a red circle", add_special_tokens=False)["input_ids"])).all()


def test_shape_negative_changes_exactly_one_shape():
    for i in range(50):
        objects = make_scene(tiny_pretrain.PRETRAIN_SEED, i)
        negative, positive = tiny_pretrain.shape_negative(i), annotation(objects)
        changed = [(a, b) for a, b in zip(positive.split("; "), negative.split("; ")) if a != b]
        assert len(negative.split("; ")) == len(objects) and len(changed) == 1
        a, b = changed[0]
        assert a.split(", ")[1:] == b.split(", ")[1:] and a.split(": ")[0] == b.split(": ")[0]  # colour, size, place kept
        assert tiny_pretrain.shape_negative(i) == negative  # a pure function of the index
