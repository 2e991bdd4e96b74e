"""Synthetic JPEG data for the end-to-end mode: `data_tools.synth` scenes at the model's image size, saved as JPEG.

Real data sets (COCO, LAION, LLaVA's) store JPEGs, and decoding them is part of what the e2e mode times;
`data_tools.synth` writes lossless PNGs, so the images are re-encoded once here. Drawing costs ~10 ms an
image at 224 px on one core, so at most `distinct` images are drawn and the records repeat them to the
length asked for. Everything is cached under `<cache root>/bench/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from recipes.common.tiny_models import build_once, cache_root

JPEG_QUALITY = 95  # a high quality keeps the shapes' colours close to the drawn ones; decode cost hardly depends on it


def _draw(task: str, n: int, image_size: int, seed: int, folder: Path) -> None:
    make_synthetic(task, n, folder, image_size=image_size, seed=seed, progress=n > 500)
    rows = read_jsonl(folder / f"{task}.jsonl")
    for row in rows:
        if not row.get("image"):  # instruct data has text-only records
            continue
        png = folder / row["image"]
        row["image"] = str(Path(row["image"]).with_suffix(".jpg"))
        Image.open(png).convert("RGB").save(folder / row["image"], quality=JPEG_QUALITY)
        png.unlink()
    write_jsonl(folder / "records.jsonl", rows)


def synthetic_jpeg_records(task: str, n_records: int, image_size: int, *, distinct: int = 2048, seed: int = 0) -> Path:
    """A JSONL file of `n_records` synthetic `task` records whose images are JPEGs of `image_size` px (cached).

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
