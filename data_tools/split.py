"""Split a data set by image, so that no image (or near duplicate of one) is in two splits; and check \
for leakage.

    python -m data_tools split data/dedup.jsonl --out-dir data --ratios 0.8,0.1,0.1 --seed 0
    python -m data_tools check-leakage data/train.jsonl data/val.jsonl data/test.jsonl

Split: rows are grouped by image, identical and near-duplicate images joining one group, and near
duplicates chain: a~b and b~c put a, b and c in one group even when a and c are far apart (frames of a
video), which is the safe side against leakage (`dedup` merges a row only into a kept image near it). The
groups, in order of first appearance, are shuffled with a generator seeded by --seed, then laid end to end
and cut by ROW count at the ratios: a group goes to the split in which its middle row falls. Each split is
thus within one group's size of its share of the rows, and the same input and seed always give
byte-identical files. Rows keep their input order inside a split; a row without image is a group of its
own. An output that is the input (IN given as OUT_DIR/train.jsonl) is refused before any work.

Image paths are relative to the image root, `--image-root` (default: each JSONL file's folder). With
`--image-root` the splits keep them as they are; without it they are rewritten relative to --out-dir, which
must then hold them (rewritten by the paths' text, as `clean` does: symlinks inside are not followed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .dedup import group_rows, image_field, iter_images, rebase_image, scan_rows
from .errors import DataError
from .files import check_outputs, replaced_together
from .hashes import (ImageHasher, add_hash_arguments, default_cache, group_images, hamming_threshold,
                     hasher_from_args)
from .hashing import DEFAULT_NEAR_THRESHOLD
from .jsonl import JsonlWriter
from .records import TASKS

DEFAULT_NAMES = ("train", "val", "test")


def assign_groups(group_sizes: list[int], ratios: list[float], seed: int) -> list[int]:
    """Split index for each group: shuffle groups with the seed, then cut the row count at the ratios."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if len(ratios) == 0 or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios.tolist()}")
    sizes = np.asarray(group_sizes, dtype=np.int64)
    bounds = np.cumsum(ratios / ratios.sum()) * int(sizes.sum())
    order = np.random.default_rng(seed).permutation(len(sizes))
    ordered = sizes[order]
    # The group's middle row: rows before it in the shuffled order, plus half its own.
    middle = (np.cumsum(ordered) - ordered) + ordered / 2
    # searchsorted: the first split whose upper bound lies beyond the group's middle row.
    assignment = np.empty(len(sizes), np.int64)
    assignment[order] = np.minimum(np.searchsorted(bounds, middle, side="right"), len(ratios) - 1)
    return assignment.tolist()


def split_records(groups: list[int | None], ratios: list[float], seed: int) -> list[int]:
    """Split index for each row, given each row's image group id (None: a group of its own; see
    `dedup.group_rows`)."""
    group_of_row = [g if g is not None else ("row", i) for i, g in enumerate(groups)]
    ids = list(dict.fromkeys(group_of_row))  # first-appearance order, so the result depends only on the input
    index = {g: k for k, g in enumerate(ids)}
    sizes = [0] * len(ids)
    for g in group_of_row:
        sizes[index[g]] += 1
    per_group = assign_groups(sizes, ratios, seed)
    return [per_group[index[g]] for g in group_of_row]


def split_rows(group: np.ndarray, ratios: list[float], seed: int) -> np.ndarray:
    """`split_records` for a group array in which a group id is its first row and -1 a row without image."""
    rows = np.arange(len(group))
    first = np.where(group >= 0, group, rows)  # a row without image is a group of its own
    # Group ids are first rows, so sorting them gives first-appearance order.
    ids, inverse, sizes = np.unique(first, return_inverse=True, return_counts=True)
    per_group = np.asarray(assign_groups(sizes, ratios, seed), np.int64)
    return per_group[inverse.ravel()]


