"""The contrastive Trainer: CLIP's softmax or SigLIP's sigmoid loss over the global batch, and retrieval +
zero-shot evaluation.

Loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
fig. 3): cosine similarities of the L2-normalised image and text embeddings, times a learned scale
exp(logit_scale), cross-entropy of each image against all texts and of each text against all images,
averaged. CLIP clips the scale at 100 (sec. 2.5); so does `ClampLogitScale`, after every optimizer step.

Sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1 and sec. 3.2):
every (image, text) pair of the global batch is its own binary question, "do they match?", with logit
t * cos + b (t = exp(logit_scale), learned, and a learned bias b); the loss is -sum over pairs of
log sigmoid(z * logit), z = +1 for a match and -1 otherwise, divided by the number of images |B|.

Across processes every rank gathers all features, puts its own (which carry gradients) in place of
their gathered copy, and computes the loss of the whole global batch, as open_clip's `ClipLoss` does.
Only the local slice carries a gradient, so each rank's backward reaches only its own features: the
full gradient through the features is the sum over ranks, and DDP averages. `gather_with_local_grad`
multiplies the local features' gradient by the world size to make up for it; the logit scale, which
every rank's loss uses whole, needs nothing. Loss and gradients equal one process holding the global
batch (tested).

Two items with the same image or the same caption text describe each other. The softmax loss leaves them
out of each other's negatives (it has one target per row); the sigmoid loss, which asks about each pair on
its own, counts them as matches (z = +1). Hard negatives (captions of the image with one attribute
changed) are extra texts on the image -> text side only (as NegCLIP does: Yuksekgonul et al. 2023, "When
and why vision-language models behave like bags-of-words"); in the sigmoid loss, extra pairs with z = -1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import TrainerCallback

from data_tools.files import atomic_write, atomic_write_text
from eval.retrieval import recall_at_k, similarity
from recipes.clip_retrieval.collator import GlobalBatchShares
from recipes.common.peft_setup import apply_freezing, apply_peft, trainable_in_float32
from recipes.common.trainer import RecipeTrainer, rank_share

logger = logging.getLogger(__name__)
LOGIT_SCALE_MAX = math.log(100)  # CLIP's clip on the logit scale (Radford et al. 2021, sec. 2.5)


# --- loss ---------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order; this rank's slice is `x` itself, so it keeps its gradient.

    That gradient is multiplied by the world size, so that DDP's average over ranks is the full gradient
    (see the module docstring). Ranks may hold different numbers of rows (a short last batch): rows are
    padded for the collective and cut again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:  # e.g. no hard negatives anywhere in this step
        return x
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = _ScaleGrad.apply(x, world) if x.requires_grad else x
    return torch.cat(parts)


def described(captions: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """[images, texts]: whether each text is a caption of each image (`captions`: [images, width], the keys
    of every caption of the image, padded with -1), drawn for this batch or not."""
    match = torch.zeros((len(captions), len(text_keys)), dtype=torch.bool, device=text_keys.device)
    for column in captions.T:  # memory of [images, texts], not of [images, width, texts]
        match |= column[:, None] == text_keys[None, :]
    return match


def contrastive_loss(image_embeds, text_embeds, logit_scale, image_keys, text_keys, neg_embeds=None,
                     neg_keys=None, caption_keys=None):
    """Symmetric InfoNCE of N (image, text) pairs (pair k in row k of both), embeddings L2-normalised.

    Image k and text l != k are not negatives of each other when the text describes the image: it is one of
    the image's captions (`caption_keys`, [N, width]; None: its own text only), or its pair has the same
    image file. `neg_embeds` (M texts) are extra negatives of every image that they do not describe.
    """
    n = image_embeds.shape[0]
    captions = text_keys[:, None] if caption_keys is None else caption_keys
    scale = logit_scale.exp()
    logits = scale * image_embeds @ text_embeds.T  # [images, texts]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    false_negative = (image_keys[:, None] == image_keys[None, :]) | described(captions, text_keys)
    logits = logits.masked_fill(false_negative & ~eye, float("-inf"))
    image_to_text = logits
    if neg_embeds is not None and neg_embeds.shape[0] > 0:
        neg_logits = scale * image_embeds @ neg_embeds.T
        neg_logits = neg_logits.masked_fill(described(captions, neg_keys), float("-inf"))
        image_to_text = torch.cat([logits, neg_logits], dim=1)
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(image_to_text, target) + F.cross_entropy(logits.T, target)) / 2


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, image_keys, text_keys, neg_embeds=None,
                 neg_keys=None, caption_keys=None):
    """SigLIP's loss of N (image, text) pairs (pair k in row k of both), embeddings L2-normalised: every image
    against every text, -sum log sigmoid(z * (exp(logit_scale) * cos + logit_bias)) / N.

    z = +1 for (image i, text j) when i == j or the text describes the image: it is one of the image's
    captions (`caption_keys`, [N, width]; None: its own text only), or its pair has the same image file;
    else -1. `neg_embeds` (M texts) are extra texts, z = -1 against every image that they do not describe.
    """
    texts, captions = text_embeds, text_keys[:, None] if caption_keys is None else caption_keys
    match = (image_keys[:, None] == image_keys[None, :]) | described(captions, text_keys)
    if neg_embeds is not None and neg_embeds.shape[0] > 0:
        texts = torch.cat([text_embeds, neg_embeds])
        match = torch.cat([match, described(captions, neg_keys)], dim=1)
    logits = logit_scale.exp() * image_embeds @ texts.T + logit_bias  # [images, texts]
    sign = match.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(sign * logits).sum() / image_embeds.shape[0]


def global_batch_loss(model_outputs, logit_scale, image_keys, text_keys, caption_keys,
                      logit_bias=None) -> torch.Tensor:
    """The contrastive loss of the global batch from this rank's model outputs (positives first, then
    negatives): the sigmoid loss with a `logit_bias`, else the softmax loss. `caption_keys`: every caption
    of each image (`described`)."""
    n = image_keys.shape[0]
    images = gather_with_local_grad(model_outputs.image_embeds)
    texts = gather_with_local_grad(model_outputs.text_embeds[:n])
    negatives = gather_with_local_grad(model_outputs.text_embeds[n:])
    image_keys, pair_keys = gather_with_local_grad(image_keys), gather_with_local_grad(text_keys[:n])
    caption_keys = gather_with_local_grad(caption_keys)
    # A stand-in pair (image key -1: a process with no share of a short last global batch) is left out.
    counted = image_keys >= 0
    images, texts, image_keys, pair_keys, caption_keys = (
        x[counted] for x in (images, texts, image_keys, pair_keys, caption_keys))
    negative_keys = gather_with_local_grad(text_keys[n:])
    if logit_bias is not None:
        return sigmoid_loss(images, texts, logit_scale, logit_bias, image_keys, pair_keys, negatives,
                            negative_keys, caption_keys)
    return contrastive_loss(images, texts, logit_scale, image_keys, pair_keys, negatives, negative_keys,
                            caption_keys)


class ClampLogitScale(TrainerCallback):
    """Keep logit_scale <= ln(100) after every optimizer step, as CLIP does."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        scale = _logit_scale(model)
        if scale.requires_grad:
            with torch.no_grad():
                scale.clamp_(max=LOGIT_SCALE_MAX)


