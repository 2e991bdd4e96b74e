"""eval.instruct (one item per held-out assistant turn; short answers by VQA accuracy, descriptions by CIDEr)
and the "instruct" task of `python -m eval report`."""

import json

import pytest
from PIL import Image

from data_tools.jsonl import write_jsonl
from eval.caption import caption_metrics
from eval.instruct import eval_items, instruct_scores, is_short
from eval.report import report_run

RECORDS = [
    {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Describe the image."},
        {"from": "gpt", "value": "A red circle in the top left of the image on a light background."}]},
    {"conversations": [{"from": "human", "value": "How many sides does a triangle have?"},
                       {"from": "gpt", "value": "three"}]},
    {"image": "b.png", "conversations": [
        {"from": "system", "value": "Answer well."},
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A blue square at the bottom of the image next to a green cross."}]},
]
PREDICTIONS = {"0:1": "red", "0:3": "a red circle in the top left of the image", "1:1": "four sides",
               "2:2": "a blue square at the bottom of the image"}


def test_items_are_assistant_turns_with_their_history():
    items = eval_items(RECORDS, short_answer_words=3)
    assert [it["key"] for it in items] == ["0:1", "0:3", "1:1", "2:2"]
    assert [it["short"] for it in items] == [True, False, True, False]
    assert (items[1]["conversations"] == RECORDS[0]["conversations"][:3]
            and items[1]["question"] == "Describe the image.")
    assert items[0]["question"] == "What color is the circle?" and items[2]["image"] is None
    assert is_short(["红色的圆形"], 5, lang="zh") and not is_short(["红色的圆形"], 4, lang="zh")  # characters


def test_an_item_shows_the_images_of_its_history_only():
    """Images that later turns' <image>s place are not in an earlier answer's prompt; images no <image>
    places lead the first user turn, so every item has them."""
    turns = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."},
             {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "A square."}]
    records = [{"images": ["lead.png", "a.png", "b.png"], "conversations": turns},
               {"image": "late.png", "conversations": [{"from": "human", "value": "Hi."},
                                                       {"from": "gpt", "value": "Hello."}, *turns[2:]]}]
    items = eval_items(records)
    assert {it["key"]: it["images"] for it in items[:2]} == {"0:1": ["lead.png", "a.png"],
                                                          "0:3": ["lead.png", "a.png", "b.png"]}
    assert {it["key"]: it["image"] for it in items[2:]} == {"1:1": None, "1:3": "late.png"}


def test_short_answers_by_vqa_accuracy_descriptions_by_cider():
    items = eval_items(RECORDS, short_answer_words=3)
    scores = instruct_scores(PREDICTIONS, items, per_sample=True)
    # "red" matches "Red." after VQA normalisation, "four sides" misses "three"
    assert scores["VQA_accuracy"] == 50.0
    assert (scores["n_short"], scores["n_long"]) == (2, 2)
    long = {k: PREDICTIONS[k] for k in ("0:3", "2:2")}
    references = {"0:3": [RECORDS[0]["conversations"][3]["value"]],
                  "2:2": [RECORDS[2]["conversations"][2]["value"]]}
    expected = caption_metrics(long, references, metrics=["Bleu", "ROUGE_L", "CIDEr"])
    assert scores["CIDEr"] == pytest.approx(expected["CIDEr"]) and scores["CIDEr"] > 0
    assert scores["per_sample"]["0:1"] == 1.0 and scores["per_sample"]["1:1"] == 0.0
    with pytest.raises(KeyError, match="not eval items"):
        instruct_scores({"9:1": "x"}, items)


