"""Data tools at data-set scale: hashing, near-pair search, dedup + split, beside the baseline, in one run.

    python -m bench.data_tools [--images 400] [--e2e-images 10000] [--e2e-rows 100000] [--big-rows 1000000]
                               [--check-rows 500000] [--json bench_data_tools.json]

- hashing: 640x480 JPEGs made here (a smooth random colour field, sharp ellipses, noise; quality 90),
  images/s for the baseline hash (full decode, `hashing.hash_image`, one process), imagehash's pHash
  (full decode, one process) and the fast hash (1 worker and all workers), and exact mode on all workers;
- near pairs: random 64-bit hashes with planted near duplicates at 10 k / 100 k / 1 M; the multi-index
  search beside the all-pairs baseline (measured at 10 k and 40 k; larger sizes are an n^2 extrapolation,
  labelled so) and faiss-cpu's IndexBinaryMultiHash (exact with nflip=0 and radius threshold + 1);
- validate: the row and image-path checks of `--check-rows` rows (images not opened), and the same rows
  with every image missing (memory with an error per row); this code and the baseline commit's;
- dedup + split: rows over generated JPEGs, each command in a fresh process (wall time and peak RSS):
  the baseline commit's code (checked out of git into a temporary package) and this code, cold and with the
  cache; and dedup + split of `--big-rows` rows from a hash file (memory at a million rows, no images).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.cli import positive, result_path_error
from data_tools.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# The commit whose data_tools this bench compares against ("baseline"): hashing by full decode in one
# process, all-pairs near-duplicate search, rows held in memory.
BASELINE_COMMIT = "363a035ca9793e0547d8584c7a28fb08ef5ba0f0"
PARTS = ("hash", "near", "e2e", "big", "check")


def make_jpeg(path: Path, seed: int, w: int = 640, h: int = 480, quality: int = 90) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(h // 16, w // 16, 3)).cumsum(0).cumsum(1)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    im = Image.fromarray(a.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse(
            [x, y, x + int(rng.integers(10, w // 3)), y + int(rng.integers(10, h // 3))],
            fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
        )
    noisy = np.asarray(im, np.float32) + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=quality)


def _interleaved(methods: dict, items: list, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (items per wall second, items per CPU second of this process)}, each the best of `rounds`.

    The methods take turns round by round, so that a burst of other work on the machine falls on all of them
    alike rather than on whichever ran then; CPU time leaves out the time this process waited for a core.
    """
    best = {name: (float("inf"), float("inf")) for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn(items)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return {name: (len(items) / w, len(items) / c) for name, (w, c) in best.items()}


def bench_hashing(n_images: int, folder: Path, rounds: int = 5) -> list[tuple[str, str, str]]:
    from data_tools import hashing
    from data_tools.hashes import ImageHasher, default_workers
    from data_tools.hashing import hash_image

    paths = []
    for k in range(n_images):
        p = folder / f"{k}.jpg"
        make_jpeg(p, k)
        paths.append(str(p))
    kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    workers = default_workers()
    for p in paths[:20]:  # warm the page cache and imports, so that no method pays for them
        hash_image(p)

    def without_simplejpeg(ps):
        saved, hashing.simplejpeg = hashing.simplejpeg, None
        try:
            ImageHasher("fast", workers=1, progress=False).hash(ps)
        finally:
            hashing.simplejpeg = saved

    decoder = "simplejpeg" if hashing.simplejpeg is not None else "Pillow draft: simplejpeg not installed"
    labels = {
        "base": "baseline: full decode, pixel SHA-256 + pHash + colours (hash_image), 1 process",
        "imagehash": "imagehash.phash (full decode), 1 process",
        "fast": f"fast: 1/8 DCT-scaled decode ({decoder}), float hash, file SHA-256, 1 worker",
        "pillow": "fast with Pillow's draft decoding instead of simplejpeg (same hashes), 1 worker",
        "fast_all": f"fast, {workers} workers",
        "exact_all": f"exact (--exact-hash), {workers} workers",
    }
    methods = {
        "base": lambda ps: [hash_image(p) for p in ps],
        "fast": lambda ps: ImageHasher("fast", workers=1, progress=False).hash(ps),
        "pillow": without_simplejpeg,
        "fast_all": lambda ps: ImageHasher("fast", workers=workers, progress=False).hash(ps),
        "exact_all": lambda ps: ImageHasher("exact", workers=workers, progress=False).hash(ps),
    }
    try:
        import imagehash

        methods["imagehash"] = lambda ps: [imagehash.phash(Image.open(p)) for p in ps]
    except ImportError:
        pass  # its row says so below
    rates = _interleaved(methods, paths, rounds)
    base_wall, base_cpu = rates["base"]
    rows = []
    for name, label in labels.items():
        if name not in rates:  # a value, so that the row is not taken for a section's heading
            rows.append((label, "-", "not installed"))
            continue
        wall, cpu = rates[name]
        if name.endswith("_all"):
            note = f"{wall / base_wall:.1f}x; {wall / base_wall / workers:.1f}x per worker"
            if name == "fast_all":
                note += f"; {wall / rates['fast'][0]:.2f}x 1 worker"
        else:
            note = f"{wall / base_wall:.1f}x; per CPU second {cpu:,.0f} images, {cpu / base_cpu:.1f}x"
        rows.append((label, f"{wall:,.0f}", note))
    # The fast path's own hash (a float linear map) against Pillow's resizes + scipy's DCT, on the same
    # reduced images: the hand-written part has to win to stay.
    reduced = [np.asarray(hashing.load_image_draft(p)) for p in paths]

    def pillow_hash(arrays):
        for a in arrays:
            image = Image.fromarray(a)
            hashing.phash_of(image), hashing.colours_of(image)

    small = _interleaved(
        {"mine": lambda arrays: [hashing.hashes_of_reduced(a) for a in arrays], "theirs": pillow_hash},
        reduced,
        rounds,
    )
    mine, theirs = small["mine"][1], small["theirs"][1]
    rows.append(
        (
            f"hash of the {reduced[0].shape[1]}x{reduced[0].shape[0]} reduced image, CPU us/image: float map "
            "(hashes_of_reduced) / Pillow resize + scipy DCT (phash_of, colours_of)",
            f"{1e6 / mine:.0f} / {1e6 / theirs:.0f}",
            f"{mine / theirs:.1f}x",
        )
    )
    title = (
        f"hashing {n_images} JPEGs 640x480 (mean {kb:.0f} KB), images/s (wall, best of {rounds} interleaved)"
    )
    return [(title, "", "")] + rows


def planted(n: int, seed: int = 0, *, sources: bool = False):
    """n hashes: 90% random, 10% near copies (0 to 4 bits flipped) of random ones (and their sources)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    k = n // 10
    src = rng.integers(0, n - k, k)
    near = h[src].copy()
    for _ in range(4):
        flip = rng.random(k) < 0.75
        near[flip] ^= np.uint64(1) << rng.integers(0, 64, int(flip.sum())).astype(np.uint64)
    h[n - k :] = near
    return (h, src) if sources else h


def _faiss_pairs(h: np.ndarray, t: int):
    import faiss

    faiss.omp_set_num_threads(1)
    codes = h.astype(">u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryMultiHash(64, t + 1, 64 // (t + 1))
    index.nflip = 0
    index.add(codes)
    lims, dist, ids = index.range_search(codes, t + 1)  # faiss keeps distances < radius
    q = np.repeat(np.arange(len(h)), np.diff(lims).astype(np.int64))
    keep = ids > q
    i, j, d = q[keep], ids[keep], dist[keep].astype(np.uint8)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def bench_near(sizes: list[int], threshold: int = 4) -> list[tuple[str, str, str]]:
    from data_tools.hashing import near_pairs_all, near_pairs_mih

    try:
        import faiss  # noqa: F401

        have_faiss = True
    except ImportError:
        have_faiss = False
    rows = [(f"near pairs, Hamming <= {threshold}, one core, seconds", "", "")]
    brute = {}
    for n in (10_000, 40_000):
        h = planted(n)
        t = time.perf_counter()
        expected = near_pairs_all(h, threshold)
        brute[n] = time.perf_counter() - t
        same = all(np.array_equal(a, b) for a, b in zip(near_pairs_mih(h, threshold), expected))
        rows.append(
            (
                f"baseline all-pairs, {n:,} hashes (measured; {len(expected[0]):,} pairs; "
                f"multi-index identical: {same})",
                f"{brute[n]:.2f}",
                "",
            )
        )
    per_pair = brute[40_000] / (40_000**2)
    for n in sizes:
        h = planted(n)
        t = time.perf_counter()
        found = near_pairs_mih(h, threshold)
        mih = time.perf_counter() - t
        base = brute.get(n, per_pair * n * n)
        kind = "measured" if n in brute else "extrapolated n^2 from 40k"
        rows.append(
            (
                f"multi-index (numpy), {n:,} hashes ({len(found[0]):,} pairs)",
                f"{mih:.2f}",
                f"baseline {base:,.1f} s ({kind}): {base / mih:,.0f}x",
            )
        )
        if have_faiss:
            t = time.perf_counter()
            other = _faiss_pairs(h, threshold)
            tf = time.perf_counter() - t
            same = all(np.array_equal(a, b) for a, b in zip(found, other))
            rows.append((f"faiss IndexBinaryMultiHash, {n:,} hashes (same pairs: {same})", f"{tf:.2f}", ""))
        else:
            rows.append((f"faiss IndexBinaryMultiHash, {n:,} hashes", "-", "not installed (faiss-cpu)"))
    return rows


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
module, fn = sys.argv[2].split(":")
main = getattr(__import__(module, fromlist=[fn]), fn)
t = time.perf_counter()
rc = main(sys.argv[3:])
wall = time.perf_counter() - t
# VmHWM is this process's own peak: ru_maxrss also counts the forking parent's peak, carried over exec.
try:
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    rss = int(status.split()[0]) / 1024
except (OSError, IndexError):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH_CHILD " + json.dumps({"rc": rc, "wall": wall, "maxrss_mb": rss}))
"""


def _child(path: Path, entry: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), entry, *argv], capture_output=True, text=True
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("BENCH_CHILD ")]
    if not line:
        raise RuntimeError(f"{entry} {argv} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    result = json.loads(line[-1].removeprefix("BENCH_CHILD "))
    if result["rc"] not in ok:
        raise RuntimeError(f"{entry} {argv} exited {result['rc']}:\n{out.stderr[-2000:]}")
    return result


def baseline_package(folder: Path) -> Path | None:
    """The baseline commit's data_tools as package `data_tools_baseline` under folder; None without git."""
    pkg = folder / "data_tools_baseline"
    pkg.mkdir(parents=True)
    try:
        names = subprocess.run(
            ["git", "-C", str(REPO), "ls-tree", "--name-only", BASELINE_COMMIT, "data_tools/"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for name in names:
            text = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (pkg / Path(name).name).write_text(text)
    except (OSError, subprocess.CalledProcessError):
        return None
    return folder


def bench_e2e(n_images: int, n_rows: int, folder: Path) -> list[tuple[str, str, str]]:
    img = folder / "img"
    img.mkdir()
    for k in range(n_images):
        make_jpeg(img / f"{k}.jpg", 10_000 + k, quality=90)
    # A tenth of the images get a near duplicate (re-encoded at quality 75) among the images.
    for k in range(0, n_images // 10):
        Image.open(img / f"{k}.jpg").save(img / f"{k}_near.jpg", quality=75)
    names = [f"{k}.jpg" for k in range(n_images)] + [f"{k}_near.jpg" for k in range(n_images // 10)]
    rng = np.random.default_rng(0)
    with open(folder / "all.jsonl", "w") as f:
        for r in range(n_rows):
            name = names[r % len(names)] if r < len(names) else names[int(rng.integers(len(names)))]
            f.write(
                json.dumps(
                    {
                        "image": f"img/{name}",
                        "question_id": r,
                        "question": f"Q{r % 50}?",
                        "answers": [f"a{r % 7}"],
                    }
                )
                + "\n"
            )
    src = str(folder / "all.jsonl")
    rows = [
        (
            f"dedup + split (vqa), {n_rows:,} rows over {len(names):,} JPEGs 640x480, fresh process each",
            "seconds",
            "peak RSS MB, main process",
        )
    ]
    base = baseline_package(folder / "baseline")

    def run(label: str, path: Path, pkg: str, extra: list[str]) -> None:
        out = folder / f"out_{pkg}_{len(rows)}"
        d = _child(
            path, f"{pkg}.dedup:main", ["--task", "vqa", src, "--out", str(folder / "d.jsonl"), *extra]
        )
        s = _child(
            path,
            f"{pkg}.split:main_split",
            [
                src,
                "--out-dir",
                str(folder),
                "--seed",
                "0",
                "--names",
                f"{out.name}_tr,{out.name}_va,{out.name}_te",
                *extra,
            ],
        )
        rows.append(
            (
                f"{label}: dedup / split",
                f"{d['wall']:.1f} / {s['wall']:.1f}",
                f"{d['maxrss_mb']:.0f} / {s['maxrss_mb']:.0f}",
            )
        )

    if base is not None:
        run("baseline (full decode, 1 process, all pairs, rows in memory)", base, "data_tools_baseline", [])
    else:
        rows.append(("baseline: git or the baseline commit is not available", "", ""))
    cache = str(folder / "cache.npz")
    run("fast hash, all workers, cold cache then cache (split)", REPO, "data_tools", ["--hash-cache", cache])
    run("fast hash, all workers, both from the cache", REPO, "data_tools", ["--hash-cache", cache])
    run(
        "exact hash, all workers, cold cache then cache (split)",
        REPO,
        "data_tools",
        ["--exact-hash", "--hash-cache", str(folder / "cache_exact.npz")],
    )
    return rows


def bench_big(n_rows: int, folder: Path) -> list[tuple[str, str, str]]:
    """dedup + split of n_rows caption rows whose hashes come from a hash file (exact mode, no images)."""
    from data_tools.hashes import COLOUR_BYTES, HashTable, _ARRAYS

    n = n_rows
    h, src = planted(n, seed=1, sources=True)
    arrays = {k: np.zeros((n, *s), t) for k, (t, s) in _ARRAYS.items()}
    arrays["phash"] = h
    rng = np.random.default_rng(1)
    # Colours: one random grey level per image; three quarters of the planted near copies keep their source's,
    # the rest fail the colour check.
    level = rng.integers(0, 256, n).astype(np.uint8)
    k = n // 10
    same = rng.random(k) < 0.75
    level[n - k :][same] = level[src[same]]
    arrays["colours"] = np.repeat(level[:, None], COLOUR_BYTES, axis=1)
    arrays["pixel_sha256"][:, :8] = np.arange(n, dtype="<u8").view(np.uint8).reshape(n, 8)
    arrays["has_pixels"][:] = True
    (folder / "img").mkdir(exist_ok=True)
    root = folder.resolve()
    table = HashTable([str(root / f"img/{i}.jpg") for i in range(n)], arrays)
    table.save(folder / "big.npz", root=root)
    del table, arrays
    with open(folder / "big.jsonl", "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"image": f"img/{i}.jpg", "captions": [f"caption {i % 1000}", f"another {i % 37}"]}
                )
                + "\n"
            )
    hashes = ["--hashes", str(folder / "big.npz")]
    d = _child(
        REPO,
        "data_tools.dedup:main",
        [
            "--task",
            "caption",
            str(folder / "big.jsonl"),
            "--out",
            str(folder / "big_d.jsonl"),
            "--report",
            str(folder / "big_r.jsonl"),
            *hashes,
        ],
    )
    s = _child(
        REPO,
        "data_tools.split:main_split",
        [
            str(folder / "big.jsonl"),
            "--out-dir",
            str(folder),
            "--seed",
            "0",
            "--names",
            "big_tr,big_va,big_te",
            *hashes,
        ],
    )
    return [
        (
            f"dedup + split (caption), {n:,} rows, hashes from a hash file, fresh process each",
            "seconds",
            "peak RSS MB, main process",
        ),
        (
            "this code: dedup / split",
            f"{d['wall']:.1f} / {s['wall']:.1f}",
            f"{d['maxrss_mb']:.0f} / {s['maxrss_mb']:.0f}",
        ),
    ]


def bench_check(n_rows: int, folder: Path) -> list[tuple[str, str, str]]:
    """validate of n_rows caption rows over 1,000 images in 10 folders, images not opened (the row and path
    checks alone), then of the same rows with every image missing (every row an error line)."""
    for k in range(1000):
        (folder / f"img{k % 10}").mkdir(exist_ok=True)
        (folder / f"img{k % 10}" / f"{k}.jpg").write_bytes(b"x")
    for name, fmt in (("ok.jsonl", "img{}/{}.jpg"), ("bad.jsonl", "missing{}/{}.jpg")):
        with open(folder / name, "w") as f:
            for r in range(n_rows):
                k = r % 1000
                f.write(json.dumps({"image": fmt.format(k % 10, k), "captions": [f"caption {r}"]}) + "\n")
    rows = [(f"validate, {n_rows:,} caption rows over 1,000 images, fresh process each", "seconds",
             "peak RSS MB, main process")]
    base = baseline_package(folder / "baseline")
    for label, path, pkg in (("baseline", base, "data_tools_baseline"), ("this code", REPO, "data_tools")):
        if path is None:
            rows.append(("baseline: git or the baseline commit is not available", "", ""))
            continue
        ok = _child(path, f"{pkg}.clean:main_validate", ["--task", "caption", "--no-check-images",
                                                         str(folder / "ok.jsonl")])
        bad = _child(path, f"{pkg}.clean:main_validate", ["--task", "caption", str(folder / "bad.jsonl")],
                     ok=(1,))
        rows.append((f"{label}: valid rows, images not opened / every image missing",
                     f"{ok['wall']:.1f} / {bad['wall']:.1f}",
                     f"{ok['maxrss_mb']:.0f} / {bad['maxrss_mb']:.0f}"))
    return rows


def hardware() -> str:
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        pass
    import PIL

    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({model or 'unknown model'}); "
        f"Python {platform.python_version()}, "
        f"numpy {np.__version__}, Pillow {PIL.__version__}, simplejpeg {_version('simplejpeg')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_tools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive(), default=400, help="JPEGs for the hashing rates")
    parser.add_argument("--near-sizes", type=_sizes, default="10000,100000,1000000",
                        help="comma-separated hash counts of the multi-index search")
    parser.add_argument("--e2e-images", type=int, default=10_000)
    parser.add_argument("--e2e-rows", type=int, default=100_000)
    parser.add_argument(
        "--big-rows", type=int, default=1_000_000, help="rows of the hash-file dedup + split (0: skip)"
    )
    parser.add_argument("--check-rows", type=int, default=500_000, help="rows of the validate part")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    if (error := result_path_error("--json", args.json)) is not None:  # known now, not after the run
        parser.error(error)
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    load_start = _load()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, fn in (
            ("hash", lambda: bench_hashing(args.images, _mk(d / "hash"))),
            ("near", lambda: bench_near(args.near_sizes)),
            (
                "e2e",
                lambda: bench_e2e(args.e2e_images, args.e2e_rows, _mk(d / "e2e")) if args.e2e_rows else [],
            ),
            ("big", lambda: bench_big(args.big_rows, _mk(d / "big")) if args.big_rows else []),
            ("check", lambda: bench_check(args.check_rows, _mk(d / "check"))),
        ):
            if name not in args.parts.split(","):
                continue
            part = fn()
            rows += part
            for r in part:
                print(" | ".join(r), flush=True)
    lines = [
        (
            f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; machine: {hardware()}; "
            f"load average (1, 5, 15 min) at the start {load_start}, at the end {_load()}"
        ),
        "",
        "| measurement | value | vs baseline / note |",
        "|---|---:|---|",
    ]
    lines += [
        f"| **{a}** | {b} | {c} |" if not b or b == "seconds" else f"| {a} | {b} | {c} |" for a, b, c in rows
    ]
    lines.append(f"\nWhole command: {time.perf_counter() - started:.0f} s wall.")
    print("\n".join(lines))
    if args.json:
        atomic_write_text(args.json, json.dumps({"hardware": hardware(), "rows": rows}, indent=1))
    return 0


def _sizes(text: str) -> list[int]:
    """--near-sizes: hash counts, each above 0."""
    return [positive()(x) for x in text.split(",")]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _load() -> str:
    """The load average: other work on the machine slows every row, so ratios in one run are the fair ones."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
