"""Load a trained run, and merge a LoRA run into a standalone checkpoint.

A LoRA run folder holds the adapter (`adapter_config.json`, `adapter_model.safetensors`) with the
full copies of what trained besides it (`modules_to_save`: a projector, vision layers), plus the
processor; the base is named in the adapter config. Merging adds the LoRA deltas into the base
weights and puts the trained copies in place of the base's, so the merged model gives the same
outputs as base + adapter. A run trained without LoRA already is a full checkpoint. A QLoRA run's base is
loaded quantized as in training (its quantization_config.json), and dequantized to merge.

A run folder holds the weights training ended with: with --load_best_model_at_end (the recipes' default)
the best checkpoint's, the ones its "after" numbers score (metrics.json's `after_step`); a checkpoint-N
folder holds step N's. The merge/export scripts print which step they wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from transformers import BitsAndBytesConfig

from data_tools.files import atomic_folder

from .models import full_weight_files, load_processor, loading, saved_names
from .quantization import QUANTIZATION_FILE, keep_4bit_training_layout, quantized_device_map
from .run import checkpoints, saved_step


def run_record(run: str | Path) -> Path | None:
    """The run.json a run wrote at its start (what it trained with): the folder's own, or a checkpoint-N's
    run folder's; None without one."""
    return next((f / "run.json" for f in (Path(run), Path(run).parent) if (f / "run.json").is_file()), None)


def trained_with(run: str | Path, name: str):
    """The value of option `name` (e.g. prompt, special_text) run `run` trained with, from its run.json
    (`run_record`: merge and export copy it into their folder); None without one."""
    record = run_record(run)
    return None if record is None else json.loads(record.read_text()).get(name)


