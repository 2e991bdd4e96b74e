"""`python -m eval report` (make eval): finds the latest run per recipe, rescores it, writes report.md and
gallery.html."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from eval.caption import caption_metrics
from eval.report import latest_runs, newer_unfinished, report_run
from eval.vqa import vqa_accuracy

ROOT = Path(__file__).resolve().parent.parent


def make_run(folder: Path, recipe: str, task: str, eval_file: Path, final: dict,
             before: dict | None = None) -> Path:
    """A run folder as a recipe's train.py leaves it."""
    (folder / "predictions").mkdir(parents=True)
    write_jsonl(folder / "predictions" / "final.jsonl",
                ({"key": k, "prediction": v} for k, v in final.items()))
    if before is not None:
        write_jsonl(folder / "predictions" / "before.jsonl",
                    ({"key": k, "prediction": v} for k, v in before.items()))
    (folder / "metrics.json").write_text(json.dumps(
        {"recipe": recipe, "task": task, "eval_file": str(eval_file), "lang": "en", "global_step": 12}))
    return folder


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    path = make_synthetic("caption", 6, d / "data", seed=3, progress=False)
    rows = read_jsonl(path)
    refs = {str(path.parent / r["image"]): r["captions"] for r in rows}
    return d, path, refs


def test_caption_run_is_rescored_and_reported(captions, tmp_path):
    _, path, refs = captions
    keys = sorted(refs)
    # Two images get a reference caption (high CIDEr), the rest one wrong caption (low).
    final = {k: (refs[k][0] if i < 2 else "a black cross on the left") for i, k in enumerate(keys)}
    before = {k: "shape circle colour red" for k in keys}
    run = make_run(tmp_path / "run", "blip2_lora_caption", "caption", path, final, before)

    row = report_run(run, gallery_size=4)

    expected = caption_metrics(final, refs, metrics=["Bleu", "METEOR", "ROUGE_L", "CIDEr"], per_sample=True)
    assert row["final"]["CIDEr"] == pytest.approx(expected["CIDEr"])
    assert row["final"]["METEOR"] == pytest.approx(expected["METEOR"])
    assert row["before"]["CIDEr"] == pytest.approx(caption_metrics(before, refs, metrics=["CIDEr"])["CIDEr"])
    assert (row["n"], row["n_eval"], row["step"]) == (6, 6, 12)

    report = (run / "report.md").read_text()
    assert f"| CIDEr | {row['before']['CIDEr']:.3f} | {row['final']['CIDEr']:.3f} |" in report
    gallery = (run / "gallery.html").read_text()
    assert gallery.count("data:image/jpeg;base64,") == 4  # gallery_size images, inlined
    # Lowest per-sample CIDEr first: the wrong captions come before the correct ones, which are cut off.
    per_sample = {k: s["CIDEr"] for k, s in expected["per_sample"].items()}
    shown = sorted(keys, key=lambda k: (per_sample[k], k))[:4]
    assert set(shown) == set(keys[2:]) and all(f"CIDEr {per_sample[k]:.3f}" in gallery for k in shown)
    assert "a black cross on the left" in gallery and refs[keys[0]][0] not in gallery


def test_partial_predictions_are_scored_on_their_images_and_unknown_keys_fail(captions, tmp_path):
    _, path, refs = captions
    keys = sorted(refs)[:3]
    run = make_run(tmp_path / "part", "r", "caption", path, {k: refs[k][1] for k in keys})
    row = report_run(run)
    assert (row["n"], row["n_eval"]) == (3, 6) and "before" not in row
    assert row["final"]["CIDEr"] == pytest.approx(caption_metrics({k: refs[k][1] for k in keys},
                                                                  {k: refs[k] for k in keys},
                                                                  metrics=["CIDEr"])["CIDEr"])
    bad = make_run(tmp_path / "bad", "r", "caption", path, {"/no/such.png": "x"})
    with pytest.raises(Exception, match="not in the eval file") as error:
        report_run(bad)
    final = bad / "predictions" / "final.jsonl"
    assert str(error.value).startswith(f"{final}: field 'key': 1 prediction key(s) are not in the eval file")


def test_a_references_file_that_is_not_there_is_an_error_naming_the_run(captions, tmp_path):
    _, path, refs = captions
    run = make_run(tmp_path / "moved", "r", "caption", Path("data/captions.jsonl"), {})
    with pytest.raises(Exception) as error:
        report_run(run)
    assert str(error.value).startswith(f"{run / 'metrics.json'}: field 'eval_file': the references file "
                                       "'data/captions.jsonl' does not exist")


