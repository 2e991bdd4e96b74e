"""Remove exact duplicates and merge rows of the same or near-duplicate images, with a report row for \
every change.

    python -m data_tools dedup --task caption data/clean.jsonl --out data/dedup.jsonl \
--report data/dedup_report.jsonl

What happens, by task:
- every task: a row with the same image content (`hashing.content_hash`) and the same normalised text as
  an earlier row is dropped ("exact_duplicate"). Text is the captions (and retrieval negatives), the question
  and the multiset of answers (vqa), or the conversation turns (instruct); a row without image (instruct)
  compares by text alone.
- caption, retrieval: rows whose images are identical ("same_image") or near duplicates of the kept image
  ("near_duplicate_image": pHash Hamming distance <= --near-threshold and matching coarse colours) become
  ONE record: the first row's, image included, with the captions of the later rows appended in order.
  A caption whose normalised text is already in the record is not appended again and is listed under
  "dropped_captions" in the report, so every caption of the input is either in the output or in the report.
  Retrieval: a text that one row gives as a caption and another as a negative stays a caption (that image
  shows it); the negative is listed under "dropped_neg_captions" of the row that brought the conflict.
  The first row's own captions and its other fields are kept as they are.
- vqa, instruct: rows of near-duplicate images ask different things, so they are all kept; the report
  lists them ("action": "kept", "grouped_with") so that the groups can be inspected.
Which image a row joins: images are taken in the order of their first row; an image that no earlier kept
image took is kept, and takes every later image near it that is not taken yet (identical images, the same
pixels, always go together). So every merged row's image is within the threshold of its kept image, whose
path and distance the report gives ("kept_image", "hamming" <= --near-threshold), and near duplicates do
not chain: frames of a video, each near the next, are not all merged into the first. `split` does chain
them (a~b and b~c put a, b and c in one split), which is the safe side against leakage.

Image paths are relative to the image root, `--image-root` (default: the input's folder). With
`--image-root` the output keeps them as they are; without it they are rewritten relative to --out's folder.

Input must be clean (`python -m data_tools clean`): a bad row or image stops the run with its file and line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import string
import sys
from array import array
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MULTIPLE_IMAGES, PATH_OUTSIDE_ROOT, WRONG_TYPE, DataError
from .files import check_outputs, replaced_together
from .hashing import CLEAN_FIRST, DEFAULT_NEAR_THRESHOLD, ImageHash, hamming
from .images import ImagePathResolver, relative_image_path, resolve_image_path
from .hashes import (ImageHasher, add_hash_arguments, default_cache, first_index, group_images,
                     hamming_threshold, hasher_from_args)
from .jsonl import JsonlWriter, is_json_list, iter_jsonl
from .records import IMAGE_ALIASES, TASKS, normalize_record
from .records import _image as _normalize_image

_END_PUNCTUATION = string.punctuation + string.whitespace


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation at both ends:
    "A dog. " and "a  dog" compare equal."""
    return " ".join(text.lower().split()).strip(_END_PUNCTUATION)


def _image_entry(record: dict) -> tuple[str, str] | None:
    """(field, path) of the record's image under its canonical name or any accepted alias, a list of one
    image (`"images": ["a.jpg"]`) included; None when it has none."""
    for key in IMAGE_ALIASES:
        value = record.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str):
            return key, value
    return None


def image_field(record: dict) -> str | None:
    """The record's image path (`_image_entry`); None when it has none."""
    entry = _image_entry(record)
    return None if entry is None else entry[1]


def _clean_first(e: DataError) -> DataError:
    if CLEAN_FIRST not in e.message:
        e.message += f" ({CLEAN_FIRST})"
    return e.at()


def _text_key(record: dict, task: str):
    if task in ("caption", "retrieval"):
        # Negatives count too, so that a row with other negatives is merged (negatives kept), not dropped.
        return (tuple(normalize_text(c) for c in record["captions"]),
                tuple(normalize_text(c) for c in record.get("neg_captions", [])))
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


