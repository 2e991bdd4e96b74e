"""Remove exact duplicates and merge rows of the same or near-duplicate images, with a report row for every change.

    python -m data_tools dedup --task caption data/clean.jsonl --out data/dedup.jsonl --report data/dedup_report.jsonl

What happens, by task:
- every task: a row with the same image content (`hashing.content_hash`) and the same normalised text as
  an earlier row is dropped ("exact_duplicate"). Text is the captions (and retrieval negatives), the question
  and the multiset of answers (vqa), or the conversation turns (instruct); a row without image (instruct)
  compares by text alone.
- caption, retrieval: rows whose images are identical ("same_image") or near duplicates
  ("near_duplicate_image": pHash Hamming distance <= --near-threshold and matching coarse colours) become
  ONE record: the first row's, image included, with the captions of the later rows appended in order.
  A caption whose normalised text is already in the record is not appended again and is listed under
  "dropped_captions" in the report, so every caption of the input is either in the output or in the report.
  The first row's own captions and its other fields are kept as they are.
- vqa, instruct: rows of near-duplicate images ask different things, so they are all kept; the report
  lists them ("action": "kept") so that the groups can be inspected.
Near duplicates chain (a~b, b~c makes one group); the reported "hamming" is the distance to the kept
row's image, which a chain can make larger than the threshold.

Input must be clean (`python -m data_tools clean`): a bad row or image stops the run with its file and line.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
from collections import Counter
from pathlib import Path

from .errors import PATH_OUTSIDE_ROOT, DataError
from .hashing import CLEAN_FIRST, DEFAULT_NEAR_THRESHOLD, ImageHash, hamming, hash_images, image_groups
from .images import resolve_image_path
from .jsonl import iter_jsonl, write_jsonl
from .records import IMAGE_ALIASES, TASKS, normalize_record

_END_PUNCTUATION = string.punctuation + string.whitespace


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation at both ends: "A dog. " and "a  dog" compare equal."""
    return " ".join(text.lower().split()).strip(_END_PUNCTUATION)


def image_field(record: dict) -> str | None:
    """The record's image path under its canonical name or any accepted alias; None when it has none."""
    key = next((k for k in IMAGE_ALIASES if isinstance(record.get(k), str)), None)
    return None if key is None else record[key]


def read_rows(path: str | os.PathLike, task: str | None = None) -> list[tuple[int, dict]]:
    """Read a clean JSONL file as (line number, record); with a task, records are normalised. Raises on a bad row."""
    rows = []
    for line, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise _clean_first(row)
        if task is not None:
            try:
                row = normalize_record(row, task)
            except DataError as e:
                raise _clean_first(e.at(path=path, line=line)) from None
        rows.append((line, row))
    return rows


def _clean_first(e: DataError) -> DataError:
    if CLEAN_FIRST not in e.message:
        e.message += f" ({CLEAN_FIRST})"
    return e.at()


def resolve_images(rows: list[tuple[int, dict]], root: Path, path, *, allow_outside_root: bool = False) -> list[Path | None]:
    """Absolute image path of each row (None for a row without image), errors naming file and line."""
    out = []
    for line, record in rows:
        image = image_field(record)
        try:
            out.append(None if image is None else resolve_image_path(image, root, allow_outside_root=allow_outside_root))
        except DataError as e:
            raise e.at(path=path, line=line) from None
    return out


