"""A held-out row whose image does not decode (its header reads, so the header check would pass it) is a
counted reject with --skip_bad_rows, as a training row is, and is not asked in generation: it stopped the run
at the eval prompts. Without --skip_bad_rows it stops the run in one line naming its file:line. Held-out
images are decoded when the data loads."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from data_tools.jsonl import read_jsonl, write_jsonl
from tests.conftest import run_script, undecodable_png

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("held_out")
    Image.new("RGB", (32, 32), "red").save(d / "red.png")
    undecodable_png(d)
    for split, bad in (("train", False), ("eval", True), ("test", True)):
        rows = [{"image": "red.png", "question_id": i, "question": "what shape?", "answers": ["circle"]}
                for i in range(4)]
        if bad:
            rows[2]["image"] = "corrupt.png"
        write_jsonl(d / f"{split}.jsonl", rows)
    return d


def _train(data, out, *extra):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return run_script(ROOT / "recipes" / "qlora_vqa" / "train.py", [
        "--model_name_or_path", "tiny:llava",
        *(f"--{split}_file={data / split}.jsonl" for split in ("train", "eval", "test")),
        "--output_dir", out, "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--per_device_train_batch_size", "2",
        "--use_cpu", "true", *extra], env)


def test_a_held_out_image_that_does_not_decode_is_a_counted_reject(data, tmp_path):
    r = _train(data, tmp_path / "stop")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    error = next(line for line in r.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: {data / 'eval.jsonl'}:3: ") and "--skip_bad_rows" in error, error
    out = tmp_path / "skip"
    r = _train(data, out, "--skip_bad_rows")
    assert r.returncode == 0, r.stderr[-3000:]
    for split in ("eval", "test"):
        (reject,) = read_jsonl(out / "rejects" / f"{split}.rejects.jsonl")
        # truncated_image or unreadable_image, as the noise falls
        assert (reject["file"], reject["line"], reject["field"]) == (str(data / f"{split}.jsonl"), 3, "image")
        assert reject["reason"] in ("truncated_image", "unreadable_image")
    answered = [json.loads(line)["key"] for line in
                (out / "predictions" / "final.jsonl").read_text().splitlines()]
    assert sorted(answered) == [0, 1, 3]
