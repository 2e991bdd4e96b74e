"""Export a trained run as a full checkpoint (CLIP, SigLIP, SigLIP 2), optionally interpolated with its base
(WiSE-FT).

    python recipes/clip_retrieval/merge.py --run outputs/clip_retrieval --out outputs/clip_merged
    python recipes/clip_retrieval/merge.py --run outputs/clip_retrieval --out outputs/clip_wise05 \
--wise_ft_alpha 0.5

A LoRA run is merged into its base (the adapter deltas added into the weights); a full or partial
fine-tune is already a full checkpoint. `--wise_ft_alpha a` then writes (1 - a) * base + a * fine-tuned,
weight by weight (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", eq. 1): a = 1 is the
fine-tuned model, a = 0 the base; values between trade the task for what the base knew.
"""

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, PreTrainedModel

from recipes.common.merge import adapter_base, is_adapter_run, merge_cli, run_record
from recipes.common.models import loading, resolve_model_path
from recipes.common.run import run_main


def base_of(run: str | Path) -> tuple[str, str | None]:
    """(base checkpoint, its --revision) of a run folder (or of a checkpoint-N in it, the run unfinished):
    from the adapter config, or the run.json a run writes at its start."""
    run = Path(run)
    if is_adapter_run(run):
        return adapter_base(run)
    for saved in (run_record(run), run / "metrics.json"):
        if saved is not None and saved.exists():
            record = json.loads(saved.read_text())
            return record["model"], record.get("revision")
    raise FileNotFoundError(f"{run}: no adapter_config.json or run.json says which base it was trained from; "
                            "pass --base.")


def load_dual_encoder(path: str | Path, dtype: torch.dtype = torch.float32,
                      revision: str | None = None) -> PreTrainedModel:
    """A full dual encoder (`AutoModel`: CLIPModel, SiglipModel, Siglip2Model) from a checkpoint, a Hub id
    (at `revision`), `tiny:<name>`, or a run folder with a LoRA adapter (merged into its base)."""
    path = resolve_model_path(str(path))
    if is_adapter_run(path):
        from peft import PeftModel

        base_path, base_revision = base_of(path)
        base_path = resolve_model_path(base_path)
        with loading(base_path):
            base = AutoModel.from_pretrained(base_path, dtype=dtype, revision=base_revision)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    with loading(path):
        return AutoModel.from_pretrained(path, dtype=dtype, revision=revision)


def wise_ft(base: PreTrainedModel, finetuned: PreTrainedModel, alpha: float) -> PreTrainedModel:
    """`finetuned` with every floating-point weight replaced by (1 - alpha) * base + alpha * finetuned."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_ft_alpha must be in [0, 1], got {alpha}")
    base_state, state = base.state_dict(), finetuned.state_dict()
    if base_state.keys() != state.keys() or any(base_state[k].shape != v.shape for k, v in state.items()):
        raise ValueError("the base and the fine-tuned model have different weights; were they trained from "
                         "each other?")
    mixed = {k: torch.lerp(base_state[k].to(v.dtype), v, alpha) if v.is_floating_point() else v
             for k, v in state.items()}
    model = copy.deepcopy(finetuned)
    model.load_state_dict(mixed)
    return model.eval()


def export(run: str, out: str, alpha: float | None = None, base: str | None = None,
           dtype: str = "float32") -> Path:
    """Write the run as a full checkpoint with its processor to `out`; with `alpha`, the WiSE-FT
    interpolation."""
    model = load_dual_encoder(run, getattr(torch, dtype))
    if alpha is not None:
        base_path, revision = (base, None) if base else base_of(run)
        model = wise_ft(load_dual_encoder(base_path, getattr(torch, dtype), revision), model, alpha)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(run).save_pretrained(out)
    return Path(out)


def main(argv=None):
    def add_arguments(p):
        p.add_argument("--wise_ft_alpha", type=float, default=None,
                       help="interpolate with the base: 0 = base, 1 = fine-tuned")
        p.add_argument("--base", default=None,
                       help="the base checkpoint (default: the one the run was trained from)")

    def describe(a):
        if (alpha := a.wise_ft_alpha) is None:
            return ""
        return (f", blended with its base: {alpha:g} * fine-tuned + {1 - alpha:g} * base "
                f"(--wise_ft_alpha {alpha:g})")

    return merge_cli(__doc__, lambda a: export(a.run, a.out, a.wise_ft_alpha, a.base, a.dtype), argv,
                     add_arguments=add_arguments, describe=describe)


if __name__ == "__main__":
    run_main(main)  # a bad --run or --out: its message, exit code 2
