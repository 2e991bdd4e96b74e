"""`convert`: COCO captions, VQA v2, LLaVA, Karpathy splits and plain image-text JSON to our JSONL.

    python -m data_tools convert --from coco-captions annotations/captions_train2014.json \\
        --image-root coco/train2014 --out data/coco/train.jsonl
    python -m data_tools convert --from vqav2 v2_OpenEnded_mscoco_train2014_questions.json \\
        v2_mscoco_train2014_annotations.json --image-root coco/train2014 --out data/vqav2/train.jsonl
    python -m data_tools convert --from llava llava_instruct_150k.json --image-root coco/train2017 \
--out data/llava.jsonl
    python -m data_tools convert --from karpathy dataset_coco.json --split train,restval --image-root coco \
--out data/train.jsonl
    python -m data_tools convert --from image-text-json pairs.json --out data/pairs.jsonl

Image paths are written relative to the image root, `--image-root` (default: the output file's
folder), as every reader takes them: the input names an image relative to that folder, and the name
is written normalised (forward slashes, no `.` parts). Give readers of the output the same
`--image-root`. A name that is absolute or climbs out with `..` is rejected (`path_outside_root`).
Images are not opened here; `clean` does that.

Every input item that cannot be converted goes to the rejects file (default OUT.rejects.jsonl) with
its reason, the input file and the JSON path of the item (e.g. `annotations[17]`); nothing is dropped
silently. Caption, question and answer texts have their whitespace collapsed; conversations are kept
as they are. Karpathy images outside `--split` are not rejects: they are counted as skipped; an image
whose split is not one of train, val, test, restval is a reject (`bad_value`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clean import user_errors
from .errors import (
    BAD_VALUE,
    EMPTY_TEXT,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    UNREADABLE_FILE,
    WRONG_TYPE,
    DataError,
)
from .files import check_outputs, replaced_together
from .images import relative_image_path
from .jsonl import JsonlWriter, check_text, is_json_list, iter_json_list, iter_jsonl, load_json
from .records import _image as _normalize_image
from .records import IMAGE_ALIASES, _pop_alias, normalize_record

FORMATS = {"coco-captions": "caption", "vqav2": "vqa", "llava": "instruct", "karpathy": "caption",
           "image-text-json": "caption"}
DEFAULT_VQA_PATTERN = "COCO_{split}2014_{image_id:012d}.jpg"
KARPATHY_SPLITS = ("train", "val", "test", "restval")
KEY_ORDER = ("id", "image", "captions", "question_id", "question", "answers", "conversations")


@dataclass
class Conversion:
    """Records and rejects of one conversion; image paths are relative to the image root."""

    task: str
    out_dir: Path
    image_root: Path | None = None
    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    skipped: int = 0  # filtered out on purpose (Karpathy --split), not an error

    def image_path(self, *parts: str) -> str:
        """The input's image name (joined from `parts`), relative to the image root, normalised with
        forward slashes. A name readers would refuse (absolute, `..` above the root) raises `DataError`."""
        for part in parts:
            relative_image_path(part, allow_outside_root=True)  # NUL, empty
        return relative_image_path(posixpath.join(*parts))

    def add(self, record: dict, *, file: Path, item: str, row: Any) -> None:
        """Keep `record` if it passes the task schema, else reject it naming the input item."""
        try:
            check_text(record)
            record = normalize_record(record, self.task)
        except DataError as e:
            self.reject(e, file=file, item=item, row=row)
            return
        # normalize_record re-inserts the fields it checks; put them back first, for readable files.
        first = {k: record.pop(k) for k in KEY_ORDER if k in record}
        self.records.append({**first, **record})

    def reject(self, error: DataError, *, file: Path, item: str, row: Any) -> None:
        self.rejects.append({**error.at(path=file).to_dict(), "item": item, "row": row})

    @property
    def rejected(self) -> Counter:
        return Counter(r["reason"] for r in self.rejects)



# --- reading inputs ----------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    return load_json(path)


def _top_list(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(
            MISSING_FIELD,
            f"expected a JSON object with a list under {key!r}; is this the right --from format?", path=path
        )
    return data[key]


def _items(path: Path, conv: Conversion) -> Iterator[tuple[str, Any]]:
    """(item label, row) for a JSON list file, or for a JSONL file (bad lines go straight to rejects)."""
    if is_json_list(path):
        for _, row, raw, item in iter_json_list(path):
            if isinstance(row, DataError):  # this row alone (a duplicate key, NaN, ...): the rest is read
                conv.reject(row, file=path, item=item, row=raw.decode("utf-8"))
            else:
                yield item, row
        return
    rows = iter_jsonl(path)
    head = list(itertools.islice(rows, 2))
    # JSONL is often named .json or .ndjson: it is JSONL when one of its first two lines is a row. One
    # object in the whole file is another format (COCO annotations given to --from llava, ...).
    if path.suffix != ".jsonl" and (len(head) < 2 or all(isinstance(r, DataError) for _, r, _ in head)):
        data = _load_json(path)  # a file error if it is not JSON at all
        raise DataError(WRONG_TYPE, f"expected a JSON list of rows or JSONL, got one JSON "
                        f"{'object' if isinstance(data, dict) else type(data).__name__}; is this the right "
                        "--from format?", path=path)
    for line, row, raw in itertools.chain(head, rows):
        if isinstance(row, DataError):
            conv.reject(row, file=path, item=f"line {line}",
                        row=raw.decode("utf-8", errors="backslashreplace"))
        else:
            yield f"line {line}", row


def _object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise DataError(NOT_AN_OBJECT, f"expected a JSON object, got {type(row).__name__}")
    return row


def _get(row: dict, key: str, types: type | tuple = object) -> Any:
    if key not in row or row[key] is None:
        raise DataError(MISSING_FIELD, "is missing", field=key)
    value = row[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(WRONG_TYPE, f"has type {type(value).__name__}", field=key)
    return value


def _text(row: dict, key: str) -> str:
    """A required text field with its whitespace collapsed (COCO captions carry stray newlines)."""
    return _clean_text(_get(row, key, str), key)


def _clean_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(WRONG_TYPE, f"has type {type(value).__name__}", field=field)
    value = " ".join(value.split())
    if not value:
        raise DataError(EMPTY_TEXT, "is empty", field=field)
    return value


def _id(row: dict, key: str) -> int | str:
    return _get(row, key, (int, str))


# --- formats -----------------------------------------------------------------------------------------
def coco_captions(path: Path, conv: Conversion) -> None:
    """COCO caption annotations -> one caption record per image, its captions in file order."""
    data = _load_json(path)
    images, annotations = _top_list(data, "images", path), _top_list(data, "annotations", path)
    by_id: dict[int | str, dict] = {}
    where: dict[int | str, tuple[str, Any]] = {}
    for i, img in enumerate(images):
        try:
            image_id = _id(_object(img), "id")
            if image_id in by_id:
                raise DataError(BAD_VALUE, f"duplicate image id {image_id!r} (first at {where[image_id][0]})",
                                field="id")
            record = {"image": conv.image_path(_get(img, "file_name", str)), "captions": [],
                      "image_id": image_id}
        except DataError as e:
            conv.reject(e, file=path, item=f"images[{i}]", row=img)
            continue
        by_id[image_id], where[image_id] = record, (f"images[{i}]", img)
    seen: dict[int | str, str] = {}  # annotation id -> its item; an annotation listed twice counts once
    for j, ann in enumerate(annotations):
        try:
            image_id = _id(_object(ann), "image_id")
            ann_id = ann.get("id") if isinstance(ann.get("id"), (int, str)) else None
            if ann_id in seen:
                raise DataError(BAD_VALUE, f"duplicate annotation id {ann_id!r} (first at {seen[ann_id]})",
                                field="id")
            if image_id not in by_id:
                raise DataError(
                    BAD_VALUE, f"image id {image_id!r} is not in 'images' (or its entry was rejected)",
                    field="image_id"
                )
            by_id[image_id]["captions"].append(_text(ann, "caption"))
            if ann_id is not None:
                seen[ann_id] = f"annotations[{j}]"
        except DataError as e:
            conv.reject(e, file=path, item=f"annotations[{j}]", row=ann)
    for image_id, record in by_id.items():
        item, img = where[image_id]
        if not record["captions"]:
            conv.reject(
                DataError(MISSING_FIELD, "image has no caption in 'annotations'", field="captions"),
                file=path, item=item, row=img
            )
        else:
            conv.add(record, file=path, item=item, row=img)


def vqav2(paths: list[Path], conv: Conversion, *, split: str | None, image_pattern: str) -> None:
    """VQA v2 questions + annotations files (any number, told apart by their keys) -> vqa records."""
    questions: list[tuple[Path, str, Any, dict]] = []
    answers: dict[int | str, tuple[Path, str, dict]] = {}
    for path in paths:
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            subtype = str(data.get("data_subtype") or "")
            names = {"split": split or re.sub(r"\d+$", "", subtype), "data_subtype": subtype}
            if "{split" in image_pattern and not names["split"]:
                raise DataError(
                    MISSING_FIELD, "has no 'data_subtype' to take the split from; pass --split (e.g. train)",
                    path=path
                )
            try:
                image_pattern.format(image_id=0, **names)
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(
                    BAD_VALUE,
                    f"--image-pattern {image_pattern!r} is not usable ({e!r}); fields: {{image_id}}, "
                    f"{{split}}, {{data_subtype}}",
                ) from None
            questions += [(path, f"questions[{i}]", q, names) for i, q in enumerate(data["questions"])]
        elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
            for i, ann in enumerate(data["annotations"]):
                try:
                    qid = _id(_object(ann), "question_id")
                    if qid in answers:
                        raise DataError(
                            BAD_VALUE,
                            f"duplicate question_id {qid!r} (first at {answers[qid][0]}: {answers[qid][1]})",
                            field="question_id",
                        )
                except DataError as e:
                    conv.reject(e, file=path, item=f"annotations[{i}]", row=ann)
                    continue
                answers[qid] = (path, f"annotations[{i}]", ann)
        else:
            raise DataError(
                MISSING_FIELD,
                "is neither a VQA questions file (a 'questions' list) nor an annotations file (an "
                "'annotations' list)",
                path=path,
            )
    if not questions or not answers:
        missing = ("questions" if not questions
                   else "annotations (test splits have none: there is nothing to train or score on)")
        raise DataError(MISSING_FIELD,
                        f"vqav2 needs a questions file and an annotations file; no {missing} among the "
                        "inputs", path=", ".join(map(str, paths)))

    matched = set()
    for path, item, q, names in questions:
        try:
            qid = _id(_object(q), "question_id")
            if qid in matched:
                raise DataError(BAD_VALUE, f"duplicate question_id {qid!r} among the questions",
                                field="question_id")
            if qid not in answers:
                raise DataError(
                    MISSING_FIELD, f"question_id {qid!r} has no entry in the annotations file(s)",
                    field="question_id"
                )
            matched.add(qid)
            image_id = _get(q, "image_id", int)
            ann = answers[qid][2]
            if ann.get("image_id", image_id) != image_id:
                raise DataError(
                    BAD_VALUE, f"image_id {image_id} differs from the annotation's {ann['image_id']!r}",
                    field="image_id"
                )
            texts = []
            for k, a in enumerate(_get(ann, "answers", list)):
                if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                    raise DataError(WRONG_TYPE, f"annotation {answers[qid][1]}: expected an object with an "
                                    f"'answer' string (the official VQA format), got {str(a)[:60]}",
                                    field=f"answers[{k}]")
                texts.append(" ".join(a["answer"].split()))
            record = {
                "image": conv.image_path(image_pattern.format(image_id=image_id, **names)),
                "question_id": qid,
                "question": _text(q, "question"),
                "answers": texts,
            }
            record.update({k: ann[k] for k in ("answer_type", "question_type", "multiple_choice_answer")
                           if k in ann})
            record["image_id"] = image_id
        except DataError as e:
            conv.reject(e, file=path, item=item, row=q)
            continue
        conv.add(record, file=path, item=item, row=q)
    for qid, (path, item, ann) in answers.items():
        if qid not in matched:
            conv.reject(
                DataError(MISSING_FIELD, f"question_id {qid!r} has no entry in the questions file(s)",
                          field="question_id"),
                file=path,
                item=item,
                row=ann,
            )


def _image_path(conv: Conversion, image: str, field: str) -> str:
    """`conv.image_path` of one image, an error naming the row's field (`image_path`, `images[1]`, ...)."""
    try:
        return conv.image_path(image)
    except DataError as e:
        e.field = field
        raise e.at() from None


