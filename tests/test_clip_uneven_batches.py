"""clip_retrieval on 2 processes when the training images do not fill the last global batch of an epoch: each
step's global batch is the 1-process batch (each image once), split between the processes, down to a last
global batch with fewer images than processes; a run resumed mid-epoch on 2 processes goes on with the
right epoch's order."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from recipes.clip_retrieval.collator import EpochPairSampler, GlobalBatchShares, PairDataset
from tests.conftest import word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "clip_retrieval" / "train.py"
# SGD without clipping: equal weights after a step mean equal gradients (see test_clip_recipe.py).
FAST = ["--model_name_or_path", "tiny:clip", "--report_to", "none", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1", "--optim", "sgd",
        "--learning_rate", "2.0", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--weight_decay", "0", "--max_grad_norm", "0", "--wise_ft_alpha", "none", "--hard_negatives", "true"]


def _per_process(n_images: int, batch_size: int, drop_last: bool = False):
    """The epoch's pair order and what each of 2 processes trains on, as the Trainer deals it out."""
    pairs = EpochPairSampler([2] * n_images, [1] * n_images, seed=3)
    # accelerate's wrapper as the Trainer leaves it (batch_size None): shares dealt out as they come
    shards = [BatchSamplerShard(GlobalBatchShares(pairs, batch_size, 2, drop_last), 2, rank)
              for rank in (0, 1)]
    batches = [list(s) for s in shards]
    assert [len(b) for b in batches] == [len(s) for s in shards]  # the Trainer counts its steps by len()
    return list(pairs), batches


def test_each_process_gets_its_share_of_every_global_batch_and_no_pair_twice():
    order, (zero, one) = _per_process(10, 8)  # less than one global batch: 5 each
    assert (zero, one) == ([order[:5]], [order[5:]])
    order, (zero, one) = _per_process(19, 8)  # 16, then 3: 2 and 1
    assert (zero, one) == ([order[:8], order[16:18]], [order[8:16], order[18:]])
    order, (zero, one) = _per_process(19, 8, drop_last=True)
    assert (zero, one) == ([order[:8]], [order[8:16]])
    # 17: the last global batch is 1 pair; process 1 gets a stand-in: that pair with no negative, not counted
    order, (zero, one) = _per_process(17, 8)
    i, j, _ = order[16]
    assert (zero, one) == ([order[:8], order[16:]], [order[8:16], [(i, j, -1, False)]])


def test_a_stand_in_pair_has_no_image_key(tmp_path):
    records = datasets.Dataset.from_list([{"image": str(tmp_path / "a.png"), "captions": ["a b", "b"],
                                           "neg_captions": ["a"]}])
    data = PairDataset(records, word_tokenizer(["<pad>", "<unk>", "<bos>", "<eos>", "a", "b"]), 8,
                       hard_negatives=True)
    assert data[(0, 1, 0)]["image_key"] == data[0]["image_key"] == 0
    stand_in = data[(0, 1, -1, False)]
    assert (stand_in["image_key"], stand_in["input_ids"], stand_in["neg_input_ids"]) == (-1, [2, 5, 3], None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """19 train images, most with hard negatives; a model cache of the module's own."""
    d = tmp_path_factory.mktemp("clip_uneven")
    rows = read_jsonl(make_synthetic("retrieval", 19, d / "synth", seed=1, progress=False))
    for r in rows[::3]:  # the processes gather different numbers of negatives
        del r["neg_captions"]
    write_jsonl(d / "synth" / "train.jsonl", rows)
    e = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return d, e, ["--train_file", str(d / "synth" / "train.jsonl"), *FAST]


def _run(env, args, port: int | None = None):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", str(port)]
    r = subprocess.run([*(launch if port else [sys.executable]), str(TRAIN), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]


def _same_weights(a: Path, b: Path):
    ref, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_short_last_global_batch_is_split_not_filled_and_a_resume_keeps_the_epoch(env):
    """19 images, global batch 16: each epoch is 16 images, then 3 (2 on process 0, 1 on process 1). Filling
    the 3 up to 16 with the epoch's first images trained on pairs one process never sees. Checkpoint-3 is in
    epoch 1, whose order the resumed processes must draw (not epoch 0's)."""
    d, e, args = env
    args = [*args, "--max_steps", "4"]
    _run(e, [*args, "--per_device_train_batch_size", "16", "--save_strategy", "no", "--output_dir",
             str(d / "one")])
    _run(e, [*args, "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "3",
             "--output_dir", str(d / "two")], port=29641)
    assert json.loads((d / "two" / "metrics.json").read_text())["world_size"] == 2
    assert _losses(d / "two") == pytest.approx(_losses(d / "one"), abs=1e-5)
    _same_weights(d / "one", d / "two")

    shutil.copytree(d / "two" / "checkpoint-3", d / "resumed" / "checkpoint-3")
    _run(e, [*args, "--per_device_train_batch_size", "8", "--save_strategy", "no", "--output_dir",
             str(d / "resumed"), "--resume_from_checkpoint", "last"], port=29642)
    assert _losses(d / "resumed")[-1] == pytest.approx(_losses(d / "one")[-1], abs=1e-5)
    _same_weights(d / "one", d / "resumed")


@pytest.mark.slow
def test_a_last_global_batch_of_fewer_images_than_processes_trains_as_on_one_process(env):
    """19 images, global batch 18: the last has 1 image, and process 1 no share of it. The sigmoid loss (a
    single pair has a loss and a gradient) with 2 accumulation steps: each step is both global batches."""
    d, e, args = env
    args = [*args, "--loss", "sigmoid", "--gradient_accumulation_steps", "2", "--max_steps", "2",
            "--save_strategy", "no"]
    _run(e, [*args, "--per_device_train_batch_size", "18", "--output_dir", str(d / "sig1")])
    _run(e, [*args, "--per_device_train_batch_size", "9", "--output_dir", str(d / "sig2")], port=29643)
    assert _losses(d / "sig2") == pytest.approx(_losses(d / "sig1"), abs=1e-5)
    _same_weights(d / "sig1", d / "sig2")
