"""Export a QLoRA run: dequantize the 4-bit base, merge the adapter (and the trained projector), save a full checkpoint.

    python recipes/qlora_vqa/merge.py --run outputs/qlora_vqa --out outputs/qlora_vqa_merged            # bf16
    python recipes/qlora_vqa/merge.py --run outputs/qlora_vqa/checkpoint-150 --out merged --dtype float32

The base is quantized as in training (the run's quantization_config.json) and dequantized, so the
LoRA deltas are added to the weights they were trained against, not to the original 16-bit ones.
The merged folder loads with `LlavaForConditionalGeneration.from_pretrained` (no bitsandbytes
needed) and gives the outputs of the quantized base + adapter, up to the rounding of --dtype
(recipes/common/quantization.py; tests/test_qlora_recipe.py checks it). A run trained on an
unquantized base (--load_in_4bit false) has no quantization_config.json and is merged as it is.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import LlavaForConditionalGeneration  # noqa: E402

from recipes.common.merge import merge_run  # noqa: E402
from recipes.common.quantization import QUANTIZATION_FILE, merge_quantized_run  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training output_dir (or a checkpoint-N folder in it)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    merge = merge_quantized_run if (Path(args.run) / QUANTIZATION_FILE).exists() else merge_run
    print(f"merged checkpoint written to {merge(args.run, args.out, LlavaForConditionalGeneration, args.dtype)}")


if __name__ == "__main__":
    main()
