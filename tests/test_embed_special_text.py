"""clip_retrieval/embed.py refuses a caption that holds one of the text tower's special strings, as training
and serve's search do: CLIP's text pools at its first `<|endoftext|>`, so the caption would be indexed as
the words before it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.errors import DataError
from recipes.clip_retrieval.embed import main as embed
from recipes.common.models import resolve_model_path
from serve.runs import load_runs

SEARCH = Path(__file__).resolve().parents[1] / "recipes" / "clip_retrieval" / "search.py"


def _gallery(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.png")
    rows = [{"image": "a.png", "captions": ["a red square"]},
            {"image": "b.png", "captions": ["a blue <|endoftext|> circle"]}]
    path = tmp_path / "gallery.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_caption_with_a_special_string_is_refused(tmp_path):
    gallery = _gallery(tmp_path)
    with pytest.raises(DataError) as e:
        embed(["--model", "tiny:clip", "--file", str(gallery), "--out", str(tmp_path / "index")])
    assert f"{gallery}:2: field 'captions[0]': holds '<|endoftext|>'" in str(e.value)
    assert "--reserved '<|endoftext|>'" in str(e.value)
    assert not (tmp_path / "index").exists()


def test_with_skip_bad_rows_it_is_counted_and_left_out(tmp_path):
    gallery = _gallery(tmp_path)
    out = tmp_path / "index"
    assert embed(["--model", "tiny:clip", "--file", str(gallery), "--out", str(out), "--skip_bad_rows"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["texts"] == ["a red square"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [(2, "captions[0]", "reserved_text")]


def test_the_special_text_a_run_trained_with_is_embedded_and_searched_for(tmp_path):
    # A merged run's folder carries its run.json: --special_text '<|endoftext|>' let its captions hold it.
    model = tmp_path / "merged"
    shutil.copytree(resolve_model_path("tiny:clip"), model)
    (model / "run.json").write_text(json.dumps({"special_text": ["<|endoftext|>"], "max_length": 16}))
    out = tmp_path / "index"
    assert embed(["--model", str(model), "--file", str(_gallery(tmp_path)), "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["texts"] == ["a red square", "a blue <|endoftext|> circle"]
    assert index["special_text"] == ["<|endoftext|>"]
    search = load_runs([out])["index"]
    assert "<|endoftext|>" not in search.reserved and "<|startoftext|>" in search.reserved
    # search.py takes the same strings as the index's captions: the run's special text, no other
    search = [sys.executable, str(SEARCH), "--index", str(out), "--query"]
    hits = subprocess.run([*search, "a blue <|endoftext|> circle", "--k", "1", "--json"], capture_output=True,
                          text=True)
    assert hits.returncode == 0 and json.loads(hits.stdout)[0]["rank"] == 1, hits.stderr
    refused = subprocess.run([*search, "a <|startoftext|> circle"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--query holds '<|startoftext|>'" in refused.stderr
    blank = subprocess.run([*search, "  "], capture_output=True, text=True)  # as an empty caption is refused
    assert blank.returncode == 2 and "--query is empty" in blank.stderr
