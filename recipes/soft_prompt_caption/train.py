"""Train an image captioner made of a frozen CLIP vision encoder and a frozen GPT-2, joined by a learned soft
prompt and a vision projection (the only trained parts; LoRA on the LM as an option).

Embedded default (tiny CLIP vision + tiny GPT-2 + synthetic shapes captions, built on first use), on the CPU:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/soft_prompt_caption/train.py

Real checkpoints and data, on one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/soft_prompt_caption/train.py \
        --config recipes/soft_prompt_caption/config.yaml \
        --vision_model openai/clip-vit-base-patch32 --language_model gpt2 \
        --train_file data/coco/train.jsonl --eval_file data/coco/val.jsonl --bf16
        --per_device_train_batch_size 64

Writes to --output_dir: trained.safetensors (soft prompt + projection [+ LoRA]) with config.json naming the
frozen bases, the tokenizer and image processor, checkpoints (trained parts only), predictions/step-N.jsonl
at every evaluation, and metrics.json (held-out metrics before and after training). export.py writes a
full checkpoint.
"""

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from transformers import AutoImageProcessor, AutoTokenizer, TrainingArguments

from recipes.common.args import (DataArguments, FeatureCacheArguments, FreezeArguments,
                                 GenerationEvalArguments, LearningRateArguments, LossArguments,
                                 ModelArguments, PeftArguments, parse_args, recipe_argv)
from recipes.common.captions import CaptionCollator, caption_eval_records, caption_samples, caption_scores
from recipes.common.data import embedded_dataset
from recipes.common.models import check_model_source, compute_dtype, resolve_model_path
from recipes.common.peft_setup import apply_freezing, apply_peft, count_parameters
from recipes.common.run import load_data, setup_run, train_and_evaluate
from recipes.soft_prompt_caption.collator import CaptionPromptCollator, tokenize_captions
from recipes.soft_prompt_caption.modeling import TRAINED_WEIGHTS, SoftPromptCaptioner, trained_sizes
from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@dataclass
class SoftPromptArguments:
    """The frozen parts of the captioner and the shape of what trains between them."""

    vision_model: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint (Hub id or folder; a full CLIP or a vision-only one) whose vision "
                          "encoder is used frozen, e.g. openai/clip-vit-base-patch32; None = the embedded "
                          "pre-trained tiny one."},
    )
    language_model: str | None = field(
        default=None, metadata={"help": "Causal LM used frozen, e.g. gpt2; None = the embedded pre-trained "
                                        "tiny GPT-2."}
    )
    prompt_length: int = field(default=10,
                               metadata={"help": "Soft prompt vectors; 0 = projection only (the ablation)."})
    prompt_init_text: str | None = field(
        default=None,
        metadata={"help": "Start the soft prompt at the LM's embeddings of this text (repeated to "
                          "prompt_length); None = N(0, 0.02)."},
    )
    projection: Literal["linear", "mlp"] = field(
        default="linear", metadata={"help": "Vision projection: one linear layer, or linear-GELU-linear."}
    )
    vision_features: Literal["pooled", "patches"] = field(
        default="pooled",
        metadata={"help": "'pooled': one vector per image (CLIP's pooled CLS); 'patches': one per patch (49 "
                          "for B/32)."},
    )


