"""What a launch of several processes prints and writes: once, as one process would, not once per process
(a whole 2-process run: tests/test_llava_recipe.py)."""

import sys

import pytest

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic


def test_an_error_is_written_whole_in_one_write(monkeypatch):
    """Processes that fail together write to one terminal: a message in two writes gets spliced with
    another's (`...was raised)error: ...`)."""
    from recipes.common.run import run_main

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())

    def main():
        raise ValueError("data/x.jsonl:3: field 'image': is missing")

    with pytest.raises(SystemExit) as exit:
        run_main(main)
    assert exit.value.code == 2
    assert [w for w in writes if w] == ["error: data/x.jsonl:3: field 'image': is missing\n"
                                        "(VLM_RECIPES_DEBUG=1 shows where it was raised)\n"]


def test_skipped_rows_are_written_and_reported_by_the_first_process_alone(tmp_path, monkeypatch, capsys):
    from recipes.common.data import load_records

    rows = read_jsonl(make_synthetic("caption", 3, tmp_path, seed=1, progress=False))
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as f:
        f.write('{"image": "images/missing.png", "captions": ["a red square"]}\n')
    for rank, written in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        rejects = tmp_path / f"rejects-{rank}.jsonl"
        ds = load_records(path, "caption", skip_bad_rows=True, rejects_path=rejects)
        assert len(ds) == 3 and ds.info.description == f"{path}: 3 rows, 1 skipped"  # every process skips it
        out = capsys.readouterr().out
        assert rejects.exists() == written and (f"{path}: skipped 1 invalid row(s) of 4" in out) == written
    rejected = read_jsonl(tmp_path / "rejects-0.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(4, "missing_image")]
