"""The one image loader used everywhere: RGB, EXIF orientation applied, size guards, errors that name the
file."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (
    BAD_VALUE,
    EMPTY_IMAGE_FILE,
    EMPTY_TEXT,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    MISSING_IMAGE,
    PATH_OUTSIDE_ROOT,
    TRUNCATED_IMAGE,
    UNREADABLE_IMAGE,
    WRONG_TYPE,
    DataError,
)

# Decompression-bomb guard. We check the header size ourselves, before decoding, with a limit lower
# than Pillow's (89.5 MP warns, 179 MP raises); no training image needs more than this.
MAX_PIXELS = 50_000_000
MIN_SIDE = 8

# Pillow's own bomb check would raise its own error before ours; ours names the file and the limit.
Image.MAX_IMAGE_PIXELS = None


_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")  # C:\data\a.jpg: absolute on Windows, where it was written


def relative_image_path(image: str, *, allow_outside_root: bool = False, flag: str | None = None) -> str:
    """A record's image path normalised (forward slashes, no `.` or `..` parts) and checked, not resolved.

    Absolute paths and paths whose `..` climbs above the image root are refused unless allowed (a data file
    must not make a training job read arbitrary files). `flag` is the caller's option that allows them,
    named in the message; without one the message names no option.
    """
    if not isinstance(image, str):
        raise DataError(WRONG_TYPE, f"expected a path string, got {type(image).__name__}", field="image")
    if "\x00" in image:
        raise DataError(BAD_VALUE, f"{image!r} holds a NUL character, which no file name can", field="image")
    if not image.strip():
        raise DataError(EMPTY_TEXT, "is an empty path", field="image")
    how = f" (pass {flag} to permit)" if flag else ""
    if os.path.isabs(image) or posixpath.isabs(image.replace("\\", "/")) or _WINDOWS_DRIVE.match(image):
        if not allow_outside_root:
            raise DataError(PATH_OUTSIDE_ROOT,
                            f"absolute path {image!r}: image paths are relative to the image root{how}",
                            field="image")
        return os.path.normpath(image)
    norm = posixpath.normpath(image.replace(os.sep, "/"))
    if (norm == ".." or norm.startswith("../")) and not allow_outside_root:
        raise DataError(PATH_OUTSIDE_ROOT, f"{image!r} points outside the image root{how}", field="image")
    return norm


def resolve_image_path(image: str, root: str | os.PathLike, *, allow_outside_root: bool = False,
                       flag: str | None = None) -> Path:
    """Resolve a record's image path against the image root (by default the JSONL file's folder).

    The path itself is checked by `relative_image_path` (`..` is applied to the text, so `a/../b` is `b`,
    even if `a` is a symlink). Symlinked folders are followed wherever they point: whoever can put a
    symlink in the image root chose where the images live. A symlinked file must point inside the image
    root or inside the folder holding the link; elsewhere it is refused like an absolute path, unless
    allowed, since a data set unpacked from an archive may carry such links.
    """
    norm = relative_image_path(image, allow_outside_root=allow_outside_root, flag=flag)
    root = Path(root).resolve()
    candidate = root / norm
    resolved = candidate.resolve()
    if allow_outside_root or not candidate.is_symlink() or resolved.is_dir():
        return resolved
    folder = candidate.parent.resolve()
    if any(base == resolved or base in resolved.parents for base in (root, folder)):
        return resolved
    how = f" (pass {flag} to permit)" if flag else ""
    raise DataError(PATH_OUTSIDE_ROOT, f"{image!r} is a symlink to {resolved}, outside the image root{how}",
                    field="image")


class ImagePathResolver:
    """`resolve_image_path` against one root with the same results, resolving each folder once rather than
    every path in full (a file's rows name few folders). A file name that is a symlink, or anything
    unusual, goes through `resolve_image_path` itself."""

    def __init__(self, root: str | os.PathLike, *, allow_outside_root: bool = False, flag: str | None = None):
        self.root, self.allow, self.flag = Path(root).resolve(), allow_outside_root, flag
        self.folders: dict[str, Path] = {}

    def _full(self, image: str) -> Path:
        return resolve_image_path(image, self.root, allow_outside_root=self.allow, flag=self.flag)

    def __call__(self, image: str) -> Path:
        head, name = os.path.split(image)
        if not name or name in (".", ".."):
            return self._full(image)
        folder = self.folders.get(head)
        if folder is None:
            try:
                folder = self.folders[head] = self._full(head or ".")
            except DataError:
                return self._full(image)  # its own message
        full = folder / name
        if os.path.islink(full):
            return self._full(image)
        return full


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the silent clipping of a plain `convert("RGB")`."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit greyscale: `convert("L")` clips at 255, turning most pixels white. Scale instead.
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and a.max() > 255:
            a = a * (255.0 / a.max())
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colours; show them on white, as a viewer would.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def _decode_reason(e: Exception) -> str:
    # Pillow reports a cut-off file as an OSError whose text varies by format and by stage.
    text = str(e).lower()
    return TRUNCATED_IMAGE if "truncated" in text or "broken data stream" in text else UNREADABLE_IMAGE


def _open_checked(path: str | os.PathLike, max_pixels: int, min_side: int) -> tuple[Path, int, Image.Image]:
    """(path, file size, opened image) after the checks every image gets before its pixels are decoded:
    a file name, an existing non-empty file, a known format, a size within the limits."""
    if "\x00" in str(path):
        raise DataError(BAD_VALUE, f"{str(path)!r} holds a NUL character, which no file name can",
                        field="image")
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(MISSING_IMAGE, "image file does not exist", path=path, field="image") from None
    except OSError as e:
        raise DataError(UNREADABLE_IMAGE, f"cannot stat image file: {e}", path=path, field="image") from e
    if size == 0:
        raise DataError(EMPTY_IMAGE_FILE, "image file is empty (0 bytes)", path=path, field="image")
    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(_decode_reason(e), f"not a readable image: {e}", path=path, field="image") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise DataError(IMAGE_TOO_LARGE, f"image is {w}x{h} = {w * h:,} pixels, above the limit of "
                        f"{max_pixels:,}", path=path, field="image")
    if min(w, h) < min_side:
        im.close()
        raise DataError(IMAGE_TOO_SMALL, f"image is {w}x{h}, a side is below {min_side} px", path=path,
                        field="image")
    return path, size, im


def load_image(
    path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied. Raises `DataError` naming the file."""
    path, _, im = _open_checked(path, max_pixels, min_side)
    with im:
        try:
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
        except OSError as e:
            raise DataError(_decode_reason(e), f"image cannot be decoded: {e}", path=path,
                            field="image") from e
        except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(UNREADABLE_IMAGE, f"image cannot be decoded: {e}", path=path,
                            field="image") from e
    return rgb


def _complete(path: Path, fmt: str | None, size: int) -> bool:
    """Whether a file of `size` bytes ends as its format says a whole file ends (without decoding it)."""
    with open(path, "rb") as f:
        head = f.read(12)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if fmt == "JPEG":  # the end-of-image marker, possibly followed by padding
        return b"\xff\xd9" in tail
    if fmt == "PNG":  # the IEND chunk closes every PNG
        return b"IEND" in tail[-16:]
    if fmt == "WEBP":  # the RIFF header states the size of what follows it
        return size >= int.from_bytes(head[4:8], "little") + 8
    if fmt == "BMP":  # the file header states the file's size
        return size >= int.from_bytes(head[2:6], "little")
    if fmt == "GIF":  # the trailer byte closes every GIF
        return tail.rstrip(b"\x00").endswith(b"\x3b")
    return True  # other formats: the header check only


def check_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> None:
    """The fast check of an image file, for every image of a data set before training: it exists, is not
    empty, its header names a known format and a size within the limits, and (JPEG, PNG, WebP, GIF, BMP)
    its last bytes are those of a whole file, so a cut-off download is caught. Decodes no pixels: `load_image`
    does. Raises `DataError` naming the file, as `load_image` does."""
    path, size, im = _open_checked(path, max_pixels, min_side)
    with im:
        fmt = im.format
    if not _complete(path, fmt, size):
        raise DataError(TRUNCATED_IMAGE, f"the {fmt} file ends before its end marker (cut off?)", path=path,
                        field="image")
