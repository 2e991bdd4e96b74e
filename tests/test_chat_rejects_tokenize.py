"""A row that passes the checks at load but that the chat encoder refuses (the model's processor or chat
template cannot take it, or its image does not decode) stops the run naming its file:line, or with
--skip_bad_rows is a counted reject written with its reason to
<output_dir>/rejects/<split>.tokenize.rejects.jsonl. A failure of every row is not about one row: it stops
the run even with --skip_bad_rows."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from data_tools.jsonl import read_jsonl, write_jsonl
from recipes.common.chat import ChatTemplateError, chat_encoder, tokenize_conversations
from recipes.common.data import load_records
from recipes.common.models import load_processor, resolve_model_path
from tests.conftest import run_script, undecodable_png

ROOT = Path(__file__).resolve().parent.parent
ANSWERED = [{"from": "human", "value": "<image>\nwhat shape is it?"}, {"from": "gpt", "value": "a circle."}]
# PaliGemma learns the last answer of a conversation: a last user turn with an image has none to learn.
UNANSWERED = [*ANSWERED, {"from": "human", "value": "<image>\nand this one?"}]
TWO_QUESTIONS = [{"from": "human", "value": "<image>\nwhat shape?"}, {"from": "human", "value": "colour?"},
                 {"from": "gpt", "value": "a red circle."}]
# The alternation check of real templates (Gemma 3, Mistral-based LLaVA) before the tiny LLaVA template.
ALTERNATE = ("{%- for message in messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{%- endif -%}{%- endfor -%}")


def _encoder(family, template_prefix=""):
    processor = load_processor(resolve_model_path(f"tiny:{family}"), family)
    if template_prefix:
        processor.chat_template = template_prefix + processor.chat_template
    return chat_encoder(processor)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with a red image, and a PNG whose header and end read but whose data does not decode."""
    d = tmp_path_factory.mktemp("rejects")
    Image.new("RGB", (32, 32), "red").save(d / "red.png")
    undecodable_png(d)
    return d


def _file(d, name, bad, n_good=4, bad_at=2):
    rows = [{"image": "red.png", "conversations": ANSWERED} for _ in range(n_good)]
    rows[bad_at:bad_at] = bad
    write_jsonl(d / name, rows)
    return d / name


def _one_line(message):
    assert "\n" not in message, message


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_row_the_processor_refuses_is_a_counted_reject(data, tmp_path, capsys, num_proc):
    path = _file(data, "pali.jsonl", [{"images": ["red.png", "red.png"], "conversations": UNANSWERED}])
    records = load_records(path, "instruct")
    rejects = tmp_path / "rejects" / "train.tokenize.rejects.jsonl"
    samples, report = tokenize_conversations(records, _encoder("paligemma"), None, source=str(path),
                                             num_proc=num_proc, skip_bad_rows=True, rejects_path=rejects)
    assert len(samples) == 4 and (report.samples, report.rejected) == (4, 1)
    (reject,) = read_jsonl(rejects)
    assert json.loads(reject.pop("raw"))["conversations"] == UNANSWERED
    assert reject == {"reason": "tokenize_error", "file": str(path), "line": 3, "field": "conversations",
                      "message": "a training sample needs an answer after the last user turn"}
    assert f"{path}: skipped 1 row(s) of 5 that the processor could not encode; reasons in {rejects}" in (
        capsys.readouterr().out)
    assert "1 rejected" in str(report)


def test_without_skip_bad_rows_the_row_stops_the_run_in_one_line(data):
    path = _file(data, "pali.jsonl", [{"images": ["red.png", "red.png"], "conversations": UNANSWERED}])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: a training sample needs an answer "
                                         r"after the last user turn; .*--skip_bad_rows") as e:
        tokenize_conversations(load_records(path, "instruct"), _encoder("paligemma"), None, source=str(path))
    _one_line(str(e.value))


UNDECODABLE = ("truncated_image", "unreadable_image")


