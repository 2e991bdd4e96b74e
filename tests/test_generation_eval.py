"""RecipeTrainer's generation-based evaluation on a tiny BLIP-2: eval_CIDEr etc. logged, usable for the best
checkpoint, predictions written."""

import json
import shutil

import datasets
import pytest
import torch
from PIL import Image
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          BlipImageProcessor, OPTConfig, TrainingArguments)

from eval.caption import caption_metrics
from recipes.blip2_lora_caption.collator import tokenize_captions
from recipes.common.captions import (CaptionCollator, CaptionPromptCollator, caption_eval_records,
                                     caption_scores)
from recipes.common.args import EarlyStoppingArguments, GenerationEvalArguments
from recipes.common.run import train_and_evaluate
from recipes.common.trainer import GenerationEval, RecipeTrainer, rank_share
from tests.test_blip2_collator import IMG, PAD, VOCAB, tokenizer  # noqa: F401  (fixture)


def _tiny_blip2():
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, encoder_hidden_size=16).to_dict(),
        text_config=OPTConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                              num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                              pad_token_id=0, bos_token_id=1, eos_token_id=1).to_dict(),
        num_query_tokens=2, image_token_index=IMG,
    )
    return Blip2ForConditionalGeneration(config)


def test_generation_metrics_are_logged_saved_and_pick_the_best_checkpoint(tokenizer, tmp_path):
    colors = {"red": "a red circle", "blue": "blue square"}
    records = []
    for i in range(6):
        color = ["red", "blue"][i % 2]
        Image.new("RGB", (16, 16), color).save(tmp_path / f"{i}.png")
        records.append({"image": str(tmp_path / f"{i}.png"),
                        "captions": [colors[color], "a photo of " + colors[color]]})
    ds = datasets.Dataset.from_list(records)
    train, _ = tokenize_captions(ds, tokenizer, image_token_id=IMG, num_image_tokens=2)
    image_processor = BlipImageProcessor(size={"height": 16, "width": 16})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-2, eval_strategy="steps",
        eval_steps=2, save_steps=2, metric_for_best_model="CIDEr", load_best_model_at_end=True, report_to=[],
        use_cpu=True, logging_steps=1, remove_unused_columns=False, seed=0,
    )
    trainer = RecipeTrainer(
        model=_tiny_blip2(), args=args, train_dataset=train, eval_dataset=train,
        data_collator=CaptionCollator(image_processor, PAD),
        generation=GenerationEval(caption_eval_records(ds),
                                  CaptionPromptCollator(image_processor, tokenizer, prefix_ids=(IMG, IMG)),
                                  caption_scores, GenerationEvalArguments(max_new_tokens=4), tokenizer),
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_CIDEr" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert {"eval_loss", "eval_Bleu_4", "eval_ROUGE_L"} <= set(evals[-1])
    # What was logged is what the written predictions score.
    lines = [json.loads(line) for line in open(tmp_path / "run" / "predictions" / "step-4.jsonl")]
    assert sorted(r["key"] for r in lines) == sorted(r["image"] for r in records)
    rescored = caption_metrics({r["key"]: r["prediction"] for r in lines},
                               {r["image"]: r["captions"] for r in records}, metrics=["CIDEr"])
    assert rescored["CIDEr"] == pytest.approx(evals[-1]["eval_CIDEr"])
    best = max(evals, key=lambda h: h["eval_CIDEr"])["step"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")


def test_generation_reads_its_images_in_the_dataloader_workers(tokenizer, tmp_path):
    records = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (16, 16), color).save(tmp_path / f"{i}.png")
        records.append({"image": str(tmp_path / f"{i}.png"), "captions": [f"a {color} circle"]})
    prompts = CaptionPromptCollator(BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer,
                                    prefix_ids=(IMG, IMG))

    def in_a_worker(batch):
        assert torch.utils.data.get_worker_info() is not None, "collated in the main process"
        return prompts(batch)

    predictions = {}
    for workers, collator in ((0, prompts), (2, in_a_worker)):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_eval_batch_size=2, report_to=[],
                                 use_cpu=True, dataloader_num_workers=workers)
        trainer = RecipeTrainer(model=_tiny_blip2(), args=args, generation=GenerationEval(
            caption_eval_records(datasets.Dataset.from_list(records)), collator, caption_scores,
            GenerationEvalArguments(max_new_tokens=4), tokenizer))
        predictions[workers] = trainer.generate_predictions(trainer.generation.records)
    assert predictions[2] == predictions[0] and len(predictions[0]) == 3