def test_a_run_that_has_not_finished_is_named_so(tmp_path):
    (tmp_path / "run.json").write_text("{}")  # a merged folder holds its run's run.json, no checkpoint
    with pytest.raises(Exception, match="not a recipe run folder: cannot read metrics.json"):
        report_run(tmp_path)
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(Exception) as error:
        report_run(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'metrics.json'}: the run has not finished: no metrics.json yet "
                                "(a stopped or killed run goes on with --resume_from_checkpoint last) "
                                "[unreadable_file]")
    (tmp_path / "run.json").unlink()
    with pytest.raises(Exception, match="not a recipe run folder: cannot read metrics.json"):
        report_run(tmp_path)


def test_vqa_run_uses_official_accuracy(tmp_path):
    path = make_synthetic("vqa", 4, tmp_path / "data", seed=2, progress=False)
    rows = read_jsonl(path)
    final = {r["question_id"]: (r["answers"][0] if i % 2 else "purple") for i, r in enumerate(rows)}
    run = make_run(tmp_path / "run", "qlora_vqa", "vqa", path, final)
    row = report_run(run)
    refs = {r["question_id"]: {"answers": r["answers"], "answer_type": r.get("answer_type"),
                               "question_type": r.get("question_type")} for r in rows}
    expected = vqa_accuracy(final, refs)
    assert row["final"]["overall"] == expected["overall"]
    assert "Q:" in (run / "gallery.html").read_text()
    report = (run / "report.md").read_text()  # every metric: per answer type and question type too
    for group in ("perAnswerType", "perQuestionType"):
        assert expected[group] and all(f"| {group}: {k} | - | {v:.3f} |" in report
                                       for k, v in expected[group].items())
    assert "per-sample VQA accuracy" in report


def test_a_run_trained_without_held_out_data_is_left_out_and_named(captions, tmp_path):
    caption_run = make_run(tmp_path / "outputs" / "blip2", "blip2_lora_caption", "caption", captions[1], {})
    untested = tmp_path / "outputs" / "vqa"
    untested.mkdir(parents=True)
    (untested / "metrics.json").write_text(json.dumps({"recipe": "qlora_vqa", "task": "vqa",
                                                       "eval_file": None, "global_step": 2}))
    assert latest_runs(tmp_path / "outputs") == [caption_run]
    with pytest.raises(DataError, match="no held-out data .* nothing to score"):
        report_run(untested)


def test_vqa_predictions_for_1_and_the_string_1_are_refused_not_one_dropped(tmp_path):
    path = make_synthetic("vqa", 2, tmp_path / "data", seed=2, progress=False)
    qid = read_jsonl(path)[0]["question_id"]
    run = make_run(tmp_path / "run", "qlora_vqa", "vqa", path, {})
    write_jsonl(run / "predictions" / "final.jsonl",
                [{"key": int(qid), "prediction": "2"}, {"key": str(qid), "prediction": "7"}])
    with pytest.raises(DataError, match=r"final.jsonl:2.*already has a prediction at line 1"):
        report_run(run)


def test_the_before_column_names_the_main_metric_as_its_column_does():
    from eval.report import table_lines

    rows = [{"recipe": "qlora_vqa", "task": "vqa", "step": 2, "n": 4, "n_eval": 4, "run": "q",
             "final": {"overall": 50.0}, "before": {"overall": 25.0}},
            {"recipe": "llava_instruct", "task": "instruct", "step": 2, "n": 4, "n_eval": 4, "run": "l",
             "final": {"VQA_accuracy": 40.0}, "before": {"VQA_accuracy": 20.0}}]
    befores = [line.split(" | ")[-2] for line in table_lines(rows)[2:]]
    assert befores[0].startswith("VQA acc 25") and befores[1].startswith("VQA acc 20")


