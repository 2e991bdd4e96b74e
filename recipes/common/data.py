"""JSONL records -> a `datasets.Dataset` of image paths, checked before the first step with the code of
`python -m data_tools validate` (every image too), so that bad input never stops a run at step N; and the
embedded default data set."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from data_tools.clean import check_rows, missing_image_hint, reserved_flags
from data_tools.errors import RESERVED_TEXT, DataError
from data_tools.jsonl import write_jsonl
from data_tools.records import other_task_hint
from data_tools.split import split_file
from data_tools.synth import make_synthetic

from .cache import build_once, cache_root

# The columns each task's collator reads.
COLUMNS = {
    "caption": ("image", "captions", "line"),
    "vqa": ("image", "question_id", "question", "answers", "answer_type", "question_type", "line"),
    "retrieval": ("image", "captions", "neg_captions"),
    # row: its index in the file (eval keys); line: where it starts (errors found when it is tokenized)
    "instruct": ("image", "images", "conversations", "row", "line"),
}


class BadRowsError(DataError):
    """A data file's invalid rows with `skip_bad_rows` off; its message, which names each row, reads as is."""

    def _format(self) -> str:
        return self.message


def launch_rank(local: bool = False) -> int:
    """This process's rank in its launch (torchrun's RANK; LOCAL_RANK, on its node, with `local`); 0 alone."""
    return int(os.environ.get("LOCAL_RANK" if local else "RANK", "0"))


def load_records(path: str | os.PathLike, task: str, *, image_root: str | os.PathLike | None = None,
                 skip_bad_rows: bool = False, rejects_path: str | os.PathLike | None = None,
                 check_images: str = "header", max_rows: int | None = None,
                 task_flags: dict[str, str] | None = None,
                 reserved: tuple[str, ...] = ()) -> datasets.Dataset:
    """A JSONL file of `task` records as a Dataset with absolute image paths (relative to `image_root`,
    default the file's folder). A bad row is an error naming file, line and field, or with `skip_bad_rows`
    a counted reject written to `rejects_path`; `info.description` says how many. `task_flags`: the
    recipe's option for each other task's records, named when a file holds those. `reserved`: the model's
    special strings, which no text may hold."""
    rows, errors = [], []
    for index, (line, row, raw) in enumerate(check_rows(path, task, image_root=image_root, reserved=reserved,
                                                        check_images=check_images, progress=False)):
        if isinstance(row, DataError):
            errors.append((row, raw))
        else:
            # its index in the file, bad rows counted: instruct eval keys stay put when rows are skipped
            row["row"], row["line"] = index, line
            rows.append({c: row.get(c) for c in COLUMNS[task]})
            if max_rows is not None and len(rows) >= max_rows:
                break
    hint = other_task_hint(errors[0][1], errors[0][0].line, task, task_flags) if errors and not rows else ""
    # Most images missing: a wrong image root, which dropping the rows would not fix.
    hint += missing_image_hint((e.reason for e, _ in errors), len(errors) + len(rows), path, image_root,
                               "--image_root")
    if errors and not skip_bad_rows:
        flags = f" --image-root {image_root}" if image_root is not None else ""
        # the special strings the rows hold, which `clean` is to drop too
        flags += reserved_flags([s for s in reserved if any(
            e.reason == RESERVED_TEXT and f"holds {s!r}" in e.message for e, _ in errors)])
        clean = f"`python -m data_tools clean --task {task}{flags} {path} --out CLEAN --rejects REJECTS`"
        if len(errors) == 1:
            message = (f"{errors[0][0]}; fix it, drop it with {clean}, or pass --skip_bad_rows to skip and "
                       "count it")
        else:
            shown = "\n".join(f"  {e}" for e, _ in errors[:10])
            more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            message = (f"{path}: {len(errors)} invalid row(s):\n{shown}{more}\nFix them, drop them with "
                       f"{clean}, or pass --skip_bad_rows to skip and count them")
        raise BadRowsError(errors[0][0].reason, f"{message}.{hint}", path=path)
    if errors and launch_rank() == 0:  # every process of a launch reads the file: one writes and says so
        rejects_path = Path(rejects_path or f"{path}.rejects.jsonl")
        write_jsonl(rejects_path,
                    ({**e.to_dict(), "raw": raw.decode("utf-8", "backslashreplace")} for e, raw in errors))
        print(f"{path}: skipped {len(errors)} invalid row(s) of {len(errors) + len(rows)}; reasons in "
              f"{rejects_path}" + (f".{hint}" if hint else ""))
    elif rejects_path is not None and launch_rank() == 0:  # an earlier run's, in the same output_dir
        Path(rejects_path).unlink(missing_ok=True)
    if not rows:
        raise DataError("empty", f"has no valid rows.{hint}", path=path)
    if task == "vqa" and len({type(r["question_id"]) for r in rows}) > 1:
        for r in rows:  # Arrow needs one type per column.
            r["question_id"] = str(r["question_id"])
    ds = datasets.Dataset.from_list(rows)
    ds.info.description = f"{path}: {len(rows)} rows, {len(errors)} skipped"
    return ds


def embedded_dataset(task: str, *, n: int = 1000, lang: str = "en", seed: int = 0,
                     image_size: int = 64) -> dict[str, Path]:
    """{"train", "val", "test": path}: synthetic shapes data for `task`, split by image 80/10/10, built on
    first use into a folder named by every parameter."""
    folder = cache_root() / "data" / f"{task}-{lang}-n{n}-s{seed}-px{image_size}"

    def build(tmp: Path) -> None:
        source = make_synthetic(task, n, tmp, lang=lang, seed=seed, image_size=image_size, progress=False)
        split_file(source, tmp, ratios=(0.8, 0.1, 0.1), names=("train", "val", "test"), seed=seed, task=task,
                   progress=False)

    build_once(folder, build, marker="test.jsonl")
    return {name: folder / f"{name}.jsonl" for name in ("train", "val", "test")}
