"""Model FLOPs of one training step, for MFU: 6NT, 4NT or 2NT per weight matrix, N counted from the model.

The convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1; MFU as in Chowdhery
et al. 2022, "PaLM", app. B): a weight matrix of N entries applied to T tokens costs 2NT in the forward pass,
2NT more for the gradient of its input and 2NT more for the gradient of its own weights. So a weight

- that trains costs 6NT;
- that is frozen but sits after something that trains, so the backward pass goes through it, costs 4NT
  (a frozen LM under LoRA, or the LM a soft prompt feeds);
- that is frozen with nothing trained before it costs 2NT: autograd records nothing there (a frozen vision
  tower).

"Before" is the forward order: the parts of a chain in the order the adapter lists them, and modules in
registration order inside a part (which is their forward order in these models). Counted: every Linear,
GPT-2 Conv1D and patch-embedding Conv2d or Conv3d (Qwen's, over 2 frames x 14 x 14 px; per token, an
im2col'd convolution is a matmul with its weight), the LM head included; a 4-bit Linear counts its full in x
out (its dequantization is not counted). Not counted:
attention scores (12·L·d·T per token in PaLM's formula: a few percent at these lengths), embeddings, norms,
the loss, and the optimizer. T counts real tokens only (no padding), so padding
lowers MFU, as it should. A Q-Former's cross-attention reads image tokens, but its key/value projections are
counted at the query count, which undercounts (conservative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

MATMULS = (torch.nn.Linear, Conv1D, torch.nn.Conv2d, torch.nn.Conv3d)
PEFT_PREFIX = "base_model.model."


@dataclass
class Part:
    """Modules (by base-model name prefix) that process `tokens` tokens each in one step."""

    name: str
    prefixes: tuple[str, ...]
    tokens: int


def _base(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def step_flops(model: torch.nn.Module, chains: list[list[Part]]) -> dict[str, float]:
    """Model FLOPs per part for one step (one micro-batch) under the convention above; keys are part names and
    "total"."""
    # peft's unused copy
    modules = [(_base(n), m) for n, m in model.named_modules() if ".original_module" not in n]
    out = {}
    for chain in chains:
        upstream_trains = False
        for part in chain:
            flops = 0.0
            for name, module in modules:
                if not _in(name, part.prefixes):
                    continue
                if isinstance(module, MATMULS):
                    trains = module.weight.requires_grad
                    factor = 6 if trains else 4 if upstream_trains else 2
                    # in x out, not weight.numel(): a bitsandbytes 4-bit Linear packs two weights per stored
                    # byte.
                    n = (module.in_features * module.out_features if isinstance(module, torch.nn.Linear)
                         else module.weight.numel())
                    flops += factor * n * part.tokens
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    upstream_trains = True
            out[part.name] = out.get(part.name, 0.0) + flops
    out["total"] = sum(out.values())
    return out


# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (the "with sparsity" figures halved):
# H100 SXM5 989.4 and PCIe 756 (H100 Tensor Core GPU data sheet), H100 NVL 835, H200 989 (H200 data sheet,
# same compute as H100 SXM), A100 312 (A100 data sheet). Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
                    ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table (pass --peak-tflops)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None
