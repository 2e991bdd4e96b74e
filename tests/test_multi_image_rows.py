"""Instruct rows with several images (`"images": [...]`): validated, cleaned, loaded and encoded with every
image; the tools that group rows by their one image (dedup, split, check-leakage) refuse them by line."""

import subprocess
import sys

from PIL import Image

from data_tools.clean import clean
from data_tools.jsonl import read_jsonl, write_jsonl
from recipes.common.data import load_records

ROW = {"images": ["img/a.png", "img/b.png"],
       "conversations": [{"from": "human", "value": "<image> and <image>: same colour?"},
                         {"from": "gpt", "value": "no."}]}


def _data(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "data" / "img" / "a.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "data" / "img" / "b.png")
    src = tmp_path / "data" / "chat.jsonl"
    write_jsonl(src, [ROW, {**ROW, "images": ["img/a.png", "img/missing.png"]}])
    return src


def test_clean_checks_and_rebases_every_image(tmp_path):
    src = _data(tmp_path)
    report = clean(src, "instruct", tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl")
    assert (report.kept, dict(report.rejected)) == (1, {"missing_image": 1})
    assert read_jsonl(tmp_path / "clean.jsonl")[0]["images"] == ["data/img/a.png", "data/img/b.png"]
    (reject,) = read_jsonl(tmp_path / "rejects.jsonl")
    assert (reject["line"], reject["field"]) == (2, "images[1]")


def test_recipes_load_every_image_and_encode_them_in_order(tmp_path):
    from transformers import AutoProcessor

    from recipes.common.chat import chat_encoder, tokenize_conversations
    from recipes.common.models import resolve_model_path

    src = _data(tmp_path)
    records = load_records(src, "instruct", skip_bad_rows=True, rejects_path=tmp_path / "rejects.jsonl")
    assert records[0]["images"] == [str(tmp_path / "data" / "img" / name) for name in ("a.png", "b.png")]
    processor = AutoProcessor.from_pretrained(resolve_model_path("tiny:llava"))
    one = [{"image": records[0]["images"][0], "conversations": [
        {"from": "human", "value": "<image> what colour?"}, {"from": "gpt", "value": "red."}]}]
    encoder = chat_encoder(processor)
    (two,), (single,) = (tokenize_conversations(rows, encoder, None)[0] for rows in (records, one))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert two["input_ids"].count(image_id) == 2 * single["input_ids"].count(image_id) > 0


def test_grouping_tools_refuse_rows_with_several_images(tmp_path):
    src = tmp_path / "chat.jsonl"
    write_jsonl(src, [ROW])
    for tool in (["dedup", str(src), "--task", "instruct", "--out", str(tmp_path / "d.jsonl")],
                 ["split", str(src), "--task", "instruct", "--out-dir", str(tmp_path / "s"), "--seed", "0"]):
        r = subprocess.run([sys.executable, "-m", "data_tools", *tool], capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "chat.jsonl:1" in r.stderr and "images" in r.stderr and "2 images" in r.stderr


def test_eval_items_prompt_check_and_report_with_every_image_of_a_row(tmp_path):
    """Eval rows with several images are asked with all of them, as training gives them: placed by their
    `<image>`s or, without any, leading the first user turn; the shuffled-image check swaps each one."""
    import json

    from transformers import AutoProcessor

    from eval.report import report_run
    from recipes.common.chat import ChatPromptCollator, chat_encoder
    from recipes.common.models import resolve_model_path
    from recipes.common.run import shuffled_images
    from recipes.llava_instruct.collator import generation_items

    src = _data(tmp_path)
    unplaced = [{"from": "human", "value": "same colour?"}, {"from": "gpt", "value": "no."}]
    write_jsonl(src, [ROW, {**ROW, "conversations": unplaced},
                      {"image": "img/a.png", "conversations": unplaced}])
    a, b = (str(tmp_path / "data" / "img" / name) for name in ("a.png", "b.png"))
    items = generation_items("instruct", load_records(src, "instruct"), 3, "en")
    assert (items["images"], items["image"]) == ([[a, b], [a, b], None], [None, None, a])
    processor = AutoProcessor.from_pretrained(resolve_model_path("tiny:llava"))
    batch = ChatPromptCollator(chat_encoder(processor))(list(items))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    n = (batch["input_ids"] == image_id).sum(1).tolist()
    assert n == [2 * n[2]] * 2 + [n[2]] and n[2] > 0 and batch["keys"] == ["0:1", "1:1", "2:1"]
    shuffled = shuffled_images(items)
    assert (shuffled["images"], shuffled["image"]) == ([[b, a], [b, a], None], [None, None, b])
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    write_jsonl(run / "predictions" / "final.jsonl", [{"key": k, "prediction": "no."} for k in items["key"]])
    (run / "metrics.json").write_text(json.dumps({"recipe": "llava_instruct", "task": "instruct",
                                                  "eval_file": str(src)}))
    assert report_run(run)["final"]["VQA_accuracy"] == 100.0
    gallery = (run / "gallery.html").read_text()
    assert gallery.count("<img ") == 5 and "(text only)" not in gallery
