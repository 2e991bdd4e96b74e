"""VQA accuracy: equal to the official VQA v2 evaluation on crafted quirk cases; normalisation; CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.inputs import read_vqa_official
from eval.vqa import normalize_answer, question_accuracy, round_half_away, vqa_accuracy

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "eval_vqa"
# expected_official.json is the output of the unmodified official vqaEval.py (GT-Vision-Lab/VQA @ a013f00,
# Python 2.7) on annotations.json / questions.json / results.json.
EXPECTED = json.loads((GOLDEN / "expected_official.json").read_text())


def _official_inputs():
    return read_vqa_official(GOLDEN / "annotations.json", GOLDEN / "questions.json", GOLDEN / "results.json")


def test_matches_official_evaluation():
    predictions, references = _official_inputs()
    result = vqa_accuracy(predictions, references)
    result["perQuestion"] = {str(k): v for k, v in result["perQuestion"].items()}
    assert result == EXPECTED


def test_quirks_in_fixture_are_exercised():
    # The fixture is only useful if it contains cases where a naive scorer would differ.
    pq = EXPECTED["perQuestion"]
    assert pq["1001"] == 0.0  # "Yes" vs ten "yes": no normalisation when annotators all agree
    assert pq["1005"] == 0.0 and pq["1006"] == 100.0  # "two": 0 vs ten "2", 100 when answers disagree
    assert pq["1027"] == 0.0  # more than 32 trailing periods: only 32 are stripped
    assert pq["1004"] == 30.0 and pq["1008"] == 60.0  # leave-one-out with 1 and 2 supporters


@pytest.mark.parametrize("raw, expected", [
    ("1,000.", "1000"), ("The Dog.", "dog"), ("(a) dog", "dog"), ("black/white", "black white"),
    ("black / white", "black white"), ("dont know", "don't know"), ("Ten", "10"), ("none", "0"),
    ("3.5", "3.5"), ("an apple", "apple"), ("yes!", "yes"), ("t-shirt", "t shirt"), ("whats up", "what's up"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_only_ascii_digits_keep_a_point_or_join_a_comma_as_in_the_official_python2_code():
    # Python 2's \d is [0-9]: a full-width "２.５" loses its period, "１,０００" is not a number there.
    assert normalize_answer("２.５") == "２５" and normalize_answer("１,０００") == "１ ０００"
    refs = {1: {"answers": ["２.５"] * 2 + ["２５"] * 8}}
    assert vqa_accuracy({1: "２.５"}, refs)["overall"] == 100.0


def test_leave_one_out_average():
    answers = ["2"] * 5 + ["3"] * 3 + ["4"] * 2
    assert question_accuracy("3", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert question_accuracy("4", answers) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert question_accuracy("5", answers) == 0.0


def test_single_reference_is_normalised_exact_match():
    assert question_accuracy("Two dogs.", ["2 dogs"]) == 1.0
    assert question_accuracy("three dogs", ["2 dogs"]) == 0.0


def test_rounding_is_half_away_from_zero_like_python2():
    assert round_half_away(0.125) == 0.13 and round(0.125, 2) == 0.12
    assert round_half_away(2.675) == 2.67  # the binary value is below 2.675
    assert round_half_away(100 / 3) == 33.33


def test_types_are_optional_and_breakdowns_grouped():
    refs = {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
            2: {"answers": ["no"] * 10, "answer_type": "yes/no"}, 3: {"answers": ["red"] * 10}}
    out = vqa_accuracy({1: "yes", 2: "yes", 3: "red"}, refs)
    assert (out["overall"] == 66.67 and out["perAnswerType"] == {"yes/no": 50.0}
            and out["perQuestionType"] == {})


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match=r"1 question_id\(s\) in references have no prediction.*7"):
        vqa_accuracy({1: "yes"}, {1: {"answers": ["yes"]}, 7: {"answers": ["no"]}})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "eval", "vqa", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_cli_official_files_json():
    proc = _cli("--vqa-annotations", GOLDEN / "annotations.json",
                "--vqa-questions", GOLDEN / "questions.json", "--vqa-results", GOLDEN / "results.json",
                "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == EXPECTED


def test_cli_jsonl_json(tmp_path):
    predictions, references = _official_inputs()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"question_id": q, "prediction": a}) + "\n"
                                              for q, a in predictions.items()))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"question_id": q, "question": "?", **r}) + "\n"
                                              for q, r in references.items()))
    proc = _cli("--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == EXPECTED


def test_cli_extra_prediction_names_file(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"question_id": 1, "answer": "yes"}\n'
                                      '{"question_id": 2, "answer": "no"}\n')
    (tmp_path / "r.jsonl").write_text('{"question_id": 1, "answers": ["yes"]}\n')
    proc = _cli("--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl", "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"in {tmp_path / 'p.jsonl'} have no reference" in proc.stderr and ": 2." in proc.stderr


def test_cli_duplicate_question_names_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"question_id": 1, "answer": "yes"}\n'
                                      '{"question_id": 1, "answer": "no"}\n')
    (tmp_path / "r.jsonl").write_text('{"question_id": 1, "answers": ["yes"]}\n')
    proc = _cli("--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl")
    assert proc.returncode == 1 and f"{tmp_path / 'p.jsonl'}:2: field 'question_id'" in proc.stderr


def test_official_results_with_non_string_answer_rejected(tmp_path):
    (tmp_path / "res.json").write_text('[{"question_id": 1000, "answer": 2}]')
    proc = _cli("--vqa-annotations", GOLDEN / "annotations.json",
                "--vqa-questions", GOLDEN / "questions.json", "--vqa-results", tmp_path / "res.json")
    assert (proc.returncode == 1 and "field '[0].answer'" in proc.stderr
            and str(tmp_path / "res.json") in proc.stderr)


def _run_predictions(path: Path, predictions: dict) -> Path:
    """A qlora_vqa run's predictions/final.jsonl: {"key": question_id, "prediction"} rows."""
    path.write_text("".join(json.dumps({"key": q, "prediction": a}) + "\n" for q, a in predictions.items()))
    return path