def llava(path: Path, conv: Conversion) -> None:
    """LLaVA instruction data (JSON list or JSONL) -> instruct records; rows without an image stay
    text-only."""
    for item, row in _items(path, conv):
        try:
            record = dict(_object(row))
            # LLaMA-Factory / ms-swift: {"messages" or "conversations": [...], "images": ["a.jpg"]}
            key = "images" if "image" not in record and "images" in record else "image"
            if isinstance(record.get(key), list) and len(record[key]) == 1:
                # a null here is a missing image, not a text-only row
                record[key] = [_get({f"{key}[0]": record[key][0]}, f"{key}[0]", str)]
            # Every image alias (image_path, img, a string under images, ...) resolved as normalize_record
            # does (bad_value where two differ), so that the path check sees whichever names the image.
            alias = next((k for k in IMAGE_ALIASES if record.get(k) is not None), "image")
            _normalize_image(record, required=False, several=True)
            if "images" in record:  # a multi-image conversation: each `<image>` in the turns, in order
                record["images"] = [_image_path(conv, v, f"{alias}[{i}]")
                                    for i, v in enumerate(record["images"])]
            elif "image" in record:
                record["image"] = _image_path(conv, record["image"], alias)
        except DataError as e:
            conv.reject(e, file=path, item=item, row=row)
            continue
        conv.add(record, file=path, item=item, row=row)


