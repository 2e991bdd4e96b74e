"""Image-text retrieval: Recall@K and mean / median rank in both directions.

`scores[t, i]` is the similarity of text t and image i; `text_to_image[t]` is the index of the image
text t describes (an image may have several texts, as in COCO and Flickr30k).

- text -> image: each text queries all images; its rank is the 1-based rank of its image.
- image -> text: each image queries all texts; its rank is the 1-based rank of the first of its
  texts (so R@K counts a hit if ANY of its captions is in the top K, as in CLIP_benchmark).
  Images that no text describes have nothing to retrieve and are left out of this direction.

Ties are pessimistic: a correct item ranks below every wrong item with the same score, so a model
that gives everything the same score gets no credit by luck of index order. Without exact ties
this equals ranking with `topk` / `argsort` as open_clip and CLIP_benchmark do. Recall@K for K
larger than the number of candidates is 1.0 (every rank is within K). Recalls are fractions; the
median rank is numpy's median, so it can end in .5 for an even number of queries.
"""

from __future__ import annotations

import numpy as np

# Rows per chunk are chosen so a boolean comparison block stays near this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, any device or dtype (bfloat16 has no numpy type)
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def similarity(text_embeds, image_embeds) -> np.ndarray:
    """`scores` of the embeddings: text x image dot products, where equal embeddings score exactly the same
    (a matrix product may round a row differently at another position, and a tie counts against the
    model: a caption shared by two images, embedded alike, must tie exactly with its copy)."""
    texts, text_rows = np.unique(_to_numpy(text_embeds), axis=0, return_inverse=True)
    images, image_rows = np.unique(_to_numpy(image_embeds), axis=0, return_inverse=True)
    return (texts @ images.T)[np.ix_(text_rows.reshape(-1), image_rows.reshape(-1))]


def _check(scores: np.ndarray, text_to_image: np.ndarray) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D texts x images matrix, got shape {scores.shape}")
    n_texts, n_images = scores.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must hold one image index per text ({n_texts}), got shape "
                         f"{text_to_image.shape}")
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image has indices outside [0, {n_images}) (min {text_to_image.min()}, "
                         f"max {text_to_image.max()})")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")


def text_to_image_ranks(scores, text_to_image) -> np.ndarray:
    """1-based rank of each text's image among all images (ties pessimistic)."""
    n_texts, n_images = scores.shape
    target = scores[np.arange(n_texts), text_to_image]
    ranks = np.empty(n_texts, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    for start in range(0, n_texts, step):
        block = scores[start:start + step]
        # Every image scoring at least as high as the correct one (the correct one included) is ahead or
        # level.
        ranks[start:start + step] = (block >= target[start:start + step, None]).sum(axis=1)
    return ranks


def image_to_text_ranks(scores, text_to_image) -> np.ndarray:
    """1-based rank of each image's best-ranked own text among all texts, for images that have texts."""
    n_texts, n_images = scores.shape
    own = scores[np.arange(n_texts), text_to_image]
    best = np.full(n_images, -np.inf, dtype=np.float64)
    np.maximum.at(best, text_to_image, own)
    # Own texts tied with the best one do not push it down: subtract them from the "level" count.
    own_level = np.bincount(text_to_image, weights=(own == best[text_to_image]), minlength=n_images)
    ahead_or_level = np.zeros(n_images, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    for start in range(0, n_texts, step):
        ahead_or_level += (scores[start:start + step] >= best[None, :]).sum(axis=0)
    has_text = np.bincount(text_to_image, minlength=n_images) > 0
    ranks = ahead_or_level - own_level.astype(np.int64) + 1
    return ranks[has_text]


def _summary(ranks: np.ndarray, ks, prefix: str) -> dict:
    out = {f"{prefix}_R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def recall_at_k(scores, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@K (fractions) and mean / median 1-based rank for `text_to_image` and `image_to_text`.

    `scores` is a texts x images similarity matrix (numpy or torch), `text_to_image[t]` the image of
    text t. Ties count against the model (see the module docstring).
    """
    scores = _to_numpy(scores)
    text_to_image = _to_numpy(text_to_image)
    if scores.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
    if (text_to_image.dtype.kind == "f" and text_to_image.size
            and np.all(text_to_image == np.round(text_to_image))):
        text_to_image = text_to_image.astype(np.int64)  # JSON or float arrays of whole numbers
    _check(scores, text_to_image)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be at least 1, got {ks}")
    if scores.shape[0] == 0:
        raise ValueError("scores has no texts")
    result = {}
    result.update(_summary(image_to_text_ranks(scores, text_to_image), ks, "image_to_text"))
    result.update(_summary(text_to_image_ranks(scores, text_to_image), ks, "text_to_image"))
    return result
