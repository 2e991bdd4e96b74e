"""The learned tokens of a training batch, for every family with a chat template and the row shapes users
bring, against an independent reference: the conversation rendered by the processor's own
`apply_chat_template`, in which each answer is found as text and must be followed by the family's
end-of-turn string. The learned tokens, decoded, must be each answer as rendered plus that string and
nothing else (the template's space before an answer may join its first word, as the tokenizer joins
them)."""

import datasets
import pytest
from PIL import Image

from recipes.common.chat import ChatCollator, chat_encoder, to_messages, tokenize_conversations
from recipes.common.models import load_processor, resolve_model_path
from recipes.qlora_vqa.collator import vqa_conversations

END_OF_TURN = {"llava": "</s>", "gemma3": "<end_of_turn>", "qwen2_5_vl": "<|im_end|>",
               "qwen3_vl": "<|im_end|>", "smolvlm": "<end_of_utterance>", "internvl": "<|im_end|>",
               "llava_onevision": "<|im_end|>", "mllama": "<|eot_id|>"}


def _h(text):
    return {"from": "human", "value": text}


def _g(text):
    return {"from": "gpt", "value": text}


ROWS = {
    "turns": [_h("<image>\nwhat shape?"), _g("a red circle."), _h("where?"), _g("top left.")],
    "system": [{"from": "system", "value": "be brief."}, _h("<image>\nwhat?"), _g("a circle."), _h("and?"),
               _g("red.")],
    "text_only": [_h("what is 2+2?"), _g("four."), _h("and 3+3?"), _g("six.")],
    "image_in_a_later_turn": [_h("<image>\nfirst?"), _g("red."), _h("now this <image> one?"), _g("blue.")],
    "ends_with_the_user": [_h("<image>\nwhat?"), _g("a circle."), _h("and then?")],
    "unicode": [_h("<image>\n这是什么？ 🎉"), _g("一个红色的圆 🔴👍🏽 café naïve")],
    "spaces_and_lines": [_h("<image>\nwhat?"), _g("  a circle. \n"), _h("list"),
                         _g("1. red\n2. blue\n\nend")],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = [str(folder / f"{c}.png") for c in ("red", "blue")]
    for path, size, colour in zip(paths, ((64, 64), (128, 96)), ("red", "blue")):
        Image.new("RGB", size, colour).save(path)
    return paths


@pytest.fixture(scope="module", params=sorted(END_OF_TURN))
def family(request):
    name = request.param
    try:
        processor = load_processor(resolve_model_path(f"tiny:{name}"), name)
    except (RuntimeError, ImportError) as e:  # a processor that needs torchvision, which this torch lacks
        if "torchvision" not in str(e).lower():
            raise
        pytest.skip(f"SKIPPED LOUDLY: tiny:{name} cannot be built or loaded here: {str(e).strip()[:200]}")
    return name, processor, chat_encoder(processor)


def _record(turns, images):
    n = sum(t["value"].count("<image>") for t in turns)
    return {"images": images[:n], "conversations": turns}


def _expected(name, processor, record):
    """Each answer as `apply_chat_template` renders it, followed by the family's end-of-turn string."""
    messages = to_messages(record["conversations"], n_images=len(record["images"]))
    full, pos, out = processor.apply_chat_template(messages, tokenize=False), 0, []
    for message in messages:
        if message["role"] != "assistant":
            continue
        answer = message["content"][0]["text"]
        start = full.find(answer, pos)
        if start < 0:  # the template trims the answer
            answer = answer.strip()
            start = full.find(answer, pos)
        pos = start + len(answer)
        assert full[pos:].startswith(END_OF_TURN[name]), full[pos:]
        out.append(answer + END_OF_TURN[name])
    return out


def _learned(tokenizer, batch, row):
    runs, current = [], []
    for token, label in zip(batch["input_ids"][row].tolist(), batch["labels"][row].tolist()):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def _same(learned, expected):
    assert len(learned) == len(expected), (learned, expected)
    for got, want in zip(learned, expected):
        assert got in (want, " " + want), (got, want)


def test_the_learned_tokens_are_each_rendered_answer_and_its_end_of_turn(family, images):
    name, processor, encoder = family
    records = [_record(turns, images) for turns in ROWS.values()]
    samples, report = tokenize_conversations(records, encoder, None)
    assert report.samples == len(ROWS) and report.dropped == report.cut == 0
    batch = ChatCollator(encoder)(list(samples))  # one padded batch of every shape
    for row, record in enumerate(records):
        _same(_learned(processor.tokenizer, batch, row), _expected(name, processor, record))


def test_a_cut_keeps_the_whole_answers_that_fit(family, images):
    name, processor, encoder = family
    record = _record(ROWS["turns"], images)
    whole, _ = tokenize_conversations([record], encoder, None)
    cut, report = tokenize_conversations([record], encoder, whole[0]["length"] - 1)
    assert (report.cut, report.turns_cut) == (1, 1)
    _same(_learned(processor.tokenizer, ChatCollator(encoder)(list(cut)), 0),
          _expected(name, processor, record)[:1])


def test_the_vqa_samples_learn_the_training_answer_alone(family, images):
    name, processor, encoder = family
    records = datasets.Dataset.from_list([
        {"image": images[0], "question": "what colour?", "answers": ["Red", "red", "red.", "blue"]},
        {"image": images[1], "question": "what 🎉?", "answers": [" café "]}])
    samples, _ = tokenize_conversations(vqa_conversations(records), encoder, None)
    batch = ChatCollator(encoder)(list(samples))
    for row, answer in enumerate(("Red", "café")):  # "Red": the first of the equal forms
        _same(_learned(processor.tokenizer, batch, row), [answer + END_OF_TURN[name]])
