"""Fine-tune a dual encoder (CLIP, SigLIP, SigLIP 2) for image-text retrieval with a contrastive loss over
the global batch: CLIP's softmax or SigLIP's sigmoid loss (--loss; default: the checkpoint's own).

Embedded default (tiny CLIP + synthetic shapes captions, built on first use), on the CPU:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/clip_retrieval/train.py
The same with a tiny SigLIP 2 (NaFlex) and the sigmoid loss:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/clip_retrieval/train.py \
        --model_name_or_path tiny:siglip2-pretrained

A real checkpoint and data set, on one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/clip_retrieval/train.py \
        --model_name_or_path openai/clip-vit-base-patch32 --train_file data/coco/train.jsonl \
        --eval_file data/coco/val.jsonl --bf16 --per_device_train_batch_size 256 --learning_rate 1e-5
    (SigLIP 2: --model_name_or_path google/siglip2-base-patch16-224, the same otherwise.)

Training modes: full fine-tune (the default); frozen towers with their last N layers trained
(--freeze_vision_tower true --freeze_language_model true --unfreeze_last_n_vision_layers N
--unfreeze_last_n_text_layers N); LoRA on the attention projections (--peft_method lora
--lora_towers vision|text|both). --vision_lr / --lm_lr give each tower its own learning rate.

Writes to --output_dir: checkpoints, the model (or the LoRA adapter) as safetensors with the processor,
predictions/<name>.npz (eval embeddings) at every evaluation, wise_ft-<alpha>/ for each --wise_ft_alpha,
and metrics.json (held-out retrieval and zero-shot metrics before and after fine-tuning, and per alpha).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoModel, TrainingArguments

from recipes.clip_retrieval.collator import (PairDataset, collator_for, embedded_retrieval,
                                             embedded_zero_shot, load_zero_shot, pools_at_eos,
                                             records_by_image)
from recipes.clip_retrieval.merge import load_dual_encoder, wise_ft
from recipes.clip_retrieval.trainer import (ContrastiveTrainer, add_sigmoid_head, default_loss,
                                            set_training_mode)
from recipes.common.args import (DataArguments, EarlyStoppingArguments, FreezeArguments,
                                 LearningRateArguments, ModelArguments, PeftArguments, arg, check_at_least,
                                 parse_recipe_args)
from recipes.common.models import (dtype_name, load_model, load_recipe_processor, resolve_model_path,
                                   text_reserved)
from recipes.common.peft_setup import count_parameters
from recipes.common.run import load_data, run_main, setup_run, train_and_evaluate

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@dataclass
class RetrievalArguments:
    """What this recipe adds: the loss, which tower LoRA adapts, hard negatives, zero-shot evaluation,
    WiSE-FT."""

    loss: str | None = arg(
        None, "softmax (CLIP's InfoNCE) or sigmoid (SigLIP's); None = the one the checkpoint was trained "
        "with (sigmoid for SigLIP and SigLIP 2, softmax otherwise).")

    lora_towers: Literal["both", "vision", "text"] = arg(
        "both", "With --peft_method lora: LoRA on the attention projections of these towers.")
    unfreeze_last_n_text_layers: int = arg(
        0, "With a frozen text tower, still train its last N layers (and its final norm and projection).")
    hard_negatives: bool = arg(
        False, "Add one of each image's neg_captions (drawn per epoch) as an extra negative text.")
    embedded_images: int = arg(5000, "Images in the embedded synthetic data set (split 80/10/10).")
    embedded_without_size: bool = arg(
        True, "Embedded default: captions without their size words (the held-out attribute).")
    zero_shot_file: str | None = arg(
        None, 'Zero-shot classification JSONL, rows {"image": ..., "label": ...}; None = the embedded one '
        "when training on the embedded default, else no zero-shot evaluation.")
    zero_shot_attribute: Literal["size", "color", "shape", "none"] = arg(
        "size", "Embedded zero-shot set: the attribute of one-object images to classify ('none': off).")
    zero_shot_templates: list[str] = arg(
        ["a photo of a {label} shape."], "Prompt templates; each class is the mean embedding of its "
        "prompts (CLIP's prompt ensembling).")
    zero_shot_labels: list[str] | None = arg(None, "Class names and order; None = the labels in the file.")
    wise_ft_alpha: list[float] | None = arg(
        None, "After training, write and evaluate wise_ft-<alpha>/: (1 - alpha) * base + alpha * "
        "fine-tuned weights.")

    def __post_init__(self):
        if self.loss not in (None, "softmax", "sigmoid"):
            raise ValueError(f"--loss {self.loss}: expected softmax or sigmoid.")
        check_at_least(self, 0, "unfreeze_last_n_text_layers")
        check_at_least(self, 1, "embedded_images")
        # Checked now: WiSE-FT runs after training, which a typo (50 for 0.5) would otherwise waste.
        bad = [a for a in self.wise_ft_alpha or [] if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"--wise_ft_alpha {bad[0]:g}: each alpha must be in [0, 1] (0 = the base, 1 = "
                             "the fine-tuned model).")


def main(argv=None):
    # config.yaml unless --config is given, then the command line; --use_cpu without a GPU.
    types = (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments,
             EarlyStoppingArguments, RetrievalArguments, TrainingArguments)
    args = parse_recipe_args(argv, DEFAULT_CONFIG, types)
    if args.data.prompt:
        raise ValueError("--prompt: CLIP encodes captions as they are, with no prompt; "
                         "zero-shot prompts are --zero_shot_templates.")
    if args.training.label_smoothing_factor:
        raise ValueError("--label_smoothing_factor: the contrastive loss (trainer.py) takes no label "
                         "smoothing; leave it out.")
    if args.data.max_length is not None and args.data.max_length < 2:
        # CLIP's tokenizer would cut every caption to its lone eos; embed.py refuses the recorded length too.
        raise ValueError(f"--max_length {args.data.max_length}: a text needs at least 2 tokens (bos and "
                         "eos); give 2 or more.")
    if args.training.neftune_noise_alpha is not None:
        raise ValueError("--neftune_noise_alpha: NEFTune puts noise on a language model's token embeddings "
                         "for instruction tuning; a dual encoder has none it applies to. Leave it out.")
    setup_run(args.training, args.model)

    # Model: by default the embedded tiny CLIP (real classes, built and pre-trained offline on first use).
    # Its processor first: the data's captions must not hold its tokenizer's special strings.
    model_path = resolve_model_path(args.model.model_name_or_path or "tiny:clip-pretrained")
    processor = load_recipe_processor(model_path, args.model)
    tokenizer = processor.tokenizer

    # Data: the embedded synthetic set (and its zero-shot set) unless files are given.
    def embedded():
        splits = embedded_retrieval(args.data.lang, args.training.seed, args.retrieval.embedded_images,
                                    args.retrieval.embedded_without_size)
        if args.retrieval.zero_shot_file is None and args.retrieval.zero_shot_attribute != "none":
            args.retrieval.zero_shot_file = str(embedded_zero_shot(args.retrieval.zero_shot_attribute,
                                                                   lang=args.data.lang))
        return splits

    # One record per image: a file with a row per caption would otherwise hold each image several times.
    train_records, eval_records, test_records = (
        records_by_image(r) if r is not None else None
        for r in load_data(args.data, "retrieval", embedded, args.training.output_dir,
                           reserved=text_reserved(tokenizer, args.data.special_text)))

    model = load_model(AutoModel, model_path, args.model)
    if not all(hasattr(model, f) for f in ("get_image_features", "get_text_features", "logit_scale")):
        raise ValueError(f"{model_path}: {type(model).__name__} is not a dual encoder (no "
                         "get_image_features, get_text_features and logit_scale); give a CLIP, SigLIP or "
                         "SigLIP 2 checkpoint.")
    positions = model.config.text_config.max_position_embeddings
    max_length = args.data.max_length or positions  # config.yaml: none, the text tower's length
    if max_length > positions:
        raise ValueError(f"--max_length {max_length}: the text tower has {positions} positions; "
                         f"set --max_length {positions} or less.")
    loss = args.retrieval.loss or default_loss(model)
    if loss == "sigmoid" and add_sigmoid_head(model):
        logger.info("sigmoid loss on a checkpoint without a logit bias: a fresh head, t' = log 10, b = -10")
        if args.training.ddp_find_unused_parameters is None:
            # Only the loss reads the new bias, after forward: DDP's search for unused parameters would
            # mark it ready before its gradient comes, and stop the step.
            args.training.ddp_find_unused_parameters = False
    logger.info("loss: %s", loss)
    model = set_training_mode(model, args.peft, args.freeze, args.retrieval.lora_towers,
                              args.retrieval.unfreeze_last_n_text_layers, args.model.revision)
    logger.info("parameters:\n%s", count_parameters(model))

    # Pairs: one caption per image per epoch (drawn by the sampler); every cut text is counted.
    text = {"pooled_at_eos": pools_at_eos(model)}
    train_dataset = PairDataset(train_records, tokenizer, max_length,
                                hard_negatives=args.retrieval.hard_negatives, **text)
    logger.info("train %s", train_dataset.report)
    if args.retrieval.hard_negatives:
        with_negatives = sum(bool(n) for n in train_dataset.negatives)
        logger.info("hard negatives: %d of %d train images have neg_captions (%d dropped: equal to a "
                    "caption of their own image)", with_negatives, len(train_dataset),
                    train_dataset.negatives_dropped)
    eval_dataset = test_dataset = zero_shot = None
    if eval_records is not None:
        eval_dataset = PairDataset(eval_records, tokenizer, max_length, **text)
        logger.info("eval %s", eval_dataset.report)
    if test_records is not None:
        test_dataset = PairDataset(test_records, tokenizer, max_length, **text)
        logger.info("test %s", test_dataset.report)
    if args.retrieval.zero_shot_file:
        zero_shot = load_zero_shot(args.retrieval.zero_shot_file, args.retrieval.zero_shot_templates,
                                   tokenizer, max_length, args.retrieval.zero_shot_labels, **text)
        logger.info("zero-shot: %d images, classes %s", len(zero_shot.images), zero_shot.labels)

    trainer = ContrastiveTrainer(
        model=model,
        args=args.training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator_for(model, tokenizer, processor.image_processor),
        processing_class=processor,
        loss=loss,
        retrieval_dataset=eval_dataset,
        zero_shot=zero_shot,
        learning_rates=args.learning_rate,
    )

    def after_training(results: dict) -> None:
        # WiSE-FT: weight-space interpolation between the base and the fine-tuned model, each alpha evaluated.
        if not args.retrieval.wise_ft_alpha:
            return
        trainer.accelerator.wait_for_everyone()  # the saved model is complete on every rank
        dtype = next(trainer.model.parameters()).dtype
        base = load_dual_encoder(model_path, dtype, args.model.revision)
        finetuned = load_dual_encoder(args.training.output_dir, dtype)
        results["wise_ft"] = {}
        for alpha in args.retrieval.wise_ft_alpha:
            mixed = wise_ft(base, finetuned, alpha).to(args.training.device)
            folder = Path(args.training.output_dir) / f"wise_ft-{alpha:g}"
            if trainer.is_world_process_zero():
                mixed.save_pretrained(folder)
                processor.save_pretrained(folder)
            if trainer.evaluates_heldout():  # on the headline split, as "after"
                results["wise_ft"][f"{alpha:g}"] = trainer.retrieval_metrics(
                    "eval", name=f"wise_ft-{alpha:g}", model=mixed, dataset=test_dataset)

    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="retrieval", lang=args.data.lang, model=model_path,
        revision=args.model.revision, dtype=dtype_name(args.model), loss=loss, max_length=max_length,
        train_file=args.data.train_file, eval_file=args.data.eval_file, test_file=args.data.test_file,
        image_root=args.data.image_root, processor_kwargs=args.model.processor_kwargs,
        special_text=args.data.special_text, zero_shot_file=args.retrieval.zero_shot_file,
        zero_shot_labels=zero_shot.labels if zero_shot else None,
        # Recorded so that a resume with other prompts is refused: its saved "before" used these.
        zero_shot_templates=args.retrieval.zero_shot_templates if zero_shot else None,
    ), test=test_dataset, after_training=after_training, early_stopping=args.early_stopping)


if __name__ == "__main__":
    run_main(main)  # a bad input or option: its message, exit code 2
