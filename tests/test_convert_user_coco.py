"""convert --from coco-captions on files shaped like the public captions_*.json."""

import json

from data_tools.convert import convert, default_rejects_path
from data_tools.jsonl import read_jsonl


def test_annotation_listed_twice_is_a_reject_not_a_second_reference(tmp_path):
    # A file concatenated or merged by hand can list one annotation (same "id") twice; kept twice, the
    # caption would count double among the image's references (CIDEr, BLEU).
    ann = tmp_path / "captions_train2017.json"
    ann.write_text(json.dumps({
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 48, "caption": "A man riding a wave."},
            {"image_id": 25, "id": 67, "caption": "A giraffe eating."},
            {"image_id": 9, "id": 48, "caption": "A man riding a wave."},
            # the same words under another id: a second annotator's caption, kept
            {"image_id": 25, "id": 70, "caption": "A giraffe eating."},
        ],
    }), encoding="utf-8")
    out = tmp_path / "train.jsonl"
    convert("coco-captions", [ann], out)
    assert read_jsonl(out) == [
        {"image": "000000000009.jpg", "captions": ["A man riding a wave."], "image_id": 9},
        {"image": "000000000025.jpg", "captions": ["A giraffe eating.", "A giraffe eating."], "image_id": 25},
    ]
    rejects = read_jsonl(default_rejects_path(out))
    assert [(r["item"], r["reason"], r["field"]) for r in rejects] == [("annotations[2]", "bad_value", "id")]
    assert "annotations[0]" in rejects[0]["message"]
