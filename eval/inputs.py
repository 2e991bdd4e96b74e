"""Reading predictions and references from JSONL (or one JSON list of rows) and from the official COCO / VQA
files.

Every bad row raises a `DataError` naming file, line and field; a duplicated key is an error too,
because silently keeping one of two predictions changes the score.
"""

from __future__ import annotations

from data_tools.errors import BAD_VALUE, DUPLICATE_ID, MISSING_FIELD, WRONG_TYPE, DataError
from data_tools.images import ImagePathResolver
from data_tools.jsonl import iter_rows, load_json

CAPTION_KEYS = ("image", "image_id", "id")
CAPTION_TEXTS = ("prediction", "caption")
VQA_KEYS = ("question_id",)
VQA_TEXTS = ("answer", "prediction")
# A recipe run's predictions/*.jsonl rows are {"key", "prediction"}: the key is the question id, or the image
# path resolved to an absolute one (see match_resolved_images). References keep their own field names.
CAPTION_PREDICTION_KEYS = (*CAPTION_KEYS, "key")
VQA_PREDICTION_KEYS = (*VQA_KEYS, "key")


def _first_field(row: dict, names: tuple, path, line: int) -> tuple[str, object]:
    for name in names:
        if name in row:
            return name, row[name]
    raise DataError(MISSING_FIELD, f"row has none of the fields {', '.join(names)}; add one",
                    path=path, line=line, field=names[0])


def _check_key(key, field: str, path, line: int):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise DataError(WRONG_TYPE, f"must be a string or an integer, got {type(key).__name__}",
                        path=path, line=line, field=field)
    return key


def _rows(path):
    """The rows of a JSONL file, or of a file holding one JSON list of rows, as `data_tools` reads them."""
    first = True
    for line, row, _, item in iter_rows(path):
        if first and (isinstance(row, DataError) or isinstance(row, dict) and "annotations" in row):
            _refuse_official_file(path)
        first = False
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(WRONG_TYPE, "row must be a JSON object", path=path, line=line, field=item)
        yield line, row


def _refuse_official_file(path) -> None:
    """An official COCO / VQA file (one JSON object holding an `annotations` list) is not rows: say which flag
    takes it, rather than that its first line is not a row."""
    try:
        data = load_json(path)
    except DataError:
        return  # not one JSON object either: the row's own error says what is wrong
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        raise DataError(WRONG_TYPE, "is an official annotations file (one JSON object with 'annotations'), "
                        "not rows; give it as --coco-annotations (captions, with --coco-results) or "
                        "--vqa-annotations (VQA, with --vqa-questions and --vqa-results)", path=path)


def read_predictions(path, keys=CAPTION_KEYS, texts=CAPTION_TEXTS) -> dict:
    """Read a predictions file (JSONL or a JSON list) into `{key: text}`; a repeated key is an error (`1` and
    `"1"` are one key, as the references' ids are: else one of the two answers would be scored unseen)."""
    predictions, seen_at = {}, {}
    for line, row in _rows(path):
        key_field, key = _first_field(row, keys, path, line)
        key = _check_key(key, key_field, path, line)
        text_field, text = _first_field(row, texts, path, line)
        if not isinstance(text, str):
            raise DataError(WRONG_TYPE, f"must be a string, got {type(text).__name__}", path=path, line=line,
                            field=text_field)
        if str(key) in seen_at:
            first_line, first = seen_at[str(key)]
            raise DataError(BAD_VALUE, f"{key!r} already has a prediction at line {first_line} ({first!r}); "
                            "keep one", path=path, line=line, field=key_field)
        predictions[key], seen_at[str(key)] = text, (line, key)
    return predictions