def split_file(
    path,
    out_dir,
    ratios: list[float],
    *,
    seed: int,
    names: list[str] | None = None,
    task: str | None = None,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    image_root=None,
    allow_outside_root: bool = False,
    progress: bool = True,
    hasher: ImageHasher | None = None,
) -> dict[str, tuple[int, int]]:
    """Split a JSONL file into out_dir/<name>.jsonl; return {name: (rows, distinct images)}.

    Rows stream through two passes (scan, write), so memory holds the image hashes and a few numbers per row.
    `hasher` defaults to fast hashes with the cache next to the file (see `data_tools.hashes`).
    Image paths are relative to `image_root`. Given, the splits keep them as they are; by default (None: the
    input's folder) they are rewritten relative to `out_dir`.
    """
    names = list(names or DEFAULT_NAMES[: len(ratios)])
    if len(names) != len(ratios) or len(set(names)) != len(names):
        raise ValueError(f"need {len(ratios)} distinct split names for ratios {ratios}, got {names}")
    path, out_dir = Path(path), Path(out_dir)
    hasher = hasher or ImageHasher(cache=default_cache(path), progress=progress)
    # Before any work: IN given as out_dir/train.jsonl would be replaced by the train split.
    outputs = {f"the {name!r} split": out_dir / f"{name}.jsonl" for name in names}
    check_outputs({**outputs, "the hash cache": hasher.cache_path}, inputs=[path, *hasher.hash_files_read])
    rebase = image_root is None
    scan = scan_rows(path, task, image_root=image_root, allow_outside_root=allow_outside_root,
                     out_folder=out_dir if rebase else None)
    _, _, _, _, group = group_rows(scan, near_threshold, hasher, path)
    split_of = split_rows(group, ratios, seed)
    with replaced_together() as together, ExitStack() as stack:
        writers = [stack.enter_context(JsonlWriter(out_dir / f"{name}.jsonl", together=together))
                   for name in names]
        for i, (line, record, _) in enumerate(iter_images(path, task, resolve=False)):
            try:
                if rebase:
                    record = rebase_image(record, path.parent, out_dir, allow_outside_root=allow_outside_root)
                writers[split_of[i]].write(record)
            except DataError as e:
                raise e.at(path=path, line=line) from None
    counts = {}
    for k, name in enumerate(names):
        chosen = split_of == k
        images = scan.image[chosen]
        counts[name] = (int(chosen.sum()), len(np.unique(images[images >= 0])))
    return counts


def find_leaks(
    paths,
    *,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    image_root=None,
    allow_outside_root: bool = False,
    progress: bool = True,
    hasher: ImageHasher | None = None,
) -> list[dict]:
    """Images shared by two files, exactly or as near duplicates: one entry per pair of images in two files.
    Image paths resolve against `image_root` (default: each file's own folder).

    Each entry gives both files, the first line at which each image appears in its file, both image
    paths as written, and the pHash Hamming distance (0 and "exact": true for identical content).
    """
    paths = [Path(p) for p in paths]
    hasher = hasher or ImageHasher(cache=default_cache(paths[0]), progress=progress)
    check_outputs({"the hash cache": hasher.cache_path}, inputs=[*paths, *hasher.hash_files_read])
    # first[(file index, image index)] = (line, image as written): one entry per image and file.
    first: dict[tuple[int, int], tuple[int, str]] = {}
    image_index: dict[str, int] = {}
    first_use: list[tuple[Path, int]] = []
    for f, path in enumerate(paths):
        rows = iter_images(path, image_root=image_root, allow_outside_root=allow_outside_root)
        for line, record, image in rows:
            if image is not None:
                k = image_index.setdefault(str(image), len(image_index))
                if k == len(first_use):
                    first_use.append((path, line))
                first.setdefault((f, k), (line, image_field(record)))
    images = list(image_index)
    try:
        table, entry = hasher.hash(images)
        grouping = group_images(table, near_threshold, hasher, entry)
    except DataError as e:
        k = image_index.get(e.path) if e.path is not None else None
        if k is not None:
            e.message += f"; first used at {first_use[k][0]}:{first_use[k][1]}"
            e.at()
        raise
    finally:
        hasher.save()
    content = grouping.content  # per image: the first image with the same pixels
    where = defaultdict(list)  # content -> [(file index, image index)]
    for f, k in first:
        where[int(content[k])].append((f, k))

    pairs = {(c, c): 0 for c in where}  # a content against itself: exact leaks
    for a, b, d in zip(grouping.near_i.tolist(), grouping.near_j.tolist(), grouping.near_d.tolist()):
        a, b = sorted((int(content[a]), int(content[b])))
        # Fast hashes of one content can differ a little: keep the nearest pair of images.
        pairs[(a, b)] = min(d, pairs.get((a, b), d))
    leaks = []
    for (a, b), d in pairs.items():
        for fa, image_a in where[a]:
            for fb, image_b in where[b]:
                if fa == fb or (a == b and fa > fb):
                    continue
                if fa > fb:  # name the earlier file first
                    fa, image_a, fb, image_b = fb, image_b, fa, image_a
                line_a, shown_a = first[(fa, image_a)]
                line_b, shown_b = first[(fb, image_b)]
                leaks.append({
                    "file_a": str(paths[fa]), "line_a": line_a, "image_a": shown_a,
                    "file_b": str(paths[fb]), "line_b": line_b, "image_b": shown_b,
                    "hamming": d, "exact": a == b,
                })
    leaks.sort(key=lambda e: (e["file_a"], e["line_a"], e["file_b"], e["line_b"]))
    return leaks


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers such as 0.8,0.1,0.1, "
                                         f"got {text!r}") from None
    if not all(math.isfinite(r) and r >= 0 for r in ratios) or not 0 < sum(ratios) < math.inf:
        raise argparse.ArgumentTypeError(f"ratios must be finite, non-negative, with a positive sum, "
                                         f"got {text!r}")
    return ratios


