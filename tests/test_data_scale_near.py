"""Near-pair search below O(n^2): the multi-index search must give exactly the all-pairs search's pairs."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.hashing import (
    ImageHash,
    group_ids,
    image_groups,
    near_pairs,
    near_pairs_all,
    near_pairs_mih,
    union_find_groups,
)


def planted_hashes(seed: int, n_random: int = 3000) -> np.ndarray:
    """Random hashes, near duplicates of some at 0..8 flipped bits, and chains (a few bits per link)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, n_random, dtype=np.uint64, endpoint=True)
    out = [base]
    for flips in range(9):
        picked = base[rng.choice(n_random, 60, replace=False)].copy()
        for _ in range(flips):
            picked ^= np.uint64(1) << rng.integers(0, 64, len(picked)).astype(np.uint64)
        out.append(picked)
    for _ in range(30):  # chains: a~b~c~... where a and the last are far apart
        h = rng.integers(0, 2**64 - 1, dtype=np.uint64, endpoint=True)
        chain = [h]
        for _ in range(6):
            for bit in rng.choice(64, 3, replace=False):
                h ^= np.uint64(1) << np.uint64(bit)
            chain.append(h)
        out.append(np.array(chain, np.uint64))
    # Low-entropy hashes (a flat image hashes to 0) make large buckets in every field.
    out.append(np.array([0] * 20 + [1, 3, 7, 2**63], np.uint64))
    h = np.concatenate(out)
    return h[rng.permutation(len(h))]


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 4, 5, 7])
def test_mih_equals_all_pairs(threshold):
    h = planted_hashes(threshold)
    expected = near_pairs_all(h, threshold)
    found = near_pairs_mih(h, threshold)
    assert len(expected[0]) > 50  # planted pairs exist at this threshold
    for a, b in zip(found, expected):
        np.testing.assert_array_equal(a, b)
    # The public entry point takes Python ints too, and gives the same arrays.
    for a, b in zip(near_pairs([int(x) for x in h[:500]], threshold), near_pairs_all(h[:500], threshold)):
        np.testing.assert_array_equal(a, b)


def test_mih_edge_cases():
    for hashes in ([], [5], [5, 5], [0, 2**64 - 1]):
        for a, b in zip(near_pairs_mih(hashes, 4), near_pairs_all(hashes, 4)):
            np.testing.assert_array_equal(a, b)


def test_group_ids_equal_union_find():
    rng = np.random.default_rng(0)
    n = 500
    i, j = rng.integers(0, n, 300), rng.integers(0, n, 300)
    assert group_ids(n, i, j).tolist() == union_find_groups(n, zip(i.tolist(), j.tolist()))
    assert group_ids(3, [], []).tolist() == [0, 1, 2]


def test_image_groups_chains_and_colour_check():
    grey, other = bytes(768), bytes([200]) * 768
    hashes = [
        ImageHash("a", 0b0000, grey),
        ImageHash("b", 0b0111, grey),  # 3 bits apart
        ImageHash("c", 0b111111, grey),  # 3 from b, 6 from a: a chain joins all three
        ImageHash("d", 0b0001, other),  # near a, but other colours
        ImageHash("a", 0b0000, grey),  # same content as the first
    ]
    groups, near = image_groups(hashes, 4)
    assert groups == [0, 0, 0, 3, 0]
    assert sorted(near) == [(0, 1, 3), (1, 2, 3)]
