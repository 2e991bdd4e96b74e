"""Merge a trained LoRA run (adapter + trained projector, and vision layers when they trained) into a full LLaVA checkpoint.

    python recipes/llava_instruct/merge.py --run outputs/llava_instruct --out outputs/llava_merged

The merged folder loads with `LlavaForConditionalGeneration.from_pretrained` and gives the same outputs
as base + adapter (recipes/common/merge.py). Runs trained without LoRA (stage pretrain, or
--peft_method none) are full checkpoints already.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import LlavaForConditionalGeneration  # noqa: E402

from recipes.common.merge import merge_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training output_dir (or a checkpoint-N folder in it)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    print(f"merged checkpoint written to {merge_run(args.run, args.out, LlavaForConditionalGeneration, args.dtype)}")


if __name__ == "__main__":
    main()
