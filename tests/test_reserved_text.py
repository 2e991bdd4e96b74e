"""A text that holds one of the model's special strings is a bad row: the tokenizer would read the control
token there (a `</s>` in a caption is the eos the model learns to stop at; an `<image>` is an image slot).
Each recipe refuses it before the model loads, naming file, line and field, or skips and counts it."""

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from data_tools.clean import check_rows
from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from recipes.common.models import load_recipe_processor, resolve_model_path, special_strings

COMMON = ["--report_to", "none", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
          "--load_best_model_at_end", "false"]


def _file(tmp_path, rows, name="train.jsonl"):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _errors(path, task, reserved):
    return [(row.line, row.field, row.reason) for _, row, _ in check_rows(path, task, reserved=reserved,
                                                                         progress=False)
            if isinstance(row, DataError)]


def test_the_tiny_tokenizers_read_these_strings_as_control_tokens():
    # What the check guards against, measured on the recipes' own tokenizers.
    from transformers import AutoTokenizer

    for name, string in [("blip2-opt", "</s>"), ("blip2-opt", "<image>"), ("clip", "<|endoftext|>")]:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(f"tiny:{name}"))
        assert string in special_strings(tokenizer)
        ids = tokenizer(f"a {string} b", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(string) in ids


def test_every_text_field_of_every_task_is_checked(tmp_path):
    reserved = ("</s>", "<image>")
    rows = {
        "caption": [{"image": "a.png", "captions": ["fine", "a </s> b"]},
                    {"image": "a.png", "caption": "ok"}],
        "retrieval": [{"image": "a.png", "captions": ["ok"], "neg_captions": ["no", "x <image>"]}],
        "vqa": [{"image": "a.png", "question": "what <image>?", "answers": ["red"]},
                {"image": "a.png", "question": "what?", "answers": ["red", "</s>"]},
                {"image": "a.png", "question": "what?", "answers": ["red"]}],
        "instruct": [
            # an <image> placeholder in a user turn places the image: not text
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "A red square."}]},
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "Red.</s>"}]},
            {"image": "a.png", "messages": [{"role": "system", "content": "be </s> brief"},
                                            {"role": "user", "content": "What?"},
                                            {"role": "assistant", "content": "Red."}]},
        ],
    }
    expected = {"caption": [(1, "captions[1]")], "retrieval": [(1, "neg_captions[1]")],
                "vqa": [(1, "question"), (2, "answers[1]")],
                "instruct": [(2, "conversations[1].value"), (3, "conversations[0].value")]}
    for task, task_rows in rows.items():
        path = _file(tmp_path, task_rows, f"{task}.jsonl")
        assert _errors(path, task, reserved) == [(line, field, "reserved_text") for line, field in
                                                 expected[task]], task
        assert _errors(path, task, ()) == []  # nothing reserved: every row is valid


