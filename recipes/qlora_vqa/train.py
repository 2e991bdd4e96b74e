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
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from transformers import LlavaForConditionalGeneration, TrainingArguments

from recipes.common.args import (DataArguments, FreezeArguments, GenerationEvalArguments,
                                 LearningRateArguments, LossArguments, ModelArguments, PeftArguments,
                                 parse_args, recipe_argv)
from recipes.common.chat import (ChatBatchArguments, ChatCollator, ChatEncoder, ChatPromptCollator,
                                 tokenize_conversations)
from recipes.common.data import embedded_dataset
from recipes.common.models import load_model_and_processor, resolve_model_path
from recipes.common.peft_setup import COMPONENT_PREFIXES, apply_lora_and_freezing, count_parameters
from recipes.common.quantization import (fall_back_to_cpu_optimizer, prepare_quantized_for_training,
                                         weight_bytes)
from recipes.common.run import load_data, setup_run, train_and_evaluate
from recipes.qlora_vqa.collator import (SHORT_ANSWER_PROMPT, prior_predictions, vqa_conversations, vqa_items,
                                        vqa_scores)
from recipes.qlora_vqa.trainer import VqaTrainer

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
# Kept in 16/32-bit (QLoRA quantizes the LM only): the vision tower and projector are small next to a 7B LM
# (4% and 0.3% of LLaVA-1.5-7B), and the LM head decides every output token. Full module-name prefixes:
# transformers 5 matches skip names from the start of the name or as a suffix, not anywhere inside it.
UNQUANTIZED = [*COMPONENT_PREFIXES["llava"]["vision"], *COMPONENT_PREFIXES["llava"]["bridge"], "lm_head"]


@dataclass
class VqaArguments:
    """How questions are put to the model."""

    answer_prompt: str | None = field(
        default=SHORT_ANSWER_PROMPT,
        metadata={"help": "Instruction after each question asking for a short answer (LLaVA-1.5's); empty = "
                          "none."},
    )


def main(argv=None):
    argv = recipe_argv(argv, DEFAULT_CONFIG)  # config.yaml unless --config is given; --use_cpu without a GPU
    (model_args, data_args, peft_args, freeze_args, lr_args, loss_args, gen_args, vqa_args, batch_args,
     training_args) = parse_args(
        (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments, LossArguments,
         GenerationEvalArguments, VqaArguments, ChatBatchArguments, TrainingArguments), argv
    )
    setup_run(training_args, model_args)
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and peft_args.peft_method == "none":
        raise ValueError("--peft_method none with --load_in_4bit/--load_in_8bit: quantized weights cannot "
                         "train. Use LoRA, or load the model unquantized (--load_in_4bit false).")
    if data_args.image_size:
        raise ValueError("--image_size: LLaVA's vision tower has one position embedding per patch of its own "
                         "image size; images are resized to it by the processor.")
    fall_back_to_cpu_optimizer(training_args)

    # Data: the embedded synthetic set unless files are given.
    train_records, eval_records = load_data(
        data_args, "vqa",
        lambda: embedded_dataset("vqa", n=1000, lang=data_args.lang, seed=training_args.seed))

    # Model: by default the embedded tiny LLaVA, pre-trained by the project (recipes/common/tiny/pretrain.py).
    # The LM's linear layers load in 4-bit NF4 (double quantization) with --load_in_4bit (config.yaml).
    model_path = resolve_model_path(model_args.model_name_or_path or "tiny:llava-pretrained")
    model, processor = load_model_and_processor(LlavaForConditionalGeneration, model_path, model_args,
                                                skip_quantization=UNQUANTIZED)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = ChatEncoder(processor)

    # LoRA on every linear layer of the LM (the default targets); a trained projector / vision layers are
    # saved with the adapter through modules_to_save. Then only what trains is cast to float32.
    model = apply_lora_and_freezing(model, peft_args, freeze_args)
    prepare_quantized_for_training(model)
    logger.info("parameters:\n%s", count_parameters(model))
    logger.info("weight bytes: %s", weight_bytes(model))

    # Samples: one short-answer conversation per question, through the processor's chat template;
    # loss on the answer tokens only; the length budget counts the image tokens.
    train_dataset, train_report = tokenize_conversations(vqa_conversations(train_records,
                                                                           vqa_args.answer_prompt), encoder,
                                                         data_args.max_length, source=data_args.train_file)
    logger.info("train %s", train_report)
    reports = {"train": vars(train_report)}
    eval_dataset = eval_items = None
    if eval_records is not None:
        eval_dataset, eval_report = tokenize_conversations(vqa_conversations(eval_records,
                                                                             vqa_args.answer_prompt), encoder,
                                                           data_args.max_length, source=data_args.eval_file)
        logger.info("eval %s", eval_report)
        reports["eval"] = vars(eval_report)
        eval_items = vqa_items(eval_records, vqa_args.answer_prompt)
        if gen_args.eval_max_samples:
            eval_items = eval_items.select(range(min(gen_args.eval_max_samples, len(eval_items))))

    trainer = VqaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ChatCollator(image_processor, pad_token_id, batch_args.padding_free),
        processing_class=processor,
        generation_dataset=eval_items,
        generation_collator=ChatPromptCollator(encoder, image_processor, pad_token_id),
        score_fn=vqa_scores,
        generation_args=gen_args,
        decode_tokenizer=tokenizer,
        learning_rates=lr_args,
        loss_on_label_positions=loss_args.loss_on_label_positions,
    )

    results = {}
    if eval_items is not None:
        # The per-question-type prior (the most popular training answer of each question type): what an
        # answer needs to beat to show that the model looked at the image.
        baseline = prior_predictions(train_records, eval_items)
        results["baseline"] = {f"eval_{k}": v for k, v in vqa_scores(baseline, eval_items).items()}
        # predictions/baseline.*: its answers and per-question-type accuracy
        if trainer.is_world_process_zero():
            trainer.write_predictions(baseline, results["baseline"], "baseline")
    return train_and_evaluate(trainer, dict(
        recipe=Path(__file__).resolve().parent.name, task="vqa", lang=data_args.lang, model=model_path,
        train_file=data_args.train_file, eval_file=data_args.eval_file, length_budget=reports,
    ), results=results, shuffled_image_check=gen_args.shuffled_image_check)

if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # every rank of a multi-process launch exits cleanly