def test_report_rescores_an_instruct_run(tmp_path):
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), color).save(tmp_path / name)
    write_jsonl(tmp_path / "val.jsonl", RECORDS)
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    write_jsonl(run / "predictions" / "final.jsonl",
                ({"key": k, "prediction": v} for k, v in PREDICTIONS.items()))
    write_jsonl(run / "predictions" / "before.jsonl", ({"key": k, "prediction": "no"} for k in PREDICTIONS))
    info = {"recipe": "llava_instruct", "task": "instruct", "eval_file": str(tmp_path / "val.jsonl"),
            "lang": "en", "short_answer_words": 3, "global_step": 5}
    (run / "metrics.json").write_text(json.dumps(info))
    row = report_run(run)
    assert (row["final"]["VQA_accuracy"] == 50.0 and row["before"]["VQA_accuracy"] == 0.0
            and row["final"]["CIDEr"] > 0)
    assert "Bleu_4" in row["final"] and row["n"] == 4
    gallery = (run / "gallery.html").read_text()
    assert "(text only)" in gallery and "How many sides does a triangle have?" in gallery
    # nothing is short any more
    (run / "metrics.json").write_text(json.dumps({**info, "short_answer_words": 0}))
    row = report_run(run)
    assert "VQA_accuracy" not in row["final"] and row["final"]["n_long"] == 4


def test_shuffled_images_give_every_image_item_another_image():
    import datasets

    from recipes.common.run import shuffled_images

    items = datasets.Dataset.from_list([{"key": "0:1", "image": "a"}, {"key": "0:3", "image": "a"},
                                        {"key": "1:1", "image": None}, {"key": "2:1", "image": "b"},
                                        {"key": "3:1", "image": "c"}])
    shuffled = shuffled_images(items)
    assert shuffled["image"] == ["b", "b", None, "c", "a"] and shuffled["key"] == items["key"]


def test_caption_eval_items_merge_the_rows_of_one_image():
    import datasets

    from recipes.llava_instruct.collator import caption_eval_items

    rows = datasets.Dataset.from_list([{"image": "a", "captions": ["x"]}, {"image": "b", "captions": ["y"]},
                                       {"image": "a", "captions": ["z", "w"]}])
    items = caption_eval_items(rows)
    assert [(it["key"], it["references"]) for it in items] == [("a", ["x", "z", "w"]), ("b", ["y"])]
    assert items[0]["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image briefly."}]


def test_keys_name_the_file_row_whatever_rows_the_run_skipped(tmp_path, capsys):
    """A run with --skip_bad_rows leaves out a row with a missing image (valid for the report, which opens
    no image) and one the schema refuses: each key still names its own row, so the references copied in
    as predictions score 100, and a prediction for the refused row is an unknown key."""
    from recipes.common.data import load_records
    from recipes.llava_instruct.collator import generation_items

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    rows = [{**RECORDS[0], "image": "missing.png"},
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]},
            {**RECORDS[0], "image": "a.png"}, RECORDS[1], {**RECORDS[2], "image": "a.png"}]
    write_jsonl(tmp_path / "val.jsonl", rows)
    records = load_records(tmp_path / "val.jsonl", "instruct", skip_bad_rows=True,
                           rejects_path=tmp_path / "rejects.jsonl")
    items = list(generation_items("instruct", records, 3, "en"))
    assert [it["key"] for it in items] == ["2:1", "2:3", "3:1", "4:2"]
    assert [it["references"][0] for it in items] == ["Red.", RECORDS[0]["conversations"][3]["value"],
                                                     "three", RECORDS[2]["conversations"][2]["value"]]
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    write_jsonl(run / "predictions" / "final.jsonl",
                ({"key": it["key"], "prediction": it["references"][0]} for it in items))
    (run / "metrics.json").write_text(json.dumps({"recipe": "llava_instruct", "task": "instruct",
                                                  "eval_file": str(tmp_path / "val.jsonl"),
                                                  "short_answer_words": 3}))
    row = report_run(run)
    assert (row["final"]["VQA_accuracy"] == 100.0 and row["n"] == 4
            and row["n_eval"] == 6)  # row 0 (its image is not opened) and rows 2 to 4
    assert "1 invalid row(s) left out" in capsys.readouterr().err
    write_jsonl(run / "predictions" / "final.jsonl", [{"key": "1:1", "prediction": "red"}])
    with pytest.raises(Exception, match="not in the eval file"):
        report_run(run)
