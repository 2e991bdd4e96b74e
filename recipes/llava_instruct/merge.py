"""Merge a trained LoRA run (adapter + trained projector, and vision layers when they trained) into a full \
LLaVA checkpoint.

    python recipes/llava_instruct/merge.py --run outputs/llava_instruct --out outputs/llava_merged

The merged folder loads with `AutoModelForImageTextToText.from_pretrained` and gives the same outputs
as base + adapter (recipes/common/merge.py). Runs trained without LoRA (stage pretrain, or
--peft_method none) are full checkpoints already.
"""

from transformers import AutoModelForImageTextToText

from recipes.common.merge import merge_cli, merge_run
from recipes.common.run import run_main


def main(argv=None):
    return merge_cli(__doc__, lambda a: merge_run(a.run, a.out, AutoModelForImageTextToText, a.dtype), argv)


if __name__ == "__main__":
    run_main(main)  # a bad --run or --out: its message, exit code 2
