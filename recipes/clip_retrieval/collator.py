"""Retrieval data: (image, caption) pairs, one caption per image per epoch, optional hard negatives.

Captions are tokenized once, before training, as the text tower reads them. CLIP: bos + text + eos; a
text longer than `max_length` is cut before its eos, which is kept because CLIP pools the text at the eos
token. SigLIP and SigLIP 2 pool the text at its last position and were trained on texts padded to a fixed
length (64): their tokenizer's own truncation applies, and the collator pads every text to that length on
the tokenizer's padding side (`pad_to`), as their processors do. Every cut is counted and printed.

Each epoch, `EpochPairSampler` draws an order of the images and, for each image, one of its captions (and
one of its hard negatives), all from (seed, epoch) alone, so a resumed run and a multi-process run see the
same pairs as an uninterrupted single process; with several processes, `GlobalBatchShares` cuts each global
batch of that order into the processes' shares.

The collator opens the images and pads the texts: the positives first (row i belongs to image i), then
the hard negatives. Every text and image carries a key (hash of the normalised caption, index of the
image file), and each image the keys of all its captions, so that the loss can tell false negatives from
true ones.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from data_tools.errors import BAD_VALUE, MISSING_FIELD, MISSING_IMAGE, WRONG_TYPE, DataError
from data_tools.images import check_image, load_image, resolve_image_path
from data_tools.jsonl import iter_jsonl, read_jsonl, write_jsonl
from data_tools.synth import SIZES, WORDS, draw_scene, make_scene
from recipes.common.cache import cache_root
from recipes.common.data import embedded_dataset

logger = logging.getLogger(__name__)


# --- texts --------------------------------------------------------------------------------------------
def caption_key(text: str) -> int:
    """A 63-bit key of the caption up to case and spacing: equal keys mean the same caption."""
    normal = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class TextLengthReport:
    texts: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    how: str = "eos kept"  # how a text is cut: before its eos (CLIP), or by the tokenizer (SigLIP)

    def __str__(self) -> str:
        return (f"text length: {self.texts} texts, {self.truncated} cut to max_length ({self.tokens_cut} "
                f"tokens cut, {self.how})")


def tokenize_texts(texts: list[str], tokenizer, max_length: int,
                   report: TextLengthReport | None = None, *, pooled_at_eos: bool = True) -> list[list[int]]:
    """Token ids per text with the tokenizer's special tokens; longer texts than `max_length` are cut
    (counted): before their eos when the tower pools at eos (CLIP), else as the tokenizer truncates."""
    report = report if report is not None else TextLengthReport()
    if not pooled_at_eos:
        report.how = "as the tokenizer truncates"  # SigLIP 2's adds no eos to keep
        full = tokenizer(list(texts))["input_ids"]
        cut = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        for a, b in zip(full, cut):
            report.texts += 1
            report.truncated += len(a) > len(b)
            report.tokens_cut += len(a) - len(b)
        return cut
    out = []
    for text, ids in zip(texts, tokenizer(list(texts))["input_ids"]):
        if ids[-1] != tokenizer.eos_token_id:
            raise ValueError(f"the tokenizer does not end {text!r} with its eos token, where CLIP pools the "
                             f"text: got {ids[-3:]}, eos is {tokenizer.eos_token_id}")
        report.texts += 1
        if len(ids) > max_length:
            report.truncated += 1
            report.tokens_cut += len(ids) - max_length
            ids = ids[: max_length - 1] + ids[-1:]
        out.append(ids)
    return out


# --- pairs ----------------------------------------------------------------------------------------------
def records_by_image(records):
    """One record per image, with the captions (and neg_captions) of every row naming it, in file order.

    A file with a row per caption would otherwise be a retrieval set with each image several times: in
    evaluation its copies tie, and every text query misses the top 1. Records with one row per image are
    returned as they are."""
    images = list(records["image"])
    if len(set(images)) == len(images):
        return records
    has_negatives = "neg_captions" in records.column_names
    merged: dict[str, dict] = {}
    for row in records:
        out = merged.setdefault(row["image"], {"image": row["image"], "captions": [], "neg_captions": None})
        out["captions"] += row["captions"]
        if has_negatives and row["neg_captions"]:
            out["neg_captions"] = (out["neg_captions"] or []) + row["neg_captions"]
    out = datasets.Dataset.from_list(list(merged.values()))
    out.info.description = f"{records.info.description}; {len(images)} rows merged into {len(merged)} images"
    logger.info("%s", out.info.description)
    return out


class PairDataset(torch.utils.data.Dataset):
    """Image records with their captions (and hard negatives) tokenized; one item per image.

    `dataset[(i, j, k)]` is image i with caption j and hard negative k (-1: none), as `EpochPairSampler`
    draws them; `dataset[i]` is image i with its first caption and no negative (evaluation);
    `dataset[(i, j, -1, False)]` is a stand-in (`GlobalBatchShares`), image key -1: no part of the loss.
    """

    def __init__(self, records, tokenizer, max_length: int, *, hard_negatives: bool = False,
                 pooled_at_eos: bool = True):
        self.images = list(records["image"])
        self.report = TextLengthReport()
        tokenize = functools.partial(tokenize_texts, tokenizer=tokenizer, max_length=max_length,
                                     report=self.report, pooled_at_eos=pooled_at_eos)
        self.captions = [tokenize(c) for c in records["captions"]]
        self.caption_texts = [list(c) for c in records["captions"]]
        self.caption_keys = [[caption_key(t) for t in c] for c in records["captions"]]
        # The keys of all of an image's captions go with it, padded to one width for the whole data set (the
        # processes' batches gather into one): a text equal to any of them describes it, drawn or not.
        self.caption_width = max(map(len, self.caption_keys), default=0)
        negatives = (records["neg_captions"] if hard_negatives and "neg_captions" in records.column_names
                     else None)
        negatives = [n or [] for n in negatives] if negatives is not None else [[] for _ in self.images]
        # A negative that is one of the image's own captions (rows merged per image) would push the image
        # away from that caption whenever another one is drawn: dropped, and counted.
        kept = [[t for t in n if caption_key(t) not in own]
                for n, own in zip(negatives, map(set, self.caption_keys))]
        self.negatives_dropped = sum(len(n) - len(k) for n, k in zip(negatives, kept))
        negatives = kept
        self.negatives = [tokenize(n) if n else [] for n in negatives]
        self.negative_keys = [[caption_key(t) for t in n] for n in negatives]
        # The same file named by two rows is one image: neither may be the other's negative.
        index = {}
        self.image_keys = [index.setdefault(path, len(index)) for path in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item) -> dict:
        i, j, k, counted = (item, 0, -1, True) if isinstance(item, (int, np.integer)) else (*item, True)[:4]
        return {
            "image": self.images[i],
            "image_key": self.image_keys[i] if counted else -1,
            "input_ids": self.captions[i][j],
            "text_key": self.caption_keys[i][j],
            "caption_keys": self.caption_keys[i] + [-1] * (self.caption_width - len(self.caption_keys[i])),
            "neg_input_ids": self.negatives[i][k] if k >= 0 else None,
            "neg_key": self.negative_keys[i][k] if k >= 0 else None,
        }

    def texts(self) -> tuple[list[list[int]], list[int]]:
        """Every caption's token ids and the index of its image (the retrieval evaluation's text side)."""
        ids = [c for caps in self.captions for c in caps]
        return ids, [i for i, caps in enumerate(self.captions) for _ in caps]

    def epoch_sampler(self, seed: int) -> EpochPairSampler:
        return EpochPairSampler([len(c) for c in self.captions], [len(n) for n in self.negatives], seed)


class EpochPairSampler(torch.utils.data.Sampler):
    """Every image once per epoch, in a random order, each with one random caption (and hard negative).

    A pure function of (seed, epoch). The Trainer (through accelerate) calls `set_epoch` before each epoch.
    """

    def __init__(self, n_captions: list[int], n_negatives: list[int], seed: int):
        self.n_captions, self.n_negatives = np.asarray(n_captions), np.asarray(n_negatives)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.n_captions)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.n_captions))
        caption = rng.integers(0, self.n_captions)
        negative = np.where(self.n_negatives > 0, rng.integers(0, np.maximum(self.n_negatives, 1)), -1)
        for i in order:
            yield int(i), int(caption[i]), int(negative[i])


class GlobalBatchShares(torch.utils.data.Sampler):
    """The pairs of `pairs` in global batches of `batch_size` x `world_size` (the last one shorter, or dropped
    with `drop_last`), each cut into `world_size` shares in process order, as even as possible. accelerate
    deals them out in turn (process p takes every share p), so the processes together train on exactly the
    batches of one process holding the global batch, each pair once per epoch.

    A share that would be empty (a last global batch with fewer pairs than processes) is a stand-in instead:
    the batch's first pair without its negative, not counted (`PairDataset`), so that every process still
    runs its forward and backward.
    """

    def __init__(self, pairs: EpochPairSampler, batch_size: int, world_size: int, drop_last: bool = False):
        self.pairs, self.world_size, self.drop_last = pairs, world_size, drop_last
        # Not kept as `batch_size`: accelerate's wrapper would hold back every share shorter than that.
        self.global_size = batch_size * world_size

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        n, size = len(self.pairs), self.global_size
        return (n // size if self.drop_last else -(-n // size)) * self.world_size

    def __iter__(self):
        order, size = list(self.pairs), self.global_size
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            if len(batch) < size and self.drop_last:
                return
            for share in np.array_split(np.arange(len(batch)), self.world_size):
                yield [batch[i] for i in share] or [(*batch[0][:2], -1, False)]


# Text towers that pool at the last position and were trained on texts padded to their full length.
PADDED_TEXT_MODEL_TYPES = ("siglip", "siglip2")


def pools_at_eos(model) -> bool:
    """Whether the text tower reads the text at its eos token (CLIP), not at its last padded position."""
    return model.config.model_type not in PADDED_TEXT_MODEL_TYPES


def collator_for(model, tokenizer, image_processor) -> ContrastiveCollator:
    """The collator with the padding rule of `model`'s text tower (SigLIP: to its full length)."""
    pad_to = None if pools_at_eos(model) else model.config.text_config.max_position_embeddings
    return ContrastiveCollator(image_processor, tokenizer.pad_token_id, tokenizer, pad_to)


