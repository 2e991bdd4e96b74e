"""Fast hashing of JPEGs whose sides are not multiples of the decode reduction (640x425 at 1/8 decodes to
80x54, of which 53.125 rows are the picture): within tolerance of a full decode on both decode paths and
every EXIF orientation, identical pixels as JPEG and PNG found, and hash files of the old version refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_tools import hashes, hashing, split
from data_tools.hashing import hamming, hash_image, hash_image_fast
from tests.test_data_scale_hash import FAST_MAX_COLOUR, FAST_MAX_HAMMING, photo

ODD_SIZES = [(640, 425), (640, 427), (500, 333), (427, 640)]


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request, monkeypatch):
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    else:  # Pillow's draft mode decodes every JPEG
        monkeypatch.setattr(hashing, "simplejpeg", None)
    return request.param


def differences(path) -> tuple[int, int]:
    exact, fast = hash_image(path), hash_image_fast(path)
    exact_colours = np.frombuffer(exact.colours, np.uint8).astype(int)
    colour = np.abs(exact_colours - np.frombuffer(fast.colours, np.uint8)).max()
    return hamming(exact.phash, fast.phash), int(colour)


def test_odd_sizes_hash_within_tolerance_on_both_decoders(tmp_path, decoder):
    worst = [0, 0]
    for w, h in ODD_SIZES:
        for seed in (7, 8):
            path = tmp_path / f"{w}x{h}_{seed}.jpg"
            photo(seed, w, h).save(path, quality=90)
            scale = hashing.draft_scale(w, h)
            assert scale > 1 and (w % scale or h % scale)
            bits, colour = differences(path)
            worst = [max(worst[0], bits), max(worst[1], colour)]
    # Resampling the padded last row as picture moved a cell by up to 75 levels (640x425) and 6 bits.
    assert worst[0] <= FAST_MAX_HAMMING and worst[1] <= FAST_MAX_COLOUR, worst


def test_every_exif_orientation_of_an_odd_size(tmp_path):
    # Rotated JPEGs go through Pillow's draft mode: the partial row or column ends up on another side.
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        photo(7, 640, 425).save(path, quality=90, exif=exif.tobytes())
        bits, colour = differences(path)
        assert bits <= FAST_MAX_HAMMING and colour <= FAST_MAX_COLOUR, (orientation, bits, colour)


def test_identical_pixels_as_jpeg_and_png_are_found(tmp_path, decoder, capsys):
    photo(7, 640, 425).save(tmp_path / "a.jpg", quality=90)
    Image.open(tmp_path / "a.jpg").convert("RGB").save(tmp_path / "a_copy.png")  # the same pixels
    for name, image in (("train", "a.jpg"), ("val", "a_copy.png")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": image, "captions": ["x"]}) + "\n")
    files = [str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")]
    assert split.main_check_leakage(files + ["--workers", "1", "--no-hash-cache"]) == 1
    assert "a.jpg <-> a_copy.png  (identical)" in capsys.readouterr().out


def test_hash_files_of_the_previous_version_are_not_reused(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    photo(7, 640, 425).save(path, quality=90)
    cache = tmp_path / "cache.npz"
    with monkeypatch.context() as m:
        m.setattr(hashes, "VERSION", 2)  # a cache written before the fast hashes changed
        old = hashes.ImageHasher("fast", workers=1, cache=cache, progress=False)
        old.hash([str(path)])
        old.save()
    with pytest.warns(UserWarning, match="version 2, this data_tools reads version 3: hash the images again"):
        hasher = hashes.ImageHasher("fast", workers=1, cache=cache, progress=False)
    table, rows = hasher.hash([str(path)])
    assert hasher.stats["hashed"] == 1 and hasher.stats["cached"] == 0
    assert int(table.phash[rows[0]]) == hash_image_fast(path).phash
    with pytest.raises(hashing.DataError, match="cache.npz.*version 2"):  # given as --hashes: an error
        hashes.load_hash_files([str(cache)])
