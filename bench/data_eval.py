"""Timings of the data tools and metrics at data-set sizes (5,000 images; 10,000 for dedup); prints a
Markdown table.

    python -m bench.data_eval [--images 5000] [--dedup-images 10000] [--out bench/RESULTS.md]

caption metrics: 5,000 images x 5 references, one prediction each (pycocoevalcap: BLEU, METEOR, ROUGE-L,
CIDEr; SPICE, which needs jars not installed by default, is not timed);
Recall@K: 5,000 images x 25,000 texts (5 per image), random similarities;
dedup: 10,000 synthetic shape images (hashing included), near-duplicate threshold 4.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cli import append_text, positive, result_path_error


def _timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def bench_caption(n_images: int) -> list[tuple[str, float]]:
    from eval.caption import caption_metrics

    rng = random.Random(0)
    words = ("a the red blue green small large circle square triangle on left right top of image "
             "there is").split()
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(4, 10))) for _ in range(5)]
            for i in range(n_images)}
    preds = {i: " ".join(rng.choices(words, k=rng.randint(4, 10))) for i in range(n_images)}
    rows = []
    t, _ = _timed(lambda: caption_metrics(preds, refs, metrics=["Bleu", "ROUGE_L", "CIDEr"]))
    rows.append(((f"caption metrics, {n_images:,} images x 5 refs: BLEU + ROUGE-L + CIDEr "
                  "(PTB tokenizer incl.)"), t))
    # SPICE left out: it runs only where its jars are, and would change the row's meaning from one machine
    # to the next
    t, _ = _timed(lambda: caption_metrics(preds, refs, metrics=["Bleu", "METEOR", "ROUGE_L", "CIDEr"]))
    rows.append((f"caption metrics, {n_images:,} images x 5 refs: BLEU + METEOR + ROUGE-L + CIDEr", t))
    return rows


def bench_recall(n_images: int) -> list[tuple[str, float]]:
    from eval.retrieval import recall_at_k

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((5 * n_images, n_images), dtype=np.float32)
    text_to_image = np.repeat(np.arange(n_images), 5)
    t, _ = _timed(lambda: recall_at_k(scores, text_to_image, ks=(1, 5, 10)))
    return [(f"Recall@1/5/10 + ranks, {n_images:,} images x {5 * n_images:,} texts", t)]


def bench_dedup(n_images: int) -> list[tuple[str, float]]:
    from data_tools.dedup import dedup_file
    from data_tools.synth import make_synthetic

    with tempfile.TemporaryDirectory() as d:
        t_synth, path = _timed(lambda: make_synthetic("caption", n_images, Path(d) / "shapes", seed=0,
                                                      progress=False))
        t, _ = _timed(lambda: dedup_file(path, Path(d) / "dedup.jsonl", "caption",
                                         report_path=Path(d) / "report.jsonl", progress=False))
    from data_tools.hashes import default_workers

    return [(f"synth, {n_images:,} caption images", t_synth),
            (f"dedup, {n_images:,} images (fast hashes, {default_workers()} processes; Hamming <= 4)", t)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.data_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive(), default=5000)
    p.add_argument("--dedup-images", type=positive(), default=10000)
    p.add_argument("--out", help="append the table to this Markdown file")
    args = p.parse_args(argv)
    # known now, not after the run
    if (error := result_path_error("--out", args.out, append=True)) is not None:
        p.error(error)
    start = time.perf_counter()
    rows = bench_caption(args.images) + bench_recall(args.images) + bench_dedup(args.dedup_images)
    import PIL
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    table = [
        f"{datetime.date.today()}, commit {commit}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, torch "
        f"{torch.__version__}",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {name} | {t:.1f} |" for name, t in rows],
        "",
        f"Whole command: {time.perf_counter() - start:.1f} s wall.",
    ]
    print("\n".join(table))
    if args.out:
        append_text(args.out, "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
