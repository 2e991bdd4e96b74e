"""Cached vision features: a frozen vision tower runs once per distinct image, not once per sample and epoch.

With the tower frozen, its output for an image never changes during training, yet a caption set with 5
captions per image recomputes it 5 times an epoch. At BLIP-2 OPT-2.7B's dims the tower is 48% of the model
FLOPs of a training sample (bench/RESULTS.md), so caching it removes about half the work of a step; the
cost is one inference pass over the images and the disk for the features (BLIP-2's ViT-g: 257 x 1408
values an image, 0.7 MB in bf16; COCO's 118K training images: 85 GB).

    cache = VisionFeatureCache.build(tower, image_processor, image_paths, folder, batch_size=64)
    serve_cached_features(tower)                 # the tower now passes 3-D features through untouched
    collator = CaptionCollator(image_processor, pad_id, feature_cache=cache)   # puts features in pixel_values

The model's own forward is unchanged: it calls its tower with `pixel_values`; a 3-D tensor there is the
tower's cached `last_hidden_state` (batch, positions, hidden) and comes back as it is, while 4-D pixel
values (generation, evaluation) still run the tower. A model of the project's own (soft_prompt_caption)
caches what it reads instead (`encode=model.image_features`) and takes 3-D input as those features. The
features are the tower's output in eval mode (no dropout), under `torch.inference_mode`, in the tower's dtype,
stored in one memory-mapped file that DataLoader workers open on their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from data_tools.images import load_image

from .cache import build_once

logger = logging.getLogger(__name__)

# numpy has no bfloat16: those values are stored as their 16 bits and viewed back.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def cache_key(tower: torch.nn.Module, image_processor, images: list[str], dtype: torch.dtype,
              tag: str = "") -> str:
    """What the features depend on: the tower's config and weights, the image processing, the images, the
    dtype, and `tag` (which of the tower's outputs is kept)."""
    h = hashlib.sha256(tag.encode())
    h.update(json.dumps(tower.config.to_dict(), sort_keys=True, default=str).encode())
    # The class too: the PIL and torchvision backends of a processor write one dict, not the same pixels.
    h.update(f"{type(image_processor).__module__}.{type(image_processor).__qualname__}".encode())
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    with torch.no_grad():  # a fingerprint of the weights: their sums, in float64
        h.update(np.array([p.double().sum().item() for p in tower.parameters()]).tobytes())
    for path in images:  # ctime too: a file replaced by one of its size and mtime (an archive unpacked)
        stat = os.stat(path)
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]