def hash_rows(images: list[Path | None], near_threshold: int | None, *, progress: bool = True, rows=None, path=None):
    """Hash the distinct images of the rows; return (hash per row, image group id per row, both None without image).

    A group id is the index of the group's first row, so rows of one image or of near-duplicate images share it.
    Given the rows (line, record) and their file, an image that fails to load is reported with the first line using it.
    """
    try:
        by_path = hash_images([p for p in images if p is not None], progress=progress)
    except DataError as e:
        if rows is not None and e.path is not None and Path(e.path) in images:
            e.message += f"; first used at {path}:{rows[images.index(Path(e.path))][0]}"
            e.at()
        raise
    paths = list(by_path)
    groups, _ = image_groups([by_path[p] for p in paths], near_threshold)
    # Image-level group ids -> the first row that shows any image of the group.
    first_row_of_group: dict[int, int] = {}
    index_of = {p: i for i, p in enumerate(paths)}
    row_groups: list[int | None] = []
    for row, p in enumerate(images):
        if p is None:
            row_groups.append(None)
            continue
        row_groups.append(first_row_of_group.setdefault(groups[index_of[p]], row))
    return [None if p is None else by_path[p] for p in images], row_groups


def _text_key(record: dict, task: str):
    if task in ("caption", "retrieval"):
        # Negatives count too, so that a row with other negatives is merged (negatives kept), not dropped.
        return tuple(normalize_text(c) for c in record["captions"]), tuple(normalize_text(c) for c in record.get("neg_captions", []))
    if task == "vqa":
        # Annotator order carries no meaning, so answers compare as a multiset.
        return normalize_text(record["question"]), tuple(sorted(normalize_text(a) for a in record["answers"]))
    return tuple((t["from"], normalize_text(t["value"])) for t in record["conversations"])


def _append_new(target: list[str], texts: list[str], seen: set[str]) -> list[str]:
    """Append the texts not yet seen (normalised) to target; return those left out."""
    dropped = []
    for text in texts:
        key = normalize_text(text)
        if key in seen:
            dropped.append(text)
        else:
            seen.add(key)
            target.append(text)
    return dropped


