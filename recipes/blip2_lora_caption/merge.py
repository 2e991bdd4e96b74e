"""Merge a trained run (LoRA adapter + trained Q-Former) into a full BLIP-2 checkpoint.

    python recipes/blip2_lora_caption/merge.py --run outputs/blip2_lora_caption --out outputs/blip2_merged

The merged folder loads with `Blip2ForConditionalGeneration.from_pretrained` and gives the same
outputs as base + adapter: LoRA deltas are added into the base weights, and the trained copies of the
`modules_to_save` (Q-Former, projection) replace the base's.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from peft import PeftConfig, PeftModel  # noqa: E402
from transformers import AutoProcessor, Blip2ForConditionalGeneration  # noqa: E402


def merge(run: str, out: str, dtype: str = "float32") -> Path:
    """Load base + adapter from `run`, merge, and save a standalone checkpoint with its processor to `out`."""
    base_path = PeftConfig.from_pretrained(run).base_model_name_or_path
    base = Blip2ForConditionalGeneration.from_pretrained(base_path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    merged.save_pretrained(out)
    AutoProcessor.from_pretrained(run).save_pretrained(out)
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training output_dir (or a checkpoint-N folder in it)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    print(f"merged checkpoint written to {merge(args.run, args.out, args.dtype)}")


if __name__ == "__main__":
    main()
