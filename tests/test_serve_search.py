"""Retrieval indexes (recipes/clip_retrieval/embed.py) searched by serve/ and search.py: a hit names its image
by its path under the image root, never by the server's own path, and texts are cut at the --max_length the
run trained with, as training cut them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

LONG = "a picture of " + " and ".join(f"a small red circle number {i}" for i in range(12))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Records in data/ whose images lie under another folder, the image root pics/ (--image_root)."""
    d = tmp_path_factory.mktemp("search")
    rows = read_jsonl(make_synthetic("retrieval", 4, d / "synth", seed=3, progress=False))
    shutil.copytree(d / "synth", d / "pics")
    rows[0]["captions"] = [LONG]
    write_jsonl(d / "data" / "gallery.jsonl", rows)
    return d, rows


def _embed(d: Path, model: str, out: Path, *extra: str) -> dict:
    from recipes.clip_retrieval.embed import main as embed

    assert embed(["--model", model, "--file", str(d / "data" / "gallery.jsonl"), "--image_root",
                  str(d / "pics"), "--out", str(out), *extra]) == 0
    return json.loads((out / "index.json").read_text())


def _run_folder(d: Path, max_length: int | None) -> Path:
    """A clip_retrieval run folder as training leaves it: the model, and run.json (with `max_length`)."""
    from recipes.common.models import resolve_model_path

    run = d / f"run-{max_length}"
    if not run.exists():
        shutil.copytree(resolve_model_path("tiny:clip"), run)
        record = {"recipe": "clip_retrieval", "task": "retrieval", "model": "tiny:clip"}
        (run / "run.json").write_text(json.dumps(record | ({"max_length": max_length} if max_length else {})))
    return run


def test_a_search_hit_names_its_image_under_the_image_root_and_its_url_serves_it(data):
    from serve.app import create_app
    from serve.runs import load_runs

    d, rows = data
    _embed(d, "tiny:clip", d / "index")
    with TestClient(create_app(load_runs([d / "index"]))) as client:
        response = client.post("/v1/search", json={"model": "index", "query": "a red circle", "k": 4})
        assert response.status_code == 200
        hits = response.json()["data"]
        assert sorted(h["image"] for h in hits) == sorted(r["image"] for r in rows)  # "images/000001.png"
        assert str(d) not in response.text and "/tmp" not in response.text
        for hit in hits:
            assert client.get(hit["url"]).content == (d / "pics" / hit["image"]).read_bytes()


def test_an_index_without_its_image_root_names_images_under_the_files_folder_or_by_name(data, tmp_path):
    from serve.runs import load_runs

    d, rows = data
    index = tmp_path / "old"
    shutil.copytree(d / "index", index)
    record = json.loads((index / "index.json").read_text())
    del record["image_root"]  # as an earlier embed.py wrote it: the images under the file's folder or not
    record["file"] = str(d / "pics" / "gallery.jsonl")
    record["images"][1] = str(d / "elsewhere" / "b.png")
    (index / "index.json").write_text(json.dumps(record))
    keys = load_runs([index])["old"].keys
    assert keys == [rows[0]["image"], "b.png", rows[2]["image"], rows[3]["image"]]


def _cut(ids: list[int], max_length: int) -> list[int]:
    return ids[: max_length - 1] + ids[-1:]


@pytest.mark.parametrize("max_length", [8, None], ids=["run.json says 8", "run.json says nothing"])
def test_texts_are_cut_at_the_runs_max_length_as_training_cuts_them(data, max_length, capsys):
    from recipes.clip_retrieval.collator import PairDataset, pools_at_eos
    from recipes.clip_retrieval.embed import load
    from recipes.clip_retrieval.search import main as search
    from recipes.clip_retrieval.trainer import embed_texts
    from recipes.common.data import load_records
    from serve.runs import load_runs

    d, rows = data
    run = _run_folder(d, max_length)
    index = _embed(d, str(run), d / f"index-{max_length}")
    expected = max_length or 77  # the text tower's length: what training uses without --max_length
    assert index["max_length"] == expected
    if max_length is None:
        assert "does not record the --max_length" in capsys.readouterr().err
    clip, processor, collator = load(str(run))
    records = load_records(d / "data" / "gallery.jsonl", "retrieval", image_root=d / "pics")
    trained = PairDataset(records, processor.tokenizer, expected, pooled_at_eos=pools_at_eos(clip)).captions
    full = processor.tokenizer([LONG])["input_ids"][0]
    assert len(full) > 77 and trained[0][0] == _cut(full, expected)  # the long caption is cut
    texts = np.load(d / f"index-{max_length}" / "texts.npy")
    np.testing.assert_allclose(texts[0], embed_texts(clip, collator, trained[0], 1, "cpu")[0], atol=1e-6)

    query = embed_texts(clip, collator, [_cut(full, expected)], 1, "cpu")[0]
    ranking = np.argsort(-(np.load(d / f"index-{max_length}" / "images.npy") @ query), kind="stable")
    served = load_runs([d / f"index-{max_length}"])[f"index-{max_length}"].search_text(LONG, 4)
    assert [h["index"] for h in served] == ranking.tolist()
    np.testing.assert_allclose(served[0]["score"], float(np.load(d / f"index-{max_length}" / "images.npy")
                                                         [ranking[0]] @ query), rtol=1e-5)
    capsys.readouterr()
    assert search(["--index", str(d / f"index-{max_length}"), "--query", LONG, "--k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [index["images"].index(h["image"]) for h in hits] == ranking.tolist()


def test_max_length_over_the_text_tower_or_not_a_count_is_one_line(data, tmp_path):
    from recipes.clip_retrieval.embed import main as embed

    d, _ = data
    run = _run_folder(d, 8)
    with pytest.raises(ValueError, match=r"--max_length 78: the text tower has 77 positions"):
        _embed(d, str(run), tmp_path / "a", "--max_length", "78")
    bad = tmp_path / "bad-run"
    shutil.copytree(run, bad)
    (bad / "run.json").write_text(json.dumps({"model": "tiny:clip", "max_length": "8"}))
    with pytest.raises(ValueError, match=rf"{bad / 'run.json'}: max_length '8': expected a whole number"):
        embed(["--model", str(bad), "--file", str(d / "data" / "gallery.jsonl"), "--image_root",
               str(d / "pics"), "--out", str(tmp_path / "b")])