def karpathy(path: Path, conv: Conversion, *, splits: set[str] | None) -> None:
    """Karpathy's dataset_{coco,flickr8k,flickr30k}.json -> caption records of the chosen splits."""
    for i, img in enumerate(_top_list(_load_json(path), "images", path)):
        item = f"images[{i}]"
        try:
            split = _get(_object(img), "split", str)
            if split not in KARPATHY_SPLITS:  # "TRAIN", "dev": no --split could keep them
                raise DataError(BAD_VALUE, f"{split!r} is not one of {', '.join(KARPATHY_SPLITS)} (lower "
                                "case, as Karpathy's files write them)", field="split")
            if splits is not None and split not in splits:
                conv.skipped += 1
                continue
            parts = (([_get(img, "filepath", str)] if img.get("filepath") else [])
                     + [_get(img, "filename", str)])
            record = {"image": conv.image_path(*parts), "captions": [], "split": split}
            for j, sentence in enumerate(_get(img, "sentences", list)):
                try:
                    record["captions"].append(_text(_object(sentence), "raw"))
                except DataError as e:
                    conv.reject(e, file=path, item=f"{item}.sentences[{j}]", row=sentence)
            if not record["captions"]:
                raise DataError(MISSING_FIELD, "has no usable sentence", field="sentences")
            image_id = img.get("cocoid", img.get("imgid"))
            if image_id is not None:
                record["image_id"] = image_id
        except DataError as e:
            conv.reject(e, file=path, item=item, row=img)
            continue
        conv.add(record, file=path, item=item, row=img)