def read_caption_references(path) -> dict:
    """Read caption records (`image` or `image_id`, `captions`) into `{key: [captions]}`.

    Several records for one image are merged, so one-record-per-caption files work too.
    """
    references = {}
    for line, row in _rows(path):
        key_field, key = _first_field(row, CAPTION_KEYS, path, line)
        key = _check_key(key, key_field, path, line)
        captions = row.get("captions", row.get("caption"))
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(WRONG_TYPE, "must be a non-empty list of strings", path=path, line=line,
                            field="captions")
        references.setdefault(key, []).extend(captions)
    return references


def read_vqa_references(path) -> dict:
    """Read VQA records into `{question_id: {"answers", "answer_type", "question_type"}}`. A question id
    used twice is an error naming both lines (`1` and `"1"` count as the same: scores key by either)."""
    references, seen_at = {}, {}
    for line, row in _rows(path):
        qid = _check_key(_first_field(row, VQA_KEYS, path, line)[1], "question_id", path, line)
        answers = row.get("answers")
        if isinstance(answers, list):  # official-style [{"answer": ...}] is accepted as well
            answers = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(WRONG_TYPE, "must be a non-empty list of answer strings", path=path, line=line,
                            field="answers")
        if str(qid) in seen_at:
            first_line, first = seen_at[str(qid)]
            raise DataError(DUPLICATE_ID,
                            f"question_id {qid!r} is already used at line {first_line} ({first!r}); "
                            "question ids must be unique, and 1 and '1' are the same id", path=path,
                            line=line, field="question_id")
        seen_at[str(qid)] = (line, qid)
        references[qid] = {"answers": answers, "answer_type": row.get("answer_type"),
                           "question_type": row.get("question_type")}
    return references


def _load_json(path):
    return load_json(path)


def _records(path, data, container: str | None, fields: tuple, text_field: str | None = None) -> list[dict]:
    """The list of objects in an official file (top level or under `container`), with fields checked."""
    records = data.get(container) if container and isinstance(data, dict) else data
    if not isinstance(records, list):
        where = f"a '{container}' list" if container else "a list"
        raise DataError(WRONG_TYPE, f"must hold {where} of objects", path=path, field=container)
    for i, rec in enumerate(records):
        missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise DataError(MISSING_FIELD, f"entry {i} lacks {', '.join(missing)}", path=path,
                            field=f"{container or ''}[{i}].{missing[0]}")
        if text_field and not isinstance(rec[text_field], str):
            raise DataError(WRONG_TYPE, f"entry {i} must be a string, got {type(rec[text_field]).__name__}",
                            path=path, field=f"{container or ''}[{i}].{text_field}")
    return records


def read_coco_captions(annotations_path, results_path) -> tuple[dict, dict]:
    """Official COCO caption files -> `(predictions, references)` keyed by `image_id`."""
    references = {}
    for ann in _records(annotations_path, _load_json(annotations_path), "annotations",
                        ("image_id", "caption"), "caption"):
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    predictions = {}
    for i, res in enumerate(_records(results_path, _load_json(results_path), None, ("image_id", "caption"),
                                     "caption")):
        if res["image_id"] in predictions:
            raise DataError(BAD_VALUE, f"image_id {res['image_id']!r} has more than one caption (entry {i})",
                            path=results_path, field="image_id")
        predictions[res["image_id"]] = res["caption"]
    return predictions, references


