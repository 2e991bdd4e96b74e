"""The bench commands' options: a bad value, a missing path or an earlier result file is a one-line error
before any run; results are written whole, never over an earlier one."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import data_eval, harness, serve
from bench import data_tools as bench_data_tools

REPO = Path(__file__).resolve().parents[1]
TINY = ["soft_prompt_caption", "--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--mode",
        "device", "--no-baseline"]


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("flag", ["--batch-size", "--device-batches", "--distinct-images", "--pad-text-to",
                                  "--peak-tflops"])
def test_harness_refuses_a_size_of_zero_before_building_anything(flag, capsys):
    # --batch-size 0 ran at batch 4, --distinct-images 0 with 1 image, --pad-text-to 0 unpadded
    with pytest.raises(SystemExit) as exit_:
        harness.main([*TINY, flag, "0"])
    assert exit_.value.code == 2
    _one_line_error(capsys, f"argument {flag}: must be above 0", "got 0")


def test_harness_never_replaces_an_earlier_json(tmp_path, capsys):
    earlier = tmp_path / "run.json"
    earlier.write_text('{"earlier": 1}')
    with pytest.raises(SystemExit) as exit_:
        harness.main([*TINY, "--json", str(earlier)])
    assert exit_.value.code == 2
    _one_line_error(capsys, f"--json {earlier}: exists", "give another name")
    assert json.loads(earlier.read_text()) == {"earlier": 1}


@pytest.mark.parametrize("argv, needle", [
    (["--parts", "hash,nerr"], "--parts: unknown part 'nerr'"),
    (["--parts", "near", "--near-sizes", "10,x"], "argument --near-sizes: expected"),
    (["--parts", "hash", "--images", "0"], "argument --images: must be above 0"),
])
def test_data_tools_bench_refuses_bad_options_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_data_tools.main(argv)
    assert exit_.value.code == 2
    _one_line_error(capsys, needle)


def test_data_tools_bench_checks_json_first_and_writes_it_whole(tmp_path, capsys):
    target = tmp_path / "missing" / "rows.json"
    with pytest.raises(SystemExit):
        bench_data_tools.main(["--parts", "near", "--near-sizes", "100", "--json", str(target)])
    _one_line_error(capsys, f"--json {target}: no folder")
    earlier = tmp_path / "rows.json"
    earlier.write_text("[]")
    with pytest.raises(SystemExit):
        bench_data_tools.main(["--parts", "near", "--near-sizes", "100", "--json", str(earlier)])
    assert earlier.read_text() == "[]"
    new = tmp_path / "new.json"
    assert bench_data_tools.main(["--parts", "near", "--near-sizes", "100", "--json", str(new)]) == 0
    rows = json.loads(new.read_text())["rows"]
    assert "multi-index (numpy), 100 hashes (10 pairs)" in [r[0] for r in rows]
    assert sorted(os.listdir(tmp_path)) == ["new.json", "rows.json"]  # no temp file left


def test_data_eval_labels_the_metrics_it_ran_and_appends_atomically(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        data_eval.main(["--images", "0"])
    assert exit_.value.code == 2
    _one_line_error(capsys, "argument --images: must be above 0")
    with pytest.raises(SystemExit):
        data_eval.main(["--out", str(tmp_path / "missing" / "r.md")])
    _one_line_error(capsys, "--out", "no folder")

    out = tmp_path / "RESULTS.md"
    out.write_text("# earlier\n")
    inode = out.stat().st_ino
    data_eval.main(["--images", "3", "--dedup-images", "3", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# earlier\n") and "| synth, 3 caption images |" in text
    assert out.stat().st_ino != inode  # a whole new file renamed over it, not an append in place
    # SPICE runs only where its jars are: the label names what ran, not "all"
    labels = [label for label, _ in data_eval.bench_caption(3)]
    assert labels[1] == "caption metrics, 3 images x 5 refs: BLEU + METEOR + ROUGE-L + CIDEr"


def test_serve_bench_refuses_a_missing_run_folder_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve.main([str(tmp_path / "no-run")])
    assert exit_.value.code == 2
    _one_line_error(capsys, f"RUN_DIR {tmp_path / 'no-run'}: no such folder")
    earlier = tmp_path / "serve.json"
    earlier.write_text("{}")
    with pytest.raises(SystemExit):
        serve.main([str(tmp_path), "--json", str(earlier)])
    _one_line_error(capsys, f"--json {earlier}: exists")


def test_serve_bench_server_that_does_not_start_is_one_line(tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert serve.main([str(empty), "--load-requests", "0"]) == 1
    _one_line_error(capsys, "python -m bench.serve:", "did not start")


def test_gpu_run_keeps_an_earlier_json_and_runs_the_rest(tmp_path):
    (tmp_path / "clip.json").write_text('{"earlier": 1}')
    env = {**os.environ, "OUT": str(tmp_path), "PY": "echo"}  # echo: the harness's command line, no run
    subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "core"], env=env, check=True,
                   capture_output=True)
    assert json.loads((tmp_path / "clip.json").read_text()) == {"earlier": 1}
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0] == f"clip: kept {tmp_path}/clip.json from an earlier run (remove it to run it again)"
    assert summary[1].startswith("blip2: rc=0 in ")
    assert "-m bench blip2_lora_caption --json" in (tmp_path / "blip2.log").read_text()


def test_harness_missing_package_is_one_line(monkeypatch, capsys):
    def run(opts):
        raise ImportError("could not load 'tiny:qwen2_5_vl': Qwen2VLVideoProcessor requires the Torchvision "
                          "library but it was not found\nCheck out the installation page")

    monkeypatch.setattr(harness, "run", run)
    with pytest.raises(SystemExit) as exit_:
        harness.main(TINY)
    assert exit_.value.code == 2
    _one_line_error(capsys, "python -m bench: error: a package is missing: could not load 'tiny:qwen2_5_vl'",
                    "requires the Torchvision library but it was not found")


def test_data_tools_bench_rows_of_a_missing_package_say_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    monkeypatch.setitem(sys.modules, "imagehash", None)
    near = bench_data_tools.bench_near([100])
    assert near[-1] == ("faiss IndexBinaryMultiHash, 100 hashes", "-", "not installed (faiss-cpu)")
    hashing = bench_data_tools.bench_hashing(2, tmp_path, rounds=1)
    assert ("imagehash.phash (full decode), 1 process", "-", "not installed") in hashing
    # in the table, a plain row, not a bold section heading
    assert bench_data_tools.main(["--parts", "near", "--near-sizes", "100"]) == 0
    out = capsys.readouterr().out
    assert "| faiss IndexBinaryMultiHash, 100 hashes | - | not installed (faiss-cpu) |" in out


def test_harness_result_carries_its_date_in_the_json_and_the_table():
    before = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    result = harness.run(harness.Options(recipe="soft_prompt_caption", device="cpu", size="tiny", steps=1,
                                         warmup=1, mode="device", baseline=False))
    when = datetime.datetime.strptime(result["date"], "%Y-%m-%d %H:%M UTC")
    when = when.replace(tzinfo=datetime.timezone.utc)
    assert before <= when <= datetime.datetime.now(datetime.timezone.utc)
    assert harness.markdown(result).splitlines()[0].startswith(
        f"soft_prompt_caption (tiny dims) on {result['device']}, {result['date']}, batch 4, 1 timed steps")