def test_cli_scores_a_recipe_runs_own_predictions_file(tmp_path):
    predictions, references = _official_inputs()
    _run_predictions(tmp_path / "final.jsonl", predictions)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"question_id": q, "question": "?", **r}) + "\n"
                                                for q, r in references.items()))
    proc = _cli("--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "val.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == EXPECTED
    # the references keep their own field: `key` there is no question id
    (tmp_path / "keyed.jsonl").write_text('{"key": 1, "answers": ["yes"]}\n')
    proc = _cli("--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "keyed.jsonl")
    assert proc.returncode == 1 and f"{tmp_path / 'keyed.jsonl'}:1: field 'question_id'" in proc.stderr


def test_cli_refuses_partial_predictions_saying_what_they_cover(tmp_path):
    # a run with --eval_max_samples 2 predicts the first 2 questions of 3
    _run_predictions(tmp_path / "final.jsonl", {1: "yes", 2: "no"})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"question_id": q, "answers": ["yes"] * 10}) + "\n"
                                                for q in (1, 2, 3)))
    proc = _cli("--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "val.jsonl", "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        f"error: 1 question_id(s) in {tmp_path / 'val.jsonl'} have no prediction in "
        f"{tmp_path / 'final.jsonl'}: 3. The predictions cover 2 of the 3 items, as a recipe run with "
        "--eval_max_samples writes them; partial predictions are not scored: predict every item, or give "
        "references that hold only the predicted ones (`python -m eval report RUN` scores a run's "
        "predictions on the items they cover and says how many).\n")


def test_ids_that_differ_only_in_type_are_named_as_such():
    with pytest.raises(ValueError) as e:
        vqa_accuracy({"1": "yes"}, {1: {"answers": ["yes"]}})
    assert str(e.value).endswith(": 1. Keys must match exactly, and their types too: 1 and '1' differ.")


def test_decomposed_accents_match_the_composed_answer():
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café")
    assert nfd != "café"
    assert question_accuracy(nfd, ["café"] * 10) == 1.0  # all annotators agree: compared raw
    assert question_accuracy(nfd, ["café"] * 4 + ["coffee shop"] * 6) == 1.0
    assert question_accuracy("café", [nfd] * 3 + ["bar"] * 7) == pytest.approx(0.9)
