"""`validate` and `clean`: check every row of a JSONL file and every image it names.

clean keeps the valid rows (canonical form, image paths rewritten relative to the output file) and
writes every dropped row to the rejects file with its line number and reason, so that
kept + rejected = input rows, always. Blank lines are not rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .errors import DataError
from .images import MAX_PIXELS, MIN_SIDE, load_image, resolve_image_path
from .jsonl import JsonlWriter, iter_rows
from .records import TASKS, normalize_record


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


def check_rows(
    path: str | os.PathLike,
    task: str,
    *,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    check_images: bool = True,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
) -> Iterator[tuple[int, dict | DataError, bytes]]:
    """Yield `(line, canonical_record_or_error, raw_line)` for every row; records get `image` made absolute.

    The file is JSONL, or one JSON list of rows (then errors also name the row's index, as the field
    `[i].<field>`: several rows can start on one line). Each distinct image is decoded once, however
    many rows name it.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    image_errors: dict[Path, DataError | None] = {}
    for line, row, raw, item in tqdm(iter_rows(path), desc=f"checking {path.name}", unit=" rows",
                                     disable=not progress):
        if isinstance(row, DataError):
            yield line, row, raw
            continue
        try:
            record = normalize_record(row, task)
            if "image" in record:
                image_path = resolve_image_path(record["image"], root, allow_outside_root=allow_outside_root)
                if check_images:
                    if image_path not in image_errors:
                        try:
                            load_image(image_path, max_pixels=max_pixels, min_side=min_side)
                            image_errors[image_path] = None
                        except DataError as e:
                            image_errors[image_path] = e
                    if image_errors[image_path] is not None:
                        e = image_errors[image_path]
                        raise DataError(e.reason, f"{record['image']!r}: {e.message}", field="image")
                record["image"] = str(image_path)
        except DataError as e:
            if item is not None:
                e.field = item + (f".{e.field}" if e.field else "")
            yield line, e.at(path=path, line=line), raw
            continue
        yield line, record, raw


def validate(path: str | os.PathLike, task: str, **kwargs) -> list[DataError]:
    """Every problem in a JSONL file, one `DataError` per bad row (empty list: the file is valid)."""
    return [row for _, row, _ in check_rows(path, task, **kwargs) if isinstance(row, DataError)]


def clean(
    in_path: str | os.PathLike, task: str, out_path: str | os.PathLike, rejects_path: str | os.PathLike,
    **kwargs
) -> CleanReport:
    """Write the valid rows to `out_path` and every dropped row, with its line and reason, to
    `rejects_path`."""
    out_dir = Path(out_path).resolve().parent
    report = CleanReport()
    with JsonlWriter(out_path) as kept, JsonlWriter(rejects_path) as rejects:
        for _, row, raw in check_rows(in_path, task, **kwargs):
            report.rows += 1
            if isinstance(row, DataError):
                report.rejected[row.reason] += 1
                rejects.write({**row.to_dict(), "raw": raw.decode("utf-8", errors="backslashreplace")})
                continue
            if "image" in row:
                # Paths in our JSONL are relative to the JSONL file, and the output may live elsewhere.
                row["image"] = os.path.relpath(row["image"], out_dir)
            kept.write(row)
    report.kept = kept.count
    assert report.kept + sum(report.rejected.values()) == report.rows
    return report


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--root", help="folder image paths are relative to (default: the JSONL file's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept absolute paths and paths with '..'")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="check the rows only, do not open images")
    p.add_argument("--min-side", type=int, default=MIN_SIDE, help="reject images with a side below this (px)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="reject images above this many pixels (decompression-bomb guard)")


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(
        root=args.root,
        allow_outside_root=args.allow_outside_root,
        check_images=args.check_images,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
    )


def main_validate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools validate",
                                description="Exit non-zero if any row is invalid.")
    _add_common(p)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    n_bad = 0
    for f in args.files:
        for error in validate(f, args.task, **_kwargs(args)):
            print(error, file=sys.stderr)
            n_bad += 1
    if n_bad:
        print(f"{n_bad} invalid row(s). Drop them with: python -m data_tools clean --task {args.task} IN "
              "--out OUT --rejects REJECTS", file=sys.stderr)
        return 1
    print(f"all rows valid ({', '.join(args.files)})")
    return 0


def main_clean(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools clean",
                                description="Keep valid rows; write every dropped row with its reason.")
    _add_common(p)
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)
    args = p.parse_args(argv)
    report = clean(args.input, args.task, args.out, args.rejects, **_kwargs(args))
    print(report.summary())
    print(f"kept {report.kept} -> {args.out}; rejected {report.rows - report.kept} -> {args.rejects}")
    return 0