def test_a_run_where_nothing_trains_stops_before_it_scores_anything(tokenizer, tmp_path):
    model = _tiny_blip2().requires_grad_(False)  # e.g. every part frozen and no LoRA

    def never(batch):
        raise AssertionError("'before' was scored")

    records = datasets.Dataset.from_list([{"key": "a", "image": "a.png", "captions": ["a"]}])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = RecipeTrainer(model=model, args=args, generation=GenerationEval(
        records, never, caption_scores, GenerationEvalArguments(), tokenizer))
    with pytest.raises(ValueError, match="nothing would train: every parameter is frozen"):
        train_and_evaluate(trainer, {"recipe": "test"})
    assert not (tmp_path / "run" / "predictions").exists() and not (tmp_path / "run" / "run.json").exists()


def test_early_stopping_ends_training_when_the_metric_stops_improving(tokenizer, tmp_path):
    records = []
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (16, 16), color).save(tmp_path / f"{i}.png")
        records.append({"image": str(tmp_path / f"{i}.png"), "captions": [f"a {color} circle"]})
    ds = datasets.Dataset.from_list(records)
    train, _ = tokenize_captions(ds, tokenizer, image_token_id=IMG, num_image_tokens=2)
    image_processor = BlipImageProcessor(size={"height": 16, "width": 16})

    def trainer(eval_strategy, folder=None, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path / (folder or eval_strategy)), resume_from_checkpoint=resume, max_steps=8,
            per_device_train_batch_size=2, learning_rate=1e-2, eval_strategy=eval_strategy, eval_steps=1,
            save_strategy=eval_strategy, save_steps=1, metric_for_best_model="CIDEr", report_to=[],
            load_best_model_at_end=eval_strategy != "no", use_cpu=True, remove_unused_columns=False)
        return RecipeTrainer(
            model=_tiny_blip2(), args=args, train_dataset=train, eval_dataset=train,
            data_collator=CaptionCollator(image_processor, PAD),
            generation=GenerationEval(caption_eval_records(ds), CaptionPromptCollator(
                image_processor, tokenizer, prefix_ids=(IMG, IMG)), caption_scores,
                GenerationEvalArguments(max_new_tokens=4), tokenizer))

    # No evaluation can beat the best by 1e9: the first sets it, the second is one without improvement.
    stop = EarlyStoppingArguments(early_stopping_patience=1, early_stopping_threshold=1e9)
    stopped = trainer("steps")
    train_and_evaluate(stopped, {"recipe": "test"}, early_stopping=stop)
    assert stopped.state.global_step == 2
    # Resumed (a requeued job), the stopped run is scored again, not trained on to its next evaluation.
    again = trainer("steps", resume="auto")
    train_and_evaluate(again, {"recipe": "test"}, early_stopping=stop)
    assert again.state.global_step == 2 and not (tmp_path / "steps" / "checkpoint-3").exists()
    assert json.loads((tmp_path / "steps" / "metrics.json").read_text())["global_step"] == 2
    # Patience 2: evaluations 2 and 3 do not improve, so it stops at step 3; resumed from step 2 too.
    stop.early_stopping_patience = 2
    run = trainer("steps", "patience")
    train_and_evaluate(run, {"recipe": "test"}, early_stopping=stop)
    assert run.state.global_step == 3
    shutil.copytree(tmp_path / "patience" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = trainer("steps", "resumed", resume="last")
    train_and_evaluate(resumed, {"recipe": "test"}, early_stopping=stop)
    assert resumed.state.global_step == 3
    with pytest.raises(ValueError, match="--early_stopping_patience needs evaluations during training"):
        train_and_evaluate(trainer("no"), {"recipe": "test"}, early_stopping=stop)


@pytest.mark.parametrize("n,world", [(33, 2), (5, 4), (1, 2), (0, 2), (7, 1), (10, 3)])
def test_every_rank_gets_as_many_items_and_their_own_shares_are_the_items_in_order(n, world):
    shares = [rank_share(n, world, rank) for rank in range(world)]
    assert len({len(indices) for indices, _ in shares}) == 1  # as many batches on every rank
    assert [i for indices, own in shares for i in indices[:own]] == list(range(n))
    assert all(set(indices) <= set(range(max(n, 1))) for indices, _ in shares)
