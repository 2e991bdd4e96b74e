"""Record schemas for the four tasks, and `normalize_record`, which checks a row and returns it canonical.

Canonical records (image paths relative to the image root, by default the JSONL file's folder):
    caption:   {"image": "img/1.jpg", "captions": ["...", ...]}
    vqa:       {"image": ..., "question_id": ..., "question": "...", "answers": ["...", ...]}
               (optional: "answer_type", "question_type"; `data_tools.clean.check_rows` gives a row
               without "question_id" one made of the file name and line, e.g. "train.jsonl:7")
    retrieval: {"image": ..., "captions": [...]}  (optional: "neg_captions": [...])
    instruct:  {"image": ... or absent (or "images": [...], several, each placed by an `<image>` in the
                turns, in order, or leading the first user turn),
                "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}: the first
                turn after any system turns is from "human", and only "human" turns hold `<image>`
Common aliases are accepted and rewritten: `image_path`/`file_name`/`filepath` for `image`, and a
list of one image (`"images": ["a.jpg"]`, LLaMA-Factory / ms-swift); `caption`/`text` (one string)
or `sentences` for `captions`; `answer` (one string) for `answers`; OpenAI-style `messages`
([{"role", "content"}]) for `conversations`, and `instruction` (+ `input`, absent when empty) with
`response` or `output` for a one-exchange conversation. Other keys are kept as they are. A caption, vqa
or retrieval row with several images is refused (`multiple_images`). Two names of one field in a row
(`image` and `images`, `captions` and `caption`, ...) must give the same value (`"a.jpg"` and `["a.jpg"]`
do): different ones are refused (`bad_value`, naming both), as which one is meant cannot be told.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from .errors import (
    BAD_VALUE,
    EMPTY_TEXT,
    MISSING_FIELD,
    MULTIPLE_IMAGES,
    NOT_AN_OBJECT,
    RESERVED_TEXT,
    WRONG_TYPE,
    DataError,
)

TASKS = ("caption", "vqa", "retrieval", "instruct")
IMAGE_TOKEN = "<image>"

IMAGE_ALIASES = ("image", "image_path", "file_name", "filepath", "img", "images")
CAPTION_ALIASES = ("captions", "sentences", "caption", "text")
ROLE_TO_FROM = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}


def _image_outside_user_turn(speaker: str, field: str) -> DataError:
    # An image is input: chat templates take image parts in user turns only (recipes.common.chat), so
    # such a row would stop training; refused here, it is a counted reject of clean and --skip_bad_rows.
    return DataError(BAD_VALUE, f"has '{IMAGE_TOKEN}' in a {speaker!r} turn; an image can only be placed "
                     "in a user ('human') turn", field=field)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _conflict(key: str, value: Any, other: str, other_value: Any) -> DataError:
    # Two names for one field that say different things: which one is meant cannot be told.
    return DataError(BAD_VALUE, f"differs from {other!r}, given too ({_short(value)} vs "
                     f"{_short(other_value)}); keep one of them", field=key)


def _pop_alias(record: dict, aliases: tuple[str, ...], convert) -> tuple[str | None, Any]:
    """Pop every alias of one field; return the first given (not null) and its value made by
    `convert(key, value)`. Another alias whose value differs raises `_conflict`; an equal one is dropped."""
    given = [(key, record.pop(key)) for key in aliases if key in record]
    given = [(key, value) for key, value in given if value is not None]
    if not given:
        return None, None
    key, value = given[0][0], convert(*given[0])
    for other, other_value in given[1:]:
        if convert(other, other_value) != value:
            raise _conflict(key, given[0][1], other, other_value)
    return key, value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(WRONG_TYPE, f"expected a string, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError(EMPTY_TEXT, "is empty", field=field)
    if "\x00" in value:  # no text holds one (a broken export), and arrays of text drop a trailing one
        raise DataError(BAD_VALUE, "holds a NUL character (\\x00)", field=field)
    return value


def _text_list(value: Any, field: str, *, allow_single_string: bool) -> list[str]:
    if isinstance(value, str) and allow_single_string:
        value = [value]
    if not isinstance(value, list):
        raise DataError(WRONG_TYPE, f"expected a list of strings, got {type(value).__name__}", field=field)
    if not value:
        raise DataError(EMPTY_TEXT, "is an empty list", field=field)
    # COCO/Karpathy-style sentence objects: {"raw": "..."}.
    value = [v.get("raw", v.get("caption")) if isinstance(v, dict) else v for v in value]
    return [_text(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _image(record: dict, *, required: bool, several: bool = False) -> None:
    # LLaMA-Factory / ms-swift: "images": ["a.jpg", ...]; "image": "a.jpg" and "images": ["a.jpg"] agree.
    key, value = _pop_alias(record, IMAGE_ALIASES, lambda _, v: v if isinstance(v, list) else [v])
    if value is not None:
        if len(value) > 1 and not several:
            raise DataError(MULTIPLE_IMAGES, f"has {len(value)} images; a {'/'.join(TASKS[:3])} row has one "
                            "image (instruct rows may have several)", field=key)
        if len(value) > 1:
            record["images"] = [_text(v, f"{key}[{i}]") for i, v in enumerate(value)]
            return
        value = value[0] if value else None
    if key is None or value is None:
        if required:
            raise DataError(MISSING_FIELD, f"is missing (one of {', '.join(IMAGE_ALIASES)})", field="image")
        return
    record["image"] = _text(value, key)


def _instruction_turns(record: dict) -> list[dict]:
    """`{"instruction", "input"?, "response"|"output"}` (Alpaca style) -> one human turn and one gpt turn."""
    instruction = _text(record.pop("instruction"), "instruction")
    extra = record.pop("input", None)
    if extra is not None and not isinstance(extra, str):
        raise DataError(WRONG_TYPE, f"expected a string, got {type(extra).__name__}", field="input")
    # Alpaca data writes "input": "" for an instruction without input: the same as leaving it out.
    if extra is not None and extra.strip():
        instruction = f"{instruction}\n{extra}"
    key, response = _pop_alias(record, ("response", "output"), lambda k, v: _text(v, k))
    if key is None:
        raise DataError(MISSING_FIELD, "is missing (or 'output')", field="response")
    if IMAGE_TOKEN in response:
        raise _image_outside_user_turn("gpt", key)
    if "image" in record and IMAGE_TOKEN not in instruction:
        instruction = f"{IMAGE_TOKEN}\n{instruction}"
    return [{"from": "human", "value": instruction}, {"from": "gpt", "value": response}]


def _turns(turns: Any, field: str) -> list[dict]:
    """A list of turns (ours, or OpenAI-style `role`/`content`) as `{"from", "value"}` turns."""
    if not isinstance(turns, list):
        raise DataError(WRONG_TYPE, f"expected a list of turns, got {type(turns).__name__}", field=field)
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(WRONG_TYPE, f"expected an object, got {type(turn).__name__}", field=where)
        role = turn.get("from", turn.get("role"))
        if not isinstance(role, str):  # a list or object would not even be a dict key
            raise DataError(WRONG_TYPE, f"expected a role string, got {type(role).__name__}",
                            field=f"{where}.{'from' if 'from' in turn else 'role'}")
        if role not in ROLE_TO_FROM:
            raise DataError(BAD_VALUE, f"role {role!r} is not one of {sorted(ROLE_TO_FROM)}",
                            field=f"{where}.from")
        value = turn.get("value", turn.get("content"))
        # OpenAI content parts: [{"type": "text", "text": ...}, {"type": "image"}]
        if isinstance(value, list):
            parts = []
            for j, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") == "image":
                    parts.append(IMAGE_TOKEN)
                elif isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise DataError(WRONG_TYPE, f"expected a string, got {type(text).__name__}",
                                        field=f"{where}.content[{j}].text")
                    parts.append(text)
                else:
                    raise DataError(WRONG_TYPE, f"unknown content part {part!r}", field=f"{where}.content")
            value = "\n".join(parts)
        value = _text(value, f"{where}.value")
        if IMAGE_TOKEN in value and ROLE_TO_FROM[role] != "human":
            raise _image_outside_user_turn(ROLE_TO_FROM[role], f"{where}.value")
        out.append({"from": ROLE_TO_FROM[role], "value": value})
    return out


def _conversations(record: dict) -> None:
    if "conversations" in record or "messages" in record:
        field, out = _pop_alias(record, ("conversations", "messages"), lambda k, v: _turns(v, k))
        if field is None:
            raise DataError(WRONG_TYPE, "expected a list of turns, got NoneType", field="conversations")
    elif "instruction" in record:
        field, out = "instruction", _turns(_instruction_turns(record), "instruction")
    else:
        raise DataError(MISSING_FIELD, "is missing (or 'messages', or 'instruction' and 'response')",
                        field="conversations")
    speakers = [t["from"] for t in out if t["from"] != "system"]
    if not speakers:
        raise DataError(EMPTY_TEXT, "has no user or assistant turn", field=field)
    if "gpt" not in speakers:
        raise DataError(BAD_VALUE, "has no assistant turn to learn from", field=field)
    if speakers[0] == "gpt":
        # Chat templates render an answer after the turns before it: with none (or only a system turn,
        # which e.g. Gemma 3 folds into the first user turn) there is no prompt to answer.
        first = next(i for i, t in enumerate(out) if t["from"] == "gpt")
        raise DataError(BAD_VALUE, f"turn {first} is an assistant turn before any user turn; a conversation "
                        "starts with a user turn (after any system turns)", field=field)
    n_image_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in out)
    n_images = len(record["images"]) if "images" in record else int("image" in record)
    if n_image_tokens > n_images:
        raise DataError(BAD_VALUE, f"has {n_image_tokens} '{IMAGE_TOKEN}' tokens for {n_images} image(s)"
                        if n_images else f"has '{IMAGE_TOKEN}' but the record has no image", field=field)
    record["conversations"] = out


def normalize_record(record: Any, task: str) -> dict:
    """Check one row against the task's schema; return it with aliases rewritten. Raises `DataError`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(record, dict):
        raise DataError(NOT_AN_OBJECT, f"a row must be a JSON object, got {type(record).__name__}")
    record = dict(record)
    _image(record, required=task != "instruct", several=task == "instruct")
    if task in ("caption", "retrieval"):
        key, value = _pop_alias(record, CAPTION_ALIASES,
                                lambda k, v: _text_list(v, k, allow_single_string=k in ("caption", "text")))
        if key is None:
            raise DataError(MISSING_FIELD, f"is missing (one of {', '.join(CAPTION_ALIASES)})",
                            field="captions")
        record["captions"] = value
        if task == "retrieval" and record.get("neg_captions") == []:
            del record["neg_captions"]  # an empty list of the optional negatives: none, as if left out
        if task == "retrieval" and "neg_captions" in record:
            record["neg_captions"] = _text_list(record["neg_captions"], "neg_captions",
                                                allow_single_string=True)
    elif task == "vqa":
        if "question" not in record:
            raise DataError(MISSING_FIELD, "is missing", field="question")
        qid = record.get("question_id", "")  # optional: check_rows names a row without one by its line
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataError(WRONG_TYPE, f"expected an int or string, got {type(qid).__name__}",
                            field="question_id")
        record["question"] = _text(record["question"], "question")
        if "answers" in record:
            answers = record["answers"]
            # VQA v2 annotation style: [{"answer": "...", "answer_confidence": ..., "answer_id": ...}].
            if isinstance(answers, list):
                answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
            record["answers"] = _text_list(answers, "answers", allow_single_string=True)
        elif "answer" in record:
            record["answers"] = [_text(record.pop("answer"), "answer")]
        else:
            raise DataError(MISSING_FIELD, "is missing (or 'answer')", field="answers")
        for key in ("answer_type", "question_type"):
            # Optional (null = absent, as eval.vqa reads it): scoring groups by them and names a metric
            # after each answer type, which another type would stop mid-run.
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(WRONG_TYPE, f"expected a string, got {type(value).__name__}", field=key)
    else:
        _conversations(record)
    return record