class VisionFeatureCache:
    """The frozen tower's `last_hidden_state` of every distinct image, in one memory-mapped file, looked up by
    path."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "features.json").read_text())
        self.images: list[str] = meta["images"]
        self.index = {path: i for i, path in enumerate(self.images)}
        self.shape, self.dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
        self._array = None  # opened on first use, in each DataLoader worker
        # build(): how long computing them took; None when found from an earlier run
        self.seconds: float | None = None

    def __getstate__(self):  # a worker gets the path, not the mapped file
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.folder / "features.bin", dtype=_NUMPY[self.dtype], mode="r",
                                    shape=(len(self.images), *self.shape))
        return self._array

    def __len__(self) -> int:
        return len(self.images)

    def get(self, paths: list[str]) -> torch.Tensor:
        """Features of `paths` stacked: (len(paths), positions, hidden)."""
        missing = [p for p in paths if p not in self.index]
        if missing:
            raise KeyError(f"{missing[0]}: not in the vision feature cache {self.folder} (built for other "
                           "images)")
        values = torch.from_numpy(np.stack([self.array[self.index[p]] for p in paths]))
        return values.view(self.dtype) if self.dtype == torch.bfloat16 else values

    @classmethod
    def build(cls, tower: torch.nn.Module, image_processor, images: list[str], root: str | Path, *,
              batch_size: int = 64, encode=None, tag: str = "last_hidden_state",
              autocast: torch.dtype | None = None) -> VisionFeatureCache:
        """Run `tower` over the distinct `images` (in eval mode, no gradients) into `root/<key>`, unless that
        is there.

        What is kept is `encode(pixel_values)` (default: the tower's last_hidden_state), which `tag` names.
        The key covers the tower's config and weights, the processor (its class and settings), the images
        (path, size, mtime, ctime), dtype, tag and `autocast` (the mixed precision training runs the live
        tower under, which the features are computed under too), so a second run on the same data reuses the
        features, and anything that changes them makes new ones.
        """
        images = sorted(set(images))
        if not images:
            raise ValueError("no images to compute vision features of")
        param = next(tower.parameters())
        encode = encode or (lambda pixels: tower(pixel_values=pixels).last_hidden_state)
        key_tag = tag if autocast is None else f"{tag} autocast {autocast}"
        folder = Path(root) / cache_key(tower, image_processor, images, param.dtype, key_tag)

        def compute(tmp: Path) -> None:
            was_training = tower.training
            tower.eval()
            array = None
            amp = torch.autocast(param.device.type, dtype=autocast, enabled=autocast is not None)
            with torch.inference_mode(), amp:
                for start in range(0, len(images), batch_size):
                    chunk = images[start:start + batch_size]
                    pixels = image_processor([load_image(p) for p in chunk],
                                             return_tensors="pt")["pixel_values"]
                    out = encode(pixels.to(param.device, param.dtype))
                    if array is None:
                        shape, dtype = tuple(out.shape[1:]), out.dtype
                        array = np.memmap(tmp / "features.bin", dtype=_NUMPY[dtype], mode="w+",
                                          shape=(len(images), *shape))
                    values = out.cpu()
                    array[start:start + len(chunk)] = (values.view(torch.uint16) if dtype == torch.bfloat16
                                                       else values).numpy()
                    if start // batch_size % 50 == 0:
                        logger.info("vision features: %d / %d images", start + len(chunk), len(images))
            array.flush()
            tower.train(was_training)
            (tmp / "features.json").write_text(json.dumps(
                {"images": images, "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}))

        start, computed = time.perf_counter(), not (folder / "features.json").exists()
        build_once(folder, compute, marker="features.json")
        cache = cls(folder)
        cache.seconds = time.perf_counter() - start if computed else None
        size = cache.array.nbytes / 2**20
        logger.info("vision features of %d images in %s (%.1f MiB)", len(cache), folder, size)
        return cache


def cache_for_run(tower: torch.nn.Module, image_processor, images: list[str], cache_args, training_args,
                  **encode) -> VisionFeatureCache:
    """--cache_vision_features as a recipe runs it: a tower that trains is refused; the features of `images`
    are computed on the training device into --vision_feature_dir (default <output_dir>/vision_features), or
    found there; by the main process first under several processes. `encode` (encode=, tag=) as for
    VisionFeatureCache.build."""
    check_frozen(tower)
    autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    folder = cache_args.vision_feature_dir or Path(training_args.output_dir) / "vision_features"
    # The main process computes them, logging its progress; the others wait (up to --ddp_timeout), then read.
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="vision features"):
        return VisionFeatureCache.build(tower.to(training_args.device), image_processor, images, folder,
                                        batch_size=training_args.per_device_eval_batch_size,
                                        autocast=autocast, **encode)


def serve_cached_features(tower: torch.nn.Module) -> None:
    """Make `tower` return a 3-D `pixel_values` (its own cached last_hidden_state) as its output, uncomputed.

    4-D pixel values still run the tower. Only `last_hidden_state` comes back (BLIP-2's Q-Former reads
    nothing else). The tower's weights, and so its state dict, are untouched.
    """
    if getattr(tower, "_serves_cached_features", False):
        return
    live = tower.forward

    def forward(pixel_values=None, *args, **kwargs):
        if pixel_values is not None and pixel_values.ndim == 3:
            return BaseModelOutputWithPooling(last_hidden_state=pixel_values)
        return live(pixel_values, *args, **kwargs)

    tower.forward = forward
    tower._serves_cached_features = True


def check_frozen(tower: torch.nn.Module, what: str = "--cache_vision_features") -> None:
    """Cached features are only right for a tower that does not train and draws no dropout."""
    trained = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    if trained:
        raise ValueError(f"{what}: {trained:,} parameters of the vision tower train (unfrozen layers or LoRA "
                         "on it), so its features change every step; freeze it (--freeze_vision_tower true "
                         "--unfreeze_last_n_vision_layers 0, no LoRA targets in it) or leave the cache off.")
    dropout = [m for m in tower.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    rate = getattr(tower.config, "attention_dropout", 0.0) or 0.0
    if dropout or rate > 0:
        logger.warning("%s: the vision tower has dropout (p > 0), which training would draw each step; the "
                       "cached features are its eval-mode output, without it.", what)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder of a BLIP-2 (or any model keeping it as `vision_model`), under a PEFT wrapper or
    not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.vision_model
