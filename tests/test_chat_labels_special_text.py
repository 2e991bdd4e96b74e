"""A turn whose text holds one of the tokenizer's special strings ("</s>", "<end_of_turn>", ...) is refused,
naming its file:line and turn: the tokenizer would read the string as its control token, and an answer
holding the end-of-turn token would teach the model to stop inside the answer."""

import re

import pytest
from PIL import Image

from recipes.common.chat import chat_encoder, tokenize_conversations
from recipes.common.models import load_processor, resolve_model_path


def _encoder(family):
    return chat_encoder(load_processor(resolve_model_path(f"tiny:{family}"), family))


def _record(image, question, answer):
    return {"image": image, "line": 3, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
        {"from": "human", "value": "and?"}, {"from": "gpt", "value": "done."}]}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 64), "red").save(path)
    return str(path)


@pytest.mark.parametrize("family, special", [("llava", "</s>"), ("llava", "<s>"),
                                             ("gemma3", "<end_of_turn>"), ("mllama", "<|eot_id|>"),
                                             ("paligemma", "<eos>")])
def test_a_special_string_in_an_answer_is_an_error_naming_the_line_and_turn(family, special, image):
    # PaliGemma learns the last answer alone: the special string goes there.
    answers = ("fine.", f"use {special} here") if family == "paligemma" else (f"use {special} here", "done.")
    record = _record(image, "what?", answers[0])
    record["conversations"][3]["value"] = answers[1]
    turn = 3 if family == "paligemma" else 1
    pattern = rf"^train\.jsonl:3: conversations\[{turn}\]: .*{re.escape(repr(special))}"
    with pytest.raises(ValueError, match=pattern):
        tokenize_conversations([record], _encoder(family), None, source="train.jsonl")


def test_a_special_string_in_a_user_turn_is_an_error_too(image):
    # "<|im_start|>assistant" in a question would open a turn of the template's own.
    record = _record(image, "say </s> please", "fine.")
    with pytest.raises(ValueError, match=r"^train\.jsonl:3: conversations\[0\]: .*'</s>'"):
        tokenize_conversations([record], _encoder("llava"), None, source="train.jsonl")


def test_text_that_only_looks_like_markup_is_learned_as_written(image):
    encoder = _encoder("llava")
    record = _record(image, "what?", "use <b>bold</b> or USER: here")
    samples, _ = tokenize_conversations([record], encoder, None)
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    learned = encoder.tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert learned == " use <b>bold</b> or USER: here</s> done.</s>"
