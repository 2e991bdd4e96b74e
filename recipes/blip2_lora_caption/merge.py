"""Merge a trained run (LoRA adapter + trained Q-Former) into a full BLIP-2 checkpoint.

    python recipes/blip2_lora_caption/merge.py --run outputs/blip2_lora_caption --out outputs/blip2_merged

The merged folder loads with `Blip2ForConditionalGeneration.from_pretrained` and gives the same
outputs as base + adapter: LoRA deltas are added into the base weights, and the trained copies of the
`modules_to_save` (Q-Former, projection) replace the base's.
"""

from transformers import Blip2ForConditionalGeneration

from recipes.common.merge import merge_cli, merge_run
from recipes.common.run import run_main


def main(argv=None):
    return merge_cli(__doc__, lambda a: merge_run(a.run, a.out, Blip2ForConditionalGeneration, a.dtype), argv)


if __name__ == "__main__":
    run_main(main)  # a bad --run or --out: its message, exit code 2
