"""Training throughput and memory of a recipe's own code, and of the plain-Trainer baseline on the same \
batches.

    python -m bench clip_retrieval      # real ViT-B/32 dims, random weights, on the GPU, both modes
    python -m bench blip2_lora_caption --mode device --steps 20 --batch-size 64
    python -m bench soft_prompt_caption -- --optim adamw_torch_fused --torch_compile true
    python -m bench llava_instruct --model qwen2_5_vl   # Qwen2.5-VL-7B-Instruct dims instead of LLaVA-1.5-7B
    python -m bench clip_retrieval --size tiny --device cpu --steps 2 --warmup 1
        # the CPU smoke (tests/test_bench.py)

What runs is the recipe's Trainer subclass (its loss, per-module learning rates, callbacks) inside
`Trainer.train`, on batches made by the recipe's collator from records tokenized by the recipe's code; flags
after `--` go to the recipe's own argument parser, as they would to its train.py. Two modes:

- device: a few batches made once by the collator and kept on the device, cycled; the time is the Trainer's
  loop alone (forward, backward, clipping, optimizer and scheduler step, callbacks).
- e2e: `Trainer.train` over its DataLoader on synthetic JPEG records at the model's image size (bench.data),
  with the workers and pinned memory the recipe's arguments set (`-- --dataloader_num_workers 8`).

The clock starts when the warm-up optimizer steps have ended and stops after `--steps` more (torch.cuda
.synchronize() at both ends, none in between). Peak memory is over the whole `train()` call, weights included.
The baseline (plain `transformers.Trainer`, the model loaded as a user would, PEFT's defaults) runs in the
same process on the same batches, after the recipe's model is freed; compare numbers from one run only. For
the generative recipes whose model is a transformers VLM, TRL's SFTTrainer follows as a second baseline on the
same samples, through its own collator, PEFT set-up and loss (bench/RESULTS.md, "Baselines").
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed

from bench.adapters import ADAPTERS, CHAT_MODELS, Adapter, ChatAdapter
from bench.cli import positive, result_path_error
from bench.data import synthetic_jpeg_records
from bench.flops import peak_tflops, step_flops
from data_tools.errors import DataError
from data_tools.files import atomic_write_text
from recipes.common.data import load_records

FLOP_CONVENTION = ("6NT for trained weights, 4NT for frozen weights after a trained one (backward through "
                   "them), 2NT for frozen weights with nothing trained before them; N per weight matrix, T "
                   "real tokens; attention scores not counted (bench/flops.py)")


# What a FLOP count reads the values of (bench.adapters' flop_chains); the rest it reads the shapes of.
KEPT_FOR_FLOPS = ("attention_mask", "image_grid_thw")


class PremadeBatches:
    """`n` micro-batches cycled from `batches` (already on the device); a fresh dict each time, since a
    recipe's compute_loss may pop keys from the one it is given."""

    def __init__(self, batches: list[dict], n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield dict(self.batches[i % len(self.batches)])


class TextPadding:
    """The recipe's collator, its text then right-padded to `width` positions (--pad-text-to), as collators
    that pad to a fixed length do (CLIP's 77 positions in the benchmark shape): more positions computed, no
    more tokens counted."""

    FILL = {"input_ids": None, "attention_mask": 0, "labels": -100}

    def __init__(self, collator, width: int, pad_token_id: int):
        self.collator, self.width, self.pad_token_id = collator, width, pad_token_id

    def __call__(self, features):
        batch = self.collator(features)
        for key, fill in self.FILL.items():
            if key in batch and batch[key].shape[1] < self.width:
                value = self.pad_token_id if fill is None else fill
                batch[key] = torch.nn.functional.pad(batch[key], (0, self.width - batch[key].shape[1]),
                                                     value=value)
        return batch


@dataclass
class BaselineCollator:
    """The recipe's collator, its batches turned into what the plain model takes (picklable, for DataLoader
    workers)."""

    collator: object
    to_baseline: object  # a static method of the adapter

    def __call__(self, features):
        return self.to_baseline(self.collator(features))


@dataclass
class MicroBatch:
    """What a timed Trainer records of one micro-batch, as device tensors (no host sync while the clock
    runs)."""

    step: int  # optimizer steps completed before it
    loss: torch.Tensor | None
    tokens: torch.Tensor
    samples: int
    shapes: dict[str, list[int]]
    # the attention mask and Qwen's image grid (t, h, w per image), every other tensor as a meta tensor of its
    # shape (FLOPs)
    light: dict[str, torch.Tensor]


def timed_trainer(trainer_cls, adapter: Adapter):
    """`trainer_cls` recording a MicroBatch per training step, and able to train on premade device batches
    instead of its DataLoader."""

    class Timed(trainer_cls):
        def __init__(self, *args, premade: PremadeBatches | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.bench_premade = premade
            self.bench_steps: list[MicroBatch] = []

        def get_train_dataloader(self):
            return self.bench_premade if self.bench_premade is not None else super().get_train_dataloader()

        def training_step(self, model, inputs, num_items_in_batch=None):
            # before compute_loss may pop some
            tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
            record = MicroBatch(self.state.global_step, None, adapter.tokens(inputs), adapter.samples(inputs),
                                {k: list(v.shape) for k, v in tensors.items()},
                                {k: v if k in KEPT_FOR_FLOPS else v.to("meta") for k, v in tensors.items()})
            record.loss = super().training_step(model, inputs, num_items_in_batch)
            self.bench_steps.append(record)
            return record.loss

    Timed.__name__ = trainer_cls.__name__
    return Timed


class StepClock(TrainerCallback):
    """Starts after optimizer step `warmup`, stops after step `warmup + steps`; synchronizes the GPU at both
    ends only."""

    def __init__(self, warmup: int, steps: int, cuda: bool):
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.start = self.seconds = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = self._now()
        elif state.global_step == self.warmup + self.steps:
            self.seconds = self._now() - self.start


@dataclass
class Options:
    recipe: str
    device: str = "cuda"
    model: str | None = None  # the chat recipes' architecture (bench.adapters.CHAT_MODELS); None: llava
    size: str = "real"
    mode: str = "both"
    steps: int = 20
    warmup: int = 3
    batch_size: int | None = None
    baseline: bool = True
    device_batches: int = 2
    pad_text_to: int | None = None
    distinct_images: int = 2048
    peak_tflops: float | None = None
    recipe_argv: list[str] = field(default_factory=list)


def _recipe_argv(adapter: Adapter, opts: Options, output_dir: str, batch_size: int) -> list[str]:
    """The recipe's command line: bench defaults, then the user's flags after `--`, then what the harness
    needs."""
    argv = list(adapter.tiny_argv if opts.size == "tiny" else adapter.real_argv)
    # the recipes' GPU launch lines use --bf16
    argv += ["--bf16", "true"] if opts.device == "cuda" else ["--use_cpu", "true"]
    argv += ["--logging_strategy", "no", "--disable_tqdm", "true"]
    argv += opts.recipe_argv
    return argv + ["--output_dir", output_dir, "--max_steps", str(opts.warmup + opts.steps),
                   "--per_device_train_batch_size", str(batch_size), "--report_to", "none", "--eval_strategy",
                   "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight holds two values per byte
    return state.shape.numel() if state is not None else p.numel()


def _parameters(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(_numel(p) for p in model.parameters()))


def _run(adapter: Adapter, who: str, mode: str, opts: Options, a, model, dataset, collator, batches,
         trainer_kwargs) -> dict:
    """Train `model` for warmup + steps optimizer steps with the recipe's Trainer (who="recipe") or the plain
    one."""
    args = a.TrainingArguments
    cuda = opts.device == "cuda"
    cls = timed_trainer(adapter.trainer_class() if who == "recipe" else Trainer, adapter)
    if who == "baseline":
        collator = BaselineCollator(collator, type(adapter).baseline_batch)
        batches = [adapter.baseline_batch(b) for b in batches] if batches is not None else None
    micro_steps = (opts.warmup + opts.steps) * args.gradient_accumulation_steps
    premade = PremadeBatches(batches, micro_steps) if mode == "device" else None
    clock = StepClock(opts.warmup, opts.steps, cuda)
    trainer = cls(model=model, args=args, train_dataset=dataset, data_collator=collator, premade=premade,
                  callbacks=[clock], **(trainer_kwargs if who == "recipe" else {}))
    result = _measure(trainer, clock, adapter, who, mode, opts)
    del trainer, model
    _free(opts.device)
    return result


def _run_sft(adapter: Adapter, mode: str, opts: Options, a, sft, batch_size: int) -> dict:
    """Train TRL's SFTTrainer as a TRL user would (its collator, its PEFT set-up, its loss) on the recipe's
    samples."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    args = a.TrainingArguments
    # The recipe's TrainingArguments as TRL converts them itself, but no truncation: the samples are within
    # the recipe's length budget already, and a cut through the image tokens would be an error. The random
    # sampler: TRL's vision rows have no token lengths until its collator runs, so transformers' length
    # grouping cannot read them (ValueError).
    sft_args = SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token, "max_length": None,
                            "train_sampling_strategy": "random"})
    rows = datasets.Dataset.from_list(sft.rows).cast_column("images", datasets.Sequence(datasets.Image()))
    cls = timed_trainer(SFTTrainer, adapter)
    clock = StepClock(opts.warmup, opts.steps, opts.device == "cuda")
    trainer = cls(model=sft.model, args=sft_args, train_dataset=rows, processing_class=sft.processor,
                  peft_config=sft.peft_config, callbacks=[clock])
    if mode == "device":  # TRL's collator over the samples the recipe's premade batches hold
        batches = [_to(trainer.data_collator([dict(rows[i])
                                              for i in range(k * batch_size, (k + 1) * batch_size)]),
                       opts.device)
                   for k in range(opts.device_batches)]
        trainer.bench_premade = PremadeBatches(batches,
                                               (opts.warmup + opts.steps) * args.gradient_accumulation_steps)
    sft.model = None
    result = _measure(trainer, clock, adapter, "trl", mode, opts, loaded_as=adapter.sft_loaded_as)
    del trainer
    _free(opts.device)
    return result


def _measure(trainer, clock: StepClock, adapter: Adapter, who: str, mode: str, opts: Options,
             loaded_as: str | None = None) -> dict:
    """Run `trainer.train()` and measure it: throughput over the timed steps, MFU, peak memory, per-step
    records."""
    args = trainer.args
    cuda = opts.device == "cuda"
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would interleave with the table
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # dropout of the first step drawn from the seed alone (tests/test_bench.py checks that loss)
    set_seed(args.seed)
    trainer.train()
    if clock.seconds is None:
        raise ValueError(f"{who} {mode}: the Trainer stopped after {trainer.state.global_step} of "
                           f"{opts.warmup + opts.steps} optimizer steps (too few samples?)")
    timed = [r for r in trainer.bench_steps if r.step >= opts.warmup]
    samples = int(sum(r.samples for r in timed))
    tokens = int(sum(r.tokens for r in timed))
    flops = sum(step_flops(trainer.model, adapter.flop_chains(trainer.model, r.light))["total"]
                for r in timed)
    peak = opts.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if cuda else None)
    trainable, total = _parameters(trainer.model)
    result = {
        "who": who, "mode": mode, "trainer": type(trainer).__name__, "trainable_parameters": trainable,
        "parameters": total, "precision": _precision(trainer.model, args),
        "loaded_as": loaded_as or ("by the recipe's own code" if who == "recipe"
                                   else adapter.baseline_loaded_as),
        "optimizer_steps": opts.steps, "seconds": clock.seconds, "samples": samples, "tokens": tokens,
        "samples_per_s": samples / clock.seconds, "tokens_per_s": tokens / clock.seconds,
        "model_tflop_per_s": flops / clock.seconds / 1e12,
        "mfu": flops / clock.seconds / (peak * 1e12) if peak else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        # Per micro-batch, warm-up included: what tests/test_bench.py checks against the batches.
        "losses": [float(r.loss) for r in trainer.bench_steps],
        "batch_tokens": [int(r.tokens) for r in trainer.bench_steps],
        "batch_shapes": [r.shapes for r in trainer.bench_steps],
    }
    return result


def _unless_out_of_memory(who: str, mode: str, trainer: str, train) -> dict:
    """`train()`'s result, or a row saying that it ran out of GPU memory, so that the other runs still
    happen."""
    try:
        return train()
    except torch.OutOfMemoryError as e:
        return {"who": who, "mode": mode, "trainer": trainer,
                "error": "out of memory: " + str(e).split("\n")[0]}


def _unless_refused(who: str, mode: str, trainer: str, train) -> dict:
    """`_unless_out_of_memory`, and a baseline that cannot run these options (its ValueError, written for the
    user) is a row saying why, after the recipe's run, not a crash that loses it."""
    try:
        return _unless_out_of_memory(who, mode, trainer, train)
    except ValueError as e:
        _free("cuda" if torch.cuda.is_available() else "cpu")
        return {"who": who, "mode": mode, "trainer": trainer, "error": str(e).splitlines()[0]}


def _unless_failed(who: str, mode: str, trainer: str, train) -> dict:
    """For a third-party baseline (TRL): any error it raises on the recipe's model is a row saying so, not a
    crash."""
    try:
        return _unless_out_of_memory(who, mode, trainer, train)
    except Exception as e:  # noqa: BLE001 (the message is the result: which model TRL cannot train, and why)
        _free("cuda" if torch.cuda.is_available() else "cpu")
        return {"who": who, "mode": mode, "trainer": trainer,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}


def _precision(model, args) -> str:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    trained = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    autocast = " with bf16 autocast" if args.bf16 else ""
    return f"weights {'/'.join(dtypes)}, trained weights {'/'.join(trained)}{autocast}"


@dataclass
class Prepared:
    """Everything one mode's runs share: the parsed recipe arguments, the recipe's model (LoRA and freezing
    applied), its tokenizer, image processor, dataset and collator, and (device mode) the premade batches on
    the device."""

    a: object
    model: object
    tokenizer: object
    image_processor: object
    dataset: object
    collator: object
    batches: list[dict] | None
    records: object  # the synthetic records the dataset was made of (TRL's baseline makes its rows of them)
    # the plain baseline's: the recipe's collator unless a recipe option changes its batches
    baseline_collator: object
    baseline_batches: list[dict] | None


def prepare(adapter: Adapter, opts: Options, mode: str, output_dir: str, batch_size: int,
            batch_device: str | None = None) -> Prepared:
    """Build the recipe's side of one mode, seeded as train.py seeds (the same seed gives the same model and
    batches)."""
    a = adapter.parse(_recipe_argv(adapter, opts, output_dir, batch_size))
    set_seed(a.TrainingArguments.seed)
    model, tokenizer, image_processor = adapter.build(a, opts.size, opts.device)
    image_size = adapter.image_size(opts.size) or image_processor_size(image_processor)
    per_step = batch_size * a.TrainingArguments.gradient_accumulation_steps
    n = per_step * (opts.warmup + opts.steps) if mode == "e2e" else batch_size * opts.device_batches
    records = load_records(synthetic_jpeg_records(adapter.task, _records_for(adapter, n), image_size,
                                                  distinct=opts.distinct_images), adapter.task)
    model = adapter.setup(model, a)
    dataset = adapter.dataset(records, tokenizer, model, a)
    collator = adapter.collator(tokenizer, image_processor, model, a)
    if opts.pad_text_to:
        collator = TextPadding(collator, opts.pad_text_to, tokenizer.pad_token_id)
    base_collator = adapter.baseline_collator(tokenizer, image_processor, model, a)
    if base_collator is not None and opts.pad_text_to:
        base_collator = TextPadding(base_collator, opts.pad_text_to, tokenizer.pad_token_id)

    def premade(collate):
        return [_to(collate([dataset[i] for i in range(k * batch_size, (k + 1) * batch_size)]),
                    batch_device or opts.device)
                for k in range(opts.device_batches)]

    batches = premade(collator) if mode == "device" else None
    base_batches = premade(base_collator) if mode == "device" and base_collator is not None else batches
    return Prepared(a, model, tokenizer, image_processor, dataset, collator, batches, records,
                    base_collator or collator, base_batches)


def make_adapter(opts: Options) -> Adapter:
    """The recipe's adapter, on the architecture --model names (the chat recipes only)."""
    if opts.recipe not in ADAPTERS:
        raise SystemExit(f"unknown recipe {opts.recipe!r}; benchable: {', '.join(sorted(ADAPTERS))}")
    if (error := model_error(opts.recipe, opts.model)) is not None:
        raise SystemExit(error)
    return ADAPTERS[opts.recipe]() if opts.model is None else ADAPTERS[opts.recipe](opts.model)


def model_error(recipe: str, model: str | None) -> str | None:
    """What is wrong with --model for `recipe` (None: nothing)."""
    if model is None:
        return None
    if not issubclass(ADAPTERS[recipe], ChatAdapter):
        chat = sorted(n for n, c in ADAPTERS.items() if issubclass(c, ChatAdapter))
        return (f"--model is for the chat recipes ({', '.join(chat)}); {recipe} benches the architecture of "
                "its own train.py")
    if model not in CHAT_MODELS:
        return f"--model {model}: expected one of {', '.join(CHAT_MODELS)}"
    return None


def _model_name(adapter: Adapter) -> str | None:
    return adapter.chat.name if isinstance(adapter, ChatAdapter) else None


def run(opts: Options) -> dict:
    """Bench one recipe as `opts` says; returns the JSON-ready result (fields: bench/RESULTS.md)."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible here; use --device cpu (with --size tiny for a "
                         "quick check)")
    if opts.warmup < 1 or opts.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the clock starts at the end of a warm-up "
                         "step)")
    adapter = make_adapter(opts)
    batch_size = opts.batch_size or (adapter.real_batch_size if opts.size == "real" else 4)
    modes = ["device", "e2e"] if opts.mode == "both" else [opts.mode]
    out = {"recipe": opts.recipe, "model": _model_name(adapter), "size": opts.size,
           "device": _device_name(opts.device), "batch_size": batch_size, "pad_text_to": opts.pad_text_to,
           "warmup_steps": opts.warmup,
           "command": " ".join(["python -m bench", *sys.argv[1:]]) if sys.argv else "",
           # when it ran: a figure in RESULTS.md carries its date beside its command and device
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "versions": _versions(), "flop_convention": FLOP_CONVENTION,
           "tokens_counted": adapter.tokens_counted, "baseline_loaded_as": adapter.baseline_loaded_as,
           "sft_loaded_as": adapter.sft_loaded_as, "runs": [], "notes": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for mode in modes:
            p = prepare(adapter, opts, mode, tmp, batch_size)
            out["gradient_accumulation_steps"] = p.a.TrainingArguments.gradient_accumulation_steps
            kwargs = adapter.trainer_kwargs(p.tokenizer, p.image_processor, p.a)
            model, p.model = p.model, None  # _run frees it
            out["runs"].append(_unless_out_of_memory("recipe", mode, adapter.trainer_class().__name__,
                                                     lambda: _run(adapter, "recipe", mode, opts, p.a, model,
                                                                  p.dataset, p.collator, p.batches, kwargs)))
            del model
            _free(opts.device)
            if opts.baseline:
                set_seed(p.a.TrainingArguments.seed)

                def baseline():
                    base = adapter.baseline(p.a, opts.size, opts.device)
                    return _run(adapter, "baseline", mode, opts, p.a, base, p.dataset, p.baseline_collator,
                                p.baseline_batches, {})

                out["runs"].append(_unless_refused("baseline", mode, "Trainer", baseline))
                _free(opts.device)
                if adapter.sft_loaded_as and _trl_installed():
                    set_seed(p.a.TrainingArguments.seed)
                    sft = adapter.sft(p.a, opts.size, opts.device, p.records)
                    out["runs"].append(_unless_failed("trl", mode, "SFTTrainer", lambda: _run_sft(
                        adapter, mode, opts, p.a, sft, batch_size)))
                    del sft
                    _free(opts.device)
    out["notes"] += list(dict.fromkeys(adapter.notes))  # once each, though both modes set the recipe up
    if opts.baseline:
        # (clip_retrieval is not generative: no SFT baseline to name)
        if not adapter.sft_loaded_as and adapter.sft_note:
            out["notes"].append(adapter.sft_note)
        elif not _trl_installed():
            out["notes"].append("TRL's SFTTrainer baseline skipped: trl is not installed "
                                "(bench/requirements.txt lists it).")
    return out


def count_flops(opts: Options) -> dict:
    """Model FLOPs per sample of one step, per part, for the premade batches (bench/flops.py); nothing is
    trained.

    At --size real the model is built on the meta device (no memory, no weights), so this runs anywhere.
    """
    adapter = make_adapter(opts)
    batch_size = opts.batch_size or (adapter.real_batch_size if opts.size == "real" else 4)
    opts = Options(**{**vars(opts), "device": "meta" if opts.size == "real" else "cpu"})
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        p = prepare(adapter, opts, "device", tmp, batch_size, batch_device="cpu")
    per_part = {}
    for batch in p.batches:
        for part, flops in step_flops(p.model, adapter.flop_chains(p.model, batch)).items():
            per_part[part] = per_part.get(part, 0.0) + flops / int(adapter.samples(batch)) / len(p.batches)
    return {"recipe": opts.recipe, "model": _model_name(adapter), "size": opts.size,
            "batch_size": batch_size, "pad_text_to": opts.pad_text_to,
            "gflop_per_sample": {k: v / 1e9 for k, v in per_part.items()},
            "tokens_per_sample": (sum(int(adapter.tokens(b)) for b in p.batches)
                                  / (batch_size * len(p.batches))),
            "flop_convention": FLOP_CONVENTION}


def _records_for(adapter: Adapter, samples: int) -> int:
    # Caption records make one sample per reference caption (5 per synthetic image); others one per record.
    return math.ceil(samples / 5) if adapter.task == "caption" else samples


def image_processor_size(image_processor) -> int:
    size = (image_processor.crop_size if getattr(image_processor, "do_center_crop", False)
            else image_processor.size)
    return int(size["height"])


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "bitsandbytes": installed("bitsandbytes"), "trl": installed("trl"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


def _trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def markdown(result: dict) -> str:
    """The result as a Markdown table, one row per run, and the recipe / baseline ratios per mode."""
    steps = next((r["optimizer_steps"] for r in result["runs"] if "error" not in r), 0)
    model = f" on {result['model']}" if result["model"] else ""
    lines = [f"{result['recipe']}{model} ({result['size']} dims) on {result['device']}, {result['date']}, "
             f"batch {result['batch_size']}, {steps} timed steps after {result['warmup_steps']} warm-up", "",
             "| mode | trainer | precision | trainable params | samples/s | tokens/s | MFU | peak alloc GiB "
             "| peak reserved GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        trainer = r["trainer"] + {"recipe": "", "baseline": " (baseline)", "trl": " (TRL baseline)"}[r["who"]]
        if "error" in r:
            lines.append(f"| {r['mode']} | {trainer} | {r['error']} |" + " |" * 6)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        alloc, reserved = (f"{r[k]:.1f}" if r[k] is not None else "n/a"
                           for k in ("peak_allocated_gib", "peak_reserved_gib"))
        lines.append(f"| {r['mode']} | {trainer} | {r['precision']} | {r['trainable_parameters']:,} | "
                     f"{r['samples_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {alloc} | {reserved} |")
    lines.append("")
    for mode in ("device", "e2e"):
        ok = {r["who"]: r for r in result["runs"] if r["mode"] == mode and "error" not in r}
        for who, name in (("baseline", "baseline"), ("trl", "TRL baseline")):
            if "recipe" not in ok or who not in ok:
                continue
            recipe, base = ok["recipe"], ok[who]
            ratio = (f"{mode}: recipe / {name} = "
                     f"{recipe['samples_per_s'] / base['samples_per_s']:.2f}x samples/s")
            if recipe["peak_allocated_gib"]:
                ratio += (f", {recipe['peak_allocated_gib'] / base['peak_allocated_gib']:.2f}x peak "
                          "allocated memory")
            lines.append(ratio)
    if any(r["who"] == "baseline" for r in result["runs"]):
        lines.append(f"baseline: {result['baseline_loaded_as']}")
    if any(r["who"] == "trl" for r in result["runs"]):
        lines.append(f"TRL baseline: {result['sft_loaded_as']}")
    lines += [f"tokens: {result['tokens_counted']}", f"FLOPs: {result['flop_convention']}", *result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                epilog="Flags after -- go to the recipe's own parser, e.g. -- --optim "
                                       "adamw_torch_fused.")
    p.add_argument("recipe", help=f"one of {', '.join(sorted(ADAPTERS))}")
    p.add_argument("--model", choices=sorted(CHAT_MODELS), default=None,
                   help="llava_instruct and qlora_vqa only: the architecture, llava (LLaVA-1.5-7B, the "
                        "default) or qwen2_5_vl (Qwen2.5-VL-7B-Instruct); the tiny model of it at --size "
                        "tiny")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=["real", "tiny"], default="real",
                   help="real: the real architecture, random weights, built on the device; tiny: the "
                        "recipe's random tiny model")
    p.add_argument("--mode", choices=["device", "e2e", "both"], default="both")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before the clock starts")
    p.add_argument("--batch-size", type=positive(), default=None,
                   help="per-device micro-batch (default: the benchmark shape; 4 at --size tiny)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time plain transformers.Trainer + PEFT defaults on the same batches")
    p.add_argument("--device-batches", type=positive(), default=2,
                   help="device mode: distinct premade batches, cycled")
    p.add_argument("--distinct-images", type=positive(), default=2048,
                   help="e2e mode: synthetic images drawn, then repeated")
    p.add_argument("--pad-text-to", type=positive(), default=None,
                   help="right-pad every batch's text to this many positions (CLIP's benchmark shape: 77)")
    p.add_argument("--peak-tflops", type=positive(float), default=None,
                   help="the GPU's dense bf16 peak, for MFU (default: by its name)")
    p.add_argument("--flops", action="store_true",
                   help="only print the model FLOPs per sample of each part (the MFU numerator); trains "
                        "nothing, needs no GPU")
    p.add_argument("--json", default=None,
                   help="also write the full result (per-step losses, shapes) to this file")
    ns = p.parse_args(argv)
    if ns.recipe in ADAPTERS and (error := model_error(ns.recipe, ns.model)) is not None:
        p.error(error)  # exit 2, one line
    if (error := result_path_error("--json", ns.json)) is not None:  # known now, not after minutes of runs
        p.error(error)
    opts = Options(recipe=ns.recipe, model=ns.model, device=ns.device, size=ns.size, mode=ns.mode,
                   steps=ns.steps, warmup=ns.warmup, batch_size=ns.batch_size, baseline=ns.baseline,
                   device_batches=ns.device_batches, distinct_images=ns.distinct_images,
                   peak_tflops=ns.peak_tflops, pad_text_to=ns.pad_text_to, recipe_argv=recipe_argv)
    try:
        result = count_flops(opts) if ns.flops else run(opts)
    except (ValueError, DataError) as e:  # options the recipe or the measurement refuses: one line
        p.error(str(e).splitlines()[0])
    except ImportError as e:  # a package this recipe or --model needs (torchvision for qwen2_5_vl)
        p.error(f"a package is missing: {str(e).splitlines()[0]}")
    print(json.dumps(result, indent=2) if ns.flops else markdown(result))
    if ns.json:
        atomic_write_text(ns.json, json.dumps(result, indent=2))
    return 0
