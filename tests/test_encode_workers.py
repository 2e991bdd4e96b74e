"""`--preprocessing_num_workers N` encodes conversations in N processes forked by `datasets.map`. A forked
worker must not wait on torch's OpenMP threads, which the fork does not copy: once the parent has used them
(loading a model does), a worker's first parallel op (a torchvision-backed image processor's resize) would
wait forever. Each case runs in a subprocess with a time limit and torch on two threads, as on a machine
with two cores or more; the workers' samples must equal one process's."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

CHILD = textwrap.dedent("""
    import json, sys, tempfile
    import numpy as np, torch
    from PIL import Image
    from recipes.common.chat import chat_encoder, tokenize_conversations
    from recipes.common.models import load_processor, resolve_model_path

    name, torch_ops = sys.argv[1], sys.argv[2] == "torch-ops"

    class WithTorchOps:
        # the encoder, running torch ops as large as a torchvision-backed image processor's on each sample
        def __init__(self, encoder):
            self.encoder = encoder

        def __getattr__(self, key):
            if key == "encoder":
                raise AttributeError(key)
            return getattr(self.encoder, key)

        def encode(self, messages, images):
            torch.ones(1 << 22).mul_(2)
            return self.encoder.encode(messages, images)

    encoder = chat_encoder(load_processor(resolve_model_path(f"tiny:{name}"), name))
    encoder = WithTorchOps(encoder) if torch_ops else encoder
    folder, rng = tempfile.mkdtemp(), np.random.default_rng(0)
    records = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
        records.append({"image": f"{folder}/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\\nwhat is it?"}, {"from": "gpt", "value": f"thing {i}."}]})
    torch.ones(1 << 22).mul_(2)  # the parent's OpenMP threads started, as loading a model starts them
    one, _ = tokenize_conversations(records, encoder, None)
    two, _ = tokenize_conversations(records, encoder, None, num_proc=2)
    print(json.dumps({"threads": torch.get_num_threads(), "same": one.to_list() == two.to_list(),
                      "samples": len(two)}))
""")


@pytest.mark.parametrize("name,mode", [("llava", "torch-ops"), ("qwen2_5_vl", "processor")])
def test_workers_encode_as_one_process_after_the_parent_used_torch_threads(name, mode, module_cache):
    if mode == "processor":
        pytest.importorskip("torchvision", reason="Qwen2.5-VL's torchvision-backed processor: make "
                                                  "test-families")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, name, mode], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the encoding workers hung (waiting on torch threads that did not survive the fork)")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the parent keeps its threads for training: only the forked workers run one
    assert out == {"threads": 2, "same": True, "samples": 8}