def test_latest_run_of_each_recipe_and_the_cli_table(captions, tmp_path):
    _, path, refs = captions
    keys = sorted(refs)
    outputs = tmp_path / "outputs"
    old = make_run(outputs / "a_old", "recipe_a", "caption", path, {k: "a red circle" for k in keys})
    new = make_run(outputs / "a_new", "recipe_a", "caption", path, {k: refs[k][0] for k in keys})
    other = make_run(outputs / "nested" / "b", "recipe_b", "caption", path, {k: refs[k][2] for k in keys})
    os.utime(old / "metrics.json", (1, 1))  # the oldest
    (new / "checkpoint-5").mkdir()
    (new / "checkpoint-5" / "metrics.json").write_text("{}")  # not a run
    assert latest_runs(outputs) == [new, other]
    started = outputs / "a_started"  # a newer run of recipe_a, stopped before its end
    (started / "checkpoint-3").mkdir(parents=True)
    (started / "run.json").write_text(json.dumps({"recipe": "recipe_a"}))
    merged = outputs / "a_merged"  # a merged folder holds its run's run.json, and no checkpoints
    merged.mkdir()
    (merged / "run.json").write_text(json.dumps({"recipe": "recipe_a"}))
    assert latest_runs(outputs) == [new, other]
    assert newer_unfinished(outputs, [new, other]) == [(started, new)]
    os.utime(started / "run.json", (2, 2))  # started before the scored run ended: nothing to say
    assert newer_unfinished(outputs, [new, other]) == []
    os.utime(started / "run.json")

    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "eval", "report", "--outputs", str(outputs)], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| recipe_")]
    assert [line.split(" | ")[0] for line in table] == ["| recipe_a", "| recipe_b"]
    assert str(new) in table[0] and str(old) not in r.stdout
    assert (new / "report.md").exists() and not (old / "report.md").exists()
    assert (f"note: {started} started after {new} but has not finished (no metrics.json): {new} is scored"
            in r.stderr)

    r = subprocess.run([sys.executable, "-m", "eval", "report", "--outputs", str(tmp_path / "empty")],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "no recipe runs under" in r.stderr
    (tmp_path / "notarun").mkdir()
    r = subprocess.run([sys.executable, "-m", "eval", "report", str(tmp_path / "notarun")], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "metrics.json" in r.stderr


def test_runs_not_finished_and_foreign_json_files_under_outputs(captions, tmp_path):
    _, path, refs = captions
    outputs = tmp_path / "outputs"
    done = make_run(outputs / "a", "recipe_a", "caption", path, {k: refs[k][0] for k in refs})
    training = outputs / "b"  # the only run of recipe_b, still training: named, not left out silently
    (training / "checkpoint-2").mkdir(parents=True)
    (training / "run.json").write_text(json.dumps({"recipe": "recipe_b"}))
    for name, text in [("list", "[1, 2]"), ("odd", '{"recipe": ["x"]}')]:  # another tool's metrics.json
        (outputs / name).mkdir()
        (outputs / name / "metrics.json").write_text(text)
    (outputs / "odd" / "run.json").write_text("[]")
    (outputs / "odd" / "checkpoint-1").mkdir()
    assert latest_runs(outputs) == [done]
    assert newer_unfinished(outputs, [done]) == [(training, None)]
    r = subprocess.run([sys.executable, "-m", "eval", "report", "--outputs", str(outputs)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (f"note: {training} has not finished (no metrics.json): not scored; resume it to score it"
            in r.stderr)
    assert "Traceback" not in r.stderr


def test_a_step_file_scored_as_final_names_its_step(captions, tmp_path):
    _, path, refs = captions
    run = make_run(tmp_path / "run", "r", "caption", path, {k: refs[k][0] for k in refs})
    (run / "predictions" / "final.jsonl").rename(run / "predictions" / "step-8.jsonl")
    row = report_run(run)
    assert row["step"] == 8 and row["final_file"] == str(run / "predictions" / "step-8.jsonl")
    assert "step 8," in (run / "report.md").read_text()


def test_a_scorer_error_is_one_line(captions, tmp_path, monkeypatch, capsys):
    from eval import report
    from eval.__main__ import main

    _, path, refs = captions
    run = make_run(tmp_path / "run", "r", "caption", path, {k: refs[k][0] for k in refs})

    def fails(*args, **kwargs):
        raise ValueError("METEOR failed: its Java process stopped (out of heap)")

    monkeypatch.setattr(report, "caption_metrics", fails)
    assert main(["report", str(run)]) == 1
    final = run / "predictions" / "final.jsonl"
    assert capsys.readouterr().err == (f"error: {final}: METEOR failed: its Java process stopped (out of "
                                       "heap) [bad_value]\n")
