"""Image hashes for dedup, split and leakage checks: an exact content hash, a perceptual hash, and a fast
finder of near-duplicate pairs among thousands of hashes.

- `content_hash`: SHA-256 of the decoded RGB pixels and the size, not of the file bytes. The same picture
  saved again as PNG, with other metadata, or under another name hashes the same; a JPEG re-compression
  changes pixels and so is only a near duplicate.
- `phash`: a 64-bit DCT perceptual hash (see `phash_of`). Two images are near duplicates when the Hamming
  distance of their hashes is at most a threshold (default 4) *and* their coarse colours agree (see
  `colours_match`): the hash is computed on grey levels and low frequencies, so on its own it calls a red
  and a blue square of the same shape and place, or two small shapes at one place, the same image, which
  for captions ("a red square") is wrong.

Every image goes through `data_tools.images.load_image` (RGB, EXIF orientation applied). An image that
cannot be loaded raises its `DataError`: these tools expect input that `python -m data_tools clean` passed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm import tqdm

from .errors import DataError
from .images import load_image

DEFAULT_NEAR_THRESHOLD = 4
# Largest difference (0-255) allowed between the mean colours of matching cells of a 16x16 grid. Measured
# on 64x64 synthetic shapes (`data_tools.synth`), the hardest case: JPEG quality 75 and a 10% resize move
# a cell by at most ~42, while two different small shapes that the grey-level hash confuses differ by more
# than 48 in all but 4 of ~100 pairs per 2,000 images (with an 8x8 grid: 86). Natural photos differ far less.
COLOUR_TOLERANCE = 48
COLOUR_GRID = 16
CLEAN_FIRST = "run python -m data_tools clean first"


@dataclass(frozen=True)
class ImageHash:
    """The hashes of one image file."""

    content: str  # hex SHA-256 of size + RGB pixels
    phash: int  # 64-bit perceptual hash
    colours: bytes  # 16x16 grid of mean RGB colours, 768 bytes


def phash_of(image: Image.Image) -> int:
    """64-bit DCT perceptual hash of a loaded image.

    Grey levels, resized to 32x32, 2-D DCT-II; keep the top-left 8x8 block (the lowest frequencies) and
    set a bit where a coefficient is above the median of the block. The DC coefficient (the mean
    brightness) is always far above the median, so its bit would be constant: it is left out of the
    median and its bit is always 0, which leaves 63 informative bits. Coefficients are rounded first so
    that floating-point noise in a flat image cannot flip bits (a flat image hashes to 0).
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = np.round(dctn(grey, type=2, norm="ortho")[:8, :8].ravel(), 6)
    bits = low > np.median(low[1:])
    bits[0] = False
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def colours_of(image: Image.Image) -> bytes:
    """Mean RGB colour of each cell of a 16x16 grid over the image (768 bytes)."""
    return image.resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).tobytes()


def colours_match(a: bytes, b: bytes, tolerance: int = COLOUR_TOLERANCE) -> bool:
    """True when no grid cell of two `colours_of` signatures differs by more than `tolerance` in a channel."""
    diff = np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8).astype(np.int16))
    return int(diff.max()) <= tolerance


def hash_image(path: str | os.PathLike) -> ImageHash:
    """Load an image once and compute all its hashes. Raises `DataError` if it cannot be loaded."""
    try:
        image = load_image(path)
    except DataError as e:
        e.message += f" ({CLEAN_FIRST})"
        raise e.at()  # re-format the message
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return ImageHash(digest.hexdigest(), phash_of(image), colours_of(image))


def content_hash(path: str | os.PathLike) -> str:
    """Hex SHA-256 of an image's size and decoded RGB pixels: same picture, same hash, whatever the file format details."""
    return hash_image(path).content


def phash(path: str | os.PathLike) -> int:
    """64-bit perceptual hash of an image file (see `phash_of`)."""
    return hash_image(path).phash


def hash_images(paths: Iterable[str | os.PathLike], *, progress: bool = True, desc: str = "hashing images") -> dict[Path, ImageHash]:
    """Hash each distinct file once (many rows may share an image, as in VQA); return {path: ImageHash}."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    return {p: hash_image(p) for p in tqdm(unique, desc=desc, unit="img", disable=not progress or len(unique) < 100)}


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def near_pairs(hashes, threshold: int = DEFAULT_NEAR_THRESHOLD, *, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming(hashes[i], hashes[j]) <= threshold, as arrays (i, j, distance).

    Compares every pair with uint64 XOR and a popcount, `chunk` rows at a time (by default as many as
    keep a block near 2 M entries, 16 MB); 10,000 hashes (50 M pairs) take about 0.3 s on one core.
    """
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    chunk = chunk or max(1, 2_000_000 // max(len(h), 1))
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(h), chunk):
        block = h[start : start + chunk]
        # Only the columns right of the block's first row can hold a j > i.
        dist = np.bitwise_count(block[:, None] ^ h[None, start:])
        i, j = np.nonzero(dist <= threshold)
        i_abs, j_abs = i + start, j + start
        keep = j_abs > i_abs
        found_i.append(i_abs[keep])
        found_j.append(j_abs[keep])
        found_d.append(dist[i[keep], j[keep]])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d).astype(np.uint8)


def union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Connected components of n items joined by pairs: returns each item's group id, the smallest index in its group."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps trees flat
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            # The smaller index becomes the root, so a group is named by its first member.
            parent[max(ra, rb)] = min(ra, rb)
    return [root(x) for x in range(n)]


def image_groups(hashes: list[ImageHash], threshold: int | None = DEFAULT_NEAR_THRESHOLD) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Group images that are identical or near duplicates (chains join: a~b and b~c put a, b, c together).

    Returns (group id per image = index of the group's first image, near pairs (i, j, distance) that
    joined distinct contents). `threshold=None` groups identical contents only.
    """
    first_of_content: dict[str, int] = {}
    pairs: list[tuple[int, int, int]] = []
    for i, h in enumerate(hashes):
        first = first_of_content.setdefault(h.content, i)
        if first != i:
            pairs.append((first, i, 0))
    near: list[tuple[int, int, int]] = []
    if threshold is not None and threshold >= 0:
        # Near pairs among distinct contents only: copies of one content would add pairs for nothing.
        reps = sorted(first_of_content.values())
        ii, jj, dd = near_pairs([hashes[r].phash for r in reps], threshold)
        for a, b, d in zip(ii.tolist(), jj.tolist(), dd.tolist()):
            i, j = reps[a], reps[b]
            if colours_match(hashes[i].colours, hashes[j].colours):
                near.append((i, j, d))
    groups = union_find_groups(len(hashes), [(i, j) for i, j, _ in pairs + near])
    return groups, near
