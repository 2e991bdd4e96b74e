"""Fine-tune BLIP-2 for image captioning with LoRA on its OPT language model.

Embedded default (tiny BLIP-2 + synthetic shapes captions, built on first use), on the CPU:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/blip2_lora_caption/train.py

A real checkpoint and data set, on one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/blip2_lora_caption/train.py \
        --config recipes/blip2_lora_caption/config.yaml --model_name_or_path Salesforce/blip2-opt-2.7b \
        --train_file data/coco/train.jsonl --eval_file data/coco/val.jsonl --bf16 --max_length 96

Writes to --output_dir: checkpoints, the final adapter (+ Q-Former when trained) as safetensors, the
processor, predictions/step-N.jsonl at every evaluation, and metrics.json (held-out metrics before
and after fine-tuning). Merge into a full checkpoint with merge.py.
"""

import functools
import logging
from pathlib import Path

from transformers import Blip2ForConditionalGeneration, TrainingArguments

from recipes.blip2_lora_caption.collator import tokenize_captions
from recipes.blip2_lora_caption.trainer import CaptionTrainer
from recipes.common.args import GENERATIVE_ARGUMENTS, FeatureCacheArguments, parse_recipe_args
from recipes.common.captions import (CaptionCollator, CaptionPromptCollator, cached_vision_features,
                                     caption_samples, caption_scores, load_caption_data)
from recipes.common.models import dtype_name, load_model, load_recipe_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing, count_parameters
from recipes.common.run import run_main, setup_run, train_and_evaluate
from recipes.common.trainer import GenerationEval

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


def main(argv=None):
    # config.yaml unless --config is given, then the command line; --use_cpu without a GPU.
    args = parse_recipe_args(argv, DEFAULT_CONFIG,
                             (*GENERATIVE_ARGUMENTS, FeatureCacheArguments, TrainingArguments))
    setup_run(args.training, args.model)

    # Model: by default the embedded tiny BLIP-2 (real classes, built and pre-trained offline on first use).
    # Its processor first: the data's captions must not hold its tokenizer's special strings.
    model_path = resolve_model_path(args.model.model_name_or_path or "tiny:blip2-opt-pretrained")
    processor = load_recipe_processor(model_path, args.model)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor

    # Data: the embedded synthetic set unless files are given. Eval: one record per image, all its captions.
    train_records, eval_records, test_records = load_caption_data(args.data, args.training, tokenizer)

    model = load_model(Blip2ForConditionalGeneration, model_path, args.model)
    side = model.config.vision_config.image_size  # BLIP-2 adds these position embeddings to any image size
    if dict(image_processor.size) != {"height": side, "width": side}:
        raise ValueError(f"--processor_kwargs size {dict(image_processor.size)}: BLIP-2's vision tower has "
                         f"position embeddings for {side} x {side} px images only; leave the size out.")
    image_token_id, n_query = model.config.image_token_id, model.config.num_query_tokens

    # LoRA on the language model; a trained Q-Former (and any trained vision layers) is saved with the
    # adapter through modules_to_save.
    model = apply_lora_and_freezing(model, args.peft, args.freeze, args.model.revision)
    logger.info("parameters:\n%s", count_parameters(model))

    # Samples: one per reference caption; the length budget counts the query tokens.
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer, image_token_id=image_token_id,
                                 num_image_tokens=n_query, prompt=args.data.prompt,
                                 max_length=args.data.max_length)
    train_dataset, eval_dataset, eval_records, test_records = caption_samples(
        tokenize, train_records, eval_records, test_records, args.generation_eval.eval_max_samples)

    # Optional: the frozen vision tower runs once per image now, not once per sample and epoch.
    feature_cache = cached_vision_features(model, image_processor, (train_dataset, eval_dataset),
                                           args.feature_cache, args.training, serve=True)

    prompts = CaptionPromptCollator(image_processor, tokenizer, args.data.prompt, (image_token_id,) * n_query)
    trainer = CaptionTrainer(
        model=model, args=args.training, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=CaptionCollator(image_processor, tokenizer.pad_token_id, feature_cache),
        processing_class=processor,
        generation=None if eval_records is None else GenerationEval(
            eval_records, prompts, functools.partial(caption_scores, lang=args.data.lang),
            args.generation_eval, tokenizer, args.data.special_text or ()),
        learning_rates=args.learning_rate, loss_on_label_positions=args.loss.loss_on_label_positions,
    )
    # Score before, train, save, score after: metrics.json; a resume must match what run.json records.
    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="caption", lang=args.data.lang, model=model_path,
        revision=args.model.revision, dtype=dtype_name(args.model),
        train_file=args.data.train_file, eval_file=args.data.eval_file, test_file=args.data.test_file,
        image_root=args.data.image_root, processor_kwargs=args.model.processor_kwargs,
        prompt=args.data.prompt, special_text=args.data.special_text,
    ), test=test_records, shuffled_image_check=args.generation_eval.shuffled_image_check,
       early_stopping=args.early_stopping)


if __name__ == "__main__":
    run_main(main)  # a bad input or option: its message, exit code 2
