"""clip_retrieval's evaluation: a text and its copies embed the same whatever the batch (the metrics count a
tie against the model, so they must not depend on the eval batch size); zero-shot prompts cut at max_length
are counted, and classes whose prompts become the same are refused; embed.py's files are replaced together."""

import json
import logging

import numpy as np
import pytest

from eval.retrieval import recall_at_k, similarity
from recipes.clip_retrieval.collator import load_zero_shot
from recipes.clip_retrieval.embed import load
from recipes.clip_retrieval.embed import main as embed_main
from recipes.clip_retrieval.trainer import embed_texts
from data_tools.jsonl import write_jsonl
from data_tools.synth import make_synthetic


@pytest.fixture(scope="module")
def clip(module_cache):
    return load("tiny:clip-pretrained")  # distinct texts embed apart: the ties tested are the copies' alone


def test_copies_of_a_text_embed_the_same_and_recall_does_not_depend_on_the_batch_size(clip):
    model, processor, collator = clip
    tok = processor.tokenizer
    texts = ["a red circle", "a big blue square on the left", "a red circle", "a green cross", "a red circle"]
    ids = [tok(t)["input_ids"] for t in texts]
    text_to_image = np.asarray([0, 1, 1, 2, 2])  # "a red circle" describes images 0, 1 and 2
    runs = {}
    for batch_size in (1, 2, 3, 8):
        embeds = embed_texts(model, collator, ids, batch_size, "cpu")
        assert np.array_equal(embeds[0], embeds[2]) and np.array_equal(embeds[0], embeds[4]), batch_size
        images = np.random.default_rng(0).standard_normal((3, embeds.shape[1])).astype(np.float32)
        scores = similarity(embeds, images)
        assert np.array_equal(scores[0], scores[4])  # `embeds @ images.T` may round the copies apart
        assert np.allclose(scores, embeds @ images.T, atol=1e-6)
        runs[batch_size] = recall_at_k(scores, text_to_image)
    assert all(r == runs[1] for r in runs.values()), runs
    # the copy ties its own: image 0's caption ranks below the copies of images 1 and 2 (pessimistic ties)
    assert runs[1]["image_to_text_R@1"] < 1


def test_zero_shot_prompts_cut_the_same_are_refused_and_the_cut_is_logged(clip, tmp_path, caplog):
    _, processor, _ = clip
    rows = [{"image": f"images/{i:06d}.png", "label": label} for i, label in enumerate(["big", "small"])]
    make_synthetic("caption", 2, tmp_path, seed=0, progress=False)
    write_jsonl(tmp_path / "zs.jsonl", rows)
    with caplog.at_level(logging.INFO):
        zs = load_zero_shot(tmp_path / "zs.jsonl", ["a photo of a {label} shape"], processor.tokenizer, 16)
    assert len(zs.prompt_ids) == 2
    assert "zero-shot text length: 2 texts, 0 cut to max_length" in caplog.text
    same = "zero-shot classes 'big' and 'small' have the same prompts once cut at max_length 4 .*2 cut"
    with pytest.raises(ValueError, match=same):
        load_zero_shot(tmp_path / "zs.jsonl", ["a photo of a {label} shape"], processor.tokenizer, 4)


def test_an_interrupted_embed_leaves_the_earlier_index_whole(module_cache, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from recipes.clip_retrieval import embed

    data = make_synthetic("retrieval", 6, tmp_path / "a", seed=0, progress=False)
    other = make_synthetic("retrieval", 4, tmp_path / "b", seed=1, progress=False)
    out = tmp_path / "index"
    assert embed_main(["--model", "tiny:clip", "--file", str(data), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stopped(*args, **kwargs):  # a stop once the embeddings are written, before index.json is
        raise KeyboardInterrupt

    monkeypatch.setattr(embed, "json", SimpleNamespace(dumps=stopped, loads=json.loads))
    with pytest.raises(KeyboardInterrupt):
        embed_main(["--model", "tiny:clip", "--file", str(other), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
