"""convert --from llava on rows shaped like the public LLaVA / LLaMA-Factory files."""

import json

from data_tools.convert import convert, default_rejects_path
from data_tools.jsonl import read_jsonl


def test_a_null_in_a_one_image_list_is_a_reject_not_a_text_only_row(tmp_path):
    # LLaMA-Factory style, the image placed before the first user turn (no `<image>` in the text): with
    # its one image null, the row must not go on as a conversation without its image.
    rows = [
        {"images": [None], "messages": [{"role": "user", "content": "What is it?"},
                                        {"role": "assistant", "content": "A cat."}]},
        {"images": ["a.jpg"], "messages": [{"role": "user", "content": "What is it?"},
                                           {"role": "assistant", "content": "A dog."}]},
    ]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    convert("llava", [src], out)
    assert read_jsonl(out) == [{"image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A dog."}]}]
    rejects = read_jsonl(default_rejects_path(out))
    assert [(r["item"], r["reason"], r["field"]) for r in rejects] == [("[0]", "missing_field", "images[0]")]
