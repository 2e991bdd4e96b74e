"""Split a data set by image, so that no image (or near duplicate of one) is in two splits; and check for leakage.

    python -m data_tools split data/dedup.jsonl --out-dir data --ratios 0.8,0.1,0.1 --seed 0
    python -m data_tools check-leakage data/train.jsonl data/val.jsonl data/test.jsonl

Split: rows are grouped by image, identical and near-duplicate images joining one group (the grouping of
`dedup`). The groups, in order of first appearance, are shuffled with a generator seeded by --seed, then
laid end to end and cut by ROW count at the ratios: a group goes to the split in which its middle row
falls. Each split is thus within one group's size of its share of the rows, and the same input and seed
always give byte-identical files. Rows keep their input order inside a split; a row without image is a
group of its own. Image paths are rewritten relative to --out-dir, which must therefore contain the images.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .dedup import hash_rows, image_field, read_rows, rebase_image, resolve_images
from .errors import DataError
from .hashing import DEFAULT_NEAR_THRESHOLD, colours_match, hash_images, near_pairs
from .jsonl import write_jsonl
from .records import TASKS

DEFAULT_NAMES = ("train", "val", "test")


def assign_groups(group_sizes: list[int], ratios: list[float], seed: int) -> list[int]:
    """Split index for each group: shuffle groups with the seed, then cut the row count at the ratios."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if len(ratios) == 0 or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios.tolist()}")
    bounds = np.cumsum(ratios / ratios.sum()) * sum(group_sizes)
    order = np.random.default_rng(seed).permutation(len(group_sizes))
    assignment = [0] * len(group_sizes)
    start = 0
    for g in order.tolist():
        middle = start + group_sizes[g] / 2
        # searchsorted: the first split whose upper bound lies beyond the group's middle row.
        assignment[g] = min(int(np.searchsorted(bounds, middle, side="right")), len(ratios) - 1)
        start += group_sizes[g]
    return assignment


def split_records(groups: list[int | None], ratios: list[float], seed: int) -> list[int]:
    """Split index for each row, given each row's image group id (None: a group of its own; see `dedup.hash_rows`)."""
    group_of_row = [g if g is not None else ("row", i) for i, g in enumerate(groups)]
    ids = list(dict.fromkeys(group_of_row))  # first-appearance order, so the result depends only on the input
    index = {g: k for k, g in enumerate(ids)}
    sizes = [0] * len(ids)
    for g in group_of_row:
        sizes[index[g]] += 1
    per_group = assign_groups(sizes, ratios, seed)
    return [per_group[index[g]] for g in group_of_row]