def _unwrapped(model):
    """The dual encoder inside DDP and peft wrappers."""
    while not hasattr(model, "logit_scale"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model


def _logit_scale(model) -> torch.nn.Parameter:
    """The dual encoder's logit_scale through DDP and peft wrappers."""
    return _unwrapped(model).logit_scale


SIGMOID_MODEL_TYPES = ("siglip", "siglip2")  # trained with the sigmoid loss; everything else with softmax


def default_loss(model) -> str:
    """The loss a checkpoint was trained with: sigmoid for SigLIP and SigLIP 2, softmax otherwise (CLIP)."""
    return "sigmoid" if model.config.model_type in SIGMOID_MODEL_TYPES else "softmax"


def add_sigmoid_head(model) -> bool:
    """Give a dual encoder without a logit bias (CLIP) a fresh sigmoid head: logit_scale = log 10 and a new
    `logit_bias` parameter = -10, the initialisation of Zhai et al. 2023 (sec. 3.2). Returns whether it did.

    The bias is saved with the weights (and restored on resume); loading the checkpoint as a CLIPModel later
    drops it, which changes no embedding or ranking.
    """
    if hasattr(model, "logit_bias"):
        return False
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
    model.logit_bias = torch.nn.Parameter(torch.full((1,), -10.0, dtype=model.logit_scale.dtype,
                                                     device=model.logit_scale.device))
    return True


# --- embeddings -----------------------------------------------------------------------------------------
@torch.no_grad()
def embed_images(model, collator, paths: list[str], batch_size: int, device,
                 progress: bool = False) -> np.ndarray:
    """L2-normalised image embeddings (float32 numpy), one row per path."""
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding images", disable=not progress):
        inputs = {k: v.to(device) for k, v in collator.images(paths[start:start + batch_size]).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out.append(F.normalize(model.get_image_features(**inputs).pooler_output.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, embedding_size(model)), np.float32)


def embedding_size(model) -> int:
    """Width of the joint embedding: CLIP's projection_dim, SigLIP's text head size."""
    config = model.config
    return getattr(config, "projection_dim", None) or config.text_config.projection_size


def distinct(ids: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """The distinct token-id lists of `ids`, in first-seen order, and the row of each of `ids` among them."""
    rows = {}
    inverse = np.asarray([rows.setdefault(tuple(x), len(rows)) for x in ids], dtype=np.int64)
    return [list(x) for x in rows], inverse


@torch.no_grad()
def embed_texts(model, collator, ids: list[list[int]], batch_size: int, device,
                progress: bool = False) -> np.ndarray:
    """L2-normalised text embeddings (float32 numpy), one row per token-id list. A text is embedded once,
    whatever its copies: a batch pads to its longest text, which moves an embedding by ~1e-7, and two copies
    must tie exactly (the retrieval metrics count a tie against the model)."""
    ids, inverse = distinct(ids)
    out = []
    for start in tqdm(range(0, len(ids), batch_size), desc="embedding texts", disable=not progress):
        batch = {k: v.to(device) for k, v in collator.texts(ids[start:start + batch_size]).items()}
        out.append(F.normalize(model.get_text_features(**batch).pooler_output.float(), dim=-1).cpu())
    return (torch.cat(out).numpy() if out else np.zeros((0, embedding_size(model)), np.float32))[inverse]


def zero_shot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, targets) -> float:
    """Top-1 accuracy of the nearest class embedding (CLIP's zero-shot classifier)."""
    return float(np.mean((image_embeds @ class_embeds.T).argmax(axis=1) == np.asarray(targets)))


def class_embeddings(prompt_embeds: list[np.ndarray]) -> np.ndarray:
    """One embedding per class: the normalised mean of its template embeddings (CLIP's prompt ensembling, sec.
    3.1.4)."""
    means = np.stack([e.mean(axis=0) for e in prompt_embeds])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


# --- what trains ---------------------------------------------------------------------------------------
def set_training_mode(model, peft_args, freeze_args, lora_towers: str = "both",
                      unfreeze_last_n_text_layers: int = 0, revision: str | None = None):
    """LoRA on the chosen towers (every base weight frozen, the temperature too; the base's `revision` goes
    into the adapter config), or (un)freezing of whole towers and of their last N layers; returns the
    model."""
    if peft_args.peft_method != "none":
        unfreeze = [f"--{k}" for k, n in (("unfreeze_last_n_vision_layers",
                                           freeze_args.unfreeze_last_n_vision_layers),
                                          ("unfreeze_last_n_text_layers", unfreeze_last_n_text_layers))
                    if n > 0]
        if unfreeze:
            # The adapter file holds the LoRA weights only: base weights trained beside it would be lost.
            raise ValueError(f"{', '.join(unfreeze)}: would train base weights, which a LoRA adapter does "
                             "not save; unfreeze layers with --peft_method none.")
        towers = {"both": ("vision", "language"), "vision": ("vision",), "text": ("language",)}[lora_towers]
        if peft_args.lora_target_modules is not None and lora_towers != "both":
            raise ValueError(f"--lora_towers {lora_towers} with --lora_target_modules: the towers pick the "
                             "default targets only; name the tower's modules in --lora_target_modules (e.g. "
                             "a regex starting with vision_model), or leave them out.")
        where = "--lora_target_modules" if peft_args.lora_target_modules else f"the {lora_towers} tower(s)"
        logger.info("LoRA on %s; every base weight stays frozen (the freeze_* flags apply to --peft_method "
                    "none)", where)
        if peft_args.lora_target_modules is None:
            # The encoder layers' attention only: SigLIP's attention-pooling head is an nn.MultiheadAttention,
            # which reads its out_proj weight directly, past any LoRA wrapper.
            prefixes = {"both": "vision_model|text_model", "vision": "vision_model",
                        "text": "text_model"}[lora_towers]
            peft_args = dataclasses.replace(peft_args, lora_target_modules=(
                rf"(?:{prefixes})\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"))
        model = apply_peft(model, peft_args, components=towers, revision=revision)
        trainable_in_float32(model)
        return model
    apply_freezing(model, freeze_args)
    # A tower's last N layers feed its final norm and projection, which train with them.
    tops = []
    # (CLIP's projections, SigLIP's heads: names a model does not have match nothing.)
    if freeze_args.freeze_vision_tower and freeze_args.unfreeze_last_n_vision_layers > 0:
        tops += ["vision_model.post_layernorm", "visual_projection", "vision_model.head"]
    n_text = unfreeze_last_n_text_layers
    if n_text > 0:
        layers = len(model.text_model.encoder.layers)
        if n_text > layers:
            raise ValueError(f"unfreeze_last_n_text_layers={n_text}, but the text tower has only {layers} "
                             "layers.")
        tops += [f"text_model.encoder.layers.{i}" for i in range(layers - n_text, layers)]
        tops += ["text_model.final_layer_norm", "text_projection", "text_model.head"]
    for name, param in model.named_parameters():
        if any(name == t or name.startswith(t + ".") for t in tops):
            param.requires_grad_(True)
    trainable_in_float32(model)
    return model


# --- trainer --------------------------------------------------------------------------------------------
class ContrastiveTrainer(RecipeTrainer):
    """RecipeTrainer with the global-batch contrastive loss and retrieval evaluation.

    loss: "softmax" (CLIP's; the temperature clamped at ln 100) or "sigmoid" (SigLIP's; the model needs a
    `logit_bias`, see `add_sigmoid_head`).
    retrieval_dataset: a `PairDataset` of the eval records: every image and every caption is embedded,
    and Recall@1/5/10 and mean rank both ways are logged as `eval_text_to_image_R@1`, ... (usable as
    `metric_for_best_model`). zero_shot: a `ZeroShotSet`; its accuracy is logged as `eval_zero_shot_accuracy`.
    """

    def __init__(self, *args, loss: str = "softmax", retrieval_dataset=None, zero_shot=None, **kwargs):
        super().__init__(*args, **kwargs)
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
        self.loss = loss
        self.retrieval_dataset = retrieval_dataset
        self.zero_shot = zero_shot
        self.pair_sampler = None  # the training data's EpochPairSampler, once the Trainer asks for it
        if loss == "softmax":
            self.add_callback(ClampLogitScale())
        # The loss needs no labels; without this, evaluation would run the model but skip eval_loss.
        self.can_return_loss = True

    def get_decay_parameter_names(self, model) -> list[str]:
        # Decaying the temperature would pull it toward 0, flattening every similarity (open_clip spares it).
        return [n for n in super().get_decay_parameter_names(model) if n.rsplit(".", 1)[-1] != "logit_scale"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.pair_sampler = dataset.epoch_sampler(seed)
        return self.pair_sampler

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        shard = loader.batch_sampler
        if isinstance(shard, BatchSamplerShard) and not shard.split_batches:
            # accelerate deals each process whole per-device batches in turn and fills a short last round with
            # the epoch's first pairs (even_batches): pairs one process never sees, an image twice in a global
            # batch. Instead it deals out each global batch's shares, of whatever size (batch_size None).
            shard.batch_sampler = GlobalBatchShares(shard.batch_sampler.sampler, shard.batch_size,
                                                    shard.num_processes, shard.drop_last)
            shard.batch_size = None
        return loader

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # Resumed mid-epoch on several processes, the sampler sits one wrapper deeper (accelerate's
        # skip_first_batches) than the Trainer's set_epoch reaches: it would draw epoch 0's order.
        if self.pair_sampler is not None:
            self.pair_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        image_keys, text_keys = inputs.pop("image_keys"), inputs.pop("text_keys")
        caption_keys = inputs.pop("caption_keys")
        outputs = model(**inputs)
        encoder = _unwrapped(model)
        bias = encoder.logit_bias if self.loss == "sigmoid" else None
        loss = global_batch_loss(outputs, encoder.logit_scale, image_keys, text_keys, caption_keys,
                                 logit_bias=bias)
        return (loss, {}) if return_outputs else loss

    def evaluates_heldout(self) -> bool:
        return self.retrieval_dataset is not None or self.zero_shot is not None

    def heldout_metrics(self, metric_key_prefix: str = "eval", name: str | None = None,
                        data=None) -> dict[str, float]:
        return self.retrieval_metrics(metric_key_prefix, name, dataset=data)

    def scored_on(self, predictions: Path, data=None) -> bool:
        """Whether saved scores are of `data` (default: the eval data): the images their embeddings hold."""
        embeddings = predictions.with_suffix(".npz")
        if not embeddings.is_file():  # zero-shot figures alone: their set is the whole zero-shot file
            return True
        data = data if data is not None else self.retrieval_dataset
        with np.load(embeddings) as saved:
            return data is not None and saved["image_keys"].tolist() == list(data.images)

    def _embed_shared(self, model, kind: str, items: list) -> np.ndarray:
        """Embed this rank's contiguous share of `items` (`rank_share`: every rank runs as many batches);
        every rank gets all embeddings, in order."""
        inverse = None
        if kind == "texts":  # each text once over all processes: copies must tie exactly (embed_texts)
            items, inverse = distinct(items)
        share, own = rank_share(len(items), self.args.world_size, self.args.process_index)
        fn = embed_images if kind == "images" else embed_texts
        part = fn(model, self.data_collator, [items[i] for i in share], self.args.per_device_eval_batch_size,
                  self.args.device, progress=self.is_local_process_zero())[:own]
        if self.args.world_size > 1:
            part = np.concatenate(gather_object([part]))
        return part if inverse is None else part[inverse]

    def retrieval_metrics(self, metric_key_prefix: str = "eval", name: str | None = None,
                          model=None, dataset=None) -> dict[str, float]:
        """Retrieval R@K / ranks on `dataset` (a PairDataset; default: the eval records) and zero-shot
        accuracy of `model` (default: the one training).

        Rank 0 writes the embeddings to `predictions/<name>.npz` (default `step-<global step>`, the newest
        step only), which `python -m eval report` scores again, and the metrics to
        `predictions/<name>.metrics.json`.
        """
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        metrics, arrays = {}, {}
        data = dataset if dataset is not None else self.retrieval_dataset
        # Under the autocast training uses (none without --bf16/--fp16), where trained float32 layers meet
        # frozen half-precision ones: get_*_features goes around the one accelerate puts on forward.
        with self.accelerator.autocast():
            if data is not None:
                text_ids, text_to_image = data.texts()
                arrays = {"image_embeds": self._embed_shared(model, "images", data.images),
                          "text_embeds": self._embed_shared(model, "texts", text_ids),
                          "text_to_image": np.asarray(text_to_image), "image_keys": np.asarray(data.images),
                          "texts": np.asarray([t for caps in data.caption_texts for t in caps])}
                metrics.update(recall_at_k(similarity(arrays["text_embeds"], arrays["image_embeds"]),
                                           arrays["text_to_image"]))
            if self.zero_shot is not None:
                zs = self.zero_shot
                images = self._embed_shared(model, "images", zs.images)
                prompts = [embed_texts(model, self.data_collator, p, len(p), self.args.device)
                           for p in zs.prompt_ids]
                classes = class_embeddings(prompts)
                metrics["zero_shot_accuracy"] = zero_shot_accuracy(images, classes, zs.targets)
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in metrics.items()}
        if self.is_world_process_zero():
            folder = os.path.join(self.args.output_dir, "predictions")
            os.makedirs(folder, exist_ok=True)
            step_eval, name = name is None, name or f"step-{self.state.global_step}"
            if arrays:
                if step_eval:  # keep the newest step's embeddings only: on a large eval set each file is big
                    for old in glob.glob(os.path.join(folder, "step-*.npz")):
                        os.remove(old)
                with atomic_write(os.path.join(folder, f"{name}.npz"), "wb") as f:
                    np.savez(f, **arrays)
            atomic_write_text(os.path.join(folder, f"{name}.metrics.json"), json.dumps(metrics, indent=2))
        return metrics
