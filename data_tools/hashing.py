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

import functools
import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm import tqdm

try:  # libjpeg-turbo with DCT scaling, without Pillow's per-image overhead
    import simplejpeg
except ImportError:  # Pillow's draft mode decodes the same pixels, a little slower
    simplejpeg = None

from .errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError
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


# Fast mode decodes a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT-domain scaling), the largest
# reduction that keeps the short side at least this long: the 32x32 hash and the 16x16 colour grid need no
# more, and images under 2x this side (64x64 thumbnails) are decoded in full, unchanged.
DRAFT_MIN_SIDE = 48
# ITU-R 601-2 luma, the weights of Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class FastHash:
    """The hashes of one image file in fast mode (see `hash_image_fast`)."""

    phash: int
    colours: bytes
    file_sha256: bytes  # SHA-256 of the file's bytes: equal bytes, equal pixels, no decoding needed
    size: int = -1  # the file's size and modification time when it was read (the cache's key)
    mtime_ns: int = -1


def draft_scale(width: int, height: int, min_side: int = DRAFT_MIN_SIDE) -> int:
    """The JPEG reduction fast mode decodes at: 8, 4 or 2, the largest keeping the short side >= min_side;
    else 1."""
    return next((s for s in (8, 4, 2) if min(width, height) // s >= min_side), 1)


def _oriented_box(box: tuple, size: tuple[int, int], orientation: int) -> tuple:
    """Where `ImageOps.exif_transpose` puts a box (x0, y0, x1, y1) of an image of `size` for an EXIF
    orientation: a flip left-right, top-bottom, or both, then a swap of the axes (orientations 5-8)."""
    (x0, y0, x1, y1), (w, h) = box, size
    if orientation in (2, 3, 7, 8):
        x0, x1 = w - x1, w - x0
    if orientation in (3, 4, 6, 7):
        y0, y1 = h - y1, h - y0
    if orientation in (5, 6, 7, 8):
        x0, y0, x1, y1 = y0, x0, y1, x1
    return x0, y0, x1, y1


def _load_draft(path: Path, data: bytes, min_side: int) -> tuple[Image.Image, tuple | None]:
    """`load_image_draft`, and the box (x0, y0, x1, y1) of the picture in it where it was decoded reduced
    (else None): a side that is not a multiple of the reduction ends in a pixel that is partly padding."""
    from PIL import ImageOps, UnidentifiedImageError

    from .errors import EMPTY_IMAGE_FILE, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL
    from .images import MAX_PIXELS, MIN_SIDE, _decode_reason, _to_rgb

    if not data:
        raise DataError(EMPTY_IMAGE_FILE, "image file is empty (0 bytes)", path=path, field="image")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(_decode_reason(e), f"not a readable image: {e}", path=path, field="image") from e
    box = None
    with im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            message = f"image is {w}x{h} = {w * h:,} pixels, above the limit of {MAX_PIXELS:,}"
            raise DataError(IMAGE_TOO_LARGE, message, path=path, field="image")
        if min(w, h) < MIN_SIDE:
            message = f"image is {w}x{h}, a side is below {MIN_SIDE} px"
            raise DataError(IMAGE_TOO_SMALL, message, path=path, field="image")
        try:
            if im.format == "JPEG":
                scale = draft_scale(w, h, min_side)
                # draft gives the picture's extent in the reduced image: (0, 0, w / scale, h / scale).
                drafted = im.draft(im.mode, (w // scale, h // scale)) if scale > 1 else None
                box = drafted[1] if drafted and im.size != (w, h) else None
            im.load()
            if box is not None:
                box = _oriented_box(box, im.size, im.getexif().get(0x0112, 1))
            rgb = _to_rgb(ImageOps.exif_transpose(im))
        except OSError as e:
            message = f"image cannot be decoded: {e}"
            raise DataError(_decode_reason(e), message, path=path, field="image") from e
        except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
            message = f"image cannot be decoded: {e}"
            raise DataError(UNREADABLE_IMAGE, message, path=path, field="image") from e
    return rgb, box


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes, and its stat from the same open file (so it describes the bytes read)."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            return f.readall(), st
    except FileNotFoundError:
        raise DataError(MISSING_IMAGE, "image file does not exist", path=path, field="image") from None
    except OSError as e:
        raise DataError(UNREADABLE_IMAGE, f"cannot read image file: {e}", path=path, field="image") from e


def load_image_draft(
    path: str | os.PathLike, data: bytes | None = None, *, min_side: int | None = None
) -> Image.Image:
    """`load_image` (same checks, errors and RGB conversion), but a JPEG is decoded reduced in the DCT domain
    with Pillow (`Image.draft`).

    The result is at least `min_side` on its short side, or the full image when that is smaller than
    2 * min_side. Formats other than JPEG are decoded in full, as by `load_image`.
    """
    path = Path(path)
    data = _read(path)[0] if data is None else data
    return _load_draft(path, data, DRAFT_MIN_SIDE if min_side is None else min_side)[0]


def _plain_jpeg(data: bytes) -> bool:
    """True for a JPEG whose segments before the first scan hold no APP1 block (EXIF or XMP, which can rotate
    the image) and no multi-picture index (APP2 "MPF", which Pillow opens as MPO and decodes in full)."""
    if data[:2] != b"\xff\xd8":
        return False
    pos, end = 2, len(data) - 4
    while pos <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return True
        if marker == 0xE1 or (marker == 0xE2 and data[pos + 4 : pos + 8] == b"MPF\0"):
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _simplejpeg_reduced(data: bytes, min_side: int) -> tuple[np.ndarray, tuple] | None:
    """The RGB pixels `load_image_draft` gives, decoded by libjpeg-turbo through simplejpeg without Pillow's
    per-image overhead, and the picture's box in them (as `_load_draft`); None where that is not sure to be
    the same (then `load_image_draft` decodes it).

    Taken: a plain YCbCr or greyscale JPEG (`_plain_jpeg`) within the size limits that fast mode reduces
    (scale > 1), decoding without a libjpeg warning (`strict`). The same
    libjpeg-turbo scaled decode gives the same pixels as Pillow's draft mode (tests/test_data_scale_hash.py).
    """
    if simplejpeg is None or not _plain_jpeg(data):
        return None
    from .images import MAX_PIXELS, MIN_SIDE

    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in ("YCbCr", "Gray") or w * h > MAX_PIXELS or min(w, h) < MIN_SIDE:
        return None
    scale = draft_scale(w, h, min_side)
    if scale == 1:
        return None
    try:
        # The smallest libjpeg scaling M/8 that keeps these sizes is 1/scale: what Pillow's draft asks for.
        rgb = simplejpeg.decode_jpeg(data, "rgb", min_height=-(-h // scale), min_width=-(-w // scale))
    except ValueError:
        return None
    return rgb, (0.0, 0.0, w / scale, h / scale)


@functools.lru_cache(maxsize=4096)
def _resample_matrix(n_in: int, n_out: int, kernel: str, lo: float = 0.0,
                     hi: float | None = None) -> np.ndarray:
    """(n_out, n_in) weights of Pillow's resampling of one axis ("lanczos" or "box") of the span [lo, hi)
    (default: all n_in pixels; Pillow's resize box), in float: the same filter centres, windows and sample
    points as Pillow's resize, so that only its rounding differs."""
    hi = n_in if hi is None else hi
    scale = (hi - lo) / n_out
    filter_scale = max(scale, 1.0)
    support = (3.0 if kernel == "lanczos" else 0.5) * filter_scale
    centre = lo + (np.arange(n_out) + 0.5) * scale
    j = np.arange(n_in, dtype=np.float64)
    x = (j[None, :] - centre[:, None] + 0.5) * (1.0 / filter_scale)
    if kernel == "lanczos":
        w = np.where((x > -3) & (x < 3), np.sinc(x) * np.sinc(x / 3), 0.0)
    else:
        w = ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    w[(j[None, :] < lo[:, None]) | (j[None, :] >= hi[:, None])] = 0.0
    return w / w.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=4096)
def _dct_matrix(n_in: int, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """(8, n_in): the 32-point lowest-frequency orthonormal DCT-II rows after a Lanczos resize of [lo, hi)
    to 32."""
    k = np.arange(32)
    dct = np.sqrt(2 / 32) * np.cos(np.pi * (2 * k[None, :] + 1) * np.arange(8)[:, None] / 64)
    dct[0] /= np.sqrt(2)
    return dct @ _resample_matrix(n_in, 32, "lanczos", lo, hi)


def _bits_of(low: np.ndarray) -> int:
    """The phash bits of the 8x8 lowest DCT coefficients (see `phash_of`)."""
    low = np.round(low.ravel(), 6)
    # The median of the 63 non-DC coefficients is the 32nd smallest.
    bits = low > np.sort(low[1:])[31]
    bits[0] = False
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hashes_of_reduced(rgb: np.ndarray, box: tuple | None = None) -> tuple[int, bytes]:
    """`phash_of` and `colours_of` of a small (reduced-decoded) RGB array, in floating point throughout.

    The same resize filters and DCT as a linear map from the pixels, without Pillow's rounding to 8 bits
    between steps: several times faster at these sizes, and within the fast mode's tested tolerance.
    `box` (x0, y0, x1, y1), as Pillow's resize takes it: the picture's extent in `rgb` (default: all of it).
    A 640x425 JPEG decoded at 1/8 is 80x54 pixels of which 53.125 rows are the picture; resampling all 54
    would stretch it by 1.6% and move the colour cells by up to 75 levels.
    """
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if box is None else (float(v) for v in box)
    pixels = rgb.astype(np.float64)
    low = _dct_matrix(h, y0, y1) @ (pixels @ _LUMA) @ _dct_matrix(w, x0, x1).T
    rows = _resample_matrix(h, COLOUR_GRID, "box", y0, y1) @ pixels.reshape(h, w * 3)
    grid = _resample_matrix(w, COLOUR_GRID, "box", x0, x1) @ rows.reshape(COLOUR_GRID, w, 3)
    colours = np.clip(np.floor(grid + 0.5), 0, 255).astype(np.uint8)
    return _bits_of(low), colours.tobytes()


def hash_image_fast(path: str | os.PathLike) -> FastHash:
    """Perceptual hash and colour grid of a JPEG decoded at reduced size, and the SHA-256 of the file's bytes.

    Several times faster than `hash_image` on photos; the hashes differ from `hash_image`'s by the
    reduced decoding (tests/test_data_scale_hash.py bounds it). Images decoded in full (not JPEG, or too
    small to reduce) get `hash_image`'s hashes. It has no pixel hash: identical pixels are confirmed with
    `content_hash` only for images whose fast hashes are near (`data_tools.hashes`).
    """
    path = Path(path)
    try:
        data, st = _read(path)
        reduced = _simplejpeg_reduced(data, DRAFT_MIN_SIDE)
        if reduced is None:
            image, box = _load_draft(path, data, DRAFT_MIN_SIDE)
            reduced = (np.asarray(image), box) if box is not None else None
    except DataError as e:
        e.message += f" ({CLEAN_FIRST})"
        raise e.at()
    digest = hashlib.sha256(data).digest()
    if reduced is None:
        return FastHash(phash_of(image), colours_of(image), digest, st.st_size, st.st_mtime_ns)
    return FastHash(*hashes_of_reduced(*reduced), digest, st.st_size, st.st_mtime_ns)


def content_hash(path: str | os.PathLike) -> str:
    """Hex SHA-256 of an image's size and decoded RGB pixels: same picture, same hash, whatever the
    file format details."""
    return hash_image(path).content


def phash(path: str | os.PathLike) -> int:
    """64-bit perceptual hash of an image file (see `phash_of`)."""
    return hash_image(path).phash


def hash_images(paths: Iterable[str | os.PathLike], *, progress: bool = True,
                desc: str = "hashing images") -> dict[Path, ImageHash]:
    """Hash each distinct file once (many rows may share an image, as in VQA); return {path: ImageHash}."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    return {p: hash_image(p)
            for p in tqdm(unique, desc=desc, unit="img", disable=not progress or len(unique) < 100)}


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


# Multi-index hashing pays off while its chunks keep enough bits for small buckets; above this threshold
# (chunks of 7 bits or fewer) comparing every pair is as fast and simpler.
MIH_MAX_THRESHOLD = 7


def near_pairs(hashes, threshold: int = DEFAULT_NEAR_THRESHOLD, *,
               chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming(hashes[i], hashes[j]) <= threshold: arrays (i, j, distance), by (i, j).

    Exact, and below O(n^2) for thresholds up to `MIH_MAX_THRESHOLD` (see `near_pairs_mih`); above it, and
    when `chunk` is given, it compares every pair (`near_pairs_all`). Both return the same arrays.
    """
    h = _as_uint64(hashes)
    if chunk is not None or threshold > MIH_MAX_THRESHOLD:
        return near_pairs_all(h, threshold, chunk=chunk)
    return near_pairs_mih(h, threshold)


def _as_uint64(hashes) -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes
    return np.asarray([int(x) for x in hashes], dtype=np.uint64)


def near_pairs_all(
    hashes, threshold: int = DEFAULT_NEAR_THRESHOLD, *, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_pairs` by comparing every pair: the reference for `near_pairs_mih`, O(n^2).

    uint64 XOR and a popcount, `chunk` rows at a time (by default as many as keep a block near 2 M
    entries, 16 MB); 10,000 hashes (50 M pairs) take about 0.3 s on one core.
    """
    h = _as_uint64(hashes)
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


def _chunk_layout(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) of threshold + 1 disjoint bit fields that together cover the 64 bits."""
    m = threshold + 1
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    shifts = np.cumsum([0] + widths[:-1]).tolist()
    return [(s, (1 << w) - 1) for s, w in zip(shifts, widths)]


def near_pairs_mih(
    hashes, threshold: int = DEFAULT_NEAR_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_pairs` by multi-index hashing: exact, and far below O(n^2) for small thresholds.

    Split the 64 bits into threshold + 1 fields: two hashes at most `threshold` bits apart agree exactly
    on at least one field (pigeonhole). For each field, sort the hashes by it and compare only hashes
    with the same field value; a pair is kept at the first field on which it agrees, so no pair is
    reported twice. With 1 M random hashes and threshold 4 that is ~300 M comparisons instead of 500 G.
    """
    h = _as_uint64(hashes)
    n = len(h)
    if not 0 <= threshold < 64:
        return near_pairs_all(h, threshold)
    layout = _chunk_layout(threshold)
    found_i, found_j, found_d = [], [], []
    positions = np.arange(n)
    for c, (shift, mask) in enumerate(layout):
        keys = (h >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys, sorted_h = keys[order], h[order]
        if n < 2:
            break
        starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
        ends = np.append(starts[1:], n)
        run_end = np.repeat(ends, ends - starts)  # for each sorted position: the end of its run
        # Compare each position with the one `offset` later in its run, for growing offsets; positions whose
        # run is exhausted drop out, so the work is the number of same-field pairs, not n * the longest run.
        active = positions[run_end - positions > 1]
        offset = 1
        while active.size:
            x = sorted_h[active] ^ sorted_h[active + offset]
            dist = np.bitwise_count(x)
            hit = np.flatnonzero(dist <= threshold)
            if hit.size:
                x_hit = x[hit]
                # Already found at an earlier field on which the pair also agrees.
                first = np.ones(hit.size, bool)
                for prev_shift, prev_mask in layout[:c]:
                    first &= ((x_hit >> np.uint64(prev_shift)) & np.uint64(prev_mask)) != 0
                a, b = order[active[hit[first]]], order[active[hit[first]] + offset]
                found_i.append(np.minimum(a, b))
                found_j.append(np.maximum(a, b))
                found_d.append(dist[hit[first]].astype(np.uint8))
            offset += 1
            active = active[run_end[active] - active > offset]
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), d[order]


def colours_match_pairs(colours: np.ndarray, i: np.ndarray, j: np.ndarray, tolerance: int = COLOUR_TOLERANCE,
                        *, block: int = 8_192) -> np.ndarray:
    """`colours_match` for many pairs at once: colours is an (n, 768) uint8 array (or anything that gives
    rows for an index array, such as `hashes.StoredRows`); returns a bool per pair. Memory: a few blocks of
    `block` rows."""
    out = np.zeros(len(i), bool)
    for s in range(0, len(i), block):
        a, b = colours[i[s : s + block]], colours[j[s : s + block]]
        # |a - b| in uint8 without a wider copy: the larger minus the smaller never wraps.
        out[s : s + block] = (np.maximum(a, b) - np.minimum(a, b)).max(axis=1) <= tolerance
    return out


def group_ids(n: int, i, j) -> np.ndarray:
    """Connected components of n items joined by pairs (i[k], j[k]): each item's group id, the smallest
    index in its group (as `union_find_groups`), for millions of items and pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    if n == 0:
        return np.zeros(0, np.int64)
    if len(i) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # np.unique returns each label's first position: the smallest member, since positions increase.
    _, first = np.unique(labels, return_index=True)
    return first[labels].astype(np.int64)


def centre_groups(n: int, i, j, d) -> tuple[np.ndarray, np.ndarray]:
    """Groups of n items joined by pairs (i[k], j[k]) at distance d[k], each group around a centre that every
    member is paired with. Unlike `group_ids`, a chain (a~b, b~c, with a and c far apart) is not one group.

    Greedy in item order: an item that no earlier centre took becomes a centre and takes every later item
    paired with it that is still free (at the smallest distance of its pairs with it). Returns each item's
    centre (itself for a centre, else a smaller index) and its distance to it (0 for a centre). The work
    is a sort of the pairs and one pass over them: a group is never compared with itself pair by pair."""
    i, j, d = np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(d, np.int64)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    # By the earlier item, then the later one, then distance: an item's pairs with later items are met in
    # a run, after every earlier item has been decided, and the closest of repeated pairs first.
    order = np.lexsort((d, hi, lo))
    taken: dict[int, tuple[int, int]] = {}  # later item -> (its centre, distance)
    for a, b, dist in zip(lo[order].tolist(), hi[order].tolist(), d[order].tolist()):
        # `a` untaken is a centre (any centre that could take it came before it); `b` untaken is still free.
        if a != b and a not in taken and b not in taken:
            taken[b] = (a, dist)
    centre, distance = np.arange(n, dtype=np.int64), np.zeros(n, np.int64)
    if taken:
        items = np.fromiter(taken, np.int64, len(taken))
        centre[items], distance[items] = np.asarray(list(taken.values()), np.int64).T
    return centre, distance


def union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Connected components of n items joined by pairs: returns each item's group id, the smallest
    index in its group."""
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


def image_groups(
    hashes: list[ImageHash], threshold: int | None = DEFAULT_NEAR_THRESHOLD,
) -> tuple[list[int], list[tuple[int, int, int]]]:
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
        reps = np.asarray(sorted(first_of_content.values()), np.int64)
        ii, jj, dd = near_pairs([hashes[r].phash for r in reps], threshold)
        if len(ii):
            colours = np.frombuffer(b"".join(hashes[r].colours for r in reps), np.uint8)
            colours = colours.reshape(len(reps), -1)
            ok = colours_match_pairs(colours, ii, jj)
            near = list(zip(reps[ii[ok]].tolist(), reps[jj[ok]].tolist(), dd[ok].tolist()))
    links = pairs + near
    groups = group_ids(len(hashes), [i for i, _, _ in links], [j for _, j, _ in links]).tolist()
    return groups, near