def split_file(
    path,
    out_dir,
    ratios: list[float],
    *,
    seed: int,
    names: list[str] | None = None,
    task: str | None = None,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    allow_outside_root: bool = False,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Split a JSONL file into out_dir/<name>.jsonl; return {name: (rows, distinct images)}."""
    names = list(names or DEFAULT_NAMES[: len(ratios)])
    if len(names) != len(ratios) or len(set(names)) != len(names):
        raise ValueError(f"need {len(ratios)} distinct split names for ratios {ratios}, got {names}")
    path, out_dir = Path(path), Path(out_dir)
    rows = read_rows(path, task)
    images = resolve_images(rows, path.parent, path, allow_outside_root=allow_outside_root)
    _, groups = hash_rows(images, near_threshold, progress=progress, rows=rows, path=path)
    split_of = split_records(groups, ratios, seed)
    counts = {}
    for k, name in enumerate(names):
        chosen = [i for i, s in enumerate(split_of) if s == k]
        records = []
        for i in chosen:
            line, record = rows[i]
            try:
                records.append(rebase_image(record, path.parent, out_dir, allow_outside_root=allow_outside_root))
            except DataError as e:
                raise e.at(path=path, line=line) from None
        write_jsonl(out_dir / f"{name}.jsonl", records)
        counts[name] = (len(chosen), len({images[i] for i in chosen if images[i] is not None}))
    return counts


def find_leaks(paths, *, near_threshold: int | None = DEFAULT_NEAR_THRESHOLD, allow_outside_root: bool = False, progress: bool = True) -> list[dict]:
    """Images shared by two files, exactly or as near duplicates: one entry per pair of images in two files.

    Each entry gives both files, the first line at which each image appears in its file, both image
    paths as written, and the pHash Hamming distance (0 and "exact": true for identical content).
    """
    paths = [Path(p) for p in paths]
    # first[(file index, absolute image)] = (line, image as written): one entry per image and file.
    first: dict[tuple[int, Path], tuple[int, str]] = {}
    for f, path in enumerate(paths):
        rows = read_rows(path)
        for (line, record), image in zip(rows, resolve_images(rows, path.parent, path, allow_outside_root=allow_outside_root)):
            if image is not None:
                first.setdefault((f, image), (line, image_field(record)))
    hashes = hash_images([image for _, image in first], progress=progress)
    # Identical files under different names are one content.
    contents = list(dict.fromkeys(h.content for h in hashes.values()))
    content_index = {c: k for k, c in enumerate(contents)}
    rep = {}
    for image, h in hashes.items():
        rep.setdefault(h.content, h)
    where = defaultdict(list)  # content index -> [(file index, absolute image)]
    for f, image in first:
        where[content_index[hashes[image].content]].append((f, image))

    pairs = [(k, k, 0) for k in range(len(contents))]  # a content against itself: exact leaks
    if near_threshold is not None and near_threshold >= 0:
        ii, jj, dd = near_pairs([rep[c].phash for c in contents], near_threshold)
        pairs += [
            (a, b, d)
            for a, b, d in zip(ii.tolist(), jj.tolist(), dd.tolist())
            if colours_match(rep[contents[a]].colours, rep[contents[b]].colours)
        ]
    leaks = []
    for a, b, d in pairs:
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
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.8,0.1,0.1, got {text!r}") from None
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise argparse.ArgumentTypeError(f"ratios must be non-negative with a positive sum, got {text!r}")
    return ratios


def _near_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, help="max pHash Hamming distance of near duplicates (default %(default)s)")
    parser.add_argument("--no-near", action="store_true", help="only identical images count as the same image")
    parser.add_argument("--allow-outside-root", action="store_true", help="allow image paths outside the JSONL file's folder")


def main_split(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools split", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="IN", help="clean (ideally deduplicated) JSONL file")
    parser.add_argument("--out-dir", required=True, help="folder for <name>.jsonl per split; it must contain the images")
    parser.add_argument("--ratios", type=_ratios, default=[0.8, 0.1, 0.1], help="row shares, normalised to sum 1 (default 0.8,0.1,0.1)")
    parser.add_argument("--names", help="comma-separated split names (default train,val,test)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--task", choices=TASKS, help="validate rows against this task's schema and write them canonical")
    _near_arguments(parser)
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if names is None and len(args.ratios) > len(DEFAULT_NAMES):
        parser.error(f"--names is needed for {len(args.ratios)} ratios")
    if names is not None and len(names) != len(args.ratios):
        parser.error(f"--names has {len(names)} names for {len(args.ratios)} ratios")
    try:
        counts = split_file(
            args.input, args.out_dir, args.ratios, seed=args.seed, names=names, task=args.task,
            near_threshold=None if args.no_near else args.near_threshold, allow_outside_root=args.allow_outside_root,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(rows for rows, _ in counts.values())
    for name, (rows, images) in counts.items():
        share = rows / total if total else 0.0
        print(f"{name}: {rows} rows ({share:.1%}), {images} images -> {Path(args.out_dir) / (name + '.jsonl')}")
        if rows == 0:
            print(f"warning: split {name!r} is empty", file=sys.stderr)
    return 0


def main_check_leakage(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools check-leakage",
        description="Exit 1 when an image, or a near duplicate of it, appears in two of the files; 0 otherwise.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="two or more JSONL files (splits)")
    _near_arguments(parser)
    args = parser.parse_args(argv)
    if len({Path(f).resolve() for f in args.files}) < 2:
        parser.error("give at least two different files")
    try:
        leaks = find_leaks(args.files, near_threshold=None if args.no_near else args.near_threshold, allow_outside_root=args.allow_outside_root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not leaks:
        print(f"no leakage across {len(args.files)} files")
        return 0
    for e in leaks:
        kind = "identical" if e["exact"] else f"near duplicate, hamming {e['hamming']}"
        print(f"{e['file_a']}:{e['line_a']} <-> {e['file_b']}:{e['line_b']}  {e['image_a']} <-> {e['image_b']}  ({kind})")
    n_exact = sum(e["exact"] for e in leaks)
    print(f"LEAKAGE: {len(leaks)} image pairs in two files ({n_exact} identical, {len(leaks) - n_exact} near duplicates)")
    return 1
