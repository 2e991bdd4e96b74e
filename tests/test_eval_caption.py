"""Caption metrics: equal to pycocoevalcap called directly; character scoring; CLI; input errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import caption
from eval.caption import caption_metrics, character_tokens

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "eval_caption"


def _coco_inputs():
    anns = json.loads((GOLDEN / "coco_annotations.json").read_text())["annotations"]
    results = json.loads((GOLDEN / "coco_results.json").read_text())
    references = {}
    for a in anns:
        references.setdefault(a["image_id"], []).append(a["caption"])
    return {r["image_id"]: r["caption"] for r in results}, references


@pytest.fixture(scope="module")
def direct():
    """pycocoevalcap run the usual way (as COCOEvalCap.evaluate does): PTB tokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions, references = _coco_inputs()
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out, per_image = {}, {}
    for scorer, names in [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
                          (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]:
        score, scores = scorer.compute_score(gts, res)
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, s, ss in zip(names, score, scores):
            out[name] = s
            per_image[name] = dict(zip(gts.keys(), ss))
    return out, per_image


@pytest.fixture(scope="module")
def ours():
    predictions, references = _coco_inputs()
    return caption_metrics(predictions, references, metrics=["Bleu", "METEOR", "ROUGE_L", "CIDEr"],
                           per_sample=True)


def test_equals_pycocoevalcap(direct, ours):
    expected, _ = direct
    assert set(ours) == set(expected) | {"per_sample"}
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    # Sanity: the case is not degenerate.
    assert 0.3 < ours["CIDEr"] < 3 and ours["Bleu_4"] > 0.05 and 0.1 < ours["METEOR"] < 0.6


def test_per_sample_equals_pycocoevalcap(direct, ours):
    _, per_image = direct
    for name in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        assert ({k: v[name] for k, v in ours["per_sample"].items()}
                == pytest.approx(per_image[name], rel=1e-12))
    assert len({round(v["CIDEr"], 6) for v in ours["per_sample"].values()}) == 4


def test_character_tokens():
    assert character_tokens("一只猫，坐在椅子上。") == "一 只 猫 坐 在 椅 子 上"
    # Full-width Latin is folded by NFKC; Latin words and numbers stay whole; punctuation goes.
    assert character_tokens("ＡＢＣ狗「3只」Dogs!") == "abc 狗 3 只 dogs"
    assert character_tokens("ねこがいる") == "ね こ が い る"
    # Thai combining vowels and tones stay on their base consonant.
    assert character_tokens("แมวนั่ง") == "แ ม ว นั่ ง"


def test_zh_scores_characters_like_pycocoevalcap_on_hand_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    predictions = {"a": "一只猫坐在椅子上。", "b": "两个人在公园里散步", "c": "桌子上有一碗米饭"}
    references = {"a": ["一只猫坐在椅子上", "猫在椅子上睡觉。"], "b": ["两个人在公园散步！", "公园里有人"],
                  "c": ["桌上有米饭和菜", "一碗饭放在桌子上"]}
    gts = {"a": ["一 只 猫 坐 在 椅 子 上", "猫 在 椅 子 上 睡 觉"], "b": ["两 个 人 在 公 园 散 步", "公 园 里 有 人"],
           "c": ["桌 上 有 米 饭 和 菜", "一 碗 饭 放 在 桌 子 上"]}
    res = {"a": ["一 只 猫 坐 在 椅 子 上"], "b": ["两 个 人 在 公 园 里 散 步"], "c": ["桌 子 上 有 一 碗 米 饭"]}
    ours = caption_metrics(predictions, references, lang="zh", per_sample=True)
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "per_sample"}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
    assert ours["CIDEr"] == pytest.approx(cider, rel=1e-12)
    assert ours["per_sample"]["a"]["CIDEr"] == pytest.approx(cider_per_image[0], rel=1e-12)
    assert ours["Bleu_1"] > 0.7  # characters overlap; sentence-level "words" would not


def test_english_only_metrics_refused_for_zh():
    with pytest.raises(ValueError, match="METEOR"):
        caption_metrics({1: "猫"}, {1: ["猫"]}, lang="zh", metrics=["METEOR"])