@functools.lru_cache(maxsize=16)
def _reserved_pattern(reserved: tuple[str, ...]) -> re.Pattern:
    # One alternation, longest first: a tokenizer may have thousands (Gemma's <unusedN>), and the regex
    # passes over a text that holds none of their first characters at once (a loop over them: 1,000x slower).
    return re.compile("|".join(map(re.escape, sorted(reserved, key=len, reverse=True))))


def find_reserved(text: str, reserved: tuple[str, ...]) -> str | None:
    """The first of the `reserved` strings in `text` (the longest one where several start), or None."""
    match = _reserved_pattern(tuple(reserved)).search(text) if reserved else None
    return match.group(0) if match else None


def check_reserved(record: dict, task: str, reserved: tuple[str, ...]) -> None:
    """Raise `DataError` for a text field of a canonical record that holds one of the `reserved` strings (a
    model's special tokens): its tokenizer would read the control token there, not the text (a `</s>` in a
    caption trains the model to stop). The `<image>` placeholders of user turns are not text."""
    if not reserved:
        return
    if task == "instruct":
        texts = [(f"conversations[{i}].value", t["value"].replace(IMAGE_TOKEN, "") if t["from"] == "human"
                  else t["value"]) for i, t in enumerate(record["conversations"])]
    else:
        texts = [(f"{key}[{i}]", text) for key in ("captions", "neg_captions", "answers")
                 for i, text in enumerate(record.get(key) or [])]
        texts += [("question", record["question"])] if task == "vqa" else []
    for field, text in texts:
        found = find_reserved(text, reserved)
        if found is not None:
            raise DataError(RESERVED_TEXT, f"holds {found!r}, which the model's tokenizer reads as a special "
                            "token, not as text; remove or rewrite it", field=field)


def tasks_of_line(raw: bytes) -> list[str]:
    """The tasks whose schema the JSON object on line `raw` fits ([] for one that is not JSON)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return []
    fits = []
    for task in TASKS:
        try:
            normalize_record(record, task)
            fits.append(task)
        except DataError:
            pass
    return fits


def other_task_hint(raw: bytes, line: int, task: str, flags: dict[str, str] | None = None) -> str:
    """" Line N is a valid record for task X, not T." when line `line` (`raw`) fits another task's schema
    and not `task`'s (records of another task were given), else "" (e.g. a bad image, not a wrong task);
    `flags`: the option that reads each other task's records, named in the hint."""
    fits = tasks_of_line(raw)
    if not fits or task in fits:
        return ""
    flags = flags or {}
    other = next((t for t in fits if t in flags), fits[0])
    reads = f" Pass {flags[other]} to read {other} records." if other in flags else ""
    return f" Line {line} is a valid record for task {other}, not {task}.{reads}"
