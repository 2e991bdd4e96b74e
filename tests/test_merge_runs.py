"""Which weights the merge/export scripts ship: a QLoRA run merged by any recipe's merge.py goes onto the base
it trained against; a run folder whose model is missing or older than its checkpoints is refused."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from recipes.common.args import FreezeArguments, ModelArguments, PeftArguments
from recipes.common.merge import load_quantized_run, merge_run
from recipes.common.models import load_model_and_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing
from recipes.common.quantization import (prepare_quantized_for_training, save_quantization_config,
                                         unquantized_modules)


@pytest.fixture(scope="module")
def qlora_run(module_cache, tmp_path_factory):
    """A QLoRA run folder as qlora_vqa saves one (adapter + projector copy, quantization_config.json,
    processor), its LoRA weights random instead of trained."""
    run = tmp_path_factory.mktemp("qlora") / "run"
    path = resolve_model_path("tiny:llava")
    model_args = ModelArguments(model_name_or_path=path, load_in_4bit=True)
    model, processor = load_model_and_processor(
        AutoModelForImageTextToText, path, model_args,
        skip_quantization=unquantized_modules(AutoModelForImageTextToText, path, model_args))
    model = apply_lora_and_freezing(model, PeftArguments(), FreezeArguments(freeze_bridge=False))
    prepare_quantized_for_training(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(run)
    processor.save_pretrained(run)
    save_quantization_config(model, run)
    return run


def _logits(model, processor):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
        add_generation_prompt=True)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte()
                            .numpy())
    with torch.no_grad():
        return model(**processor(images=[image], text=[text], return_tensors="pt")).logits


def test_merge_run_of_a_qlora_run_adds_the_adapter_to_the_dequantized_base(qlora_run, tmp_path):
    """llava_instruct/merge.py (merge_run) on a QLoRA run: the same model as qlora_vqa/merge.py writes."""
    adapted, processor = load_quantized_run(qlora_run, AutoModelForImageTextToText)
    expected = _logits(adapted, processor)
    merged = AutoModelForImageTextToText.from_pretrained(
        merge_run(qlora_run, tmp_path / "merged", AutoModelForImageTextToText)).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    got = _logits(merged, processor)
    # float32 rounding only (the adapter on the unquantized base: 0.15)
    assert (got - expected).abs().max().item() < 1e-4


def _finished_run(folder, step: int, checkpoint_steps):
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for n in checkpoint_steps:
        (folder / f"checkpoint-{n}").mkdir()
    return folder


@pytest.mark.parametrize("script", ["llava_instruct.merge", "clip_retrieval.merge", "qlora_vqa.merge",
                                    "blip2_lora_caption.merge", "soft_prompt_caption.export"])
def test_a_run_resumed_past_its_final_model_and_stopped_is_refused(script, tmp_path):
    """A run that finished at step 4 and was resumed with more steps, stopped at checkpoint-8: its folder's
    model is step 4's, not the run's newest weights."""
    import importlib

    main = importlib.import_module(f"recipes.{script}").main
    run = _finished_run(tmp_path / "run", 4, (2, 4, 6, 8))
    message = (r"run: its model is step 4's, but the run was resumed and went on to checkpoint-8 without "
               r"finishing\. Give .*run/checkpoint-8 instead")
    with pytest.raises(ValueError, match=message):
        main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["clip_retrieval.merge", "soft_prompt_caption.export"])
def test_an_unfinished_run_names_its_newest_checkpoint(script, tmp_path):
    """Those two load the run folder themselves: a run with checkpoints and no model yet gets the same
    message as merge_run's, not a loader's complaint about a config.json that is not there."""
    import importlib

    main = importlib.import_module(f"recipes.{script}").main
    run = tmp_path / "run"
    for n in (3, 12):
        (run / f"checkpoint-{n}").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": "tiny:clip"}))
    with pytest.raises(FileNotFoundError, match=r"holds no final model: the run did not finish\. Give one of "
                                                r"its checkpoints instead, e\.g\. .*run/checkpoint-12,"):
        main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_merge_says_which_step_it_wrote_the_best_checkpoint_s_with_load_best_model_at_end(
        qlora_run, tmp_path, capsys):
    """A run that kept its best checkpoint (step 2 of 6) is merged, not refused, and says so; a checkpoint-N
    is step N."""
    import shutil

    from recipes.qlora_vqa.merge import main

    run = tmp_path / "run"
    shutil.copytree(qlora_run, run)
    shutil.copytree(qlora_run, run / "checkpoint-2")
    (run / "checkpoint-6").mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 6, "best_global_step": 2}))
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (run / "metrics.json").write_text(json.dumps({"after_step": 2, "global_step": 6}))
    main(["--run", str(run), "--out", str(tmp_path / "best")])
    main(["--run", str(run / "checkpoint-2"), "--out", str(tmp_path / "step2")])
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"full checkpoint written to {tmp_path / 'best'}: the run's weights at step 2 of 6 (the best "
        "checkpoint)",
        f"full checkpoint written to {tmp_path / 'step2'}: the run's weights at step 2"]


def _serve(run):
    from serve.runs import load_runs

    load_runs([run])


def _chat(run):
    from recipes.llava_instruct.chat import load

    load(str(run))


def _embed(run):
    from recipes.clip_retrieval.embed import load

    load(str(run))


@pytest.mark.parametrize("load", [_serve, _chat, _embed])
def test_serve_chat_and_embed_refuse_a_run_resumed_past_its_final_model(load, tmp_path):
    """They would load the folder's step-4 model as the run's, as merge would."""
    run = _finished_run(tmp_path / "run", 4, (4, 8))
    with pytest.raises(ValueError, match=r"its model is step 4's, but the run was resumed and went on to "
                                         r"checkpoint-8 without finishing\. Give .*run/checkpoint-8 instead"):
        load(run)