def test_an_image_that_does_not_decode_is_named_and_skipped_with_its_reason(data, tmp_path):
    path = _file(data, "corrupt.jsonl", [{"image": "corrupt.png", "conversations": ANSWERED}])
    records = load_records(path, "instruct")  # the header check passes it
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: .*corrupt\.png.*image cannot be "
                                         r"decoded.*--skip_bad_rows") as e:
        tokenize_conversations(records, _encoder("llava"), None, source=str(path))
    _one_line(str(e.value))
    rejects = tmp_path / "r.jsonl"
    samples, report = tokenize_conversations(records, _encoder("llava"), None, source=str(path),
                                             skip_bad_rows=True, rejects_path=rejects)
    assert len(samples) == 4 and report.rejected == 1
    (reject,) = read_jsonl(rejects)
    # truncated_image or unreadable_image, as zlib meets the corrupted bytes
    assert reject["reason"] in UNDECODABLE and (reject["line"], reject["field"]) == (3, "image")


def test_a_conversation_the_chat_template_refuses_is_a_reject_and_all_refused_stops(data, tmp_path):
    path = _file(data, "turns.jsonl", [{"image": "red.png", "conversations": TWO_QUESTIONS}], bad_at=1)
    encoder = _encoder("llava", ALTERNATE)
    rejects = tmp_path / "r.jsonl"
    samples, report = tokenize_conversations(load_records(path, "instruct"), encoder, None, source=str(path),
                                             skip_bad_rows=True, rejects_path=rejects)
    assert len(samples) == 4 and report.rejected == 1
    (reject,) = read_jsonl(rejects)
    assert (reject["line"], reject["reason"]) == (2, "tokenize_error")
    assert reject["message"].startswith("the chat template refused the conversation: Conversation roles must")
    # Every row refused: the template, not the rows; the first row's error, as without --skip_bad_rows.
    every = _file(data, "all.jsonl", [{"image": "red.png", "conversations": TWO_QUESTIONS}] * 3, n_good=0)
    with pytest.raises(ChatTemplateError, match=rf"^{re.escape(str(every))}:1: the chat template refused"):
        tokenize_conversations(load_records(every, "instruct"), encoder, None, source=str(every),
                               skip_bad_rows=True, rejects_path=tmp_path / "all.jsonl")


def _train(recipe, args, out):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return run_script(ROOT / "recipes" / recipe / "train.py", [
        *args, "--output_dir", out, "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--per_device_train_batch_size", "2",
        "--use_cpu", "true"], env)


@pytest.mark.parametrize("recipe, model, bad, reason", [
    ("llava_instruct", "tiny:paligemma", {"images": ["red.png", "red.png"], "conversations": UNANSWERED},
     ("tokenize_error",)),
    ("qlora_vqa", "tiny:llava", {"image": "corrupt.png", "question": "what shape?", "answers": ["circle"]},
     UNDECODABLE),
])
def test_the_recipes_count_the_rejects_or_stop_in_one_line(data, tmp_path, recipe, model, bad, reason):
    good = ({"image": "red.png", "conversations": ANSWERED} if recipe == "llava_instruct"
            else {"image": "red.png", "question": "what shape?", "answers": ["circle"]})
    rows = [dict(row) for row in (good, good, bad, good)]
    if recipe == "qlora_vqa":
        for i, row in enumerate(rows):
            row["question_id"] = i
    path = data / f"{recipe}.jsonl"
    write_jsonl(path, rows)
    args = ["--model_name_or_path", model, "--train_file", path]
    r = _train(recipe, args, tmp_path / "stop")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    error = next(line for line in r.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: {path}:3: ") and "--skip_bad_rows" in error, error
    out = tmp_path / "skip"
    r = _train(recipe, [*args, "--skip_bad_rows"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    (reject,) = read_jsonl(out / "rejects" / "train.tokenize.rejects.jsonl")
    assert (reject["file"], reject["line"]) == (str(path), 3) and reject["reason"] in reason
    budget = json.loads((out / "metrics.json").read_text())["length_budget"]["train"]
    assert (budget["samples"], budget["rejected"]) == (3, 1)
    assert "skipped 1 row(s) of 4 that the processor could not encode" in r.stdout
