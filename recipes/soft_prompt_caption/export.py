"""Export a trained run (soft prompt + projection [+ LoRA], on top of the two frozen bases) as one full \
checkpoint.

    python recipes/soft_prompt_caption/export.py --run outputs/soft_prompt_caption --out \
outputs/soft_prompt_full

The folder holds every weight (LoRA merged into the LM), the config, tokenizer and image processor, and
needs neither base any more. It gives the same outputs as the run:

    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner   # also registers it with AutoModel
    model = SoftPromptCaptioner.from_pretrained("outputs/soft_prompt_full")
"""

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from recipes.common.merge import merge_cli
from recipes.common.run import run_main
from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner


def export(run: str, out: str, dtype: str = "float32", vision_model: str | None = None,
           language_model: str | None = None) -> Path:
    """Rebuild the run's model from its bases and trained weights and save it, with its processors, to
    `out`."""
    model = SoftPromptCaptioner.from_trained(run, vision_model=vision_model, language_model=language_model)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(run).save_pretrained(out)
    AutoImageProcessor.from_pretrained(run).save_pretrained(out)
    return Path(out)


def main(argv=None):
    def add_arguments(p):
        p.add_argument("--vision_model",
                       help="where the vision base is now, if not where the run's config.json says")
        p.add_argument("--language_model",
                       help="where the language model base is now, if not where config.json says")

    return merge_cli(__doc__, lambda a: export(a.run, a.out, a.dtype, a.vision_model, a.language_model), argv,
                     add_arguments=add_arguments)


if __name__ == "__main__":
    run_main(main)  # a bad --run or --out: its message, exit code 2
