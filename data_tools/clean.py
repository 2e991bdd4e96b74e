"""`validate` and `clean`: check every row of a JSONL file and every image it names.

Image paths in a record are relative to the image root: `image_root` / `--image-root`, by default the
JSONL file's own folder. clean keeps the valid rows (canonical form) and writes every dropped row to
the rejects file with its line number and reason, so that kept + rejected = input rows, always. Blank
lines are not rows; a file with none is an error (`empty_file`).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from .errors import BAD_VALUE, DUPLICATE_ID, EMPTY_FILE, MISSING_IMAGE, UNREADABLE_FILE, DataError
from .files import check_outputs, replaced_together
from .images import MAX_PIXELS, MIN_SIDE, ImagePathResolver, check_image, load_image, relative_image_path
from .jsonl import JsonlWriter, iter_rows
from .records import TASKS, check_reserved, normalize_record, other_task_hint


@dataclass
class CleanReport:
    rows: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        lines = [f"{'reason':<22} {'rows':>8}", f"{'-' * 22} {'-' * 8}", f"{'kept':<22} {self.kept:>8}"]
        lines += [f"{reason:<22} {n:>8}" for reason, n in self.rejected.most_common()]
        lines += [f"{'-' * 22} {'-' * 8}", f"{'input rows':<22} {self.rows:>8}"]
        return "\n".join(lines)


def _image_root(path: Path, image_root, root) -> Path:
    if image_root is not None and root is not None and Path(image_root) != Path(root):
        raise ValueError("give image_root or its older name root, not both")
    given = image_root if image_root is not None else root
    if given is None:
        return path.parent
    if not Path(given).is_dir():
        raise DataError(UNREADABLE_FILE, "the image root is not a folder", path=given)
    return Path(given)


def check_rows(
    path: str | os.PathLike,
    task: str,
    *,
    image_root: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    check_images: bool | str = True,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
    outside_root_flag: str | None = None,
    reserved: tuple[str, ...] = (),
) -> Iterator[tuple[int, dict | DataError, bytes]]:
    """Yield `(line, canonical_record_or_error, raw_line)` for every row; records get `image` made absolute.

    `image_root` is the folder the records' image paths are relative to (default None: the file's own
    folder; `root` is its older name). `check_images`: "decode" (or True) decodes every image, "header"
    only checks its header, size and end (`images.check_image`, fast), "none" (or False) opens none.
    `outside_root_flag` is the caller's option that permits paths outside it, named in the reject message
    (None: no option is named). The file is JSONL, or one JSON list of rows (then errors also name the
    row's index, as the field `[i].<field>`: several rows can start on one line). Each distinct image is
    checked once, however many rows name it. For vqa, a
    row without a `question_id` gets `"<file name>:<line>"`, and a question id used twice (`1` and `"1"`
    count as the same) is an error naming both lines. `reserved`: strings no text field may hold (a model's
    special tokens, `records.check_reserved`). A missing or unreadable file raises `DataError`.
    """
    for line, row, raw, _ in _check_rows(
            path, task, image_root=image_root, root=root, allow_outside_root=allow_outside_root,
            check_images=check_images, min_side=min_side, max_pixels=max_pixels, progress=progress,
            outside_root_flag=outside_root_flag, reserved=reserved):
        yield line, row, raw


def _check_rows(path, task, *, image_root=None, root=None, allow_outside_root=False, check_images=True,
                min_side=MIN_SIDE, max_pixels=MAX_PIXELS, progress=True, outside_root_flag=None, reserved=()):
    """`check_rows`, also yielding each record's image path relative to the image root (None if none; a list
    for a row with several images)."""
    path = Path(path)
    image_root = _image_root(path, image_root, root)
    if check_images not in (True, False, "decode", "header", "none"):
        raise ValueError(f"check_images={check_images!r}: expected 'decode', 'header' or 'none'.")
    check = {True: load_image, "decode": load_image, "header": check_image}.get(check_images)
    resolve = ImagePathResolver(image_root, allow_outside_root=allow_outside_root, flag=outside_root_flag)
    image_errors: dict[str, tuple[str, str] | None] = {}  # checked image -> None or (reason, message)
    question_ids: dict[str, tuple[int, int | str]] = {}
    # Progress only on a terminal: in a log or a pipe its lines would bury the messages that matter.
    for line, row, raw, item in tqdm(iter_rows(path), desc=f"checking {path.name}", unit=" rows",
                                     disable=None if progress else True):
        if isinstance(row, DataError):
            if item is not None and not (row.field or "").startswith(item):
                row.field = item + (f".{row.field}" if row.field else "")
                row.at()
            yield line, row, raw, None
            continue
        rel = None
        try:
            record = normalize_record(row, task)
            check_reserved(record, task, reserved)
            if task == "vqa":
                if "question_id" not in record:
                    record["question_id"] = f"{path.name}:{line}" if item is None else f"{path.name}{item}"
                qid = record["question_id"]
                if str(qid) in question_ids:
                    first_line, first = question_ids[str(qid)]
                    raise DataError(DUPLICATE_ID,
                                    f"question_id {qid!r} is already used at line {first_line} ({first!r}); "
                                    "question ids must be unique, and 1 and '1' are the same id",
                                    field="question_id")
            for key in ("image", "images"):
                if key not in record:
                    continue
                names = record[key] if key == "images" else [record[key]]
                rels, paths = [], []
                for i, name in enumerate(names):
                    where = f"images[{i}]" if key == "images" else "image"
                    rels.append(relative_image_path(name, allow_outside_root=allow_outside_root,
                                                    flag=outside_root_flag))
                    image_path = str(resolve(name))
                    if check is not None:
                        if image_path not in image_errors:
                            try:
                                check(image_path, max_pixels=max_pixels, min_side=min_side)
                                image_errors[image_path] = None
                            except DataError as e:
                                # Not the error itself (~2.5 KB): a wrong image root fails millions of images.
                                image_errors[image_path] = (e.reason, e.message)
                        if image_errors[image_path] is not None:
                            reason, message = image_errors[image_path]
                            hint, posix = "", name.replace("\\", "/")
                            if reason == MISSING_IMAGE and posix != name:  # written on Windows
                                hint = f"; a backslash is not a folder separator here: write {posix!r}"
                            raise DataError(reason, f"{name!r}: {message}{hint}", field=where)
                    paths.append(image_path)
                record[key] = paths if key == "images" else paths[0]
                rel = rels if key == "images" else rels[0]
            if task == "vqa":
                question_ids[str(record["question_id"])] = (line, record["question_id"])
        except DataError as e:
            if item is not None:
                e.field = item + (f".{e.field}" if e.field else "")
            yield line, e.at(path=path, line=line), raw, None
            continue
        yield line, record, raw, rel


def no_rows_error(path: str | os.PathLike) -> DataError:
    """The error for a file with no rows: an empty file is more likely a wrong path or a failed export
    than a valid data set."""
    return DataError(EMPTY_FILE, "has no rows (blank lines are not rows); is it the right file?", path=path)


def validate(path: str | os.PathLike, task: str, **kwargs) -> list[DataError]:
    """Every problem in a JSONL file, one `DataError` per bad row (empty list: the file is valid).
    Takes `check_rows`'s keyword arguments (`image_root`, ...). A file with no rows raises `DataError`."""
    n_rows, errors = 0, []
    for _, row, _ in check_rows(path, task, **kwargs):
        n_rows += 1
        if isinstance(row, DataError):
            errors.append(row)
    if not n_rows:
        raise no_rows_error(path)
    return errors


