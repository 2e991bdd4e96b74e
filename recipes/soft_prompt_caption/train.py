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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoImageProcessor, AutoTokenizer, TrainingArguments

from recipes.common.args import (GENERATIVE_ARGUMENTS, FeatureCacheArguments, arg, check_at_least,
                                 parse_recipe_args)
from recipes.common.captions import (CaptionCollator, CaptionPromptCollator, cached_vision_features,
                                     caption_samples, caption_scores, load_caption_data)
from recipes.common.models import compute_dtype, dtype_name, loading, resolve_model_path
from recipes.common.peft_setup import apply_freezing, apply_peft, count_parameters, trainable_in_float32
from recipes.common.run import run_main, setup_run, train_and_evaluate
from recipes.common.trainer import GenerationEval
from recipes.soft_prompt_caption.collator import tokenize_captions
from recipes.soft_prompt_caption.modeling import TRAINED_WEIGHTS, SoftPromptCaptioner, trained_sizes
from recipes.soft_prompt_caption.trainer import SoftPromptTrainer

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@dataclass
class SoftPromptArguments:
    """The frozen parts of the captioner and the shape of what trains between them."""

    vision_model: str | None = arg(
        None, "CLIP checkpoint (Hub id or folder; a full CLIP or a vision-only one) whose vision encoder "
        "is used frozen, e.g. openai/clip-vit-base-patch32; None = the embedded pre-trained tiny one.")
    language_model: str | None = arg(
        None, "Causal LM used frozen, e.g. gpt2; None = the embedded pre-trained tiny GPT-2.")
    prompt_length: int = arg(10, "Soft prompt vectors; 0 = projection only (the ablation).")
    prompt_init_text: str | None = arg(
        None, "Start the soft prompt at the LM's embeddings of this text (repeated to prompt_length); None "
        "= N(0, 0.02).")
    projection: Literal["linear", "mlp"] = arg(
        "linear", "Vision projection: one linear layer, or linear-GELU-linear.")
    vision_features: Literal["pooled", "patches"] = arg(
        "pooled", "'pooled': one vector per image (CLIP's pooled CLS); 'patches': one per patch (49 for "
        "B/32).")

    def __post_init__(self):
        check_at_least(self, 0, "prompt_length")
        if self.prompt_init_text and self.prompt_length == 0:
            raise ValueError(f"prompt_init_text {self.prompt_init_text!r} needs a soft prompt to start, but "
                             "prompt_length is 0: give prompt_length > 0, or leave prompt_init_text out.")