def test_spice_skipped_with_one_stderr_line(monkeypatch, capsys):
    monkeypatch.setattr(caption, "spice_available", lambda: (False, "the jars are missing (test)"))
    out = caption_metrics({1: "a cat sleeps"}, {1: ["a cat is sleeping"]}, metrics=["SPICE", "Bleu"])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "SPICE" in line] == [
        "SPICE skipped: the jars are missing (test)"]
    assert "SPICE" not in out and "Bleu_1" in out


class _SortedLikeSpice:
    """Stands in for pycocoevalcap's Spice (its CoreNLP jars are not installed here) with the output shape
    of pycocoevalcap/spice/spice.py: per-sample sub-score dicts in sorted(gts.keys()) order. Each sample's
    "All" F-score is its prediction's word count, so a score filed under another key shows."""

    def compute_score(self, gts, res):
        scores = [{"All": {"f": float(len(res[k][0].split()))}} for k in sorted(gts.keys())]
        return sum(s["All"]["f"] for s in scores) / len(scores), scores


def test_spice_per_sample_scores_land_on_their_keys(monkeypatch):
    monkeypatch.setattr(caption, "spice_available", lambda: (True, ""))
    real_scorer = caption._scorer
    monkeypatch.setattr(caption, "_scorer",
                        lambda name: _SortedLikeSpice() if name == "SPICE" else real_scorer(name))
    predictions = {"b": "a dog", "c": "a red bus stops", "a": "three sleeping cats"}
    references = {k: ["a cat"] for k in predictions}
    out = caption_metrics(predictions, references, metrics=["SPICE"], per_sample=True)
    assert out == {"SPICE": 3.0,
                   "per_sample": {"b": {"SPICE": 2.0}, "c": {"SPICE": 4.0}, "a": {"SPICE": 3.0}}}
    # Keys that do not sort together (int and str) are scored too.
    predictions = {10: "a dog", "x": "a red bus stops", 2: "one cat sleeps"}
    out = caption_metrics(predictions, {k: ["a cat"] for k in predictions}, metrics=["SPICE"],
                          per_sample=True)
    assert out["per_sample"] == {10: {"SPICE": 2.0}, "x": {"SPICE": 4.0}, 2: {"SPICE": 3.0}}


def test_spice_available_reports_missing_corenlp():
    ok, why = caption.spice_available()
    if ok:
        pytest.skip("SPICE jars are installed here")
    assert "stanford-corenlp" in why.lower() or "spice-1.0.jar" in why


def test_missing_prediction_and_reference_named():
    with pytest.raises(ValueError) as e:
        caption_metrics({1: "x", 9: "y"}, {1: ["x"], 2: ["z"]}, metrics=["CIDEr"])
    msg = str(e.value)
    assert "9" in msg and "no reference" in msg and "2" in msg and "no prediction" in msg


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "eval", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def test_cli_coco_files_json(direct):
    expected, _ = direct
    proc = _cli("caption", "--coco-annotations", GOLDEN / "coco_annotations.json",
                "--coco-results", GOLDEN / "coco_results.json", "--metrics", "Bleu", "ROUGE_L", "CIDEr",
                "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object, no progress text
    # pycocoevalcap's chatter (the tokenizer's progress, BLEU's length ratios) is dropped, not moved to
    # stderr.
    assert ("testlen" not in proc.stderr and "ratio" not in proc.stderr
            and "tokeniz" not in proc.stderr.lower())
    assert set(result) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    for name, value in result.items():
        assert value == pytest.approx(expected[name], rel=1e-12)


def test_cli_coco_results_of_some_annotated_images_score_those_as_pycocoevalcap_does(direct, tmp_path):
    expected, _ = direct
    annotations = json.loads((GOLDEN / "coco_annotations.json").read_text())
    annotations["annotations"] += [{"image_id": 990001, "id": 990001, "caption": "a cat on a mat"}]
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    proc = _cli("caption", "--coco-annotations", tmp_path / "ann.json", "--coco-results",
                GOLDEN / "coco_results.json", "--metrics", "CIDEr", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["CIDEr"] == pytest.approx(expected["CIDEr"], rel=1e-12)
    n = len(json.loads((GOLDEN / "coco_results.json").read_text()))
    assert f"scoring the {n} images" in proc.stderr and f"of the {n + 1} annotated" in proc.stderr
    results = json.loads((GOLDEN / "coco_results.json").read_text()) + [{"image_id": 5, "caption": "a"}]
    (tmp_path / "res.json").write_text(json.dumps(results))  # an image that is not annotated: refused
    proc = _cli("caption", "--coco-annotations", tmp_path / "ann.json",
                "--coco-results", tmp_path / "res.json")
    assert proc.returncode != 0 and "no reference" in proc.stderr


def test_cli_jsonl_per_sample(tmp_path):
    preds, refs = _coco_inputs()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": f"img/{k}.jpg", "prediction": v}) + "\n"
                                              for k, v in preds.items()))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"image": f"img/{k}.jpg", "captions": v}) + "\n"
                                              for k, v in refs.items()))
    proc = _cli("caption", "--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl",
                "--metrics", "CIDEr", "--json", "--per-sample", tmp_path / "per.jsonl")
    assert proc.returncode == 0, proc.stderr
    lib = caption_metrics(preds, refs, metrics=["CIDEr"], per_sample=True)
    assert json.loads(proc.stdout) == {"CIDEr": pytest.approx(lib["CIDEr"], rel=1e-12)}
    rows = [json.loads(line) for line in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"img/{k}.jpg" for k in refs]
    assert [r["CIDEr"] for r in rows] == pytest.approx([lib["per_sample"][k]["CIDEr"] for k in refs],
                                                       rel=1e-12)