def missing_image_hint(reasons: Iterable[str], n_rows: int, path: str | os.PathLike,
                       image_root: str | os.PathLike | None, flag: str) -> str:
    """A sentence for the report of a file's bad rows when all of its `n_rows` checked rows, or more than
    half and at least 2, miss their image (`reasons`: one reason code per bad row); else "".

    Then the image root is the likely mistake, not the rows: `clean` or skipping bad rows would drop them
    all. The sentence names the folder the paths were resolved against and the caller's option `flag`
    that sets it (`--image-root` for the data tools, `--image_root` for the recipes)."""
    n_missing = sum(reason == MISSING_IMAGE for reason in reasons)
    most = n_missing >= 2 and 2 * n_missing > n_rows
    if not n_missing or not (n_missing == n_rows or most):
        return ""
    root = Path(image_root if image_root is not None else Path(path).parent).resolve()
    default = "" if image_root is not None else f" (by default the folder of {Path(path).name})"
    return (f" {n_missing} of {n_rows} rows name an image file that does not exist. Image paths are resolved "
            f"against the image root {root}{default}: if the images are in another folder, pass {flag} "
            "with the folder they are relative to, instead of dropping the rows.")


def output_prefix(in_path: str | os.PathLike, out_path: str | os.PathLike) -> str | None:
    """How image paths relative to the input's folder are rewritten for an output file in another folder:
    None (same folder: unchanged) or the prefix that leads from the output's folder to the input's.

    Raises `DataError` when the output's folder is not the input's or above it: its paths would have to
    climb out with '..', which readers refuse.
    """
    in_dir, out_dir = Path(in_path).resolve().parent, Path(out_path).resolve().parent
    if in_dir == out_dir:
        return None
    prefix = Path(os.path.relpath(in_dir, out_dir)).as_posix()
    if prefix == ".." or prefix.startswith("../"):
        raise DataError(BAD_VALUE, f"is not in {in_dir} or a folder above it, so the image paths of the rows "
                        "(relative to the input's folder) cannot be written relative to it; write it there, "
                        "or give an image root that its readers will be given too", path=out_path)
    return prefix