def test_validate_and_clean_take_reserved_strings(tmp_path):
    path = _file(tmp_path, [{"image": "a.png", "captions": ["ok"]},
                            {"image": "a.png", "captions": ["a <|endoftext|> b"]}])
    cli = [sys.executable, "-m", "data_tools"]
    out = subprocess.run([*cli, "validate", "--task", "caption", "--reserved", "<|endoftext|>",
                          "--reserved", "</s>", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{path}:2: field 'captions[0]': holds '<|endoftext|>'" in out.stderr
    assert "clean --task caption --reserved '<|endoftext|>' --reserved '</s>' IN" in out.stderr
    out = subprocess.run([*cli, "clean", "--task", "caption", "--reserved", "<|endoftext|>", str(path),
                          "--out", str(tmp_path / "c.jsonl"), "--rejects", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [r["captions"] for r in read_jsonl(tmp_path / "c.jsonl")] == [["ok"]]
    assert [(r["line"], r["reason"]) for r in read_jsonl(tmp_path / "r.jsonl")] == [(2, "reserved_text")]


def _bad_caption_file(tmp_path, string):
    return _file(tmp_path, [{"image": "a.png", "captions": [f"a red square {i}"]} for i in range(5)]
                 + [{"image": "a.png", "captions": ["a red square", f"a red {string} square"]}])


@pytest.mark.parametrize("recipe, model_flags, string", [
    ("blip2_lora_caption", ["--model_name_or_path", "tiny:blip2-opt"], "</s>"),
    ("soft_prompt_caption", ["--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2"],
     "<|endoftext|>"),
    ("clip_retrieval", ["--model_name_or_path", "tiny:clip", "--zero_shot_attribute", "none"],
     "<|endoftext|>"),
])
def test_a_caption_recipe_refuses_the_row_before_the_model_loads(tmp_path, recipe, model_flags, string):
    import importlib

    main = importlib.import_module(f"recipes.{recipe}.train").main
    path = _bad_caption_file(tmp_path, string)
    with pytest.raises(DataError) as e:
        main([*model_flags, *COMMON, "--train_file", str(path), "--output_dir", str(tmp_path / "out")])
    text = str(e.value)
    assert text.startswith(f"{path}:6: field 'captions[1]': holds {string!r}, which the model's tokenizer ")
    assert "\n" not in text
    assert f"clean --task {'retrieval' if recipe == 'clip_retrieval' else 'caption'} --reserved '{string}' " \
           f"{path} --out CLEAN" in text


def test_blip2_skips_and_counts_the_row_with_skip_bad_rows(tmp_path):
    from recipes.blip2_lora_caption.train import main

    path = _bad_caption_file(tmp_path, "</s>")
    out = tmp_path / "out"
    main(["--model_name_or_path", "tiny:blip2-opt", *COMMON, "--train_file", str(path), "--output_dir",
          str(out), "--skip_bad_rows", "true"])
    rejects = read_jsonl(out / "rejects" / "train.rejects.jsonl")
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [(6, "captions[1]", "reserved_text")]


@pytest.mark.parametrize("recipe, rows, field", [
    ("qlora_vqa", [{"image": "a.png", "question": "is it <image> red?", "answers": ["yes"]}], "question"),
    ("llava_instruct", [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                             {"from": "gpt", "value": "Red</s>"}]}],
     "conversations[1].value"),
])
def test_a_chat_recipe_refuses_special_strings_and_image_placeholders_in_text(tmp_path, recipe, rows, field):
    import importlib

    main = importlib.import_module(f"recipes.{recipe}.train").main
    task = "vqa" if recipe == "qlora_vqa" else "instruct"
    fine = ({"image": "a.png", "question": f"is it red {i}?", "answers": ["yes"]} if task == "vqa" else
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                 {"from": "gpt", "value": "Red."}]} for i in range(3))
    path = _file(tmp_path, [*fine, *rows])
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}:4: field {field!r}: holds')}"):
        main(["--model_name_or_path", "tiny:llava", "--load_in_4bit", "false", *COMMON, "--train_file",
              str(path), "--output_dir", str(tmp_path / "out")])


def test_the_processor_loads_with_its_options_checked(tmp_path):
    from recipes.common.args import ModelArguments

    path = resolve_model_path("tiny:llava")
    with pytest.raises(ValueError, match="--processor_kwargs 'patch_sise'.*Did you mean 'patch_size'"):
        load_recipe_processor(path, ModelArguments(processor_kwargs={"patch_sise": 14}))


def test_a_vqa_row_that_fails_when_tokenized_is_named_by_its_line(tmp_path):
    # The safety net behind the check at load: the chat encoder refuses the text too, naming the row's line.
    from recipes.common.chat import chat_encoder, tokenize_conversations
    from recipes.common.data import load_records
    from recipes.common.models import load_processor
    from recipes.qlora_vqa.collator import vqa_conversations

    rows = [{"image": "a.png", "question": f"what {i}?", "answers": ["red"]} for i in range(2)]
    path = _file(tmp_path, [*rows, {"image": "a.png", "question": "what </s>?", "answers": ["red"]}])
    path.write_text("\n" + path.read_text())  # a blank first line: the bad row is on line 4, record 2
    encoder = chat_encoder(load_processor(resolve_model_path("tiny:llava"), "llava"))
    records = load_records(path, "vqa")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:4: conversations\\[0\\]: holds '</s>'"):
        tokenize_conversations(vqa_conversations(records), encoder, None, source=str(path))


def test_a_caption_row_that_fails_when_tokenized_as_a_conversation_is_named_by_its_line(tmp_path):
    # llava_instruct's stage 1 makes caption records conversations: an error there names the file's line too.
    from recipes.common.chat import chat_encoder, tokenize_conversations
    from recipes.common.data import load_records
    from recipes.common.models import load_processor
    from recipes.llava_instruct.collator import caption_conversations

    path = _file(tmp_path, [{"image": "a.png", "captions": ["a red square"]},
                            {"image": "a.png", "captions": ["a red </s> square"]}])
    encoder = chat_encoder(load_processor(resolve_model_path("tiny:llava"), "llava"))
    records = load_records(path, "caption")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: conversations\\[1\\]: holds '</s>'"):
        tokenize_conversations(caption_conversations(records, seed=0), encoder, None, source=str(path))