def main(argv=None):
    # config.yaml unless --config is given, then the command line; --use_cpu without a GPU.
    args = parse_recipe_args(argv, DEFAULT_CONFIG, (*GENERATIVE_ARGUMENTS, SoftPromptArguments,
                                                     FeatureCacheArguments, TrainingArguments))
    setup_run(args.training)
    if args.model.model_name_or_path:
        raise ValueError("--model_name_or_path is not used by soft_prompt_caption: name the frozen parts "
                         "with --vision_model and --language_model.")
    if args.model.load_in_4bit or args.model.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit are not supported by soft_prompt_caption: its "
                         "frozen parts are loaded in --dtype (bfloat16 on a GPU by default).")
    if args.model.trust_remote_code:
        # export.py and serve rebuild the model from the bases without it: a run they could not reload.
        raise ValueError("--trust_remote_code is not supported by soft_prompt_caption: its bases load "
                         "through the classes transformers ships (a CLIP-style vision encoder and a causal "
                         "LM).")
    if args.model.processor_kwargs:
        raise ValueError("--processor_kwargs is not used by soft_prompt_caption: images are resized to what "
                         "the CLIP vision encoder was trained on (its image processor's size).")

    # Model: the frozen parts from two checkpoints (by default the embedded tiny ones), fresh trained parts
    # between. The tokenizer first: the data's captions must not hold its special strings.
    vision_path = resolve_model_path(args.soft_prompt.vision_model or "tiny:clip-vision-pretrained")
    language_path = resolve_model_path(args.soft_prompt.language_model or "tiny:gpt2-pretrained")
    with loading(language_path):
        tokenizer = AutoTokenizer.from_pretrained(language_path, revision=args.model.revision)

    # Data: the embedded synthetic set unless files are given. Eval: one record per image, all its captions.
    train_records, eval_records, test_records = load_caption_data(args.data, args.training, tokenizer)

    with loading(vision_path, language_path):
        image_processor = AutoImageProcessor.from_pretrained(vision_path, revision=args.model.revision)
        model = SoftPromptCaptioner.from_parts(
            vision_path, language_path, dtype=compute_dtype(args.model),
            attn_implementation=args.model.attn_implementation, revision=args.model.revision,
            prompt_length=args.soft_prompt.prompt_length, projection=args.soft_prompt.projection,
            vision_features=args.soft_prompt.vision_features,
        )
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    if args.soft_prompt.prompt_init_text:
        model.init_soft_prompt_from_text(tokenizer, args.soft_prompt.prompt_init_text)
    config = model.config
    n_positions = getattr(config.text_config, "max_position_embeddings", None)
    max_length = args.data.max_length or n_positions  # null (no budget): the LM's positions still bound it
    if n_positions and max_length > n_positions:
        raise ValueError(f"--max_length {max_length} is more than the language model's {n_positions} "
                         "positions.")

    # Optional LoRA on the LM; then only the soft prompt and projection (+ LoRA) train.
    model = apply_peft(model, args.peft)
    apply_freezing(model, args.freeze)
    trainable_in_float32(model)  # an unfrozen part of a bf16 base would lose every update below 2^-8
    logger.info("parameters:\n%s", count_parameters(model))
    logger.info("%s (soft prompt %d + image %d = %d prefix positions)", trained_sizes(model),
                config.prompt_length, config.num_vision_tokens, config.prefix_length)

    # Samples: one per reference caption, text only; the length budget counts the prefix.
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer, prefix_length=config.prefix_length,
                                 prompt=args.data.prompt, max_length=max_length,
                                 lang=args.data.lang)
    train_dataset, eval_dataset, eval_records, test_records = caption_samples(
        tokenize, train_records, eval_records, test_records, args.generation_eval.eval_max_samples)

    # Optional: the frozen vision encoder's image features (the projection's input) are computed once per
    # image now, not once per sample and epoch while training.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    feature_cache = cached_vision_features(model, image_processor, (train_dataset, eval_dataset),
                                           args.feature_cache, args.training, encode=base.image_features,
                                           tag=f"image_features:{config.vision_features}")

    trainer = SoftPromptTrainer(
        model=model, args=args.training, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=CaptionCollator(image_processor, tokenizer.pad_token_id, feature_cache),
        processing_class=tokenizer, image_processor=image_processor,
        generation=None if eval_records is None else GenerationEval(
            eval_records, CaptionPromptCollator(image_processor, tokenizer, args.data.prompt),
            functools.partial(caption_scores, lang=args.data.lang), args.generation_eval, tokenizer,
            args.data.special_text or ()),
        learning_rates=args.learning_rate, loss_on_label_positions=args.loss.loss_on_label_positions,
    )

    results = train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="caption", lang=args.data.lang,
        model=f"{vision_path} + {language_path}", vision_model=vision_path, language_model=language_path,
        revision=args.model.revision, dtype=dtype_name(args.model),
        prompt_length=config.prompt_length, vision_features=config.vision_features,
        projection=config.projection, trained_parameters=count_parameters(model).trainable,
        train_file=args.data.train_file, eval_file=args.data.eval_file, test_file=args.data.test_file,
        image_root=args.data.image_root, prompt=args.data.prompt, special_text=args.data.special_text,
    ), test=test_records, shuffled_image_check=args.generation_eval.shuffled_image_check,
       early_stopping=args.early_stopping)
    if trainer.is_world_process_zero():
        weights = Path(args.training.output_dir) / TRAINED_WEIGHTS
        logger.info("trained weights: %s (%.1f kB); full checkpoint: python %s/export.py --run %s --out OUT",
                    weights, weights.stat().st_size / 1024, Path(__file__).resolve().parent,
                    args.training.output_dir)
    return results

if __name__ == "__main__":
    run_main(main)  # a bad input or option: its message, exit code 2