def read_vqa_official(annotations_path, questions_path, results_path) -> tuple[dict, dict]:
    """Official VQA v2 files -> `(predictions, references)` keyed by `question_id`."""
    anns = _records(annotations_path, _load_json(annotations_path), "annotations",
                    ("question_id", "answers", "answer_type", "question_type"))
    questions = _records(questions_path, _load_json(questions_path), "questions", ("question_id",))
    references = {}
    for i, a in enumerate(anns):
        answers = a["answers"]
        where = f"annotations[{i}].answers"
        if not isinstance(answers, list) or not answers:
            raise DataError(WRONG_TYPE, f"entry {i} must hold a non-empty list of {{'answer': ...}} objects",
                            path=annotations_path, field=where)
        for k, x in enumerate(answers):
            if not isinstance(x, dict) or not isinstance(x.get("answer"), str):
                raise DataError(WRONG_TYPE, f"entry {i}: expected an object with an 'answer' string (the "
                                f"official VQA format), got {str(x)[:60]}", path=annotations_path,
                                field=f"{where}[{k}]")
        qid = _check_key(a["question_id"], f"annotations[{i}].question_id", annotations_path, None)
        if qid in references:
            raise DataError(DUPLICATE_ID, f"question_id {qid!r} is annotated twice (entry {i})",
                            path=annotations_path, field=f"annotations[{i}].question_id")
        references[qid] = {"answers": [x["answer"] for x in answers], "answer_type": a["answer_type"],
                           "question_type": a["question_type"]}
    unknown = {q["question_id"] for q in questions} ^ set(references)
    if unknown:
        raise DataError(BAD_VALUE, f"questions and annotations disagree on {len(unknown)} question ids, e.g. "
                        f"{sorted(unknown, key=str)[:5]}; use the matching pair of files",
                        path=questions_path)
    predictions = {}
    for i, res in enumerate(_records(results_path, _load_json(results_path), None, ("question_id", "answer"),
                                     "answer")):
        if res["question_id"] in predictions:
            raise DataError(BAD_VALUE, f"question_id {res['question_id']!r} is answered twice (entry {i})",
                            path=results_path, field="question_id")
        predictions[res["question_id"]] = res["answer"]
    return predictions, references


def match_resolved_images(predictions: dict, references: dict, image_root) -> dict:
    """`predictions` with each key that is no reference's key but is the image path a reference names,
    resolved against `image_root` as the recipes resolve it (a run's predictions are keyed so), put under
    that reference's key."""
    if all(k in references for k in predictions):
        return predictions
    resolve = ImagePathResolver(image_root, allow_outside_root=True)  # matched, not read: any path will do
    resolved = {}
    for key in references:
        if not isinstance(key, str):  # an image id (COCO's int ids): no run keys a prediction by its path
            continue
        try:
            resolved.setdefault(str(resolve(key)), key)
        except DataError:  # an empty path
            continue
    matched, given_as = {}, {}
    for key, text in predictions.items():
        own = key if key in references else resolved.get(key, key)
        if own in matched:
            raise DataError(BAD_VALUE, f"{given_as[own]!r} and {key!r} are predictions for the same image "
                            f"{own!r}; keep one", field="key")
        matched[own], given_as[own] = text, key
    return matched


def check_same_keys(predictions: dict, references: dict, what: str = "key",
                    predictions_name="predictions", references_name="references") -> None:
    """Raise `ValueError` naming the keys that have no reference and those that have no prediction."""
    no_reference = [k for k in predictions if k not in references]
    no_prediction = [k for k in references if k not in predictions]
    problems = []
    if no_reference:
        problems.append(f"{len(no_reference)} {what}(s) in {predictions_name} have no reference in "
                        f"{references_name}: {_preview(no_reference)}")
    if no_prediction:
        problems.append(f"{len(no_prediction)} {what}(s) in {references_name} have no prediction in "
                        f"{predictions_name}: {_preview(no_prediction)}")
    if not references:
        problems.append(f"{references_name} is empty")
    if not problems:
        return
    if predictions and no_prediction and not no_reference:
        # a subset scored as it is would be a score of other items than the references name
        advice = (f"The predictions cover {len(predictions)} of the {len(references)} items, as a recipe run "
                  "with --eval_max_samples writes them; partial predictions are not scored: predict every "
                  "item, or give references that hold only the predicted ones (`python -m eval report RUN` "
                  "scores a run's predictions on the items they cover and says how many).")
    elif {str(k) for k in no_reference} & {str(k) for k in no_prediction}:
        advice = "Keys must match exactly, and their types too: 1 and '1' differ."
    else:
        advice = "Score the same set of items on both sides (keys must match exactly, 1 and '1' differ)."
    raise ValueError("; ".join(problems) + ". " + advice)


def _preview(keys: list, limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

