"""Pre-training of the tiny BLIP-2 base: corpus, learning, reproducibility, caching, and no leak into the
fine-tuning data."""

import json

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from data_tools.synth import make_scene
from recipes.common.tiny import pretrain as tiny_pretrain
from recipes.common.models import resolve_model_path
from recipes.common.tiny.models import tiny_model_path
from recipes.common.tiny.pretrain import (_train, annotation, corpus_batch, pretrain_blip2,
                                          pretrained_tiny_path, text_corpus)


pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_path("blip2-opt", tmp_path_factory.mktemp("cache"))


def test_annotation_names_every_attribute_in_reading_order():
    objects = [{"shape": "circle", "color": "red", "size": "small", "position": "top left"},
               {"shape": "cross", "color": "blue", "size": "large", "position": "bottom right"}]
    assert annotation(objects) == ("top-left: shape circle, colour red, size small; "
                                   "bottom-right: shape cross, colour blue, size large")
    images, texts = corpus_batch(3, 4)
    scene = tiny_pretrain.pretraining_scenes(16)[13]
    assert len(images) == 4 and texts[1] == annotation(make_scene(tiny_pretrain.PRETRAIN_SEED, scene))
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
    # stage 1: the LM on text
    text_first, text_last = record["text_loss_curve"][0], record["text_loss_curve"][-1]
    assert text_last["step"] == 19 and set(text_last) == {"step", "text_loss"}
    assert text_last["text_loss"] < 0.85 * text_first["text_loss"]
    first, last = record["loss_curve"][0], record["loss_curve"][-1]  # stage 2: images, text loss at 0.2
    assert (last["step"] == 39 and last["image_loss"] < 0.7 * first["image_loss"]
            and last["text_loss"] < text_first["text_loss"])
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
    # argmin of (w - 3)^2 + 0.25 (w + 3)^2 = (3 - 0.75) / 1.25
    assert w.item() == pytest.approx(1.8, abs=0.02)


def test_cached_base_is_built_once_and_named_tiny_pretrained(base, tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(out, base, log):  # the cache logic, not the training, is under test here
        calls.append(base)
        pretrain_blip2(out, base=base, steps=2, batch_size=2, log=log)

    monkeypatch.setitem(tiny_pretrain.PRETRAINERS, "blip2-opt", fake_pretrain)
    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path))
    # the cache path is under test: no shipped base (the scene list stays)
    shipped = tiny_pretrain.shipped_base
    monkeypatch.setattr(tiny_pretrain, "shipped_base",
                        lambda name: shipped(name) if "scenes" in name else None)
    path = pretrained_tiny_path("blip2-opt")
    assert path.name.startswith("blip2-opt-pretrained-v") and (path / "pretraining.json").exists()
    assert resolve_model_path("tiny:blip2-opt-pretrained") == str(path) and len(calls) == 1
    assert resolve_model_path("tiny:blip2-opt") == str(tmp_path / "tiny" / base.name)
    assert resolve_model_path("Salesforce/blip2-opt-2.7b") == "Salesforce/blip2-opt-2.7b"
    monkeypatch.chdir(tmp_path)  # a local folder: by its absolute path, which merge finds from anywhere
    assert resolve_model_path("tiny") == str(tmp_path / "tiny") and resolve_model_path("./none") == "./none"
    with pytest.raises(ValueError, match="blip2-opt-pretrained"):
        resolve_model_path("tiny:blip3")


def test_no_pretraining_scene_shows_a_val_or_test_image_of_an_embedded_default():
    """The scenes every base pre-trains on (each pre-trainer's default steps x batch) against every val and
    test image of the recipes' embedded defaults, read from their split files: none has the same objects
    (all 192,000 of CLIP's), and by the rule of `dedup` and `split` (pHash within 4 bits and colours
    within tolerance, data_tools.hashing) none is a near duplicate: all 64,000 scenes the BLIP-2, GPT-2
    and LLaVA bases see, and 8,000 drawn at random from the rest of CLIP's."""
    import inspect
    import random

    import numpy as np
    from PIL import Image

    from data_tools.hashing import colours_match_pairs, colours_of, near_pairs, phash_of
    from data_tools.jsonl import read_jsonl
    from data_tools.synth import draw_scene
    from recipes.clip_retrieval.train import RetrievalArguments
    from recipes.common.data import embedded_dataset
    from recipes.llava_instruct.train import STAGE1_SEED_OFFSET

    # The defaults the recipes make (train.py): the list the pre-training avoids must be theirs.
    assert RetrievalArguments().embedded_images == 5000 and STAGE1_SEED_OFFSET == 1
    defaults = [("caption", 1000, 0), ("vqa", 1000, 0), ("instruct", 1000, 0), ("caption", 1000, 1),
                ("retrieval", 5000, 0)]
    assert set(defaults) == set(tiny_pretrain.HELD_OUT_DEFAULTS)
    held_out, held = set(), []
    for task, n, seed in defaults:
        splits = embedded_dataset(task, n=n, seed=seed)
        for split in ("val", "test"):
            for r in read_jsonl(splits[split]):
                if "objects" in r:
                    held_out.add(tuple((o["shape"], o["color"], o["size"], o["position"])
                                       for o in r["objects"]))
                    held.append(Image.open(splits[split].parent / r["image"]).convert("RGB"))
    counts = {}
    for name, fn in tiny_pretrain.PRETRAINERS.items():
        defaults_of = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
        if "steps" in defaults_of and "batch_size" in defaults_of:
            counts[name] = defaults_of["steps"] * defaults_of["batch_size"]
    assert counts["clip"] == 192_000 and max(n for k, n in counts.items() if k != "clip") == 64_000
    seed = tiny_pretrain.PRETRAIN_SEED
    scenes = tiny_pretrain.pretraining_scenes(counts["clip"])
    assert len(set(scenes)) == len(scenes)
    shown = {tuple((o["shape"], o["color"], o["size"], o["position"]) for o in make_scene(seed, i))
             for i in scenes}
    assert not shown & held_out and len(held_out) > 1000

    checked = scenes[:64_000] + random.Random(0).sample(scenes[64_000:], 8_000)
    held_hashes = np.array([phash_of(im) for im in held], np.uint64)
    held_colours = np.frombuffer(b"".join(colours_of(im) for im in held), np.uint8).reshape(len(held), -1)
    near = 0
    for start in range(0, len(checked), 8_000):
        pre = [draw_scene(make_scene(seed, i), seed, i) for i in checked[start:start + 8_000]]
        hashes = np.concatenate([held_hashes, np.array([phash_of(im) for im in pre], np.uint64)])
        colours = np.concatenate([held_colours, np.frombuffer(b"".join(colours_of(im) for im in pre),
                                                              np.uint8).reshape(len(pre), -1)])
        ii, jj, _ = near_pairs(hashes, 4)
        ok = colours_match_pairs(colours, ii, jj)
        near += sum((i < len(held)) != (j < len(held)) for i, j in zip(ii[ok].tolist(), jj[ok].tolist()))
    assert len(held) > 2000 and near == 0


