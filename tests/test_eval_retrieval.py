"""Recall@K: hand-computed cases (ties, several captions per image, K > candidates) and a brute-force
reference."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import retrieval
from eval.retrieval import recall_at_k

REPO = Path(__file__).resolve().parents[1]


def brute_force(scores, text_to_image, ks):
    """Sort every query's candidates explicitly: by score, correct items after wrong ones on ties."""
    n_texts, n_images = scores.shape
    t2i, i2t = [], []
    for t in range(n_texts):
        correct = np.arange(n_images) == text_to_image[t]
        order = np.lexsort((correct, -scores[t]))  # last key is primary
        t2i.append(int(np.flatnonzero(correct[order])[0]) + 1)
    for i in range(n_images):
        correct = text_to_image == i
        if not correct.any():
            continue
        order = np.lexsort((correct, -scores[:, i]))
        i2t.append(int(np.flatnonzero(correct[order])[0]) + 1)
    out = {}
    for name, ranks in (("image_to_text", np.array(i2t)), ("text_to_image", np.array(t2i))):
        out.update({f"{name}_R@{k}": float(np.mean(ranks <= k)) for k in ks})
        out[f"{name}_mean_rank"] = float(ranks.mean())
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def test_hand_computed_with_ties_and_several_captions():
    # 3 images; texts 0,1 -> image 0, texts 2,3 -> image 1, text 4 -> image 2.
    scores = np.array([
        [0.9, 0.1, 0.0],   # text 0: image 0 first -> rank 1
        [0.5, 0.5, 0.2],   # text 1: tie with image 1 -> pessimistic rank 2
        [0.3, 0.2, 0.1],   # text 2: image 1 second -> rank 2
        [0.0, 0.0, 0.0],   # text 3: all tied -> rank 3
        [0.1, 0.7, 0.6],   # text 4: image 2 second -> rank 2
    ])
    t2i = [0, 0, 1, 1, 2]
    r = recall_at_k(scores, t2i, ks=(1, 2, 10))
    assert r["text_to_image_R@1"] == pytest.approx(1 / 5)
    assert r["text_to_image_R@2"] == pytest.approx(4 / 5)
    assert r["text_to_image_mean_rank"] == pytest.approx((1 + 2 + 2 + 3 + 2) / 5)
    assert r["text_to_image_median_rank"] == 2.0
    # Image 0 column [.9,.5,.3,0,.1]: own text 0 is first -> rank 1.
    # Image 1 column [.1,.5,.2,0,.7]: own texts 2 (0.2), 3 (0.0); ahead: 0.7, 0.5 -> rank 3.
    # Image 2 column [0,.2,.1,0,.6]: own text 4 first -> rank 1.
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_mean_rank"] == pytest.approx(5 / 3)
    assert r["image_to_text_median_rank"] == 1.0
    assert r["image_to_text_R@10"] == 1.0 and r["text_to_image_R@10"] == 1.0  # K > candidates
    assert r == brute_force(scores, np.array(t2i), (1, 2, 10))


def test_constant_scores_get_no_credit_from_ties():
    r = recall_at_k(np.zeros((6, 3)), [0, 0, 1, 1, 2, 2], ks=(1, 3))
    assert r["text_to_image_R@1"] == 0.0 and r["text_to_image_R@3"] == 1.0
    # Each image has 2 own texts among 6: the first of them ranks 6 - 2 + 1 = 5.
    assert r["image_to_text_mean_rank"] == 5.0 and r["image_to_text_R@1"] == 0.0


def test_own_texts_tied_do_not_push_each_other_down():
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 1.0]])
    r = recall_at_k(scores, [0, 0, 1], ks=(1,))
    assert r["image_to_text_R@1"] == 1.0 and r["image_to_text_mean_rank"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_matrices(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 12))
    n_texts = int(rng.integers(1, 40))
    t2i = rng.integers(0, n_images, n_texts)  # some images may have no text
    # Few distinct values, so ties are common.
    scores = (rng.integers(0, 4, (n_texts, n_images)).astype(np.float32) if seed % 2
              else rng.random((n_texts, n_images)))
    ks = (1, 2, 5, 50)
    expected = brute_force(scores, t2i, ks)
    assert recall_at_k(scores, t2i, ks) == pytest.approx(expected)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 7)  # many small chunks give the same answer
    assert recall_at_k(scores, t2i, ks) == pytest.approx(expected)


def test_torch_tensors_accepted():
    rng = np.random.default_rng(1)
    scores, t2i = rng.random((20, 4)).astype(np.float32), np.repeat(np.arange(4), 5)
    expected = recall_at_k(scores, t2i)
    assert recall_at_k(torch.from_numpy(scores), torch.from_numpy(t2i)) == expected
    assert recall_at_k(torch.from_numpy(scores).to(torch.float64), list(t2i)) == expected
    half = torch.from_numpy(scores).to(torch.bfloat16)  # numpy has no bfloat16: compared after upcasting
    assert recall_at_k(half, t2i) == recall_at_k(half.float().numpy(), t2i)


def test_large_matrix_is_fast():
    import time
    rng = np.random.default_rng(0)
    scores = rng.random((25000, 5000), dtype=np.float32)
    t0 = time.perf_counter()
    r = recall_at_k(scores, np.repeat(np.arange(5000), 5))
    assert time.perf_counter() - t0 < 10
    assert 0 <= r["text_to_image_R@10"] < 0.01


@pytest.mark.parametrize("t2i, match",
                         [([0, 3], "outside"), ([0], "one image index per text"), ([0.5, 1], "integer")])
def test_bad_index_rejected(t2i, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(np.zeros((2, 3)), np.array(t2i))


def test_cli_npy_and_json(tmp_path):
    rng = np.random.default_rng(3)
    scores, t2i = rng.random((10, 5)), np.repeat(np.arange(5), 2)
    np.save(tmp_path / "s.npy", scores)
    (tmp_path / "t.json").write_text(json.dumps(t2i.tolist()))
    proc = subprocess.run([sys.executable, "-m", "eval", "retrieval", "--scores", tmp_path / "s.npy",
                           "--text-image-index", tmp_path / "t.json", "--k", "1", "3", "--json"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pytest.approx(recall_at_k(scores, t2i, ks=(1, 3)))