def dedup_records(
    records: list[dict],
    task: str,
    hashes: list[ImageHash | None],
    groups: list[int | None],
    *,
    lines: list[int] | None = None,
    images: list[str | None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Deduplicate canonical records given each row's image hash and image group (see `hash_rows`).

    Returns (output records, report entries). Report entries name input line numbers (`lines`, default
    1..n) and image paths as written in the rows (`images`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    lines = lines or list(range(1, len(records) + 1))
    images = images or [r.get("image") for r in records]
    merge = task in ("caption", "retrieval")
    report: list[dict] = []
    out: dict[int, dict] = {}  # row index of the kept row -> its output record
    seen_captions: dict[int, set[str]] = {}
    seen_negatives: dict[int, set[str]] = {}
    first_of_key: dict[tuple, int] = {}
    kept_of_group: dict[int, int] = {}

    def entry(i: int, kept: int, action: str, reason: str) -> dict:
        e = {"line": lines[i], "action": action, "reason": reason}
        e["merged_into" if action != "kept" else "grouped_with"] = lines[kept]
        if images[i] is not None:
            e["image"], e["kept_image"] = images[i], images[kept]
            e["hamming"] = hamming(hashes[i].phash, hashes[kept].phash)
        return e

    for i, record in enumerate(records):
        h, g = hashes[i], groups[i]
        key = (h.content if h else None, _text_key(record, task))
        twin = first_of_key.setdefault(key, i)
        kept = kept_of_group.setdefault(g, i) if g is not None else i
        if twin != i:
            # Where the twin's content ended up: its own record, or the record it was merged into.
            into = kept_of_group[groups[twin]] if merge and groups[twin] is not None else twin
            e = entry(i, into, "dropped", "exact_duplicate")
            if merge:
                e["dropped_captions"] = list(record["captions"])
            report.append(e)
            continue
        if kept == i or not merge:
            out[i] = record
            if merge:
                seen_captions[i] = {normalize_text(c) for c in record["captions"]}
                seen_negatives[i] = {normalize_text(c) for c in record.get("neg_captions", [])}
            elif kept != i and images[i] != images[kept]:
                same = h.content == hashes[kept].content
                report.append(entry(i, kept, "kept", "same_image" if same else "near_duplicate_image"))
            continue
        target = out[kept]
        if target is records[kept]:
            target = out[kept] = {**records[kept], "captions": list(records[kept]["captions"])}
            if "neg_captions" in target:
                target["neg_captions"] = list(target["neg_captions"])
        same = h.content == hashes[kept].content
        e = entry(i, kept, "merged", "same_image" if same else "near_duplicate_image")
        e["dropped_captions"] = _append_new(target["captions"], record["captions"], seen_captions[kept])
        if record.get("neg_captions"):
            # A negative that is a positive of the merged record would contradict it.
            negatives = target.setdefault("neg_captions", [])
            blocked = seen_negatives[kept] | seen_captions[kept]
            dropped = _append_new(negatives, record["neg_captions"], blocked)
            seen_negatives[kept] |= {normalize_text(c) for c in negatives}
            if dropped:
                e["dropped_neg_captions"] = dropped
        report.append(e)
    return [out[i] for i in sorted(out)], report


def rebase_image(record: dict, src_root: Path, dst_root: Path, *, allow_outside_root: bool = False) -> dict:
    """Rewrite the record's image path, relative to src_root, to be relative to dst_root (where it is written)."""
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    key = next((k for k in IMAGE_ALIASES if isinstance(record.get(k), str)), None)
    if src_root == dst_root or key is None:
        return record
    absolute = resolve_image_path(record[key], src_root, allow_outside_root=allow_outside_root)
    relative = os.path.relpath(absolute, dst_root)
    if relative.split(os.sep)[0] == ".." and not allow_outside_root:
        raise DataError(
            PATH_OUTSIDE_ROOT,
            f"image {record[key]!r} would be outside the output folder {dst_root}, and image paths are relative "
            f"to the JSONL file: write the output next to the input ({src_root}) or to a folder that contains the images "
            "(or pass --allow-outside-root)",
            field=key,
        )
    return {**record, key: Path(relative).as_posix()}


def dedup_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    task: str,
    *,
    report_path: str | os.PathLike | None = None,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    allow_outside_root: bool = False,
    progress: bool = True,
) -> tuple[int, int, list[dict]]:
    """Deduplicate a JSONL file into `out` (and the report into `report_path`); return (rows in, rows out, report)."""
    path, out = Path(path), Path(out)
    rows = read_rows(path, task)
    records = [r for _, r in rows]
    paths = resolve_images(rows, path.parent, path, allow_outside_root=allow_outside_root)
    hashes, groups = hash_rows(paths, near_threshold, progress=progress, rows=rows, path=path)
    kept, report = dedup_records(records, task, hashes, groups, lines=[line for line, _ in rows], images=[image_field(r) for r in records])
    kept = [rebase_image(r, path.parent, out.parent, allow_outside_root=allow_outside_root) for r in kept]
    write_jsonl(out, kept)
    if report_path is not None:
        write_jsonl(report_path, report)
    return len(rows), len(kept), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools dedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="IN", help="clean JSONL file")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--report", help="JSONL file with one row per dropped, merged or grouped row")
    parser.add_argument("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, help="max pHash Hamming distance of near duplicates (default %(default)s)")
    parser.add_argument("--no-near", action="store_true", help="only identical images count as the same image")
    parser.add_argument("--allow-outside-root", action="store_true", help="allow image paths outside the JSONL file's folder")
    args = parser.parse_args(argv)
    try:
        n_in, n_out, report = dedup_file(
            args.input, args.out, args.task, report_path=args.report,
            near_threshold=None if args.no_near else args.near_threshold, allow_outside_root=args.allow_outside_root,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.input}: {n_in} rows in, {n_out} rows out -> {args.out}")
    for (action, reason), n in sorted(Counter((e["action"], e["reason"]) for e in report).items()):
        print(f"  {action} ({reason}): {n}")
    n_dropped_captions = sum(len(e.get("dropped_captions", [])) for e in report)
    if n_dropped_captions:
        print(f"  captions not repeated in merged records (listed in the report): {n_dropped_captions}")
    if args.report:
        print(f"report: {args.report}")
    return 0