IMAGE_KEYS = ("image_path", "image", "file_name", "filepath", "img")
TEXT_KEYS = ("text", "caption", "captions")


def _texts(key: str, value: Any) -> list[str]:
    """The captions of an image-text-json row's text field: a string or a list of strings."""
    if isinstance(value, list):
        return [_clean_text(t, f"{key}[{i}]") for i, t in enumerate(value)]
    return [_clean_text(value, key)]


def image_text_json(paths: list[Path], conv: Conversion) -> None:
    """`[{"image_path", "text"}, ...]` (JSON list or JSONL) -> caption records; rows of one image merge."""
    merged: dict[str, tuple[dict, Path, str, Any]] = {}
    for path in paths:
        for item, row in _items(path, conv):
            try:
                # Every name of a field is read: two that differ (`caption` and `captions`, `image_path`
                # and `image`) are a bad_value reject, as in normalize_record, not the first one silently.
                fields = dict(_object(row))
                image_key, image = _pop_alias(fields, IMAGE_KEYS,
                                              lambda k, v: conv.image_path(_get({k: v}, k, str)))
                if image_key is None:
                    raise DataError(MISSING_FIELD, f"is missing (one of {', '.join(IMAGE_KEYS)})",
                                    field="image_path")
                text_key, texts = _pop_alias(fields, TEXT_KEYS, _texts)
                if text_key is None:
                    raise DataError(MISSING_FIELD, f"is missing (one of {', '.join(TEXT_KEYS)})",
                                    field="text")
            except DataError as e:
                conv.reject(e, file=path, item=item, row=row)
                continue
            merged.setdefault(image, ({"image": image, "captions": []}, path, item, row))[0][
                "captions"].extend(texts)
    for record, path, item, row in merged.values():
        conv.add(record, file=path, item=item, row=row)


