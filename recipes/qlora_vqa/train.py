"""Fine-tune a LLaVA model for visual question answering with QLoRA: a 4-bit NF4 language model, LoRA on all
of its linear layers, the vision tower, projector and LM head unquantized.

Embedded default (tiny pre-trained LLaVA + synthetic shapes VQA, built on first use), on the CPU, where
bitsandbytes' 4-bit kernels run too:
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/qlora_vqa/train.py

A real checkpoint and VQA v2 (`python -m data_tools convert --from vqav2 ...`), on one GPU (bf16 autocast):
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/qlora_vqa/train.py \
        --model_name_or_path llava-hf/llava-1.5-7b-hf --train_file data/vqav2/train.jsonl \
        --eval_file data/vqav2/val.jsonl --eval_max_samples 2000 --max_length 704 \
        --per_device_train_batch_size 16 --learning_rate 2e-4 --freeze_bridge true

Writes to --output_dir: checkpoints; the adapter (+ the projector when it trains) as safetensors with the
base's quantization config; the processor; predictions/step-N.jsonl (+ .results.json in the official VQA
results format, + .vqa.json: accuracy per answer and question type) at every evaluation; metrics.json
(held-out accuracy before and after, and of the per-question-type prior baseline, whose answers and
breakdown are predictions/baseline.*). Export a merged bf16
checkpoint with merge.py.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForImageTextToText, TrainingArguments

from data_tools.records import IMAGE_TOKEN, find_reserved
from recipes.common.args import GENERATIVE_ARGUMENTS, arg, parse_recipe_args
from recipes.common.chat import (ChatBatchArguments, chat_collator, chat_encoder, chat_generation,
                                 encoded_once, tokenize_conversations)
from recipes.common.data import embedded_dataset
from recipes.common.models import dtype_name, load_model, load_recipe_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing, count_parameters
from recipes.common.quantization import (
    fall_back_to_cpu_optimizer,
    prepare_quantized_for_training,
    unquantized_modules,
    weight_bytes,
)
from recipes.common.run import load_data, run_main, setup_run, train_and_evaluate
from recipes.qlora_vqa.collator import (SHORT_ANSWER_PROMPT, prior_predictions, vqa_conversations, vqa_items,
                                        vqa_scores)
from recipes.qlora_vqa.trainer import VqaTrainer

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@dataclass
class VqaArguments:
    """How questions are put to the model."""

    answer_prompt: str | None = arg(
        SHORT_ANSWER_PROMPT, "Instruction after each question asking for a short answer (LLaVA-1.5's); empty "
        "= none.")


def check_answer_prompt(prompt: str | None, reserved: tuple[str, ...]) -> None:
    """Refuse an --answer_prompt holding a special string or `<image>`: it goes into every question, and
    encoding would blame the first data row for it."""
    found = find_reserved(prompt or "", (*reserved, IMAGE_TOKEN))
    if found == IMAGE_TOKEN:
        raise ValueError(f"--answer_prompt {prompt!r} holds {IMAGE_TOKEN!r}, which places an image (each "
                         "question has its one image already); remove it from the prompt.")
    if found is not None:
        raise ValueError(f"--answer_prompt {prompt!r} holds {found!r}, which the tokenizer reads as its "
                         "special token, not as text; remove or rewrite it.")


def main(argv=None):
    # config.yaml unless --config is given, then the command line; --use_cpu without a GPU.
    args = parse_recipe_args(argv, DEFAULT_CONFIG, (*GENERATIVE_ARGUMENTS, VqaArguments,
                                                     ChatBatchArguments, TrainingArguments))
    setup_run(args.training, args.model)
    quantized = args.model.load_in_4bit or args.model.load_in_8bit
    if quantized and args.peft.peft_method == "none":
        raise ValueError("--peft_method none with --load_in_4bit/--load_in_8bit: quantized weights cannot "
                         "train. Use LoRA, or load the model unquantized (--load_in_4bit false).")
    fall_back_to_cpu_optimizer(args.training)

    # Model: by default the embedded tiny LLaVA, pre-trained by the project (recipes/common/tiny/pretrain.py).
    # Its processor first: the data's texts must not hold its tokenizer's special strings (nor `<image>`,
    # which places an image in a turn).
    model_path = resolve_model_path(args.model.model_name_or_path or "tiny:llava-pretrained")
    processor = load_recipe_processor(model_path, args.model)
    encoder = chat_encoder(processor, args.data.special_text)
    check_answer_prompt(args.vqa.answer_prompt, encoder.reserved)

    # Data: the embedded synthetic set unless files are given.
    def embedded():
        return embedded_dataset("vqa", n=1000, lang=args.data.lang, seed=args.training.seed)

    train_records, eval_records, test_records = load_data(
        args.data, "vqa", embedded, args.training.output_dir,
        reserved=(*encoder.reserved, IMAGE_TOKEN))

    # The LM's linear layers load in 4-bit NF4 (double quantization) with --load_in_4bit (config.yaml);
    # QLoRA quantizes the LM only: vision tower, projector and LM head stay in 16/32-bit.
    skip = unquantized_modules(AutoModelForImageTextToText, model_path, args.model)
    model = load_model(AutoModelForImageTextToText, model_path, args.model, skip_quantization=skip)

    # LoRA on every linear layer of the LM (the default targets); a trained projector / vision layers are
    # saved with the adapter through modules_to_save. Then only what trains is cast to float32.
    model = apply_lora_and_freezing(model, args.peft, args.freeze, args.model.revision)
    prepare_quantized_for_training(model)
    logger.info("parameters:\n%s", count_parameters(model))
    logger.info("weight bytes: %s", weight_bytes(model))

    # Samples: one short-answer conversation per question, through the processor's chat template;
    # loss on the answer tokens only; the length budget counts the image tokens. Encoded by one process of a
    # launch, which the others read; it writes the rows it cannot encode (--skip_bad_rows) to
    # rejects/<split>.tokenize.rejects.jsonl.
    def samples(records, split, source):
        return encoded_once(lambda: tokenize_conversations(
            vqa_conversations(records, args.vqa.answer_prompt), encoder, args.data.max_length, source=source,
            num_proc=args.chat_batch.preprocessing_num_workers, skip_bad_rows=args.data.skip_bad_rows,
            rejects_path=Path(args.training.output_dir) / "rejects" / f"{split}.tokenize.rejects.jsonl"),
            split, args.training)

    train_dataset, train_report = samples(train_records, "train", args.data.train_file)
    logger.info("train %s", train_report)
    reports = {"train": vars(train_report)}

    # Held-out items: one per question; a prompt over the budget is left out, as in training, and counted
    # in metrics.json (prompts_left_out).
    left_out = {}

    def held_out_items(records, split):
        items, left_out[split] = encoder.fitting(vqa_items(records, args.vqa.answer_prompt),
                                                 args.data.max_length, args.generation_eval.eval_max_samples)
        return items

    eval_dataset = eval_items = None
    if eval_records is not None:
        eval_dataset, eval_report = samples(eval_records, "eval", args.data.eval_file)
        logger.info("eval %s", eval_report)
        reports["eval"] = vars(eval_report)
        eval_items = held_out_items(eval_records, "eval")
    test_items = None if test_records is None else held_out_items(test_records, "test")

    trainer = VqaTrainer(
        model=model, args=args.training, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=chat_collator(encoder, train_dataset, args.chat_batch.padding_free),
        processing_class=processor,
        generation=chat_generation(eval_items, encoder, vqa_scores, args.generation_eval),
        learning_rates=args.learning_rate, loss_on_label_positions=args.loss.loss_on_label_positions,
    )

    results = {}
    headline = test_items if test_items is not None else eval_items
    if headline is not None:
        # The per-question-type prior (the most popular training answer of each question type): what an
        # answer needs to beat to show that the model looked at the image. On the headline split.
        baseline = prior_predictions(train_records, headline)
        results["baseline"] = {f"eval_{k}": v for k, v in vqa_scores(baseline, headline).items()}
        # predictions/baseline.*: its answers and per-question-type accuracy
        if trainer.is_world_process_zero():
            trainer.write_predictions(baseline, results["baseline"], "baseline", headline)
    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="vqa", lang=args.data.lang, model=model_path,
        revision=args.model.revision,
        train_file=args.data.train_file, eval_file=args.data.eval_file, test_file=args.data.test_file,
        image_root=args.data.image_root, processor_kwargs=args.model.processor_kwargs,
        special_text=args.data.special_text,
        # How the base computes and how questions are asked: a resume that changed them would train on a
        # checkpoint, and report "before" scores, of another setup.
        dtype=dtype_name(args.model), load_in_4bit=args.model.load_in_4bit,
        load_in_8bit=args.model.load_in_8bit,
        bnb_4bit_quant_type=args.model.bnb_4bit_quant_type if args.model.load_in_4bit else None,
        bnb_4bit_use_double_quant=args.model.bnb_4bit_use_double_quant if args.model.load_in_4bit else None,
        answer_prompt=args.vqa.answer_prompt or None,  # "" is none too
        length_budget=reports, prompts_left_out=left_out,
    ), test=test_items, results=results, shuffled_image_check=args.generation_eval.shuffled_image_check,
       early_stopping=args.early_stopping)


if __name__ == "__main__":
    run_main(main)  # a bad input or option: its message, exit code 2
