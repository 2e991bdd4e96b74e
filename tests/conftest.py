"""Fixtures the test files share: subprocess environments for recipe runs, and small synthetic data splits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist each worker has a core: torch's threads (one per core by default) in two workers and the
# runs they start would share two cores, where OpenMP's spinning threads make a run several times slower.
# Set here, before torch loads, so that the workers and every subprocess they start (the environment is
# inherited) run one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A model and data cache (VLM_RECIPES_CACHE) of the test module's own: what the module builds is built
    once, and never into the user's cache. Yields its folder."""
    root = tmp_path_factory.mktemp("vlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_RECIPES_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def recipe_env(tmp_path_factory):
    """A factory: (folder, environment) for subprocess runs of a recipe, with a model cache of the module's
    own (tiny models are built there once per module) and the first `n_train` of `n` synthetic `task` rows
    written to synth/train.jsonl, the rest to synth/eval.jsonl. `extra` adds environment variables."""

    def make(name: str, task: str, n: int, n_train: int, **extra):
        d = tmp_path_factory.mktemp(name)
        rows = read_jsonl(make_synthetic(task, n, d / "synth", seed=1, progress=False))
        write_jsonl(d / "synth" / "train.jsonl", rows[:n_train])
        write_jsonl(d / "synth" / "eval.jsonl", rows[n_train:])
        env = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false", **extra)
        env.pop("PYTHONPATH", None)  # the project is found as installed (pip install -e .), as a user's is
        return d, env

    return make


def run_script(script, args, env, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python script args...` with `env`, output captured."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def lora_module_names(model) -> list[str]:
    """Base-model names of the modules of a peft model that carry a LoRA adapter."""
    return sorted(name.removeprefix("base_model.model.").removesuffix(".lora_A")
                  for name, _ in model.named_modules() if name.endswith(".lora_A"))


def word_llava_processor(vocab: dict[str, int], chat_template: str):
    """A LLaVA processor over a word-level `vocab` ({word: id} with <unk>, <s>, </s>, <pad> and <image>): a
    16 px image is 4 image tokens (8 px patches, CLS dropped), and every text starts with <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def undecodable_png(folder: Path) -> Path:
    """`folder/corrupt.png`: a PNG whose header and end read (the header check passes it) but whose data does
    not decode."""
    import numpy as np
    from PIL import Image

    # Seeded noise: PIL's effect_noise draws from C's rand(), whose state earlier tests move, and how the
    # image fails to decode (truncated or unreadable) follows the bytes.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    corrupt = bytearray((folder / "noise.png").read_bytes())
    corrupt[200:400] = bytes(b ^ 0x55 for b in corrupt[200:400])
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    return folder / "corrupt.png"


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over `words` (<pad>, <unk>, <bos>, <eos> among them) that wraps a text in bos
    ... eos, as CLIP's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ends = [(name, words.index(name)) for name in ("<bos>", "<eos>")]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=ends)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