class _Merger:
    """The per-row decisions of `dedup_records`, one row at a time, holding state only for merge targets.

    Inputs are per-row arrays: `twin` (first row with the same image content and text, itself if none) and
    `group` (first row of the row's image group, -1 without image); `same(i, k)` and `distance(i, k)` compare
    two rows' images. `feed` is called for rows in order and returns the row's report entries; `output`
    then gives the record to write for a row, or None. Report entries name earlier rows only, so each row's
    line and image as written are kept just for the rows that entries will name (`referenced`).
    """

    def __init__(self, task: str, twin: np.ndarray, group: np.ndarray, same, distance, lines):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        n = len(twin)
        rows = np.arange(n)
        self.task, self.twin, self.group, self.lines = task, twin, group, lines
        self.same, self.distance = same, distance
        self.merge = task in ("caption", "retrieval")
        grouped = (group >= 0) & (group != rows)
        unique = twin == rows
        self.kept = unique & (~grouped | (not self.merge))
        self.targets = set(np.unique(group[unique & grouped]).tolist()) if self.merge else set()
        into = np.where((group >= 0) & self.merge, group, twin)
        self.referenced = set(np.unique(np.concatenate([into[~unique], group[unique & grouped]])).tolist())
        self.image_of: dict[int, str | None] = {}
        self.state: dict[int, dict] = {}

    def _entry(self, i: int, image: str | None, kept: int, action: str, reason: str) -> dict:
        e = {"line": int(self.lines[i]), "action": action, "reason": reason}
        e["merged_into" if action != "kept" else "grouped_with"] = int(self.lines[kept])
        if image is not None:
            e["image"], e["kept_image"] = image, self.image_of[kept]
            e["hamming"] = self.distance(i, kept)
        return e

    def feed(self, i: int, record: dict, image: str | None) -> list[dict]:
        if i in self.referenced:
            self.image_of[i] = image
        twin, g = int(self.twin[i]), int(self.group[i])
        kept = g if g >= 0 else i
        if twin != i:
            # Where the twin's content ended up: its own record, or the record it was merged into.
            into = g if self.merge and g >= 0 else twin
            e = self._entry(i, image, into, "dropped", "exact_duplicate")
            if self.merge:
                e["dropped_captions"] = list(record["captions"])
            return [e]
        if kept == i or not self.merge:
            if i in self.targets:
                self.state[i] = {
                    "captions": list(record["captions"]),
                    "neg_captions": list(record["neg_captions"]) if "neg_captions" in record else None,
                    "seen": {normalize_text(c) for c in record["captions"]},
                    "seen_neg": {normalize_text(c) for c in record.get("neg_captions", [])},
                }
            elif not self.merge and kept != i and image != self.image_of[kept]:
                reason = "same_image" if self.same(i, kept) else "near_duplicate_image"
                return [self._entry(i, image, kept, "kept", reason)]
            return []
        target = self.state[kept]
        reason = "same_image" if self.same(i, kept) else "near_duplicate_image"
        e = self._entry(i, image, kept, "merged", reason)
        e["dropped_captions"] = _append_new(target["captions"], record["captions"], target["seen"])
        dropped = []
        # A caption of this row that is a negative of the record: this image shows it, so the caption wins
        # and the negative leaves the record (listed in the report); a text is never both.
        clash = {normalize_text(c) for c in record["captions"]} & target["seen_neg"]
        if clash:
            dropped = [c for c in target["neg_captions"] if normalize_text(c) in clash]
            target["neg_captions"] = [c for c in target["neg_captions"] if normalize_text(c) not in clash]
            target["seen_neg"] -= clash
        if record.get("neg_captions"):
            # A negative that is a positive of the merged record would contradict it.
            if target["neg_captions"] is None:
                target["neg_captions"] = []
            blocked = target["seen_neg"] | target["seen"]
            dropped += _append_new(target["neg_captions"], record["neg_captions"], blocked)
            target["seen_neg"] |= {normalize_text(c) for c in target["neg_captions"]}
        if dropped:
            e["dropped_neg_captions"] = dropped
        return [e]

    def output(self, i: int, record: dict) -> dict | None:
        if not self.kept[i]:
            return None
        state = self.state.get(i)
        if state is None:
            return record
        out = {**record, "captions": state["captions"]}
        if state["neg_captions"]:
            out["neg_captions"] = state["neg_captions"]
        elif state["neg_captions"] is not None:  # every negative became a caption
            out.pop("neg_captions", None)
        return out


