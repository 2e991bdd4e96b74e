"""The `evaluate` modules load offline, from outside the repository, and give the library's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = (r"""
import json, sys
import evaluate
root = sys.argv[1]
vqa = evaluate.load(root + "/eval/metrics/vqa_accuracy")
recall = evaluate.load(root + "/eval/metrics/recall_at_k")
cap = evaluate.load(root + "/eval/metrics/caption_metrics")
out = {
    "vqa": vqa.compute(predictions=["two", "Yes", "red"],
                       references=[["2"] * 5 + ["3"] * 5, ["yes"] * 10, ["red", "blue"] + ["green"] * 8],
                       answer_types=["number", "yes/no", "other"]),
    "recall": recall.compute(predictions=[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], references=[0, 0, 1],"""
    r""" ks=[1, 2]),
    "caption": cap.compute(predictions=["a dog runs on grass", "two cats sleep"],
                           references=[["A dog is running on the grass.", "a dog runs"],"""
    r""" ["Two cats are sleeping.", "cats asleep"]],
                           metrics=["Bleu", "CIDEr"]),
    "eval_from": sys.modules["eval"].__file__,
}
try:
    vqa.compute(predictions=["2", "yes"], references=[["2"] * 10, ["yes"] * 10], answer_types=["number"])
except ValueError as e:
    out["vqa_types_mismatch"] = str(e)
print(json.dumps(out))
""")


def test_modules_load_offline_from_outside_the_repo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    # cwd outside the repository, no PYTHONPATH: `eval` comes from the installed package (make setup).
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["eval_from"]).resolve() == (REPO / "eval" / "__init__.py").resolve()

    from eval.caption import caption_metrics
    from eval.retrieval import recall_at_k
    from eval.vqa import vqa_accuracy

    refs = {0: {"answers": ["2"] * 5 + ["3"] * 5, "answer_type": "number"},
            1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
            2: {"answers": ["red", "blue"] + ["green"] * 8, "answer_type": "other"}}
    expected_vqa = vqa_accuracy({0: "two", 1: "Yes", 2: "red"}, refs)
    expected_vqa["perQuestion"] = {str(k): v for k, v in expected_vqa["perQuestion"].items()}
    assert out["vqa"] == expected_vqa
    assert out["vqa"]["overall"] == 43.33  # 100, 0 (no normalisation when all agree), 30
    assert out["vqa_types_mismatch"] == ("answer_types: 1 values for 2 predictions; give one per "
                                         "prediction")

    assert out["recall"] == recall_at_k([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], [0, 0, 1], ks=[1, 2])
    assert out["recall"]["text_to_image_R@1"] == 2 / 3

    expected_cap = caption_metrics({0: "a dog runs on grass", 1: "two cats sleep"},
                                   {0: ["A dog is running on the grass.", "a dog runs"],
                                    1: ["Two cats are sleeping.", "cats asleep"]}, metrics=["Bleu", "CIDEr"])
    assert out["caption"] == expected_cap and out["caption"]["CIDEr"] > 0

