"""What the two captioning recipes share: records, samples, batches, prompts and scores."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import torch

from data_tools.images import load_image
from eval.caption import caption_metrics

from .data import embedded_dataset
from .lengths import pad_batch
from .models import text_reserved
from .run import first, load_data

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # an option: its module is read only by runs that use it
    from .feature_cache import VisionFeatureCache


def pixel_values(image_processor, paths: list[str]) -> torch.Tensor:
    """Open the images (RGB, EXIF-aware, errors naming the file) and preprocess them."""
    return image_processor([load_image(p) for p in paths], return_tensors="pt")["pixel_values"]


def load_caption_data(data_args, training_args, tokenizer):
    """(train, validation, test) records of the data files or the embedded synthetic captions
    (`run.load_data`); validation and test (or None) with one record per image and all its captions."""
    embedded = functools.partial(embedded_dataset, "caption", n=1000, lang=data_args.lang,
                                 seed=training_args.seed)
    train, *held_out = load_data(data_args, "caption", embedded, training_args.output_dir,
                                 reserved=text_reserved(tokenizer, data_args.special_text))
    return train, *(caption_eval_records(r) if r is not None else None for r in held_out)


def caption_eval_records(ds: datasets.Dataset) -> datasets.Dataset:
    """One eval record per image, {"key", "image", "captions"}: all captions of the rows naming it (a file
    with a row per caption would otherwise score an image several times against one caption each)."""
    merged: dict[str, list[str]] = {}
    for row in ds:
        merged.setdefault(row["image"], []).extend(row["captions"])
    out = datasets.Dataset.from_list([{"key": image, "image": image, "captions": captions}
                                      for image, captions in merged.items()])
    out.info.description = ds.info.description
    if len(merged) != len(ds):
        out.info.description = f"{ds.info.description}; {len(ds)} rows merged into {len(merged)} images"
    return out


def caption_samples(tokenize, train_records, eval_records, test_records, eval_max_samples: int | None = None):
    """(train samples, eval samples, eval records, test records); `tokenize(records)` -> (samples,
    LengthReport), whose report is logged. At most `eval_max_samples` eval and test records generate."""
    def samples(records, split: str):
        out, report = tokenize(records)
        logger.info("%s %s", split, report)
        if len(out) == 0:
            raise ValueError(f"no {split} sample fits: {report}; raise --max_length")
        return out

    train = samples(train_records, "train")
    eval_samples = None if eval_records is None else samples(eval_records, "eval")
    return train, eval_samples, first(eval_records, eval_max_samples), first(test_records, eval_max_samples)


def cached_vision_features(model, image_processor, samples, cache_args, training_args, *, serve: bool = False,
                           **encode) -> VisionFeatureCache | None:
    """--cache_vision_features: the frozen tower's features of the `samples`' images, computed once before
    training, else None. `serve`: the tower then takes a cached feature in place of pixels (BLIP-2)."""
    if not cache_args.cache_vision_features:
        return None
    from .feature_cache import cache_for_run, serve_cached_features, vision_tower  # read only when caching

    tower = vision_tower(model)
    images = [image for ds in samples if ds is not None for image in ds["image"]]
    cache = cache_for_run(tower, image_processor, images, cache_args, training_args, **encode)
    if serve:
        serve_cached_features(tower)
    return cache


@dataclass
class CaptionCollator:
    """Training batches: pixel values (or, with a `feature_cache`, each image's cached vision features) and
    the right-padded text."""

    image_processor: object
    pad_token_id: int
    feature_cache: "VisionFeatureCache | None" = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        paths = [f["image"] for f in features]
        cache = self.feature_cache
        images = cache.get(paths) if cache is not None else pixel_values(self.image_processor, paths)
        return {"pixel_values": images, **pad_batch(features, self.pad_token_id)}


def caption_scores(predictions: dict, records, lang: str = "en") -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr of the predictions against each record's captions (METEOR is slow)."""
    references = {r["key"]: r["captions"] for r in records}
    return caption_metrics(predictions, references, lang=lang, metrics=["Bleu", "ROUGE_L", "CIDEr"])


@dataclass
class CaptionPromptCollator:
    """Eval records -> `generate` inputs: pixel values, `prefix_ids` (image tokens) + the prompt's ids (the
    same for every record: no padding), and the records' keys."""

    image_processor: object
    tokenizer: object
    prompt: str | None = None
    prefix_ids: tuple[int, ...] = ()

    def __call__(self, records: list[dict]) -> dict:
        ids = [*self.prefix_ids, *self.tokenizer(self.prompt or "", add_special_tokens=True)["input_ids"]]
        n = len(records)
        return {
            "pixel_values": pixel_values(self.image_processor, [r["image"] for r in records]),
            # dtype given: with no prefix and no prompt the ids are empty, and torch.tensor([[]]) is float.
            "input_ids": torch.tensor([ids] * n, dtype=torch.long).reshape(n, len(ids)),
            "attention_mask": torch.ones((n, len(ids)), dtype=torch.long),
            "keys": [r.get("key", r["image"]) for r in records],
        }