# --- driver ------------------------------------------------------------------------------------------
def convert_records(
    fmt: str,
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    image_pattern: str = DEFAULT_VQA_PATTERN,
) -> Conversion:
    """Convert input files in memory; image paths come out relative to the image root (`image_root`, by
    default `out_dir`: either way the input's names). Raises `DataError` for unusable files."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    conv = Conversion(FORMATS[fmt], Path(out_dir), Path(image_root) if image_root is not None else None)
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise DataError(UNREADABLE_FILE,
                            "is a folder, not a file" if path.is_dir() else "file does not exist", path=path)
    if fmt == "vqav2":
        vqav2(paths, conv, split=split, image_pattern=image_pattern)
    elif fmt == "image-text-json":
        image_text_json(paths, conv)
    else:
        splits = None
        if fmt == "karpathy" and split not in (None, "all"):
            splits = set(split.split(","))
            if splits - set(KARPATHY_SPLITS):
                raise ValueError(
                    f"unknown Karpathy split(s) {sorted(splits - set(KARPATHY_SPLITS))}; expected "
                    f"{KARPATHY_SPLITS} or 'all'"
                )
        for path in paths:
            if fmt == "coco-captions":
                coco_captions(path, conv)
            elif fmt == "llava":
                llava(path, conv)
            else:
                karpathy(path, conv, splits=splits)
    return conv


def default_rejects_path(out: str | os.PathLike) -> Path:
    """OUT.jsonl -> OUT.rejects.jsonl."""
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return out.with_name(stem + ".rejects.jsonl")


def convert(
    fmt: str, inputs: list[str | os.PathLike], out: str | os.PathLike, *,
    rejects: str | os.PathLike | None = None, **kwargs
) -> Conversion:
    """Convert `inputs` and write the records to `out` and every reject to `rejects` (default
    OUT.rejects.jsonl), each atomically."""
    out = Path(out)
    check_outputs({"the output": out, "the rejects file": rejects or default_rejects_path(out)},
                  inputs=inputs)
    conv = convert_records(fmt, inputs, out.parent, **kwargs)
    with replaced_together() as together:
        with JsonlWriter(out, together=together) as w:
            for record in conv.records:
                w.write(record)
        # Written even when empty, so that a stale rejects file from an earlier run cannot mislead.
        with JsonlWriter(rejects or default_rejects_path(out), together=together) as w:
            for reject in conv.rejects:
                w.write(reject)
    return conv


def summary(conv: Conversion, out: Path, rejects: Path) -> str:
    """Counts by reason, one example each, and where the image paths are relative to."""
    lines = [f"converted {len(conv.records)} {conv.task} records -> {out}",
             f"rejected {len(conv.rejects)} -> {rejects}"]
    for reason, n in conv.rejected.most_common():
        first = next(r for r in conv.rejects if r["reason"] == reason)
        what = f"field '{first['field']}': " if first["field"] else ""
        lines.append(f"  {reason:<16} {n:>7}   e.g. {first['file']}: {first['item']}: "
                     f"{what}{first['message']}")
    if conv.skipped:
        lines.append(f"skipped {conv.skipped} images of other splits (--split)")
    if conv.image_root is not None and Path(conv.image_root).resolve() != out.parent.resolve():
        lines.append(f"image paths are relative to {conv.image_root}: give readers of {out} --image-root "
                     f"{conv.image_root} (e.g. python -m data_tools validate --image-root {conv.image_root})")
    return "\n".join(lines)


@user_errors
def main(argv: list[str]) -> int:
    """`python -m data_tools convert`: 0 when records were written, 1 when none, 2 on a user error."""
    p = argparse.ArgumentParser(
        prog="python -m data_tools convert",
        description="Convert COCO captions / VQA v2 / LLaVA / Karpathy / image-text JSON to our JSONL.",
        epilog="Image paths are written relative to the image root (--image-root, default OUT's folder). "
               "Rows that cannot be converted go to the rejects file with a reason.",
    )
    p.add_argument("--from", dest="fmt", required=True, choices=sorted(FORMATS))
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="vqav2: the questions and the annotations files (any order)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-root",
                   help="folder the input's image names are relative to; the written paths are too, so "
                        "give readers the same --image-root (default: OUT's folder)")
    p.add_argument("--split",
                   help="karpathy: keep these splits (train, val, test, restval, comma-separated, or all: "
                        "the default); "
                        "vqav2: the {split} in --image-pattern (default: from the questions file's "
                        "data_subtype)")  # fmt: skip
    p.add_argument(
        "--image-pattern",
        default=DEFAULT_VQA_PATTERN,
        help="vqav2: image file name from {image_id}, {split}, {data_subtype} (default: %(default)s)",
    )
    p.add_argument("--rejects", help="where rejected rows go (default: OUT.rejects.jsonl)")
    args = p.parse_args(argv)
    if args.split is not None and args.fmt not in ("karpathy", "vqav2"):
        p.error("--split applies to --from karpathy and vqav2 only")
    if args.image_pattern != DEFAULT_VQA_PATTERN and args.fmt != "vqav2":
        p.error("--image-pattern applies to --from vqav2 only")
    if (args.fmt == "karpathy" and args.split not in (None, "all")
            and set(args.split.split(",")) - set(KARPATHY_SPLITS)):
        p.error(f"--split: expected a comma-separated list of {', '.join(KARPATHY_SPLITS)}, or all")
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(args.out)
    check_outputs({"--out": args.out, "--rejects": rejects}, inputs=args.inputs)
    if args.image_root is not None and not Path(args.image_root).is_dir():
        print(f"warning: --image-root {args.image_root} is not a folder (yet); its images cannot be found",
              file=sys.stderr)
    kwargs = {"image_root": args.image_root, "split": args.split}
    if args.fmt == "vqav2":
        kwargs["image_pattern"] = args.image_pattern
    try:
        conv = convert(args.fmt, args.inputs, args.out, rejects=rejects, **kwargs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(conv, Path(args.out), rejects))
    if not conv.records:
        print("error: nothing was converted; see the rejects file", file=sys.stderr)
        return 1
    return 0