def evaluated_precision(run: str | Path) -> tuple[str, torch.dtype | None]:
    """(dtype, autocast dtype or None) that run `run` generated its evaluation in (run.json: its dtype and
    --bf16 / --fp16): loaded and generating so, it answers as it scored. float32, no autocast, where run.json
    does not say."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained_with(run, "mixed_precision"))
    return trained_with(run, "dtype") or "float32", autocast


def adapter_base(run: str | Path) -> tuple[str, str | None]:
    """(base checkpoint, revision it was loaded at) of LoRA run `run`, from its adapter_config.json."""
    config = PeftConfig.from_pretrained(run)
    return config.base_model_name_or_path, config.revision


def no_model_message(run: Path) -> str:
    """Why folder `run` holds no model: an unfinished run (its newest checkpoint named), or no run at all."""
    found = checkpoints(run)
    if found:
        return (f"{run} holds no final model: the run did not finish. Give one of its checkpoints instead, "
                f"e.g. {found[-1]}, or resume the run to finish it.")
    return f"{run}: no adapter_config.json or config.json; give a training output_dir or a checkpoint-N in it"


def check_final_model(run: str | Path) -> None:
    """Refuse a run folder with checkpoints whose model is missing (the run did not finish) or older than its
    newest checkpoint (the run finished, was resumed with more steps, and did not finish again): its folder
    then holds the earlier end's model, not the run's."""
    run = Path(run)
    found = checkpoints(run)
    if not found:
        return  # a checkpoint-N, a full checkpoint, or a finished run that kept none
    if not any((run / name).is_file() for name in ("adapter_config.json", "config.json")):
        raise FileNotFoundError(no_model_message(run))
    newest = int(found[-1].name.removeprefix("checkpoint-"))
    # trainer_state.json is written with the model when training ends; its step is the last one trained,
    # the best checkpoint's (--load_best_model_at_end) being older or the same
    if (run / "trainer_state.json").is_file() and (step := saved_step(run)) < newest:
        raise ValueError(f"{run}: its model is step {step}'s, but the run was resumed and went on to "
                         f"{found[-1].name} without finishing. Give {found[-1]} instead, or resume the run "
                         "to finish it.")


def is_adapter_run(run: str | Path) -> bool:
    """Whether `run` holds a peft adapter (rather than a full checkpoint)."""
    return (Path(run) / "adapter_config.json").exists()


def load_run(run: str | Path, model_cls, dtype: str = "float32"):
    """(model in eval mode, processor) of a run folder or checkpoint-N: base + adapter, or the saved model."""
    run = Path(run)
    if not (run / "config.json").exists() and not is_adapter_run(run):
        raise FileNotFoundError(no_model_message(run))
    torch_dtype = getattr(torch, dtype)
    if is_adapter_run(run):
        base_path, revision = adapter_base(run)
        with loading(base_path):
            base = model_cls.from_pretrained(base_path, dtype=torch_dtype, revision=revision)
        model = with_adapter(base, run)
    else:
        with loading(str(run)):
            model = model_cls.from_pretrained(run, dtype=torch_dtype)
        float32_as_saved(model, run)
    with loading(str(run)):
        processor = load_processor(run, model.config.model_type)
    return model.eval(), processor


def with_adapter(model, run: str | Path, adapter_name: str = "default") -> PeftModel:
    """`model` (a base, or a PeftModel to add it to) with the adapter of run `run`, in eval mode, in the
    dtypes it trained in. All that trains is float32 (`peft_setup.trainable_in_float32`), but peft copies
    the modules saved beside the adapter (modules_to_save: a projector) in the base's dtype: on a bf16 base,
    rounded, and the run would answer otherwise than it scored."""
    known = {id(p) for p in model.parameters()}
    if isinstance(model, PeftModel):
        model.load_adapter(str(run), adapter_name=adapter_name)
    else:
        model = PeftModel.from_pretrained(model, run, adapter_name=adapter_name)
    added = [p for p in model.parameters() if id(p) not in known]
    if any(p.dtype != torch.float32 for p in added):
        for p in added:
            p.data = p.data.float()
        set_peft_model_state_dict(model, load_peft_weights(str(run)), adapter_name=adapter_name)
    return model.eval()


def float32_as_saved(model, run: str | Path) -> int:
    """A full-weight run on a half-precision base saves what trained in float32 (`trainable_in_float32`)
    beside the half-precision rest; from_pretrained loads every tensor in one dtype, rounding them: put them
    back in float32. A checkpoint saved in one dtype (merge.py's --dtype) loads as asked. Returns how many."""
    files, dtypes = full_weight_files(run), {}
    for file in files:
        with safe_open(file, "pt") as f:
            dtypes.update((key, f.get_slice(key).get_dtype()) for key in f.keys())
    if not {"BF16", "F16"} & set(dtypes.values()):
        return 0
    names, params, cast = saved_names(model), dict(model.named_parameters()), 0
    for file in files:
        with safe_open(file, "pt") as f:
            for key in (k for k in f.keys() if dtypes[k] == "F32"):
                param = params.get(names.get(key))  # None for a buffer: loaded as from_pretrained loads it
                if param is not None and param.dtype != torch.float32:
                    param.data = f.get_tensor(key).to(param.device)
                    cast += 1
    return cast


def merge_run(run: str | Path, out: str | Path, model_cls, dtype: str = "float32") -> Path:
    """Merge the adapter of LoRA run `run` into its base; save model and processor to `out`. A QLoRA run's
    base is quantized as in training and dequantized first (`merge_quantized_run`)."""
    if not Path(run).is_dir():
        raise FileNotFoundError(f"{run}: no such folder; give a training output_dir or a checkpoint-N in it")
    if not is_adapter_run(run):
        if not (Path(run) / "config.json").exists():
            raise FileNotFoundError(no_model_message(run))
        raise ValueError(f"{run} has no adapter_config.json: it was trained without LoRA and is already a "
                         "full checkpoint")
    if (Path(run) / QUANTIZATION_FILE).is_file():  # the deltas belong on the 4/8-bit weights they trained on
        return merge_quantized_run(run, out, model_cls, dtype)
    model, processor = load_run(run, model_cls, dtype)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def _quantized_base(run: Path, model_cls):
    """The base of QLoRA run `run`, loaded as training loaded it."""
    kwargs = _load_kwargs(run)
    path, revision = adapter_base(run)
    with loading(path):
        return model_cls.from_pretrained(path, revision=revision, **kwargs)


def _load_kwargs(run: Path) -> dict:
    """from_pretrained keyword arguments that load the base of `run` as training loaded it."""
    if not (run / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run}: no adapter_config.json; give a training output_dir or a "
                                "checkpoint-N in it")
    path = run / QUANTIZATION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, so the base cannot be quantized as in training. Was the "
                                "run trained on a 4/8-bit base? If not, merge it with "
                                "recipes/common/merge.py's merge_run.")
    saved = json.loads(path.read_text())
    return dict(quantization_config=BitsAndBytesConfig.from_dict(saved["quantization_config"]),
                dtype=getattr(torch, saved["dtype"]), device_map=quantized_device_map())


