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

from accelerate import PartialState
from transformers import Blip2ForConditionalGeneration, TrainingArguments

from recipes.blip2_lora_caption.collator import CaptionPromptCollator, tokenize_captions
from recipes.blip2_lora_caption.trainer import CaptionTrainer
from recipes.common.args import (DataArguments, FeatureCacheArguments, FreezeArguments,
                                 GenerationEvalArguments, LearningRateArguments, LossArguments,
                                 ModelArguments, PeftArguments, parse_args, recipe_argv)
from recipes.common.captions import CaptionCollator, caption_eval_records, caption_samples, caption_scores
from recipes.common.data import embedded_dataset
from recipes.common.models import load_model_and_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing, count_parameters
from recipes.common.run import load_data, setup_run, train_and_evaluate

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


def main(argv=None):
    argv = recipe_argv(argv, DEFAULT_CONFIG)  # config.yaml unless --config is given; --use_cpu without a GPU
    (model_args, data_args, peft_args, freeze_args, lr_args, loss_args, cache_args, gen_args,
     training_args) = parse_args(
        (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments, LossArguments,
         FeatureCacheArguments, GenerationEvalArguments, TrainingArguments), argv
    )
    setup_run(training_args, model_args)

    # Data: the embedded synthetic set unless files are given. Eval: one record per image, all its captions.
    train_records, eval_records = load_data(
        data_args, "caption",
        lambda: embedded_dataset("caption", n=1000, lang=data_args.lang, seed=training_args.seed))
    if eval_records is not None:
        eval_records = caption_eval_records(eval_records)

    # Model: by default the embedded tiny BLIP-2 (real classes, built and pre-trained offline on first use).
    model_path = resolve_model_path(model_args.model_name_or_path or "tiny:blip2-opt-pretrained")
    model, processor = load_model_and_processor(Blip2ForConditionalGeneration, model_path, model_args)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    if data_args.image_size:
        image_processor.size = {"height": data_args.image_size, "width": data_args.image_size}
    image_token_id, n_query = model.config.image_token_id, model.config.num_query_tokens

    # LoRA on the language model; a trained Q-Former (and any trained vision layers) is saved with the
    # adapter through modules_to_save.
    model = apply_lora_and_freezing(model, peft_args, freeze_args)
    logger.info("parameters:\n%s", count_parameters(model))

    # Samples: one per reference caption; the length budget counts the query tokens.
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer, image_token_id=image_token_id,
                                 num_image_tokens=n_query, prompt=data_args.prompt,
                                 max_length=data_args.max_length)
    train_dataset, eval_dataset, eval_records = caption_samples(tokenize, train_records, eval_records,
                                                                gen_args.eval_max_samples)

    # Optional: the frozen vision tower runs once per image now, not once per sample and epoch while training.
    feature_cache = None
    if cache_args.cache_vision_features:
        from recipes.common.feature_cache import cache_for_run, serve_cached_features, vision_tower

        tower = vision_tower(model)
        images = list(train_dataset["image"]) + (list(eval_dataset["image"])
                                                 if eval_dataset is not None else [])
        feature_cache = cache_for_run(tower, image_processor, images, cache_args, training_args)
        serve_cached_features(tower)  # generation (4-D pixels) still runs the tower

    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CaptionCollator(image_processor, tokenizer.pad_token_id, feature_cache),
        processing_class=processor,
        generation_dataset=eval_records,
        generation_collator=CaptionPromptCollator(image_processor, tokenizer, image_token_id, n_query,
                                                  data_args.prompt),
        score_fn=functools.partial(caption_scores, lang=data_args.lang),
        generation_args=gen_args,
        decode_tokenizer=tokenizer,
        learning_rates=lr_args,
        loss_on_label_positions=loss_args.loss_on_label_positions,
    )
    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="caption", lang=data_args.lang, model=model_path,
        train_file=data_args.train_file, eval_file=data_args.eval_file,
    ), shuffled_image_check=gen_args.shuffled_image_check)


if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # every rank of a multi-process launch exits cleanly