@dataclass
class ContrastiveCollator:
    """Opens the images and pads the texts: input_ids rows are the positives (row i: image i), then the
    negatives.

    Texts are right-padded to the longest, or, with `pad_to` (SigLIP), padded by `tokenizer` to that fixed
    length on its own padding side, with an attention mask where its processor returns one. The images
    are whatever the image processor returns: `pixel_values`, and for SigLIP 2 NaFlex also
    `pixel_attention_mask` and `spatial_shapes`.
    """

    image_processor: object
    pad_token_id: int
    tokenizer: object = None
    pad_to: int | None = None

    def images(self, paths: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.image_processor([load_image(p) for p in paths], return_tensors="pt"))

    def texts(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.pad_to is not None:
            return dict(self.tokenizer.pad({"input_ids": ids}, padding="max_length", max_length=self.pad_to,
                                           return_tensors="pt"))
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention_mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        negatives = [f for f in features if f["neg_input_ids"] is not None]
        texts = self.texts([f["input_ids"] for f in features] + [f["neg_input_ids"] for f in negatives])
        return {
            **self.images([f["image"] for f in features]),
            **texts,
            "image_keys": torch.tensor([f["image_key"] for f in features]),
            "text_keys": torch.tensor([f["text_key"] for f in features] + [f["neg_key"] for f in negatives]),
            "caption_keys": torch.tensor([f["caption_keys"] for f in features]),
        }


# --- the embedded default -------------------------------------------------------------------------------
def drop_size_words(caption: str, lang: str = "en") -> str:
    """The synthetic caption without its size words ("a small red circle" -> "a red circle")."""
    words = [w for size in SIZES for w in WORDS[lang]["size"][size]]
    if lang == "zh":  # "左侧的一个小的红色圆形": the size is "<word>的" before the colour
        return re.sub("|".join(f"{w}的" for w in words), "", caption)
    # English sizes always follow an article, which must then agree with the next word.
    pattern = rf"\b(?:a|an) (?:{'|'.join(words)}) (\w)"
    return re.sub(pattern, lambda m: ("an " if m[1] in "aeiou" else "a ") + m[1], caption)


def embedded_retrieval(lang: str = "en", seed: int = 0, n: int = 1000,
                       without_size: bool = True) -> dict[str, Path]:
    """The embedded default: synthetic retrieval records split 80/10/10 by image; built on first use.

    `without_size` rewrites every caption without its size words (duplicates within a record merged),
    into `<split>.nosize.jsonl` next to the originals: the fine-tuning task never names the size, the
    attribute the zero-shot evaluation asks about (see README, "Forgetting").
    """
    splits = embedded_dataset("retrieval", n=n, lang=lang, seed=seed)
    if not without_size:
        return splits
    out = {}
    for name, path in splits.items():
        out[name] = path.with_name(f"{name}.nosize.jsonl")
        if not out[name].exists():
            rows = read_jsonl(path)
            for row in rows:
                row["captions"] = list(dict.fromkeys(drop_size_words(c, lang) for c in row["captions"]))
            # A file of its own per process, then an atomic rename: DDP ranks build it at the same time.
            tmp = out[name].with_name(f"{out[name].name}.{os.getpid()}")
            write_jsonl(tmp, rows)
            os.replace(tmp, out[name])
    return out


# synth seed of the zero-shot images: neither the fine-tuning (0) nor pre-training (10,000) scenes
ZERO_SHOT_SEED = 20_000
ZERO_SHOT_ATTRIBUTES = ("size", "color", "shape")


def embedded_zero_shot(attribute: str = "size", n: int = 200, lang: str = "en",
                       seed: int = ZERO_SHOT_SEED) -> Path:
    """A zero-shot classification file of `n` one-object synthetic images labelled with the object's
    `attribute`.

    Rows are `{"image": "images/000007.png", "label": "small"}`; the label is the attribute's first
    word in `lang`. One object per image, so that the label is the image's and not one object's.
    """
    if attribute not in ZERO_SHOT_ATTRIBUTES:
        raise ValueError(f"zero-shot attribute {attribute!r}: expected one of {ZERO_SHOT_ATTRIBUTES}")
    folder = cache_root() / "data" / f"zero-shot-{attribute}-{lang}-n{n}-s{seed}-px64"
    path = folder / "zero_shot.jsonl"
    if path.exists():
        return path
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rows, index = [], 0
    while len(rows) < n:
        objects = make_scene(seed, index)
        if len(objects) == 1:
            draw_scene(objects, seed, index).save(tmp / "images" / f"{index:06d}.png", compress_level=1)
            rows.append({"image": f"images/{index:06d}.png",
                         "label": WORDS[lang][attribute][objects[0][attribute]][0]})
        index += 1
    write_jsonl(tmp / "zero_shot.jsonl", rows)
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank built it first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass
class ZeroShotSet:
    """Images with a class index each, and the token ids of every (class, template) prompt."""

    images: list[str]
    targets: list[int]
    labels: list[str]
    prompt_ids: list[list[list[int]]]  # [class][template] -> token ids


def load_zero_shot(path: str | os.PathLike, templates: list[str], tokenizer, max_length: int,
                   labels: list[str] | None = None, *, pooled_at_eos: bool = True) -> ZeroShotSet:
    """Read `{"image", "label"}` rows (image paths relative to the file) into a `ZeroShotSet`.

    `labels` fixes the classes and their order (default: the labels found, sorted). Errors name the file,
    line and field.
    """
    if not templates or any("{label}" not in t for t in templates):
        raise ValueError(f"zero_shot_templates must each contain '{{label}}', got {templates!r}")
    for t in templates:
        try:
            t.format(label="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"zero_shot template {t!r}: {{label}} is its only field (a literal brace is "
                             f"written {{{{ or }}}}); format error {e!r}") from None
    images, names = [], []
    for line, row, _ in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        for field in ("image", "label"):
            if field not in row:
                raise DataError(MISSING_FIELD, "is missing", path=path, line=line, field=field)
            if not isinstance(row[field], str) or not row[field].strip():
                raise DataError(WRONG_TYPE, "expected a non-empty string", path=path, line=line, field=field)
        try:
            images.append(str(resolve_image_path(row["image"], Path(path).parent)))
        except DataError as e:
            raise e.at(path=path, line=line) from None
        try:
            check_image(images[-1])  # now, not when the first evaluation opens it
        except DataError as e:
            hint = (f" (its paths are relative to the file's own folder, {Path(path).parent}, not to "
                    "--image_root)" if e.reason == MISSING_IMAGE else "")
            raise DataError(e.reason, f"{row['image']!r}: {e.message}{hint}", path=path, line=line,
                            field="image") from None
        names.append((line, row["label"]))
    if not images:
        raise DataError("empty", "has no rows", path=path)
    labels = list(labels) if labels else sorted({label for _, label in names})
    unknown = [(line, label) for line, label in names if label not in labels]
    if unknown:
        line, label = unknown[0]
        raise DataError(BAD_VALUE, f"label {label!r} is not one of zero_shot_labels {labels}", path=path,
                        line=line, field="label")
    report = TextLengthReport()
    prompts = [tokenize_texts([t.format(label=label) for t in templates], tokenizer, max_length, report,
                              pooled_at_eos=pooled_at_eos)
               for label in labels]
    logger.info("zero-shot %s", report)
    # Classes whose prompts read the same (cut at max_length) embed the same: the accuracy would be noise.
    same = {}
    for label, ids in zip(labels, prompts):
        if (other := same.setdefault(str(ids), label)) != label:
            raise ValueError(f"zero-shot classes {other!r} and {label!r} have the same prompts once cut at "
                             f"max_length {max_length} ({report}): raise --max_length, or shorten "
                             "--zero_shot_templates.")
    return ZeroShotSet(images, [labels.index(label) for _, label in names], labels, prompts)