def _near_arguments(parser: argparse.ArgumentParser, image_root_help: str) -> None:
    parser.add_argument("--near-threshold", type=hamming_threshold, default=DEFAULT_NEAR_THRESHOLD,
                        help="max pHash Hamming distance of near duplicates (default %(default)s)")
    parser.add_argument("--no-near", action="store_true",
                        help="only identical images count as the same image")
    parser.add_argument("--image-root", metavar="DIR", help=image_root_help)
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="allow image paths outside the image root")
    add_hash_arguments(parser)


def main_split(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools split", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="IN", help="clean (ideally deduplicated) JSONL file")
    parser.add_argument("--out-dir", required=True,
                        help="folder for <name>.jsonl per split; without --image-root it must contain "
                             "the images")
    parser.add_argument("--ratios", type=_ratios, default=[0.8, 0.1, 0.1],
                        help="row shares, normalised to sum 1 (default 0.8,0.1,0.1)")
    parser.add_argument("--names", help="comma-separated split names (default train,val,test)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--task", choices=TASKS,
                        help="validate rows against this task's schema and write them canonical")
    _near_arguments(parser, "folder the image paths are relative to, in IN and (unchanged) in the splits; "
                    "default: IN's folder, the paths then rewritten relative to --out-dir")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if names is None and len(args.ratios) > len(DEFAULT_NAMES):
        parser.error(f"--names is needed for {len(args.ratios)} ratios")
    if names is not None and len(names) != len(args.ratios):
        parser.error(f"--names has {len(names)} names for {len(args.ratios)} ratios")
    for name in names or ():  # each is a file name in --out-dir
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            parser.error(f"--names: {name!r} is not a file name (each split is written to "
                         "--out-dir/<name>.jsonl)")
    try:
        counts = split_file(
            args.input, args.out_dir, args.ratios, seed=args.seed, names=names, task=args.task,
            near_threshold=None if args.no_near else args.near_threshold,
            image_root=args.image_root, allow_outside_root=args.allow_outside_root,
            hasher=hasher_from_args(args, args.input),
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(rows for rows, _ in counts.values())
    for name, (rows, images) in counts.items():
        share = rows / total if total else 0.0
        print(f"{name}: {rows} rows ({share:.1%}), {images} images "
              f"-> {Path(args.out_dir) / (name + '.jsonl')}")
        if rows == 0:
            print(f"warning: split {name!r} is empty", file=sys.stderr)
    if args.image_root:
        print(f"image paths in the splits are relative to {args.image_root}: give their readers "
              f"--image-root {args.image_root}")
    return 0


def main_check_leakage(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools check-leakage",
        description="Exit 1 when an image, or a near duplicate of it, appears in two of the files; "
                    "0 otherwise.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="two or more JSONL files (splits)")
    _near_arguments(parser, "folder the image paths of every FILE are relative to "
                    "(default: each file's own folder)")
    args = parser.parse_args(argv)
    if len({Path(f).resolve() for f in args.files}) < 2:
        parser.error("give at least two different files")
    try:
        leaks = find_leaks(
            args.files, near_threshold=None if args.no_near else args.near_threshold,
            image_root=args.image_root, allow_outside_root=args.allow_outside_root,
            hasher=hasher_from_args(args, args.files[0], inputs=args.files),
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not leaks:
        print(f"no leakage across {len(args.files)} files")
        return 0
    for e in leaks:
        kind = "identical" if e["exact"] else f"near duplicate, hamming {e['hamming']}"
        print(f"{e['file_a']}:{e['line_a']} <-> {e['file_b']}:{e['line_b']}  "
              f"{e['image_a']} <-> {e['image_b']}  ({kind})")
    n_exact = sum(e["exact"] for e in leaks)
    print(f"LEAKAGE: {len(leaks)} image pairs in two files "
          f"({n_exact} identical, {len(leaks) - n_exact} near duplicates)")
    return 1