def load_quantized_run(run: str | Path, model_cls):
    """(base quantized as in training + adapter, in eval mode; processor) of a QLoRA run folder or
    checkpoint-N."""
    run = Path(run)
    base = _quantized_base(run, model_cls)
    # the weights training used, not bitsandbytes' CPU-inference rounding of them
    keep_4bit_training_layout(base)
    return with_adapter(base, run), load_processor(run, base.config.model_type)


def load_trained_run(run: str | Path, model_cls, dtype: str = "float32"):
    """(model in eval mode, processor) of a run folder or checkpoint-N as it trained: a QLoRA run on its base
    quantized as in training (`load_quantized_run`), any other as `load_run` loads it."""
    if (Path(run) / QUANTIZATION_FILE).is_file():
        return load_quantized_run(run, model_cls)
    return load_run(run, model_cls, dtype)


def merge_quantized_run(run: str | Path, out: str | Path, model_cls,
                        dtype: str = "bfloat16") -> Path:
    """Dequantize the base of QLoRA run `run`, merge the adapter into it, and save a `dtype` checkpoint to
    `out`.

    The base is quantized exactly as in training (the saved config and dtype), so the dequantized
    weights the adapter is added to are the ones it was trained against.
    """
    run, torch_dtype = Path(run), getattr(torch, dtype)
    base = _quantized_base(run, model_cls)
    # Dequantized in the dtype the forward used, then cast: bf16 NF4 values cast to float32 stay what training
    # saw.
    base = base.dequantize(dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, run).merge_and_unload().to(torch_dtype)
    merged.save_pretrained(out)
    load_processor(run, merged.config.model_type).save_pretrained(out)
    return Path(out)


def trained_step(run: str | Path) -> str | None:
    """Which step's weights run folder (or checkpoint-N) `run` holds, in words; None where it does not say."""
    run = Path(run)
    if run.name.startswith("checkpoint-") and (run / "trainer_state.json").is_file():
        return f"step {saved_step(run)}"
    try:  # written when the run's scoring ends; a run stopped before has none
        metrics = json.loads((run / "metrics.json").read_text())
        after, last = int(metrics["after_step"]), int(metrics["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"step {after} of {last}" + (" (the best checkpoint)" if after != last else "")


def merge_cli(doc: str, merge: Callable[[argparse.Namespace], Path], argv: list[str] | None = None, *,
              dtype: str = "float32", add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
              describe: Callable[[argparse.Namespace], str] | None = None) -> Path:
    """The command line of a recipe's merge/export script: --run, --out, --dtype (+ `add_arguments`'s), then
    `merge(args)`, which writes to a temp folder renamed to --out when complete (--out must be new), with the
    run's run.json (what it trained with, e.g. the caption prompt serve uses); prints the folder written and
    the step of its weights (then `describe(args)`, e.g. a blend), and returns the folder."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True,
                   help="the training output_dir (the weights it ended with: the best checkpoint's with "
                        "--load_best_model_at_end) or a checkpoint-N folder in it")
    p.add_argument("--out", required=True, help="a new folder for the full checkpoint")
    p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"],
                   help=f"dtype of the written weights (default: {dtype})")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    check_final_model(args.run)
    out = Path(args.out)
    with atomic_folder(out) as tmp:  # beside `out`, renamed to it when complete
        args.out = str(tmp)
        merge(args)
        if (record := run_record(args.run)) is not None:
            shutil.copyfile(record, tmp / "run.json")
    step = trained_step(args.run)
    print(f"full checkpoint written to {out}" + (f": the run's weights at {step}" if step else "")
          + (describe(args) if describe is not None else ""))
    return out