def main(argv=None):
    argv = recipe_argv(argv, DEFAULT_CONFIG)  # config.yaml unless --config is given; --use_cpu without a GPU
    (model_args, data_args, sp_args, peft_args, freeze_args, lr_args, loss_args, cache_args, gen_args,
     training_args) = parse_args(
        (ModelArguments, DataArguments, SoftPromptArguments, PeftArguments, FreezeArguments,
         LearningRateArguments, LossArguments, FeatureCacheArguments, GenerationEvalArguments,
         TrainingArguments), argv
    )
    setup_run(training_args)
    if model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is not used by soft_prompt_caption: name the frozen parts "
                         "with --vision_model and --language_model.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit are not supported by soft_prompt_caption: its "
                         "frozen parts are loaded in --dtype (bfloat16 on a GPU by default).")
    if data_args.image_size:
        raise ValueError("--image_size is not used by soft_prompt_caption: images are resized to what the "
                         "CLIP vision encoder was trained on (its image processor's size).")

    # Data: the embedded synthetic set unless files are given. Eval: one record per image, all its captions.
    train_records, eval_records = load_data(
        data_args, "caption",
        lambda: embedded_dataset("caption", n=1000, lang=data_args.lang, seed=training_args.seed))
    if eval_records is not None:
        eval_records = caption_eval_records(eval_records)

    # Model: the frozen parts from two checkpoints (by default the embedded tiny ones), fresh trained parts
    # between.
    vision_path = resolve_model_path(sp_args.vision_model or "tiny:clip-vision-pretrained")
    language_path = resolve_model_path(sp_args.language_model or "tiny:gpt2-pretrained")
    for path in (vision_path, language_path):
        check_model_source(path)
    tokenizer = AutoTokenizer.from_pretrained(language_path, revision=model_args.revision)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(vision_path, revision=model_args.revision)
    model = SoftPromptCaptioner.from_parts(
        vision_path, language_path, dtype=compute_dtype(model_args),
        attn_implementation=model_args.attn_implementation, revision=model_args.revision,
        prompt_length=sp_args.prompt_length, projection=sp_args.projection,
        vision_features=sp_args.vision_features,
    )
    if sp_args.prompt_init_text:
        model.init_soft_prompt_from_text(tokenizer, sp_args.prompt_init_text)
    config = model.config
    n_positions = getattr(config.text_config, "max_position_embeddings", None)
    if n_positions and data_args.max_length > n_positions:
        raise ValueError(f"--max_length {data_args.max_length} is more than the language model's "
                         f"{n_positions} positions.")

    # Optional LoRA on the LM; then only the soft prompt and projection (+ LoRA) train.
    model = apply_peft(model, peft_args)
    apply_freezing(model, freeze_args)
    logger.info("parameters:\n%s", count_parameters(model))
    logger.info("%s (soft prompt %d + image %d = %d prefix positions)", trained_sizes(model),
                config.prompt_length, config.num_vision_tokens, config.prefix_length)

    # Samples: one per reference caption, text only; the length budget counts the prefix.
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer, prefix_length=config.prefix_length,
                                 prompt=data_args.prompt, max_length=data_args.max_length,
                                 lang=data_args.lang)
    train_dataset, eval_dataset, eval_records = caption_samples(tokenize, train_records, eval_records,
                                                                gen_args.eval_max_samples)

    # Optional: the frozen vision tower runs once per image now, not once per sample and epoch while training.
    feature_cache = None
    if cache_args.cache_vision_features:
        from recipes.common.feature_cache import cache_for_run

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        images = list(train_dataset["image"]) + (list(eval_dataset["image"])
                                                 if eval_dataset is not None else [])
        feature_cache = cache_for_run(base.vision_model, image_processor, images, cache_args, training_args,
                                      encode=base.image_features,
                                      tag=f"image_features:{config.vision_features}")

    trainer = SoftPromptTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CaptionCollator(image_processor, tokenizer.pad_token_id, feature_cache),
        processing_class=tokenizer,
        image_processor=image_processor,
        generation_dataset=eval_records,
        generation_collator=CaptionPromptCollator(image_processor, tokenizer, data_args.prompt),
        score_fn=functools.partial(caption_scores, lang=data_args.lang),
        generation_args=gen_args,
        decode_tokenizer=tokenizer,
        learning_rates=lr_args,
        loss_on_label_positions=loss_args.loss_on_label_positions,
    )

    results = train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="caption", lang=data_args.lang,
        model=f"{vision_path} + {language_path}", vision_model=vision_path, language_model=language_path,
        prompt_length=config.prompt_length, trained_parameters=count_parameters(model).trainable,
        train_file=data_args.train_file, eval_file=data_args.eval_file,
    ), shuffled_image_check=gen_args.shuffled_image_check)
    if trainer.is_world_process_zero():
        weights = Path(training_args.output_dir) / TRAINED_WEIGHTS
        logger.info("trained weights: %s (%.1f kB); full checkpoint: python %s/export.py --run %s --out OUT",
                    weights, weights.stat().st_size / 1024, Path(__file__).resolve().parent,
                    training_args.output_dir)
    return results

if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # every rank of a multi-process launch exits cleanly
