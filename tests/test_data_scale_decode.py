"""Fast hashing's JPEG decoding: simplejpeg gives Pillow's draft-mode pixels, the cases it leaves to Pillow
are still hashed as Pillow decodes them, and the float hash of a reduced image is Pillow's within rounding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools import hashing
from data_tools.hashing import (
    _plain_jpeg,
    _simplejpeg_reduced,
    colours_of,
    hamming,
    hash_image_fast,
    hashes_of_reduced,
    load_image_draft,
    phash_of,
)
from tests.test_data_scale_hash import SIZES, photo

pytest.importorskip("simplejpeg")


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


CASES = [
    (
        f"{w}x{h} q{q} {sub}{' progressive' if prog else ''}",
        photo(k, w, h),
        {"quality": q, "subsampling": sub, "progressive": prog},
    )
    for k, ((w, h), q, sub, prog) in enumerate(
        zip(SIZES[10:], [75, 90, 95] * 6, [0, 1, 2] * 6, [False, False, True, False] * 4)
    )
]


@pytest.mark.parametrize("name,image,save", CASES, ids=[c[0] for c in CASES])
def test_simplejpeg_gives_pillow_draft_pixels(tmp_path, name, image, save):
    for mode in ("RGB", "L"):
        data = jpeg_bytes(image.convert(mode), **save)
        path = tmp_path / "x.jpg"
        path.write_bytes(data)
        expected = np.asarray(load_image_draft(path))
        reduced = _simplejpeg_reduced(data, hashing.DRAFT_MIN_SIDE)
        if min(image.size) < 2 * hashing.DRAFT_MIN_SIDE:
            assert reduced is None  # decoded in full, by Pillow
            continue
        got, box = reduced
        assert got.shape == expected.shape and got.dtype == np.uint8
        scale = hashing.draft_scale(*image.size)
        assert box == (0, 0, image.width / scale, image.height / scale)
        np.testing.assert_array_equal(got, expected)
        # Without simplejpeg, Pillow decodes the same pixels: the same hashes either way.
        with_simplejpeg = hash_image_fast(path)
        try:
            saved, hashing.simplejpeg = hashing.simplejpeg, None
            assert hash_image_fast(path) == with_simplejpeg
        finally:
            hashing.simplejpeg = saved


def test_exif_rotation_cmyk_and_bad_data_go_through_pillow(tmp_path):
    image = photo(7, 640, 480)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate: the hash must be of the upright image, as load_image shows it
    cases = {
        "rotated": jpeg_bytes(image, exif=exif.tobytes()),
        "cmyk": jpeg_bytes(image.convert("CMYK")),
        "xmp": jpeg_bytes(image, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="3"/></x:xmpmeta>'),
    }
    plain = jpeg_bytes(image)
    cut = plain[: len(plain) * 2 // 3]  # Pillow refuses a truncated file; so must fast mode
    for name, data in cases.items():
        assert not _plain_jpeg(data) or _simplejpeg_reduced(data, 48) is None, name
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        reduced = np.asarray(load_image_draft(path))
        fast = hash_image_fast(path)
        assert (fast.phash, fast.colours) == hashes_of_reduced(reduced), name
    assert np.asarray(load_image_draft(tmp_path / "rotated.jpg")).shape == (80, 60, 3)
    assert _plain_jpeg(plain) and _simplejpeg_reduced(plain, 48) is not None
    (tmp_path / "cut.jpg").write_bytes(cut)
    assert _simplejpeg_reduced(cut, 48) is None
    with pytest.raises(hashing.DataError, match="cut.jpg"):
        hash_image_fast(tmp_path / "cut.jpg")


def test_float_hash_of_reduced_image_is_pillows_within_rounding(tmp_path):
    worst_bits, worst_colour = 0, 0
    for k in range(40):
        w, h = [(80, 60), (60, 80), (160, 120), (81, 55), (125, 94)][k % 5]
        image = photo(300 + k, w, h)
        phash, colours = hashes_of_reduced(np.asarray(image))
        worst_bits = max(worst_bits, hamming(phash, phash_of(image)))
        theirs = np.frombuffer(colours_of(image), np.uint8)
        diff = np.abs(np.frombuffer(colours, np.uint8).astype(int) - theirs)
        worst_colour = max(worst_colour, int(diff.max()))
    # Pillow rounds to 8 bits after each resize pass and after the grey conversion; the float map does not.
    assert worst_colour <= 1
    assert worst_bits <= 2
