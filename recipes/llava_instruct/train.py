"""Visual instruction tuning of a LLaVA model (CLIP vision tower + projector + Llama-style LM), in LLaVA-1.5's
two stages.

Embedded default (tiny LLaVA + synthetic multi-turn instructions, built on first use), on the CPU:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/llava_instruct/train.py
    # stage 1 first (projector only, on captions), then stage 2 from its output:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/llava_instruct/train.py \
        --stage pretrain --num_train_epochs 1 --learning_rate 1e-3 --output_dir
        outputs/llava_instruct_pretrain
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/llava_instruct/train.py \
        --model_name_or_path outputs/llava_instruct_pretrain

A real checkpoint and LLaVA-Instruct data (`python -m data_tools convert --from llava ...`), on one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/llava_instruct/train.py \
        --model_name_or_path llava-hf/llava-1.5-7b-hf --train_file data/llava/train.jsonl \
        --eval_file data/llava/val.jsonl --bf16 --max_length 2048 --lora_r 128 --lora_alpha 256 \
        --learning_rate 2e-4 --projector_lr 2e-5 --num_train_epochs 1 --unfreeze_last_n_vision_layers 0 \
        --short_answer_words 3   # see README.md

Writes to --output_dir: checkpoints; the adapter with the trained projector (and vision layers) as
safetensors, or the full model (stage pretrain, or --peft_method none); the processor;
predictions/step-N.jsonl at every evaluation; metrics.json (held-out metrics before and after).
Merge an adapter into a full checkpoint with merge.py; talk to a run with chat.py.
"""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoModelForImageTextToText, TrainingArguments

from data_tools.records import IMAGE_TOKEN
from eval.instruct import SHORT_ANSWER_WORDS, instruct_scores
from recipes.common.args import GENERATIVE_ARGUMENTS, arg, check_at_least, parse_recipe_args
from recipes.common.chat import (ChatBatchArguments, chat_collator, chat_encoder, chat_generation,
                                 encoded_once, tokenize_conversations)
from recipes.common.data import embedded_dataset
from recipes.common.models import dtype_name, load_model, load_recipe_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing, count_parameters
from recipes.common.run import load_data, run_main, setup_run, train_and_evaluate
from recipes.llava_instruct.collator import caption_conversations, generation_items
from recipes.llava_instruct.trainer import InstructTrainer

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
# Stage 1's images are scenes drawn with another seed than the instruction data's, as LLaVA's stage-1
# images (CC3M, LAION/CC/SBU) are not its instruction-tuning images: no held-out image is seen in stage 1.
STAGE1_SEED_OFFSET = 1


@dataclass
class InstructArguments:
    """Which LLaVA-1.5 training stage runs, and how its evaluation scores answers."""

    stage: Literal["pretrain", "finetune"] = arg(
        "finetune", "'pretrain': stage 1, the projector alone on caption data; 'finetune': stage 2, the "
        "projector with LoRA (or all of the LM with --peft_method none) on instruction data.")
    data_task: Literal["instruct", "caption"] | None = arg(
        None, "Schema of --train_file/--eval_file: 'caption' records become single-turn conversations; "
        "None = caption for --stage pretrain, instruct for finetune.")
    short_answer_words: int = arg(
        SHORT_ANSWER_WORDS, "Eval answers of at most this many words are scored with VQA accuracy, longer "
        "ones with CIDEr.")
    projector_lr: float | None = arg(None, "Learning rate of the projector (= bridge_lr).")

    def __post_init__(self):
        check_at_least(self, 0, "short_answer_words")


