"""Synthetic data for the harness: JPEG images at the model's image size, and conversations filled to a length
budget.

The end-to-end mode decodes JPEGs: `data_tools.synth` scenes at the model's image size, saved as JPEG.

Real data sets (COCO, LAION, LLaVA's) store JPEGs, and decoding them is part of what the e2e mode times;
`data_tools.synth` writes lossless PNGs, so the images are re-encoded once here. Drawing costs ~10 ms an
image at 224 px on one core, so at most `distinct` images are drawn and the records repeat them to the
length asked for. Everything is cached under `<cache root>/bench/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from PIL import Image

from data_tools.images import load_image
from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.records import IMAGE_TOKEN
from data_tools.synth import make_synthetic
from recipes.common.cache import build_once, cache_root
from recipes.common.chat import to_messages

# a high quality keeps the shapes' colours close to the drawn ones; decode cost hardly depends on it
JPEG_QUALITY = 95


def _draw(task: str, n: int, image_size: int, seed: int, folder: Path) -> None:
    make_synthetic(task, n, folder, image_size=image_size, seed=seed, progress=n > 500)
    rows = read_jsonl(folder / f"{task}.jsonl")
    for row in rows:
        if not row.get("image"):  # instruct data has text-only records
            continue
        png = folder / row["image"]
        row["image"] = str(Path(row["image"]).with_suffix(".jpg"))
        if png.exists():  # VQA records share their image's file
            Image.open(png).convert("RGB").save(folder / row["image"], quality=JPEG_QUALITY)
            png.unlink()
    write_jsonl(folder / "records.jsonl", rows)


def synthetic_jpeg_records(task: str, n_records: int, image_size: int, *, distinct: int = 2048,
                           seed: int = 0) -> Path:
    """A JSONL file of `n_records` synthetic `task` records whose images are JPEGs of `image_size` px
    (cached).

    At most `distinct` images are drawn; record i is drawn record i mod that number.
    """
    n_images = max(1, min(n_records, distinct))
    folder = build_once(cache_root() / "bench" / f"{task}-n{n_images}-px{image_size}-s{seed}-jpeg",
                        lambda tmp: _draw(task, n_images, image_size, seed, tmp), marker="records.jsonl")
    path = folder / f"records-{n_records}.jsonl"
    if not path.exists():
        rows = read_jsonl(folder / "records.jsonl")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")  # one per process, then an atomic rename
        write_jsonl(tmp, [rows[i % len(rows)] for i in range(n_records)])
        tmp.replace(path)
    return path


def _without_image(turns: list[dict]) -> list[dict]:
    return [{**t, "value": t["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")}
            for t in turns]


def fill_conversations(conversations: datasets.Dataset, encoder, max_length: int) -> datasets.Dataset:
    """Each conversation followed by the turns of the next ones (their `<image>` taken out, wrapping around)
    until it encodes to more than `max_length` tokens: the recipe's length budget then cuts it after the last
    whole turn that fits, so that every sample is about `max_length` long (the benchmark shapes: 832 tokens,
    where the synthetic conversations alone are ~650 with LLaVA-1.5's 576 image tokens). `encoder` is the
    recipe's ChatEncoder."""
    rows = list(conversations)
    extra = [_without_image(r["conversations"]) for r in rows]
    # Each one's own length: a cheap guess of what appending it adds (one bos too many), measured again below.
    cost = [len(encoder.encode(to_messages(turns)).input_ids) for turns in extra]
    out = []
    for i, row in enumerate(rows):
        turns, j = list(row["conversations"]), i + 1
        images = [] if row.get("image") is None else [load_image(row["image"])]
        while (length := len(encoder.encode(to_messages(turns, len(images)), images).input_ids)) \
                <= max_length:
            while length <= max_length:
                turns += extra[j % len(rows)]
                length += cost[j % len(rows)]
                j += 1
        out.append({**row, "conversations": turns})
    return datasets.Dataset.from_list(out)
