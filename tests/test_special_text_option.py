"""--special_text: special strings a data set writes on purpose (e.g. Qwen2-VL's grounding tokens) are kept
as the tokenizer's control tokens; training records them, and serve takes them in requests to that run."""

import base64
import io
import json
import shutil

import pytest
from PIL import Image

from data_tools.records import find_reserved
from recipes.common.models import resolve_model_path, special_strings, text_reserved

COMMON = ["--report_to", "none", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
          "--load_best_model_at_end", "false", "--per_device_train_batch_size", "2"]


def test_find_reserved_names_the_leftmost_and_longest():
    reserved = ("<box>", "<box_end>", "</s>")
    assert find_reserved("a <box_end> b </s>", reserved) == "<box_end>"
    assert find_reserved("a </s> b <box>", reserved) == "</s>"
    assert find_reserved("a box. b", reserved) is None
    assert find_reserved("a </s>", ()) is None
    many = tuple(f"<unused{i}>" for i in range(3000))  # Gemma-sized lists: one pattern, not a loop
    assert find_reserved("x <unused2999> y", many) == "<unused2999>"
    assert find_reserved("x <unused3000> y", many) is None


def test_text_reserved_leaves_out_the_allowed_strings_and_refuses_unknown_ones():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny:llava"))
    specials = special_strings(tokenizer)
    assert "</s>" in specials and text_reserved(tokenizer) == specials
    assert text_reserved(tokenizer, ["</s>"]) == tuple(s for s in specials if s != "</s>")
    with pytest.raises(ValueError, match=r"--special_text '<box>' is not a special string of the tokenizer"):
        text_reserved(tokenizer, ["<box>"])


def test_llava_trains_on_a_special_string_the_data_holds_on_purpose(tmp_path):
    from transformers import AutoTokenizer

    from recipes.common.chat import chat_encoder, tokenize_conversations
    from recipes.common.models import load_processor
    from recipes.llava_instruct.train import main

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                 {"from": "gpt", "value": f"Red</s>{i}."}]} for i in range(4)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["--model_name_or_path", "tiny:llava", *COMMON, "--train_file", str(path), "--output_dir", str(out),
          "--special_text", "</s>"])
    assert json.loads((out / "run.json").read_text())["special_text"] == ["</s>"]
    assert not (out / "rejects").exists()
    # the string is the control token: the answer's tokens hold the eos where the text wrote it
    encoder = chat_encoder(load_processor(resolve_model_path("tiny:llava"), "llava"), ["</s>"])
    row = {**rows[0], "image": str(tmp_path / "a.png")}
    samples, _ = tokenize_conversations([row], encoder, None)
    eos = AutoTokenizer.from_pretrained(resolve_model_path("tiny:llava")).eos_token_id
    answer = [t for t in samples[0]["labels"] if t != -100]
    assert answer.count(eos) == 2  # the text's and the template's after the answer
    with pytest.raises(ValueError, match="holds '</s>'"):
        tokenize_conversations([row], chat_encoder(encoder.processor), None)


def test_serve_takes_the_special_strings_its_run_trained_with(tmp_path):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.runs import load_runs

    names = {"plain": "llava", "grounding": "llava", "captioner": "blip2-opt",
             "captioner-allowing": "blip2-opt"}
    for name, tiny in names.items():
        shutil.copytree(resolve_model_path(f"tiny:{tiny}"), tmp_path / name)
    for name in ("grounding", "captioner-allowing"):
        (tmp_path / name / "run.json").write_text(json.dumps({"special_text": ["</s>"]}))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    image = {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    message = {"role": "user", "content": [image, {"type": "text", "text": "what is </s> here?"}]}
    with TestClient(create_app(load_runs([tmp_path / name for name in names]))) as client:
        status = {name: client.post("/v1/chat/completions", json={"model": name, "max_tokens": 2,
                                                                  "messages": [message]}).status_code
                  for name in names}
    assert status == {"plain": 400, "grounding": 200, "captioner": 400, "captioner-allowing": 200}