def clean(
    in_path: str | os.PathLike, task: str, out_path: str | os.PathLike, rejects_path: str | os.PathLike,
    *, image_root: str | os.PathLike | None = None, root: str | os.PathLike | None = None, **kwargs
) -> CleanReport:
    """Write the valid rows to `out_path` and every dropped row, with its line and reason, to
    `rejects_path`. Takes `check_rows`'s keyword arguments.

    Kept image paths stay relative to the image root. With no `image_root` that is the input's folder,
    so an output in another folder gets them rewritten (`output_prefix`), or a `DataError` when they
    cannot be. Both outputs are written atomically: readers see the old file or the whole new one.
    """
    check_outputs({"the output": out_path, "the rejects file": rejects_path}, inputs=[in_path])
    given_root = image_root if image_root is not None else root
    prefix = output_prefix(in_path, out_path) if given_root is None else None
    report = CleanReport()
    with replaced_together() as both, JsonlWriter(out_path, together=both) as kept, \
            JsonlWriter(rejects_path, together=both) as rejects:
        for _, row, raw, rel in _check_rows(in_path, task, image_root=given_root, **kwargs):
            report.rows += 1
            if isinstance(row, DataError):
                report.rejected[row.reason] += 1
                rejects.write({**row.to_dict(), "raw": raw.decode("utf-8", errors="backslashreplace")})
                continue
            if rel is not None:
                rebased = [r if prefix is None or os.path.isabs(r)
                           else posixpath.normpath(posixpath.join(prefix, r))
                           for r in (rel if isinstance(rel, list) else [rel])]
                if isinstance(rel, list):
                    row["images"] = rebased
                else:
                    row["image"] = rebased[0]
            kept.write(row)
        if not report.rows:
            raise no_rows_error(in_path)  # before the outputs replace anything
    report.kept = kept.count
    assert report.kept + sum(report.rejected.values()) == report.rows
    return report


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--image-root", "--root", dest="image_root", metavar="DIR",
                   help="folder the records' image paths are relative to (default: the JSONL file's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept absolute paths, '..' above the image root, and symlinked files pointing "
                        "outside it")
    p.add_argument("--check-images", choices=("decode", "header", "none"), default="decode",
                   help="decode every image (default), check only its header, size and end (fast: what "
                        "the recipes check by default), or open none")
    p.add_argument("--no-check-images", dest="check_images", action="store_const", const="none",
                   help="the same as --check-images none")
    p.add_argument("--min-side", type=int, default=MIN_SIDE, help="reject images with a side below this (px)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="reject images above this many pixels (decompression-bomb guard)")
    p.add_argument("--reserved", action="append", default=[], metavar="STR", type=_reserved_string,
                   help="reject rows whose text holds this string, e.g. a model's special token ('</s>'), "
                        "which its tokenizer reads as a control token, not as text; repeat for several")


def _reserved_string(value: str) -> str:
    if not value:  # e.g. an unset shell variable: every row would be rejected
        raise argparse.ArgumentTypeError("an empty string, which every text holds; give the string to "
                                         "refuse, e.g. '</s>'")
    return value


def reserved_flags(strings) -> str:
    """' --reserved S' for each string, quoted for a shell."""
    return "".join(f" --reserved {shlex.quote(s)}" for s in strings)


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
        check_images=args.check_images,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        outside_root_flag="--allow-outside-root",
        reserved=tuple(args.reserved),
    )