def test_cli_missing_prediction_names_file_and_key(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    (tmp_path / "r.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n'
                                      '{"image": "b.jpg", "captions": ["y"]}\n')
    proc = _cli("caption", "--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl",
                "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert ("'b.jpg'" in proc.stderr and "no prediction" in proc.stderr
            and str(tmp_path / "p.jsonl") in proc.stderr)


def test_cli_bad_row_names_file_line_field(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n\n'
                                      '{"image": "b.jpg", "text": "y"}\n')
    (tmp_path / "r.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n')
    proc = _cli("caption", "--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl")
    assert proc.returncode == 1
    assert f"{tmp_path / 'p.jsonl'}:3: field 'prediction'" in proc.stderr


def test_line_breaks_inside_captions_do_not_shift_images():
    # pycocoevalcap's tokenizer works line by line; a "\r" inside a caption must not move later captions.
    references = {1: ["a dog runs on grass"], 2: ["a red bus on a street"], 3: ["two cats sleep"]}
    broken = caption_metrics({1: "a dog\rruns", 2: "a red\u2028bus", 3: "two cats"}, references,
                             metrics=["CIDEr"], per_sample=True)
    clean = caption_metrics({1: "a dog runs", 2: "a red bus", 3: "two cats"}, references,
                            metrics=["CIDEr"], per_sample=True)
    assert broken == clean and clean["per_sample"][3]["CIDEr"] > 0


def _run_files(tmp_path, image_root):
    """references `test.jsonl` with image paths relative to `image_root`, and the predictions a recipe run
    writes for it (predictions/final.jsonl: {"key": absolute image path, "prediction"})."""
    preds, refs = _coco_inputs()
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"image": f"img/{k}.jpg", "captions": v}) + "\n"
                                                 for k, v in refs.items()))
    (tmp_path / "final.jsonl").write_text("".join(
        json.dumps({"key": str(image_root.resolve() / "img" / f"{k}.jpg"), "prediction": v}) + "\n"
        for k, v in preds.items()))
    return {f"img/{k}.jpg": v for k, v in preds.items()}, {f"img/{k}.jpg": v for k, v in refs.items()}


