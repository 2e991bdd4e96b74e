"""A base loaded at a Hub --revision: merge, export, WiSE-FT and serve load the base at that revision, not at
the repository's main branch. The Hub is a local cache (HF_HUB_OFFLINE) holding two revisions of each tiny
model: `v1`, the model itself, and `main`, every weight halved."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlavaForConditionalGeneration

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from recipes.common.args import FreezeArguments, ModelArguments, PeftArguments
from recipes.common.merge import load_run, merge_run
from recipes.common.models import load_model_and_processor, resolve_model_path
from recipes.common.peft_setup import apply_lora_and_freezing

ROOT = Path(__file__).resolve().parent.parent
V1, MAIN = "1" * 40, "2" * 40  # the two commits


@pytest.fixture(scope="module")
def hub(module_cache):
    """An offline Hub cache with acme/tiny-{llava,clip,clip-vision,gpt2} at revisions v1 and main; yields
    {name: {revision: the state dict there}}."""
    root = module_cache / "hub"
    states = {}
    for name, cls in (("llava", LlavaForConditionalGeneration), ("clip", AutoModel),
                      ("clip-vision", AutoModel), ("gpt2", AutoModelForCausalLM)):
        repo = root / f"models--acme--tiny-{name}"
        src = Path(resolve_model_path(f"tiny:{name}"))
        states[name] = {}
        for ref, commit, scale in (("v1", V1, 1.0), ("main", MAIN, 0.5)):
            snapshot = repo / "snapshots" / commit
            shutil.copytree(src, snapshot)
            model = cls.from_pretrained(snapshot)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(scale)
            model.save_pretrained(snapshot)
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
            states[name][ref] = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield states


def _assert_same(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def llava_run(hub, tmp_path_factory):
    """A LoRA run of acme/tiny-llava at v1, its adapter non-zero; (run folder, its merged state dict)."""
    torch.manual_seed(0)
    model, processor = load_model_and_processor(LlavaForConditionalGeneration, "acme/tiny-llava",
                                                ModelArguments(revision="v1"))
    assert torch.equal(model.lm_head.weight, hub["llava"]["v1"]["lm_head.weight"])
    model = apply_lora_and_freezing(model, PeftArguments(), FreezeArguments(), "v1")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter's delta
    run = tmp_path_factory.mktemp("llava") / "run"
    model.save_pretrained(run)
    processor.save_pretrained(run)
    return run, {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_a_lora_run_loads_and_merges_onto_the_revision_it_trained_on(llava_run, tmp_path):
    run, expected = llava_run
    assert json.loads((run / "adapter_config.json").read_text())["revision"] == "v1"
    model, _ = load_run(run, LlavaForConditionalGeneration)
    _assert_same(model.merge_and_unload().state_dict(), expected)
    merge_run(run, tmp_path / "merged", LlavaForConditionalGeneration)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    _assert_same(merged.state_dict(), expected)


def test_serve_shares_a_base_only_between_runs_of_the_same_revision(hub, llava_run, tmp_path):
    from serve.runs import load_runs

    run, _ = llava_run
    on_main = tmp_path / "on_main"
    shutil.copytree(run, on_main)
    config = json.loads((on_main / "adapter_config.json").read_text())
    (on_main / "adapter_config.json").write_text(json.dumps({**config, "revision": None}))
    runs = load_runs([run, on_main])
    first, second = runs.values()
    assert first.model is not second.model
    for served, ref in ((first, "v1"), (second, "main")):
        base = served.model.get_base_model()
        assert torch.equal(base.lm_head.weight, hub["llava"][ref]["lm_head.weight"])


def test_clip_wise_ft_and_export_use_the_trained_revision(hub, module_cache, tmp_path):
    from recipes.clip_retrieval.merge import base_of, export

    rows = read_jsonl(make_synthetic("retrieval", 12, tmp_path / "synth", seed=1, progress=False))
    write_jsonl(tmp_path / "synth" / "train.jsonl", rows[:8])
    write_jsonl(tmp_path / "synth" / "eval.jsonl", rows[8:])
    env = dict(os.environ, VLM_RECIPES_CACHE=str(module_cache), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=huggingface_hub.constants.HF_HUB_CACHE, TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "clip_retrieval" / "train.py"),
         "--model_name_or_path", "acme/tiny-clip", "--revision", "v1", "--peft_method", "lora",
         "--train_file", tmp_path / "synth" / "train.jsonl", "--eval_file", tmp_path / "synth" / "eval.jsonl",
         "--max_steps", "1", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
         "--load_best_model_at_end", "false", "--report_to", "none", "--wise_ft_alpha", "0",
         "--output_dir", out], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["revision"] == "v1"
    assert base_of(out) == ("acme/tiny-clip", "v1")
    v1 = hub["clip"]["v1"]
    _assert_same(AutoModel.from_pretrained(out / "wise_ft-0").state_dict(), v1)  # alpha 0: the base itself
    export(str(out), str(tmp_path / "exported"), alpha=0.0)
    _assert_same(AutoModel.from_pretrained(tmp_path / "exported").state_dict(), v1)


def test_a_soft_prompt_run_rebuilds_its_bases_at_their_revision(hub, tmp_path):
    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner, save_trained

    model = SoftPromptCaptioner.from_parts("acme/tiny-clip-vision", "acme/tiny-gpt2", revision="v1")
    save_trained(model, tmp_path / "run")
    rebuilt = SoftPromptCaptioner.from_trained(tmp_path / "run")
    _assert_same(rebuilt.vision_model.state_dict(), hub["clip-vision"]["v1"])
    _assert_same(rebuilt.language_model.state_dict(), hub["gpt2"]["v1"])
    # bases given instead of the recorded ones are loaded as given: the recorded revision is not theirs
    moved = SoftPromptCaptioner.from_trained(tmp_path / "run", vision_model="acme/tiny-clip-vision",
                                             language_model="acme/tiny-gpt2")
    _assert_same(moved.vision_model.state_dict(), hub["clip-vision"]["main"])
    # one of them alone would load the other, recorded one at the default revision, not at v1: refused
    with pytest.raises(ValueError, match="at revision 'v1': give both --vision_model and --language_model"):
        SoftPromptCaptioner.from_trained(tmp_path / "run", vision_model="acme/tiny-clip-vision")