def user_errors(main):
    """Wrap a CLI `main(argv) -> int`: a user-input error (`DataError`, `OSError`) prints one line to
    stderr and returns 2, instead of a traceback. Other exceptions are bugs and still raise."""

    def wrapped(argv: list[str]) -> int:
        try:
            return main(argv)
        except (DataError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; outputs were not replaced", file=sys.stderr)
            return 130

    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped


@user_errors
def main_validate(argv: list[str]) -> int:
    """`python -m data_tools validate`: exit 1 if any row is invalid, 2 on a file that cannot be read."""
    p = argparse.ArgumentParser(prog="python -m data_tools validate",
                                description="Exit non-zero if any row is invalid.")
    _add_common(p)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    n_bad = 0
    for f in args.files:
        # Read to the end first: a file that cannot be read is one error, with no row errors before it.
        # The row errors wait in a temp file: a wrong --image-root makes every one of millions of rows bad.
        first, n_valid, reasons = None, 0, Counter()
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace") as errors:
            for _, row, raw in check_rows(f, args.task, **_kwargs(args)):
                if isinstance(row, DataError):
                    first = first or (row, raw)
                    reasons[row.reason] += 1
                    errors.write(f"{row}\n")
                else:
                    n_valid += 1
            errors.seek(0)
            shutil.copyfileobj(errors, sys.stderr)
        n_errors = sum(reasons.values())
        if not n_errors and not n_valid:
            raise no_rows_error(f)
        n_bad += n_errors
        if first and not n_valid and (hint := other_task_hint(first[1], first[0].line, args.task)):
            print(f"{f}: no valid row.{hint}", file=sys.stderr)
        hint = missing_image_hint(reasons.elements(), n_errors + n_valid, f, args.image_root, "--image-root")
        if hint:
            print(f"{f}:{hint}", file=sys.stderr)
    if n_bad:
        root = f" --image-root {args.image_root}" if args.image_root else ""
        root += reserved_flags(args.reserved)
        print(f"{n_bad} invalid row(s). Drop them with: python -m data_tools clean --task {args.task}{root} "
              "IN --out OUT --rejects REJECTS", file=sys.stderr)
        return 1
    print(f"all rows valid ({', '.join(args.files)})")
    return 0


@user_errors
def main_clean(argv: list[str]) -> int:
    """`python -m data_tools clean`: keep the valid rows, write every dropped row with its reason."""
    p = argparse.ArgumentParser(prog="python -m data_tools clean",
                                description="Keep valid rows; write every dropped row with its reason.")
    _add_common(p)
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)
    args = p.parse_args(argv)
    check_outputs({"--out": args.out, "--rejects": args.rejects}, inputs=[args.input])
    if args.image_root is None:
        try:
            output_prefix(args.input, args.out)
        except DataError as e:
            print(f"error: {e.path}: is not in the input's folder or a folder above it, so the rows' image "
                  f"paths cannot be rewritten for it; write it there, or pass --image-root "
                  f"{Path(args.input).parent or '.'} (and give readers of {e.path} the same --image-root)",
                  file=sys.stderr)
            return 2
    report = clean(args.input, args.task, args.out, args.rejects, **_kwargs(args))
    print(report.summary())
    print(f"kept {report.kept} -> {args.out}; rejected {report.rows - report.kept} -> {args.rejects}")
    hint = missing_image_hint(report.rejected.elements(), report.rows, args.input, args.image_root,
                              "--image-root")
    if hint:
        print(f"warning: {args.input}:{hint}", file=sys.stderr)
    if args.image_root:
        print(f"image paths in {args.out} are relative to {args.image_root}: give its readers "
              f"--image-root {args.image_root}")
    return 0
