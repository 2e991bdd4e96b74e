"""Hash files keep their colour grids on disk: rows read on demand equal the saved rows, across shards."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.hashes import _ARRAYS, COLOUR_BYTES, HashTable, StoredRows, load_hash_files
from data_tools.hashing import colours_match, colours_match_pairs


def table(n: int, seed: int, prefix: str) -> HashTable:
    rng = np.random.default_rng(seed)
    arrays = {k: np.zeros((n, *s), t) for k, (t, s) in _ARRAYS.items()}
    arrays["phash"] = rng.integers(0, 2**63, n).astype(np.uint64)
    arrays["colours"] = rng.integers(0, 256, (n, COLOUR_BYTES)).astype(np.uint8)
    arrays["pixel_sha256"] = rng.integers(0, 256, (n, 32)).astype(np.uint8)
    return HashTable([f"/data/{prefix}{k}.jpg" for k in range(n)], arrays)


def test_stored_rows_equal_the_saved_rows_across_files(tmp_path):
    parts = [table(n, seed, f"s{seed}_") for seed, n in enumerate((300, 1, 0, 250))]
    for k, t in enumerate(parts):
        t.save(tmp_path / f"h-{k}.npz")
    merged = load_hash_files([str(tmp_path / "h-*.npz")])
    expected = np.concatenate([t.colours for t in parts])
    assert isinstance(merged.colours, StoredRows) and merged.colours.shape == expected.shape
    rng = np.random.default_rng(0)
    for index in (rng.integers(0, len(expected), 1000), np.arange(len(expected))[::-1], [299, 300, 301], []):
        np.testing.assert_array_equal(merged.colours[index], expected[np.asarray(index, np.int64)])
    np.testing.assert_array_equal(np.asarray(merged.colours), expected)
    np.testing.assert_array_equal(merged.phash, np.concatenate([t.phash for t in parts]))
    with pytest.raises(IndexError):
        merged.colours[[len(expected)]]
    # Saving a table whose rows are on disk over its own file (the cache does) keeps them.
    one = HashTable.load(tmp_path / "h-0.npz")
    one.save(tmp_path / "h-0.npz")
    again = HashTable.load(tmp_path / "h-0.npz")
    np.testing.assert_array_equal(again.colours[np.arange(300)], parts[0].colours)


def test_colour_check_of_pairs_equals_one_pair_at_a_time(tmp_path):
    rng = np.random.default_rng(1)
    colours = rng.integers(100, 160, (200, COLOUR_BYTES)).astype(np.uint8)
    colours[::3] = colours[0]  # some pairs equal, the rest differ by up to 60 levels
    colours[1::7, 5] = 0  # and some by more than 100 in one cell
    i, j = rng.integers(0, 200, 5000), rng.integers(0, 200, 5000)
    expected = [colours_match(colours[a].tobytes(), colours[b].tobytes()) for a, b in zip(i, j)]
    assert 0 < sum(expected) < len(expected)
    assert colours_match_pairs(colours, i, j, block=64).tolist() == expected
    t = table(200, 2, "c")
    t.arrays["colours"] = colours
    t.save(tmp_path / "c.npz")
    assert colours_match_pairs(HashTable.load(tmp_path / "c.npz").colours, i, j).tolist() == expected