def main(argv=None):
    # config.yaml unless --config is given, then the command line; --use_cpu without a GPU.
    args = parse_recipe_args(argv, DEFAULT_CONFIG, (*GENERATIVE_ARGUMENTS, InstructArguments,
                                                     ChatBatchArguments, TrainingArguments))
    setup_run(args.training, args.model)
    if args.model.load_in_4bit or args.model.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit are not supported by llava_instruct (its merge and "
                         "chat put the adapter on the unquantized base); recipes/qlora_vqa trains LoRA on a "
                         "4-bit base, for VQA data.")
    if args.instruct.projector_lr is not None:
        if args.learning_rate.bridge_lr not in (None, args.instruct.projector_lr):
            raise ValueError(f"--projector_lr {args.instruct.projector_lr} and --bridge_lr "
                             f"{args.learning_rate.bridge_lr} name the same learning rate; give one of them.")
        args.learning_rate.bridge_lr = args.instruct.projector_lr
    task = args.instruct.data_task or ("caption" if args.instruct.stage == "pretrain" else "instruct")

    # Model: by default the embedded tiny LLaVA (real classes, built and pre-trained offline on first use).
    # Its processor first: the data's texts must not hold its tokenizer's special strings (nor `<image>`
    # outside the user turns it places images in).
    model_path = resolve_model_path(args.model.model_name_or_path or "tiny:llava-pretrained")
    processor = load_recipe_processor(model_path, args.model)
    encoder = chat_encoder(processor, args.data.special_text)

    # Data: the embedded synthetic set unless files are given. Stage 1's images are scenes of another seed.
    seed = args.training.seed + (STAGE1_SEED_OFFSET if task == "caption" else 0)
    train_records, eval_records, test_records = load_data(
        args.data, task, lambda: embedded_dataset(task, n=1000, lang=args.data.lang, seed=seed),
        args.training.output_dir, task_flags={t: f"--data_task {t}" for t in ("caption", "instruct")},
        reserved=(*encoder.reserved, IMAGE_TOKEN))

    model = load_model(AutoModelForImageTextToText, model_path, args.model)

    # What trains. Stage 1: the projector alone. Stage 2: the projector with LoRA on the LM (or the whole
    # LM); a trained projector / trained vision layers are saved with the adapter through modules_to_save.
    if args.instruct.stage == "pretrain":
        args.peft.peft_method = "none"
        args.freeze.freeze_vision_tower, args.freeze.unfreeze_last_n_vision_layers = True, 0
        args.freeze.freeze_bridge, args.freeze.freeze_language_model = False, True
        logger.info("stage pretrain: only the projector trains (LoRA and the vision/LM freeze flags are "
                    "ignored)")
    model = apply_lora_and_freezing(model, args.peft, args.freeze, args.model.revision)
    logger.info("parameters:\n%s", count_parameters(model))

    # Samples: conversations rendered with the processor's chat template; the budget counts image tokens.
    # Encoded by one process of a launch, which the others read; it writes the rows it cannot encode
    # (--skip_bad_rows) to rejects/<split>.tokenize.rejects.jsonl.
    def samples(records, split, source):
        conversations = caption_conversations(records, args.training.seed) if task == "caption" else records
        dataset, report = encoded_once(lambda: tokenize_conversations(
            conversations, encoder, args.data.max_length, source=source,
            num_proc=args.chat_batch.preprocessing_num_workers, skip_bad_rows=args.data.skip_bad_rows,
            rejects_path=Path(args.training.output_dir) / "rejects" / f"{split}.tokenize.rejects.jsonl"),
            split, args.training)
        logger.info("%s %s", split, report)
        return dataset, report

    # Held-out items: one per answer to generate; a prompt over the budget is left out, as in training,
    # and counted in metrics.json (prompts_left_out).
    left_out = {}

    def held_out_items(records, split):
        items = generation_items(task, records, args.instruct.short_answer_words, args.data.lang)
        items, left_out[split] = encoder.fitting(encoder.usable(items), args.data.max_length,
                                                 args.generation_eval.eval_max_samples)
        return items

    train_dataset, train_report = samples(train_records, "train", args.data.train_file)
    eval_dataset = eval_items = None
    reports = {"train": vars(train_report)}
    if eval_records is not None:
        eval_dataset, eval_report = samples(eval_records, "eval", args.data.eval_file)
        reports["eval"] = vars(eval_report)
        eval_items = held_out_items(eval_records, "eval")
        if args.training.metric_for_best_model == "VQA_accuracy" and not any(eval_items["short"]):
            # Stage 1 evaluates captions only: there are no short answers to pick the best checkpoint by.
            logger.warning("no eval answer is short enough for VQA accuracy: metric_for_best_model is CIDEr "
                           "instead")
            args.training.metric_for_best_model = "CIDEr"

    test_items = None if test_records is None else held_out_items(test_records, "test")

    scores = functools.partial(instruct_scores, lang=args.data.lang)
    trainer = InstructTrainer(
        model=model, args=args.training, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=chat_collator(encoder, train_dataset, args.chat_batch.padding_free),
        processing_class=processor,
        generation=chat_generation(eval_items, encoder, scores, args.generation_eval),
        learning_rates=args.learning_rate, loss_on_label_positions=args.loss.loss_on_label_positions,
    )
    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task=task, stage=args.instruct.stage,
        lang=args.data.lang, short_answer_words=args.instruct.short_answer_words, model=model_path,
        revision=args.model.revision, dtype=dtype_name(args.model),
        train_file=args.data.train_file, eval_file=args.data.eval_file, test_file=args.data.test_file,
        image_root=args.data.image_root, processor_kwargs=args.model.processor_kwargs,
        special_text=args.data.special_text,
        length_budget=reports, prompts_left_out=left_out,
    ), test=test_items, shuffled_image_check=args.generation_eval.shuffled_image_check,
       early_stopping=args.early_stopping)


if __name__ == "__main__":
    run_main(main)  # a bad input or option: its message, exit code 2
