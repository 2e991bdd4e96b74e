"""Fast hashing at scale: tolerance against full decoding, the per-file cache, workers, shard files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_tools import dedup, hashes, split
from data_tools.hashes import HashTable, ImageHasher, group_images
from data_tools.hashing import hamming, hash_image, hash_image_fast
from tests.test_dedup import read, write_lines

# Largest differences between the fast (reduced JPEG decoding) and the exact hashes of one image, over
# the generated photos below; the README quotes them.
FAST_MAX_HAMMING = 4
FAST_MAX_COLOUR = 34


def photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth random colour field with sharp coloured ellipses and noise: JPEG-sized detail."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(max(h // 16, 2), max(w // 16, 2), 3)).cumsum(0).cumsum(1)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    im = Image.fromarray(a.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x, y, x + int(rng.integers(5, max(w // 3, 6))), y + int(rng.integers(5, max(h // 3, 6)))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(im, np.float64) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


SIZES = (
    [(640, 480)] * 12
    + [(64, 64)] * 4
    + [(100, 75), (128, 128), (300, 200), (481, 333), (1024, 768), (1280, 720)]
    # sides that are not multiples of the reduction: the decoded image's last row or column is partly padding
    + [(640, 425), (640, 427), (500, 333), (427, 640)]
)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for k, (w, h) in enumerate(SIZES):
        p = folder / f"{k}_{w}x{h}.jpg"
        photo(k, w, h).save(p, quality=75 + 5 * (k % 4))
        paths.append(p)
    return paths


def test_fast_hash_within_tolerance_and_exact_on_small_images(jpegs):
    worst_bits, worst_colour = 0, 0
    for p in jpegs:
        exact, fast = hash_image(p), hash_image_fast(p)
        bits = hamming(exact.phash, fast.phash)
        colour = int(
            np.abs(
                np.frombuffer(exact.colours, np.uint8).astype(int) - np.frombuffer(fast.colours, np.uint8)
            ).max()
        )
        if (
            "_64x64" in p.name or "_100x75" in p.name
        ):  # below 2 x DRAFT_MIN_SIDE: decoded in full, same hashes
            assert (bits, colour) == (0, 0), p.name
        worst_bits, worst_colour = max(worst_bits, bits), max(worst_colour, colour)
        assert fast.file_sha256 == __import__("hashlib").sha256(p.read_bytes()).digest()
    assert worst_bits <= FAST_MAX_HAMMING and worst_colour <= FAST_MAX_COLOUR


def test_second_run_hashes_nothing_and_cache_keys_include_mode(jpegs, tmp_path):
    cache = tmp_path / "cache.npz"
    paths = [str(p) for p in jpegs]
    first = ImageHasher("fast", workers=1, cache=cache, progress=False)
    table, rows = first.hash(paths)
    first.save()
    assert first.stats == {"hashed": len(paths), "cached": 0, "pixels_hashed": 0}
    again = ImageHasher("fast", workers=1, cache=cache, progress=False)
    table2, rows2 = again.hash(paths)
    assert again.stats["hashed"] == 0 and again.stats["cached"] == len(paths)
    np.testing.assert_array_equal(table.phash[rows], table2.phash[rows2])
    # Another mode is another key: exact hashes are computed, and then cached beside the fast ones.
    exact = ImageHasher("exact", workers=1, cache=cache, progress=False)
    exact.hash(paths[:3])
    exact.save()
    assert exact.stats["hashed"] == 3
    assert ImageHasher("fast", workers=1, cache=cache, progress=False).hash(paths)[0] is not None
    # A changed file (new mtime) is hashed again; the others are not.
    os.utime(jpegs[0], ns=(1, 1))
    changed = ImageHasher("fast", workers=1, cache=cache, progress=False)
    changed.hash(paths)
    assert changed.stats["hashed"] == 1
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left


def test_corrupt_cache_is_ignored_with_a_warning(jpegs, tmp_path, capsys):
    cache = tmp_path / "cache.npz"
    cache.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(UserWarning, match="ignoring the image hash cache"):
        hasher = ImageHasher("fast", workers=1, cache=cache, progress=False)
    hasher.hash([str(jpegs[0])])
    assert hasher.stats["hashed"] == 1
    hasher.save()
    assert len(HashTable.load(cache)) == 1  # replaced by a good one


def test_workers_give_the_same_hashes_as_one(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    paths = []
    for k in range(hashes.MIN_PARALLEL + 16):
        p = folder / f"{k}.jpg"
        photo(100 + k, 160, 120).save(p, quality=85)
        paths.append(str(p))
    one, _ = ImageHasher("fast", workers=1, progress=False).hash(paths)
    two, _ = ImageHasher("fast", workers=2, progress=False).hash(paths)
    assert one.paths == two.paths
    for k in one.arrays:
        np.testing.assert_array_equal(one.arrays[k], two.arrays[k])


def test_fast_mode_confirms_identical_pixels_only_where_needed(tmp_path):
    a, b, c = photo(1, 320, 240), photo(2, 320, 240), photo(3, 320, 240)
    a.save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "a_copy.jpg").write_bytes(
        (tmp_path / "a.jpg").read_bytes()
    )  # equal bytes: no decoding needed
    Image.open(tmp_path / "a.jpg").save(tmp_path / "a_pixels.png")  # same pixels, another file format
    b.save(tmp_path / "b.jpg", quality=90)
    c.save(tmp_path / "c.jpg", quality=90)
    paths = [str(tmp_path / n) for n in ("a.jpg", "a_copy.jpg", "a_pixels.png", "b.jpg", "c.jpg")]
    hasher = ImageHasher("fast", workers=1, progress=False)
    table, rows = hasher.hash(paths)
    g = group_images(table, 4, hasher, rows)
    assert g.content.tolist() == [0, 0, 0, 3, 4]
    assert g.group.tolist() == [0, 0, 0, 3, 4]
    assert hasher.stats["pixels_hashed"] == 2  # a.jpg and a_pixels.png, not the copy, b or c
    exact = ImageHasher("exact", workers=1, progress=False)
    table, rows = exact.hash(paths)
    assert group_images(table, 4, exact, rows).content.tolist() == [0, 0, 0, 3, 4]


ROWS = [{"image": f"img/{k}.jpg", "captions": [f"caption {k % 7}"]} for k in range(40)]


@pytest.fixture
def dataset(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for k in range(30):
        photo(200 + k, 200, 150).save(tmp_path / f"img/{k}.jpg", quality=90)
    for k in range(30, 40):  # near duplicates (re-encoded) and copies of the first ten
        src = Image.open(tmp_path / f"img/{k - 30}.jpg")
        src.save(tmp_path / f"img/{k}.jpg", quality=70) if k % 2 else src.save(tmp_path / f"img/{k}.png")
    rows = [
        dict(r, image=r["image"].replace(".jpg", ".png")) if k >= 30 and k % 2 == 0 else r
        for k, r in enumerate(ROWS)
    ]
    write_lines(tmp_path / "all.jsonl", rows)
    return tmp_path


def test_shards_merge_to_the_same_dedup_split_and_leakage(dataset, capsys):
    base = [
        "--task",
        "caption",
        str(dataset / "all.jsonl"),
        "--report",
        str(dataset / "r1.jsonl"),
        "--no-hash-cache",
    ]
    assert dedup.main(base + ["--out", str(dataset / "d1.jsonl")]) == 0
    for i in range(3):
        assert (
            hashes.main(
                [
                    str(dataset / "all.jsonl"),
                    "--shard",
                    f"{i}/3",
                    "--out",
                    str(dataset / f"h/hashes-{i}.npz"),
                    "--no-hash-cache",
                ]
            )
            == 0
        )
    sizes = [len(HashTable.load(dataset / f"h/hashes-{i}.npz")) for i in range(3)]
    assert sum(sizes) == 40 and all(sizes)
    sharded = ["--hashes", str(dataset / "h/hashes-*.npz")]
    base[4] = str(dataset / "r2.jsonl")
    assert dedup.main(base + ["--out", str(dataset / "d2.jsonl")] + sharded) == 0
    assert (dataset / "d1.jsonl").read_bytes() == (dataset / "d2.jsonl").read_bytes()
    assert (dataset / "r1.jsonl").read_bytes() == (dataset / "r2.jsonl").read_bytes()
    assert len(read(dataset / "d1.jsonl")) < 40  # the near duplicates and copies were merged

    out = {}
    for name, extra in (("plain", ["--no-hash-cache"]), ("sharded", sharded)):
        (dataset / name).mkdir()
        assert (
            split.main_split(
                [
                    str(dataset / "all.jsonl"),
                    "--out-dir",
                    str(dataset),
                    "--seed",
                    "0",
                    "--names",
                    f"{name}_a,{name}_b",
                    "--ratios",
                    "0.5,0.5",
                ]
                + extra
            )
            == 0
        )
        out[name] = [(dataset / f"{name}_{s}.jsonl").read_bytes() for s in "ab"]
        files = [str(dataset / f"{name}_{s}.jsonl") for s in "ab"]
        assert split.main_check_leakage(files + extra) == 0
    assert out["plain"] == out["sharded"]
    assert split.main_check_leakage([str(dataset / "all.jsonl"), str(dataset / "d1.jsonl")] + sharded) == 1


def test_image_missing_from_hash_files_names_the_line(dataset, capsys):
    assert (
        hashes.main(
            [
                str(dataset / "all.jsonl"),
                "--shard",
                "0/2",
                "--out",
                str(dataset / "h0.npz"),
                "--no-hash-cache",
            ]
        )
        == 0
    )
    code = dedup.main(
        [
            "--task",
            "caption",
            str(dataset / "all.jsonl"),
            "--out",
            str(dataset / "o.jsonl"),
            "--hashes",
            str(dataset / "h0.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "none of the --hashes files" in err and "all.jsonl:" in err and "Traceback" not in err
    )
    (dataset / "bad.npz").write_bytes(b"junk")
    assert (
        dedup.main(
            [
                "--task",
                "caption",
                str(dataset / "all.jsonl"),
                "--out",
                str(dataset / "o.jsonl"),
                "--hashes",
                str(dataset / "bad.npz"),
            ]
        )
        == 2
    )
    assert "unreadable image hash file" in capsys.readouterr().err


def test_cli_second_run_reports_cache_hits(dataset, capsys):
    argv = [
        "--task",
        "caption",
        str(dataset / "all.jsonl"),
        "--out",
        str(dataset / "o.jsonl"),
        "--workers",
        "1",
    ]
    assert dedup.main(argv) == 0
    assert "40 hashed, 0 from the cache" in capsys.readouterr().out
    assert dedup.main(argv) == 0
    assert "0 hashed, 40 from the cache" in capsys.readouterr().out
    assert (dataset / hashes.CACHE_NAME).exists()


def test_folder_resolver_equals_resolve_image_path(tmp_path):
    from data_tools.errors import DataError
    from data_tools.images import ImagePathResolver, resolve_image_path

    (tmp_path / "img/sub").mkdir(parents=True)
    (tmp_path / "img/a.png").write_bytes(b"x")
    (tmp_path / "img/link.png").symlink_to(tmp_path / "img/sub")
    (tmp_path / "img/out.png").symlink_to("/etc/hostname")
    cases = [
        "img/a.png",
        "img/./a.png",
        "img/sub/../a.png",
        "a.png",
        "img/missing.png",
        "img/link.png",
        "img/out.png",
        "../x.png",
        "img/../../x.png",
        "/etc/hostname",
        "img/sub/..",
        "img/",
    ]
    for allow in (False, True):
        resolver = ImagePathResolver(tmp_path, allow_outside_root=allow, flag="--allow-outside-root")
        for image in cases:
            try:
                expected = resolve_image_path(image, tmp_path, allow_outside_root=allow,
                                              flag="--allow-outside-root")
            except DataError as e:
                expected = str(e)
            try:
                got = resolver(image)
            except DataError as e:
                got = str(e)
            assert got == expected, (image, allow)
