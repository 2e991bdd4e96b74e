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
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: recipes.common, data_tools, eval

import transformers  # noqa: E402
from accelerate import PartialState  # noqa: E402
from transformers import Blip2ForConditionalGeneration, TrainingArguments, set_seed  # noqa: E402

from recipes.common.args import DataArguments, FreezeArguments, GenerationEvalArguments, ModelArguments, PeftArguments, parse_args, recipe_argv, resume_checkpoint  # noqa: E402
from recipes.common.data import embedded_dataset, load_records, merge_captions_by_image  # noqa: E402
from recipes.common.feature_cache import cache_for_run, serve_cached_features, vision_tower  # noqa: E402
from recipes.common.models import check_mixed_precision, load_model_and_processor, resolve_model_path  # noqa: E402
from recipes.common.peft_setup import apply_lora_and_freezing, count_parameters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this recipe's own modules, wherever it was copied
from collator import CaptionCollator, CaptionPromptCollator, caption_scores, tokenize_captions  # noqa: E402
from trainer import CaptionTrainer  # noqa: E402

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


def main(argv=None):
    argv = recipe_argv(argv, DEFAULT_CONFIG)  # config.yaml unless --config is given; --use_cpu without a GPU
    model_args, data_args, peft_args, freeze_args, gen_args, training_args = parse_args(
        (ModelArguments, DataArguments, PeftArguments, FreezeArguments, GenerationEvalArguments, TrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    check_mixed_precision(model_args, training_args)

    # Data: the embedded synthetic set unless files are given. Rows hold image paths, not pixels.
    if data_args.train_file is None:
        splits = embedded_dataset("caption", n=1000, lang=data_args.lang, seed=training_args.seed)
        data_args.train_file, data_args.eval_file = str(splits["train"]), data_args.eval_file or str(splits["val"])
    train_records = load_records(data_args.train_file, "caption", skip_bad_rows=data_args.skip_bad_rows,
                                 max_rows=data_args.max_train_samples)
    eval_records = None
    if data_args.eval_file:
        # One generation and one set of references per image, also for files with a row per caption.
        eval_records = merge_captions_by_image(load_records(data_args.eval_file, "caption", skip_bad_rows=data_args.skip_bad_rows,
                                                            max_rows=data_args.max_eval_samples))

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
    train_dataset, report = tokenize_captions(train_records, tokenizer, image_token_id=image_token_id,
                                              num_image_tokens=n_query, prompt=data_args.prompt, max_length=data_args.max_length)
    logger.info("train %s", report)
    eval_dataset = None
    if eval_records is not None:
        eval_dataset, report = tokenize_captions(eval_records, tokenizer, image_token_id=image_token_id,
                                                 num_image_tokens=n_query, prompt=data_args.prompt, max_length=data_args.max_length)
        logger.info("eval %s", report)
        if gen_args.eval_max_samples:
            eval_records = eval_records.select(range(min(gen_args.eval_max_samples, len(eval_records))))

    # Optional: the frozen vision tower runs once per image now, not once per sample and epoch while training.
    feature_cache = None
    if freeze_args.cache_vision_features:
        tower = vision_tower(model)
        images = list(train_dataset["image"]) + (list(eval_dataset["image"]) if eval_dataset is not None else [])
        feature_cache = cache_for_run(tower, image_processor, images, freeze_args, training_args)
        serve_cached_features(tower)  # generation (4-D pixels) still runs the tower

    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CaptionCollator(image_processor, tokenizer.pad_token_id, feature_cache),
        processing_class=processor,
        generation_dataset=eval_records,
        generation_collator=CaptionPromptCollator(image_processor, tokenizer, image_token_id, n_query, data_args.prompt),
        score_fn=functools.partial(caption_scores, lang=data_args.lang),
        generation_args=gen_args,
        decode_tokenizer=tokenizer,
        freeze_args=freeze_args,
        loss_on_label_positions=model_args.loss_on_label_positions,
    )

    resume = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # 'last': newest complete one
    results = {}
    before_file = Path(training_args.output_dir) / "predictions" / "before.metrics.json"
    if eval_records is not None and resume and before_file.exists():
        results["before"] = json.loads(before_file.read_text())  # scored when the run first started
    elif eval_records is not None:
        results["before"] = trainer.generation_metrics("eval", name="before")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # adapter (+ modules_to_save) as safetensors, and the processor
    if eval_records is not None:
        results["after"] = trainer.generation_metrics("eval", name="final")
    if trainer.is_world_process_zero():
        # recipe/task/eval_file/lang: what `python -m eval report` (make eval) needs to score this run again.
        results.update(recipe=Path(__file__).resolve().parent.name, task="caption", lang=data_args.lang,
                       model=model_path, train_file=data_args.train_file, eval_file=data_args.eval_file,
                       global_step=trainer.state.global_step, world_size=training_args.world_size)
        with open(os.path.join(training_args.output_dir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        for when in ("before", "after"):
            if when in results:
                logger.info("held-out %s fine-tuning: %s", when, json.dumps(results[when]))
        logger.info("outputs in %s", training_args.output_dir)
    return results


if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # every rank of a multi-process launch exits cleanly
