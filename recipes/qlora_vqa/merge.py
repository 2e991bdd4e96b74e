"""Export a QLoRA run: dequantize the 4-bit base, merge the adapter (and the trained projector), save a full \
checkpoint.

    python recipes/qlora_vqa/merge.py --run outputs/qlora_vqa --out outputs/qlora_vqa_merged            # bf16
    python recipes/qlora_vqa/merge.py --run outputs/qlora_vqa/checkpoint-150 --out merged --dtype float32

The base is quantized as in training (the run's quantization_config.json) and dequantized, so the
LoRA deltas are added to the weights they were trained against, not to the original 16-bit ones.
The merged folder loads with `AutoModelForImageTextToText.from_pretrained` (no bitsandbytes
needed) and gives the outputs of the quantized base + adapter, up to the rounding of --dtype
(recipes/common/quantization.py; tests/test_qlora_recipe.py checks it). An 8-bit run (--load_in_8bit)
also rounds the activations to 8 bits in its forward (LLM.int8), which no full checkpoint does: its merge
differs from it by that rounding, as much as its base differs from its own dequantized weights (1e-2 of the
logits on the tiny LLaVA). A run trained on an unquantized base (--load_in_4bit false) has no
quantization_config.json and is merged as it is.
"""

from transformers import AutoModelForImageTextToText

from recipes.common.merge import merge_cli, merge_run
from recipes.common.run import run_main


def main(argv=None):
    # merge_run quantizes the base as the run's quantization_config.json says
    return merge_cli(__doc__, lambda a: merge_run(a.run, a.out, AutoModelForImageTextToText, a.dtype), argv,
                     dtype="bfloat16")


if __name__ == "__main__":
    run_main(main)  # a bad --run or --out: its message, exit code 2
