"""Retrieval indexes (recipes/clip_retrieval/embed.py) searched by serve/: a hit names its image by its path
under the image root, never by the server's own path."""

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Records in data/ whose images lie under another folder, the image root pics/ (--image_root)."""
    d = tmp_path_factory.mktemp("search")
    rows = read_jsonl(make_synthetic("retrieval", 4, d / "synth", seed=3, progress=False))
    shutil.copytree(d / "synth", d / "pics")
    write_jsonl(d / "data" / "gallery.jsonl", rows)
    return d, rows


def _embed(d: Path, model: str, out: Path, *extra: str) -> dict:
    from recipes.clip_retrieval.embed import main as embed

    assert embed(["--model", model, "--file", str(d / "data" / "gallery.jsonl"), "--image_root",
                  str(d / "pics"), "--out", str(out), *extra]) == 0
    return json.loads((out / "index.json").read_text())


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