def test_clip_pretraining_learns_and_exports_its_vision_tower(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    base = tiny_model_path("clip", tmp_path / "cache")
    clip = tiny_pretrain.pretrain_clip(tmp_path / "clip", base=base, steps=80, batch_size=16, warmup=5,
                                       log=lambda m: None)
    curve = json.loads((clip / "pretraining.json").read_text())["loss_curve"]
    # from (ln 32 + ln 16) / 2: 16 texts + 16 hard negatives
    assert curve[-1]["contrastive_loss"] < 0.85 * curve[0]["contrastive_loss"]
    vision = tiny_pretrain.export_clip_vision(tmp_path / "vision", clip=clip, log=lambda m: None)
    full, alone = (CLIPModel.from_pretrained(clip).vision_model.state_dict(),
                   CLIPVisionModel.from_pretrained(vision).state_dict())
    assert full.keys() == alone.keys() and all(torch.equal(full[k], alone[k]) for k in full)
    assert not torch.equal(
        alone["embeddings.patch_embedding.weight"],
        CLIPModel.from_pretrained(base).vision_model.state_dict()["embeddings.patch_embedding.weight"])


def test_language_model_pretraining_gpt2_and_llava(tmp_path):
    from transformers import AutoTokenizer, CLIPModel, GPT2LMHeadModel, LlavaForConditionalGeneration

    cache = tmp_path / "cache"
    gpt2 = tiny_pretrain.pretrain_gpt2(tmp_path / "gpt2", base=tiny_model_path("gpt2", cache), steps=30,
                                       batch_size=8, lr=3e-3, warmup=5, log=lambda m: None)
    curve = json.loads((gpt2 / "pretraining.json").read_text())["loss_curve"]
    assert curve[-1]["text_loss"] < 0.7 * curve[0]["text_loss"]
    GPT2LMHeadModel.from_pretrained(gpt2), AutoTokenizer.from_pretrained(gpt2)  # an ordinary checkpoint

    clip = tiny_model_path("clip", cache)  # any CLIP with the same vision config will do here
    base = tiny_model_path("llava", cache)
    llava = tiny_pretrain.pretrain_llava(tmp_path / "llava", base=base, clip=clip, steps=10, batch_size=8,
                                         warmup=2, log=lambda m: None)
    after, before = (LlavaForConditionalGeneration.from_pretrained(p).state_dict() for p in (llava, base))
    tower = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    # the CLIP tower, as is
    assert all(torch.equal(after[f"model.vision_tower.{k}"], v) for k, v in tower.items())
    projector = [k for k in after if k.startswith("model.multi_modal_projector.")]
    assert projector and all(torch.equal(after[k], before[k]) for k in projector)  # left for stage 1
    assert not torch.equal(after["model.language_model.embed_tokens.weight"],
                           before["model.language_model.embed_tokens.weight"])


def test_text_batches_start_with_bos_whatever_the_tokenizer():
    from transformers import AutoTokenizer

    for name in ("gpt2", "blip2-opt"):  # GPT-2's tokenizer adds no bos, OPT's does
        tok = AutoTokenizer.from_pretrained(tiny_model_path(name))
        batch = tiny_pretrain._text_batch(tok, ["a red circle", "a blue square in the middle"])
        assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()
        n = int(batch["attention_mask"][0].sum())
        assert batch["input_ids"][0, n - 1] == tok.eos_token_id and (batch["labels"][0, n:] == -100).all()
        assert (batch["input_ids"][0, 1:n - 1]
                == torch.tensor(tok("a red circle", add_special_tokens=False)["input_ids"])).all()


def test_shape_negative_changes_exactly_one_shape():
    for i in range(50):
        objects = make_scene(tiny_pretrain.PRETRAIN_SEED, i)
        negative, positive = tiny_pretrain.shape_negative(i), annotation(objects)
        changed = [(a, b) for a, b in zip(positive.split("; "), negative.split("; ")) if a != b]
        assert len(negative.split("; ")) == len(objects) and len(changed) == 1
        a, b = changed[0]
        # colour, size, place kept
        assert a.split(", ")[1:] == b.split(", ")[1:] and a.split(": ")[0] == b.split(": ")[0]
        assert tiny_pretrain.shape_negative(i) == negative  # a pure function of the index
