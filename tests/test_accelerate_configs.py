"""Every accelerate config loads with accelerate's own loader; multi_cpu really runs 2 gloo processes."""

import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"
EXPECTED = {
    "cpu": ("NO", 1),
    "multi_cpu": ("MULTI_GPU", 2),  # torchrun launcher; the processes choose the CPU
    "single_gpu": ("NO", 1),
    "ddp": ("MULTI_GPU", 8),
    "fsdp": ("FSDP", 8),
    "deepspeed_zero2": ("DEEPSPEED", 8),
    "deepspeed_zero3": ("DEEPSPEED", 8),
    "multi_node": ("MULTI_GPU", 16),
}


def test_the_config_set_is_complete():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    distributed_type, num_processes = EXPECTED[name]
    assert str(config.distributed_type).split(".")[-1] == distributed_type
    assert config.num_processes == num_processes
    assert config.use_cpu == (name == "cpu")
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


WORKER = """
import sys, torch, torch.distributed as dist
from accelerate import Accelerator
acc = Accelerator(cpu=True)
x = torch.tensor([float(acc.process_index + 1)], requires_grad=True)
total = acc.reduce(x.detach().clone(), reduction="sum")
g = acc.gather(torch.tensor([acc.process_index]))
model = acc.prepare(torch.nn.Linear(1, 1, bias=False))
model(torch.tensor([[float(acc.process_index + 1)]])).sum().backward()
# One file per rank: lines that two processes print to one pipe can interleave.
grad = (model.module if hasattr(model, "module") else model).weight.grad.item()
open(f"{sys.argv[1]}/rank{acc.process_index}.txt", "w").write(
    f"rank={acc.process_index} world={acc.num_processes} backend={dist.get_backend()} sum={total.item()} "
    f"gathered={g.tolist()} grad={grad}")
# Drop the DDP model (it holds the process group), leave together and close the group: a group destroyed at
# interpreter exit, with gloo's threads still running, can abort ("terminate called without an active
# exception").
del model
acc.free_memory()
dist.barrier()
dist.destroy_process_group()
"""


def test_multi_cpu_runs_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_cpu.yaml"),
         "--main_process_port", "29533", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    # DDP averages gradients: inputs 1 and 2 give d(w*x)/dw = 1.5 on both ranks.
    assert lines == [
        "rank=0 world=2 backend=gloo sum=3.0 gathered=[0, 1] grad=1.5",
        "rank=1 world=2 backend=gloo sum=3.0 gathered=[0, 1] grad=1.5",
    ]