def test_cli_scores_a_recipe_runs_predictions_keyed_by_absolute_image_paths(tmp_path):
    preds, refs = _run_files(tmp_path, tmp_path)  # the images' root: the references file's folder
    proc = _cli("caption", "--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "test.jsonl",
                "--metrics", "CIDEr", "--json", "--per-sample", tmp_path / "per.jsonl")
    assert proc.returncode == 0, proc.stderr
    lib = caption_metrics(preds, refs, metrics=["CIDEr"])
    assert json.loads(proc.stdout) == {"CIDEr": pytest.approx(lib["CIDEr"], rel=1e-12)}
    rows = [json.loads(line) for line in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == list(refs)  # the references' own keys


def test_cli_matches_absolute_paths_under_the_image_root_given(tmp_path):
    (tmp_path / "images").mkdir()
    preds, refs = _run_files(tmp_path, tmp_path / "images")  # a run with --image_root images
    args = ("caption", "--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "test.jsonl",
            "--metrics", "CIDEr", "--json")
    proc = _cli(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.rstrip().endswith(
        f"Absolute image paths (a recipe run's keys) match the references' images resolved against "
        f"--image-root, here {tmp_path}: give the run's image root (its --image_root; by default its eval or "
        "test file's folder).")
    proc = _cli(*args, "--image-root", tmp_path / "images")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"CIDEr": pytest.approx(caption_metrics(preds, refs, metrics=["CIDEr"])
                                                              ["CIDEr"], rel=1e-12)}


def test_cli_refuses_a_partial_runs_predictions(tmp_path):
    _run_files(tmp_path, tmp_path)
    rows = (tmp_path / "final.jsonl").read_text().splitlines()
    (tmp_path / "final.jsonl").write_text("\n".join(rows[:2]) + "\n")  # a run with --eval_max_samples 2
    proc = _cli("caption", "--predictions", tmp_path / "final.jsonl", "--references", tmp_path / "test.jsonl",
                "--metrics", "CIDEr")
    assert proc.returncode == 1 and proc.stdout == ""
    assert (f"have no prediction in {tmp_path / 'final.jsonl'}" in proc.stderr
            and f"The predictions cover 2 of the {len(rows)} items" in proc.stderr
            and "partial predictions are not scored" in proc.stderr)


def test_cli_with_int_image_ids_that_do_not_match_is_one_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"image_id": 1, "captions": ["a cat"]}\n')
    (tmp_path / "p.jsonl").write_text('{"image_id": 2, "caption": "a cat"}\n')
    proc = _cli("caption", "--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl",
                "--metrics", "Bleu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no reference" in proc.stderr


def test_decomposed_accents_score_as_the_same_text():
    # "café" typed as e + combining acute (NFD: macOS, some tokenizers' decoding) is the same text as the
    # precomposed "é" (NFC); scored as it stands it would be a different word.
    import unicodedata

    references = {1: ["a café by the rosé stand"], 2: ["a blue square"]}
    composed = caption_metrics({1: "a café by the rosé stand", 2: "a blue square"}, references,
                               metrics=["Bleu", "CIDEr"], per_sample=True)
    decomposed = caption_metrics({1: unicodedata.normalize("NFD", "a café by the rosé stand"),
                                  2: "a blue square"}, references, metrics=["Bleu", "CIDEr"], per_sample=True)
    assert decomposed == composed and composed["Bleu_4"] == pytest.approx(1.0)


_DYING_METEOR = """
import subprocess, sys, threading
from pycocoevalcap.meteor.meteor import Meteor
import eval.caption as caption

class DyingMeteor(Meteor):  # METEOR's Java process as it ends on a very long caption: out of heap space
    def __init__(self):
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stderr.write('Exception in thread main "
             "java.lang.OutOfMemoryError: Java heap space\\\\n')"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.meteor_p.wait()

caption._scorer = lambda name: DyingMeteor()
from eval.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_meteor_process_that_dies_is_one_line_not_a_hang(tmp_path):
    # pycocoevalcap's METEOR keeps its lock when its Java process dies (a caption of some ten thousand words
    # runs it out of heap), and its __del__ then waits for that lock for ever.
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "caption": "a dog"}\n')
    (tmp_path / "r.jsonl").write_text('{"image": "a.jpg", "captions": ["a dog runs"]}\n')
    proc = subprocess.run([sys.executable, "-c", _DYING_METEOR, "caption", "--predictions",
                           tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl", "--metrics", "METEOR"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: METEOR failed: its Java process stopped (Exception in thread main "
        "java.lang.OutOfMemoryError: Java heap space); the longest prediction has 2 words. Shorten the "
        "predictions or score without METEOR"]
