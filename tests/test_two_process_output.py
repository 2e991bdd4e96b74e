"""What a launch of several processes prints and writes: once, as one process would, not once per process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "llava_instruct" / "train.py"
BAD_ROW = '{"image": "images/missing.png", "conversations": [{"from": "human", "value": "<image>\\nhi"}, ' \
          '{"from": "gpt", "value": "hi"}]}\n'


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


def test_two_processes_print_what_one_process_prints(tmp_path):
    """llava_instruct under 2 processes, a bad row skipped: its message, the rejects file, the eval prompt
    lengths' bars and the shuffled-image check's `map` bar come once, as in a 1-process run."""
    rows = read_jsonl(make_synthetic("instruct", 14, tmp_path / "synth", seed=1, progress=False))
    rows = [r for r in rows if "image" in r]
    train, held_out = tmp_path / "synth" / "train.jsonl", tmp_path / "synth" / "eval.jsonl"
    write_jsonl(train, rows[:-4])
    with open(train, "a") as f:
        f.write(BAD_ROW)
    write_jsonl(held_out, rows[-4:])
    env = dict(os.environ, VLM_RECIPES_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    args = ["--train_file", str(train), "--eval_file", str(held_out), "--skip_bad_rows", "true",
            "--model_name_or_path", "tiny:llava", "--report_to", "none", "--max_steps", "1",
            "--per_device_eval_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--max_new_tokens", "4", "--shuffled_image_check", "true"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", "29611"]
    runs = {}
    for n, prefix, batch in ((1, [sys.executable], "4"), (2, launch, "2")):
        out = tmp_path / f"run{n}"
        r = subprocess.run([*prefix, str(TRAIN), *args, "--per_device_train_batch_size", batch,
                            "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        assert [x["line"] for x in read_jsonl(out / "rejects" / "train.rejects.jsonl")] == [len(rows) - 3]
        runs[n] = r
    skipped = f"{train}: skipped 1 invalid row(s) of {len(rows) - 3}"
    assert runs[1].stdout.count(skipped) == runs[2].stdout.count(skipped) == 1
    for bar in ("eval prompt lengths", "Map"):
        assert runs[1].stderr.count(bar) > 0 and runs[2].stderr.count(bar) == runs[1].stderr.count(bar), bar
