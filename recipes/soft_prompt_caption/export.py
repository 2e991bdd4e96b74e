"""Export a trained run (soft prompt + projection [+ LoRA], on top of the two frozen bases) as one full checkpoint.

    python recipes/soft_prompt_caption/export.py --run outputs/soft_prompt_caption --out outputs/soft_prompt_full

The folder holds every weight (LoRA merged into the LM), the config, tokenizer and image processor, and
needs neither base any more. It gives the same outputs as the run:

    import sys; sys.path.insert(0, "recipes/soft_prompt_caption")
    from modeling import SoftPromptCaptioner          # also registers it with AutoConfig / AutoModel
    model = SoftPromptCaptioner.from_pretrained("outputs/soft_prompt_full")
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import AutoImageProcessor, AutoTokenizer  # noqa: E402

from modeling import SoftPromptCaptioner  # noqa: E402


def export(run: str, out: str, dtype: str = "float32", vision_model: str | None = None,
           language_model: str | None = None) -> Path:
    """Rebuild the run's model from its bases and trained weights and save it, with its processors, to `out`."""
    model = SoftPromptCaptioner.from_trained(run, vision_model=vision_model, language_model=language_model)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(run).save_pretrained(out)
    AutoImageProcessor.from_pretrained(run).save_pretrained(out)
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training output_dir (or a checkpoint-N folder in it)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vision_model", help="where the vision base is now, if not where the run's config.json says")
    p.add_argument("--language_model", help="where the language model base is now, if not where config.json says")
    args = p.parse_args()
    out = export(args.run, args.out, args.dtype, args.vision_model, args.language_model)
    print(f"full checkpoint written to {out}")


if __name__ == "__main__":
    main()