def _text_digest(record: dict, task: str) -> bytes:
    # 128-bit digests stand for the texts, so that a million rows' texts need not stay in memory.
    text = repr(_text_key(record, task)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).digest()


def _twins(content: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """First row with the same content id (-1: no image) and text digest, per row."""
    keys = np.zeros((len(content), 24), np.uint8)
    keys[:, :8] = content.astype("<i8").view(np.uint8).reshape(-1, 8)
    keys[:, 8:] = digests.reshape(len(content), 16)
    return first_index(keys)


def dedup_records(
    records: list[dict],
    task: str,
    hashes: list[ImageHash | None],
    groups: list[int | None],
    *,
    lines: list[int] | None = None,
    images: list[str | None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Deduplicate canonical records given each row's image hash and image group (see `group_rows`).

    Returns (output records, report entries). Report entries name input line numbers (`lines`, default
    1..n) and images as written (`images`, default each record's "image").
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    n = len(records)
    lines = np.asarray(lines or list(range(1, n + 1)), np.int64)
    images = images or [r.get("image") for r in records]
    # Group labels -> the first row with that label, which is what `_Merger` expects.
    first_of_label: dict = {}
    group = [-1 if g is None else first_of_label.setdefault(g, i) for i, g in enumerate(groups)]
    group = np.array(group, np.int64)
    content_id: dict = {}
    content = [-1 if h is None else content_id.setdefault(h.content, len(content_id)) for h in hashes]
    content = np.array(content, np.int64)
    digests = np.frombuffer(b"".join(_text_digest(r, task) for r in records), np.uint8).reshape(n, 16)
    merger = _Merger(
        task, _twins(content, digests), group,
        same=lambda i, k: hashes[i].content == hashes[k].content,
        distance=lambda i, k: hamming(hashes[i].phash, hashes[k].phash),
        lines=lines,
    )
    report = [e for i, r in enumerate(records) for e in merger.feed(i, r, images[i])]
    out = [merger.output(i, r) for i, r in enumerate(records)]
    return [r for r in out if r is not None], report


def _outside_output(image: str, src_root: Path, dst_root: Path) -> DataError:
    return DataError(
        PATH_OUTSIDE_ROOT,
        f"image {image!r} would be outside the output folder {dst_root}, to which the output's image paths "
        f"would be rewritten: write the output next to the input ({src_root}) or to a folder that contains "
        f"the images, or pass --image-root {src_root} to keep the paths as they are (and give the output's "
        "readers the same --image-root), or --allow-outside-root",
        field="image",
    )


def _rebase_path(image: str, src_root: Path, dst_root: Path, *,
                 allow_outside_root: bool = False) -> tuple[str, bool]:
    """An image path relative to src_root rewritten relative to dst_root (both resolved), and whether it
    climbs out of dst_root. By the path's text, as `clean` does, not from where the image resolves: a
    symlinked folder inside the root (`ln -s /mnt/coco data/coco`) may point anywhere, and readers follow
    it from the path's text."""
    norm = relative_image_path(image, allow_outside_root=allow_outside_root)
    if os.path.isabs(norm):  # allowed outside the root: kept as it is
        return norm, True
    rebased = Path(os.path.relpath(os.path.join(src_root, norm), dst_root)).as_posix()
    return rebased, rebased == ".." or rebased.startswith("../")


def rebase_image(record: dict, src_root: Path, dst_root: Path, *, allow_outside_root: bool = False) -> dict:
    """Rewrite the record's image path, relative to src_root, to be relative to dst_root (where it is
    written)."""
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    entry = _image_entry(record)
    if src_root == dst_root or entry is None:
        return record
    key, image = entry
    resolve_image_path(image, src_root, allow_outside_root=allow_outside_root)  # a path readers accept
    rebased, outside = _rebase_path(image, src_root, dst_root, allow_outside_root=allow_outside_root)
    if outside and not allow_outside_root:
        e = _outside_output(image, src_root, dst_root)
        e.field = key
        raise e
    return {**record, key: rebased if isinstance(record[key], str) else [rebased]}


def _check_one_image(row: dict) -> None:
    """Refuse a row with several images under any image alias (`"image": [a, b]` too), or with two aliases
    naming different images: rows are grouped by their one image, and another would be free to leak into
    another split. `DataError` naming the field."""
    given = [k for k in IMAGE_ALIASES if k in row]
    if len(given) == 1 and isinstance(row[given[0]], str):
        return  # the common case, and nothing to check
    probe = {k: row[k] for k in given}
    _normalize_image(probe, required=False, several=True)  # aliases that differ: bad_value
    if len(probe.get("images", [])) > 1:
        key = next(k for k in given if isinstance(row[k], list) and len(row[k]) > 1)
        raise DataError(MULTIPLE_IMAGES, f"has {len(row[key])} images; dedup, split and check-leakage group "
                        "rows by their one image", field=key)


def _image_root(path: Path, image_root) -> Path:
    """The folder a file's image paths are relative to: `image_root`, by default the file's own folder."""
    return Path(image_root if image_root is not None else path.parent).resolve()


def iter_images(path: str | os.PathLike, task: str | None = None, *,
                image_root: str | os.PathLike | None = None, allow_outside_root: bool = False,
                resolve: bool = True):
    """Stream a clean JSONL file as (line, record, absolute image path or None), normalised for a task.

    Image paths resolve against `image_root` (default: the file's folder). With `resolve=False` the image
    path is not resolved (None). Raises a `DataError` naming the file and line at the first bad row.
    """
    path = Path(path)
    if is_json_list(path):
        # Rows are named by their line, and a JSON list can hold many rows on one line.
        raise DataError(WRONG_TYPE, f"holds one JSON list of rows; dedup, split, check-leakage and hash read "
                        f"JSONL (one row per line): {CLEAN_FIRST}, which writes JSONL", path=path)
    resolver = ImagePathResolver(_image_root(path, image_root), allow_outside_root=allow_outside_root)
    for line, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise _clean_first(row)
        if task is not None:
            try:
                row = normalize_record(row, task)
            except DataError as e:
                raise _clean_first(e.at(path=path, line=line)) from None
        try:
            _check_one_image(row)
            image = image_field(row) if resolve else None
            resolved = None if image is None else resolver(image)
        except DataError as e:
            raise e.at(path=path, line=line) from None
        yield line, row, resolved


@dataclass
class ScannedRows:
    """What one pass over a JSONL file keeps: per row its line, image index (-1: none) and text digest; and
    the distinct images (absolute paths) with the first line using each. No records are kept."""

    lines: np.ndarray
    image: np.ndarray
    digests: np.ndarray | None
    paths: list[str]
    first_line: list[int]


def scan_rows(
    path, task: str | None = None, *, digests: bool = False, image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False, out_folder: str | os.PathLike | None = None,
) -> ScannedRows:
    """First pass over a JSONL file: see `ScannedRows`. Image paths resolve against `image_root` (default:
    the file's folder).

    With `out_folder` (where the rows will be written with paths rewritten relative to it, see
    `rebase_image`), an image outside it stops the scan, before any hashing, unless `allow_outside_root`.
    """
    path = Path(path)
    src = _image_root(path, image_root)
    dst = Path(out_folder).resolve() if out_folder is not None else None
    check_out = dst is not None and dst != src and not allow_outside_root
    lines, image, digest = array("q"), array("q"), bytearray()
    index: dict[str, int] = {}
    first_line: list[int] = []
    for line, record, resolved in iter_images(path, task, image_root=image_root,
                                              allow_outside_root=allow_outside_root):
        lines.append(line)
        if resolved is None:
            image.append(-1)
        else:
            key = str(resolved)
            k = index.setdefault(key, len(index))
            if k == len(first_line):
                first_line.append(line)
                if check_out and _rebase_path(image_field(record), src, dst)[1]:
                    raise _outside_output(image_field(record), src, dst).at(path=path, line=line)
            image.append(k)
        if digests:
            digest += _text_digest(record, task)
    n = len(lines)
    return ScannedRows(np.frombuffer(lines, np.int64) if n else np.zeros(0, np.int64),
                       np.frombuffer(image, np.int64) if n else np.zeros(0, np.int64),
                       np.frombuffer(bytes(digest), np.uint8).reshape(n, 16) if digests else None,
                       list(index), first_line)


def group_rows(scan: ScannedRows, near_threshold: int | None, hasher: ImageHasher, path) -> tuple:
    """Hash and group the images of scanned rows: returns (grouping by image, hash table, table entry per
    image, content id per row (-1: no image), image group per row = its first row (-1: no image)).

    An image that fails to load is reported with the first line using it.
    """
    try:
        table, entry = hasher.hash(scan.paths)
        grouping = group_images(table, near_threshold, hasher, entry)
    except DataError as e:
        where = {p: k for k, p in enumerate(scan.paths)}.get(e.path) if e.path is not None else None
        if where is not None:
            e.message += f"; first used at {path}:{scan.first_line[where]}"
            e.at()
        raise
    finally:
        hasher.save()
    n = len(scan.image)
    has = np.flatnonzero(scan.image >= 0)
    content = np.full(n, -1, np.int64)
    content[has] = grouping.content[scan.image[has]]
    return grouping, table, entry, content, first_rows(scan.image, grouping.group)


def first_rows(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per row, the first row whose image has the same `label` (an array per image); -1 for a row without
    image (`image` -1)."""
    has = np.flatnonzero(image >= 0)
    group = np.full(len(image), -1, np.int64)
    if len(has):
        _, first, inverse = np.unique(label[image[has]], return_index=True, return_inverse=True)
        group[has] = has[first][inverse.ravel()]
    return group


def dedup_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    task: str,
    *,
    report_path: str | os.PathLike | None = None,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    progress: bool = True,
    hasher: ImageHasher | None = None,
    keep_report: bool = True,
) -> tuple[int, int, list[dict] | Counter]:
    """Deduplicate a JSONL file into `out` (and the report into `report_path`); return (rows in, rows out,
    report).

    Rows stream through three passes (scan, report, output), so memory holds the image hashes and a few
    numbers per row, not the rows. The report is returned as a list of entries, or with `keep_report=False`
    (only with a `report_path`, which has them) as a Counter of (action, reason) and "dropped_captions".
    `hasher` defaults to fast hashes with the cache next to the file (see `data_tools.hashes`).

    Image paths are relative to `image_root`. Given, the output keeps them as they are (relative to the same
    root); by default (None: the input's folder) they are rewritten relative to `out`'s folder.
    """
    path, out = Path(path), Path(out)
    hasher = hasher or ImageHasher(cache=default_cache(path), progress=progress)
    check_outputs({"the output": out, "the report": report_path, "the hash cache": hasher.cache_path},
                  inputs=[path, *hasher.hash_files_read])  # before any hashing
    rebase = image_root is None
    scan = scan_rows(path, task, digests=True, image_root=image_root, allow_outside_root=allow_outside_root,
                     out_folder=out.parent if rebase else None)
    grouping, _, _, content, _ = group_rows(scan, near_threshold, hasher, path)
    # Not the connected components (`group`, which split uses): a chain of near duplicates (video frames)
    # would merge images far apart. A row joins the kept image it is itself near.
    centre, to_centre = grouping.centres()
    image = scan.image
    group = first_rows(image, centre)

    def distance(i: int, k: int) -> int:
        # k is i's twin (same content) or the first row of i's group, whose image is the centre.
        return 0 if content[i] == content[k] else int(to_centre[image[i]])

    merger = _Merger(task, _twins(content, scan.digests), group, same=lambda i, k: content[i] == content[k],
                     distance=distance, lines=scan.lines)
    keep_report = keep_report or report_path is None
    report: list[dict] | Counter = [] if keep_report else Counter()
    with replaced_together() as together:  # the report and the output: both new, or both old
        writer = JsonlWriter(report_path, together=together) if report_path is not None else nullcontext()
        with writer as w:
            for i, (_, record, _) in enumerate(iter_images(path, task, resolve=False)):
                for e in merger.feed(i, record, image_field(record)):
                    if w is not None:
                        w.write(e)
                    if keep_report:
                        report.append(e)
                    else:
                        report[(e["action"], e["reason"])] += 1
                        report["dropped_captions"] += len(e.get("dropped_captions", []))
        n_out = 0
        with JsonlWriter(out, together=together) as w:
            for i, (line, record, _) in enumerate(iter_images(path, task, resolve=False)):
                kept = merger.output(i, record)
                if kept is not None:
                    try:
                        if rebase:
                            kept = rebase_image(kept, path.parent, out.parent,
                                                allow_outside_root=allow_outside_root)
                        w.write(kept)
                    except DataError as e:
                        raise e.at(path=path, line=line) from None
                    n_out += 1
    return len(scan.lines), n_out, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools dedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="IN", help="clean JSONL file")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--report", help="JSONL file with one row per dropped, merged or grouped row")
    parser.add_argument("--near-threshold", type=hamming_threshold, default=DEFAULT_NEAR_THRESHOLD,
                        help="max pHash Hamming distance of near duplicates (default %(default)s)")
    parser.add_argument("--no-near", action="store_true",
                        help="only identical images count as the same image")
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder the image paths are relative to, in IN and (unchanged) in OUT; default: "
                             "IN's folder, the paths then rewritten relative to OUT's folder")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="allow image paths outside the image root")
    add_hash_arguments(parser)
    args = parser.parse_args(argv)
    try:
        hasher = hasher_from_args(args, args.input)
        n_in, n_out, report = dedup_file(
            args.input, args.out, args.task, report_path=args.report,
            near_threshold=None if args.no_near else args.near_threshold,
            image_root=args.image_root, allow_outside_root=args.allow_outside_root,
            hasher=hasher, keep_report=False,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.input}: {n_in} rows in, {n_out} rows out -> {args.out}")
    if isinstance(report, list):
        counts = Counter((e["action"], e["reason"]) for e in report)
        n_dropped_captions = sum(len(e.get("dropped_captions", [])) for e in report)
    else:
        n_dropped_captions = report.pop("dropped_captions", 0)
        counts = report
    for (action, reason), n in sorted(counts.items()):
        print(f"  {action} ({reason}): {n}")
    print(f"  images: {hasher.stats['hashed']} hashed, {hasher.stats['cached']} from the cache or hash files "
          f"({hasher.mode} mode)")
    if n_dropped_captions:
        print(f"  captions not repeated in merged records (listed in the report): {n_dropped_captions}")
    if args.report:
        print(f"report: {args.report}")
    if args.image_root:
        print(f"image paths in {args.out} are relative to {args.image_root}: give its readers "
              f"--image-root {args.image_root}")
    return 0
