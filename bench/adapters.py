"""One adapter per recipe: how the harness builds the recipe's model, data, collator and Trainer as its
train.py does, and the baseline a user would otherwise run on the same batches.

An adapter reads the recipe's own config.yaml with the recipe's own argument dataclasses (`parse_args`, as
train.py does), so a flag after `--` on the bench command line reaches the recipe exactly as it would reach
train.py (`-- --lora_r 8 --optim adamw_torch_fused`). The recipe's model set-up lines (LoRA, freezing) are
repeated here from its train.py, each marked; tests/test_bench.py checks that the parameters that train are
the ones train.py trains. Adding a recipe is a subclass with its `build`, `setup`, `dataset`,
`trainer_kwargs`, `baseline` and `flop_chains`, and an entry in ADAPTERS. The chat recipes run on several
architectures (`--model`): each is a class in CHAT_MODELS with its real config, image size and FLOP chain.
"""

from __future__ import annotations

import gc
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainingArguments

from bench import real_configs
from bench.flops import Part
from data_tools.records import IMAGE_TOKEN
from recipes.common.args import (
    RECIPE_DEFAULTS,
    DataArguments,
    FeatureCacheArguments,
    FreezeArguments,
    GenerationEvalArguments,
    LearningRateArguments,
    LossArguments,
    ModelArguments,
    PeftArguments,
    parse_args,
)
from recipes.common.models import (check_mixed_precision, compute_dtype, load_model_and_processor,
                                   resolve_model_path)
from recipes.common.quantization import quantization_config

ROOT = Path(__file__).resolve().parents[1]


def import_train_module(recipe: str):
    """`recipes/<recipe>/train.py` as a module."""
    return importlib.import_module(f"recipes.{recipe}.train")


def on_device(cls, config, model_args: ModelArguments, device: str, dtype: torch.dtype | None = None):
    """`cls` with random weights, built directly on `device` in the recipe's dtype (never materialised on the
    CPU first)."""
    with torch.device(device):
        return cls._from_config(config, dtype=dtype or compute_dtype(model_args),
                                attn_implementation=model_args.attn_implementation)


def load_quantized(model, model_args: ModelArguments, skip_modules: list[str], device: str):
    """`model` loaded again by `from_pretrained` with the recipe's BitsAndBytesConfig, from its weights in
    memory instead of a checkpoint's files: the same quantization of the same weights as
    `load_model_and_processor` with --load_in_4bit (tests/test_bench.py checks it weight for weight). The
    caller drops `model` afterwards."""
    return type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                       quantization_config=quantization_config(model_args, skip_modules),
                                       dtype=compute_dtype(model_args),
                                       attn_implementation=model_args.attn_implementation,
                                       device_map={"": device})


def user_dtype(device: str) -> torch.dtype:
    """The dtype a user loads a checkpoint in for a baseline: bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def vision_positions(vision_config) -> int:
    """Tokens a ViT computes per image: one per patch and the class token."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def resize_image_processor(image_processor, side: int) -> None:
    """The tiny processor at the real model's image size (e2e mode of --size real): same class, same steps,
    bigger images."""
    if (getattr(image_processor, "crop_size", None) is not None
            and getattr(image_processor, "do_center_crop", False)):
        image_processor.size = {"shortest_edge": side}
        image_processor.crop_size = {"height": side, "width": side}
    else:
        image_processor.size = {"height": side, "width": side}


@dataclass
class SftBaseline:
    """What `trl.SFTTrainer(model, processing_class=processor, train_dataset=rows, peft_config=peft_config)`
    takes."""

    model: object
    processor: object
    # {"images": [path], "prompt"/"completion" or "messages": ...}; the harness makes them a Dataset
    rows: list[dict]
    peft_config: object


class Adapter:
    """What the harness needs from a recipe. `a` below is the parsed arguments: a namespace of the recipe's
    dataclasses."""

    name: str  # folder under recipes/
    task: str  # record schema of its data (data_tools)
    arg_types: tuple = ()  # the dataclasses train.py parses, TrainingArguments last
    # --size tiny: the random tiny model(s), fast to build (train.py defaults to pre-trained ones)
    tiny_argv: tuple = ()
    # --size real: recipe flags that give the benchmark shape (bench/RESULTS.md, "Shapes"), before the user's
    # flags after --
    real_argv: tuple = ()
    real_batch_size = 64  # the benchmark shape
    tokens_counted = ""  # what tokens/s counts, in words
    baseline_loaded_as = ""  # the baseline's model and what trains in it, in words

    def __init__(self):
        self.train = import_train_module(self.name)
        # what setting up the recipe's side did that the result should say (harness adds them)
        self.notes: list[str] = []

    def parse(self, argv: list[str]) -> SimpleNamespace:
        """The recipe's arguments from its config.yaml, then `argv` (later flags win), checked as train.py
        checks them."""
        parsed = parse_args(self.arg_types, ["--config", str(self.train.DEFAULT_CONFIG), *argv],
                            defaults=RECIPE_DEFAULTS)
        a = SimpleNamespace(**{type(p).__name__: p for p in parsed})
        check_mixed_precision(a.ModelArguments, a.TrainingArguments)
        return a

    def image_size(self, size: str) -> int:
        raise NotImplementedError

    def build(self, a, size: str, device: str):
        """(model, tokenizer, image processor) as the recipe loads them: --size tiny through the recipe's
        loader, --size real from the real config with random weights on `device`. No LoRA or freezing yet."""
        raise NotImplementedError

    def setup(self, model, a):
        """The recipe's LoRA and freezing, as its train.py applies them; returns the model."""
        return model

    def dataset(self, records, tokenizer, model, a):
        """The recipe's training dataset from records (its own tokenization and length budget)."""
        raise NotImplementedError

    def collator(self, tokenizer, image_processor, model, a):
        raise NotImplementedError

    def baseline_collator(self, tokenizer, image_processor, model, a):
        """The collator whose batches the plain baseline is given (None: the recipe's). A recipe option that
        changes what its batches hold (cached vision features instead of pixels, padding-free rows) needs the
        plain batches here."""
        return None

    def feature_cache(self, tower, image_processor, a, **encode):
        """--cache_vision_features as train.py builds it, over the images of the last dataset() (self.images);
        the one pass over them is not in the timed steps, but noted in the result."""
        from recipes.common.feature_cache import cache_for_run

        if next(tower.parameters()).device.type == "meta":
            raise ValueError("--flops with --cache_vision_features: a cached tower does no work in a step "
                             "(its FLOPs are 0); count without the option, which gives the tower's share "
                             "too.")
        cache = cache_for_run(tower, image_processor, self.images, a.FeatureCacheArguments,
                              a.TrainingArguments, **encode)
        if cache.seconds is not None:
            self.notes.append(f"vision features of {len(cache)} distinct images computed before training in "
                              f"{cache.seconds:.1f} s (not in the timed steps)")
        return cache

    def trainer_class(self):
        raise NotImplementedError

    def trainer_kwargs(self, tokenizer, image_processor, a) -> dict:
        """The recipe Trainer's own constructor arguments, as its train.py passes them."""
        kwargs = {"learning_rates": a.LearningRateArguments}
        # the generative recipes' label-position loss (recipes/common/trainer.py)
        if self.task != "retrieval":
            kwargs["loss_on_label_positions"] = a.LossArguments.loss_on_label_positions
        return kwargs

    def baseline(self, a, size: str, device: str):
        """The model a user would train with a plain `transformers.Trainer` and PEFT's defaults (None: no
        baseline)."""
        return None

    # TRL's SFTTrainer baseline in words; None: the recipe has none (sft_note says why)
    sft_loaded_as: str | None = None
    sft_note = ""

    def sft(self, a, size: str, device: str, records) -> SftBaseline:
        """TRL's SFTTrainer baseline: the model as a TRL user loads it (no LoRA yet: SFTTrainer applies
        `peft_config`), its processor, and the recipe's samples as TRL's vision rows, in the order of the
        recipe's dataset."""
        raise NotImplementedError

    @staticmethod
    def baseline_batch(batch: dict) -> dict:
        """A recipe batch as the plain model takes it (the same tensors)."""
        return batch

    def samples(self, batch: dict) -> int:
        return batch["pixel_values"].shape[0]

    def tokens(self, batch: dict) -> torch.Tensor:
        """Non-pad tokens of a batch (a tensor on the batch's device, summed without a host sync); a
        padding-free batch (no attention_mask) has no padding: its length, known on the host."""
        if "attention_mask" not in batch:
            return torch.tensor(batch["input_ids"].numel())
        return batch["attention_mask"].sum()

    def flop_chains(self, model, batch: dict) -> list[list[Part]]:
        """The model's parts in forward order with the tokens each processes in this batch (see
        bench.flops)."""
        raise NotImplementedError


# --- blip2_lora_caption -------------------------------------------------------------------------------------
class Blip2LoraCaption(Adapter):
    name, task = "blip2_lora_caption", "caption"
    arg_types = (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments,
                 LossArguments, FeatureCacheArguments, GenerationEvalArguments, TrainingArguments)
    tiny_argv = ("--model_name_or_path", "tiny:blip2-opt")
    real_batch_size = 64
    tokens_counted = ("LM positions with attention_mask 1: the 32 query (image) tokens, bos, prompt and "
                      "caption; no padding")
    baseline_loaded_as = ("Blip2ForConditionalGeneration in bf16 on a GPU (float32 on the CPU) + "
                          "get_peft_model(LoraConfig(r=lora_r)): peft's default targets for blip-2 (the "
                          "OPT's q_proj, v_proj), alpha 8, no dropout; Q-Former frozen")

    def image_size(self, size):
        return real_configs.blip2_opt_2_7b().vision_config.image_size if size == "real" else None

    def _model(self, a, size, device, dtype=None):
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        m = a.ModelArguments
        if size == "tiny":
            path = resolve_model_path(m.model_name_or_path)
            model, processor = load_model_and_processor(Blip2ForConditionalGeneration, path, m)
        else:
            model = on_device(Blip2ForConditionalGeneration, real_configs.blip2_opt_2_7b(), m, device, dtype)
            processor = AutoProcessor.from_pretrained(resolve_model_path("tiny:blip2-opt"))
            resize_image_processor(processor.image_processor, self.image_size(size))
        return model, processor

    def build(self, a, size, device):
        model, processor = self._model(a, size, device)
        return model, processor.tokenizer, processor.image_processor

    def setup(self, model, a):
        from recipes.common.peft_setup import apply_lora_and_freezing

        # As train.py: LoRA on the LM; a trained Q-Former is saved with the adapter through modules_to_save.
        return apply_lora_and_freezing(model, a.PeftArguments, a.FreezeArguments)

    def dataset(self, records, tokenizer, model, a):
        config = model.config
        ds, _ = self.train.tokenize_captions(records, tokenizer, image_token_id=config.image_token_id,
                                             num_image_tokens=config.num_query_tokens,
                                             prompt=a.DataArguments.prompt,
                                             max_length=a.DataArguments.max_length)
        self.images = list(ds["image"])  # what collator() caches the vision features of
        return ds

    def collator(self, tokenizer, image_processor, model, a):
        from recipes.common.feature_cache import serve_cached_features, vision_tower

        cache = None
        if a.FeatureCacheArguments.cache_vision_features:  # as train.py
            cache = self.feature_cache(vision_tower(model), image_processor, a)
            serve_cached_features(vision_tower(model))
        return self.train.CaptionCollator(image_processor, tokenizer.pad_token_id, cache)

    def baseline_collator(self, tokenizer, image_processor, model, a):
        # pixels, whatever the recipe's option
        return self.train.CaptionCollator(image_processor, tokenizer.pad_token_id)

    def trainer_class(self):
        return self.train.CaptionTrainer

    def baseline(self, a, size, device):
        from peft import LoraConfig, get_peft_model

        model, _ = self._model(a, size, device, dtype=user_dtype(device))
        # peft's default targets for blip-2: q_proj, v_proj
        return get_peft_model(model, LoraConfig(r=a.PeftArguments.lora_r))

    sft_loaded_as = ("trl.SFTTrainer on Blip2ForConditionalGeneration in bf16 on a GPU (float32 on the CPU) "
                     "with its AutoProcessor, rows {images, prompt: the recipe's prompt, completion: caption "
                     "+ eos} (TRL's default for them: loss on the completion only), "
                     "peft_config=LoraConfig(r=lora_r): peft's default targets (the OPT's q_proj, v_proj)")

    def sft(self, a, size, device, records):
        from peft import LoraConfig

        model, processor = self._model(a, size, device, dtype=user_dtype(device))
        # The processor writes num_query_tokens `<image>` tokens before the text; the model fills the
        # positions of its config's image token id. At --size real the tokenizer is the tiny one: make both
        # the real model's.
        processor.num_query_tokens = model.config.num_query_tokens
        model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
        prompt, eos = a.DataArguments.prompt, processor.tokenizer.eos_token
        # As the recipe's tokenize_captions: one sample per caption, a space after a prompt, eos after the
        # caption.
        rows = [{"images": [r["image"]], "prompt": prompt or "",
                 "completion": (f" {c.strip()}" if prompt else c.strip()) + eos}
                for r in records for c in r["captions"]]
        return SftBaseline(model, processor, rows, LoraConfig(r=a.PeftArguments.lora_r))

    def flop_chains(self, model, batch):
        config = model.config
        n = batch["pixel_values"].shape[0]
        # --cache_vision_features: the tower's output, the tower not run
        cached = batch["pixel_values"].dim() == 3
        return [[Part("vision", ("vision_model",),
                      0 if cached else n * vision_positions(config.vision_config)),
                 Part("bridge", ("qformer", "language_projection"), n * config.num_query_tokens),
                 Part("language", ("language_model",), int(batch["attention_mask"].sum()))]]


# --- clip_retrieval -----------------------------------------------------------------------------------------
class ClipRetrieval(Adapter):
    name, task = "clip_retrieval", "retrieval"
    tiny_argv = ("--model_name_or_path", "tiny:clip")
    real_batch_size = 1024
    tokens_counted = "text tokens with attention_mask 1 (bos, caption, eos); image patches not counted"
    baseline_loaded_as = ("CLIPModel in float32 (the checkpoint's dtype), Trainer --bf16 (autocast) on a "
                          "GPU; full fine-tune with CLIPModel's own loss (return_loss=True)")

    @property
    def arg_types(self):
        return (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments,
                self.train.RetrievalArguments, TrainingArguments)

    def image_size(self, size):
        return real_configs.clip_vit_b32().vision_config.image_size if size == "real" else None

    def _model(self, a, size, device, dtype=None):
        from transformers import AutoProcessor, CLIPModel

        m = a.ModelArguments
        if size == "tiny":
            return load_model_and_processor(CLIPModel, resolve_model_path(m.model_name_or_path), m)
        model = on_device(CLIPModel, real_configs.clip_vit_b32(), m, device, dtype)
        processor = AutoProcessor.from_pretrained(resolve_model_path("tiny:clip"))
        resize_image_processor(processor.image_processor, self.image_size(size))
        return model, processor

    def build(self, a, size, device):
        model, processor = self._model(a, size, device)
        return model, processor.tokenizer, processor.image_processor

    def setup(self, model, a):
        # As train.py: LoRA on the chosen towers, or (un)freezing of whole towers and their last layers.
        return self.train.set_training_mode(model, a.PeftArguments, a.FreezeArguments,
                                            a.RetrievalArguments.lora_towers,
                                            a.RetrievalArguments.unfreeze_last_n_text_layers)

    def dataset(self, records, tokenizer, model, a):
        # config.yaml's max_length is null: the text tower's length, as train.py reads it
        max_length = a.DataArguments.max_length or model.config.text_config.max_position_embeddings
        return self.train.PairDataset(records, tokenizer, max_length,
                                      hard_negatives=a.RetrievalArguments.hard_negatives)

    def collator(self, tokenizer, image_processor, model, a):
        return self.train.collator_for(model, tokenizer, image_processor)  # SigLIP: texts padded to 64

    def trainer_class(self):
        return self.train.ContrastiveTrainer

    def baseline(self, a, size, device):
        if a.PeftArguments.peft_method != "none":
            raise ValueError("the clip_retrieval baseline is a full fine-tune; bench the "
                             "recipe's LoRA mode with --no-baseline.")
        model, _ = self._model(a, size, device, dtype=torch.float32)
        return model

    @staticmethod
    def baseline_batch(batch):
        if batch["input_ids"].shape[0] != batch["pixel_values"].shape[0]:
            raise ValueError("the plain CLIP loss takes one text per image: bench --hard_negatives with "
                             "--no-baseline.")
        return {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"], "return_loss": True}

    def flop_chains(self, model, batch):
        config = model.config
        n_images, n_texts = batch["pixel_values"].shape[0], batch["input_ids"].shape[0]
        return [[Part("vision", ("vision_model",), n_images * vision_positions(config.vision_config)),
                 Part("vision_projection", ("visual_projection",), n_images)],
                [Part("text", ("text_model",), int(batch["attention_mask"].sum())),
                 Part("text_projection", ("text_projection",), n_texts)]]


# --- soft_prompt_caption ------------------------------------------------------------------------------------
class SoftPromptCaption(Adapter):
    name, task = "soft_prompt_caption", "caption"
    tiny_argv = ("--vision_model", "tiny:clip-vision", "--language_model", "tiny:gpt2")
    real_batch_size = 64
    tokens_counted = ("caption tokens with attention_mask 1; the prefix (soft prompt + image vectors) not "
                      "counted")
    baseline_loaded_as = ("the same SoftPromptCaptioner with its frozen parts in float32 (the checkpoints' "
                          "dtype), Trainer --bf16 (autocast) on a GPU; the same soft prompt and projection "
                          "train")
    sft_note = ("no TRL SFTTrainer baseline: its model is the recipe's own module (a CLIP vision tower, a "
                "GPT-2 and the soft prompt between them), which SFTTrainer's vision path (a transformers "
                "vision-language model and its processor) does not take")

    @property
    def arg_types(self):
        return (ModelArguments, DataArguments, self.train.SoftPromptArguments, PeftArguments, FreezeArguments,
                LearningRateArguments, LossArguments, FeatureCacheArguments, GenerationEvalArguments,
                TrainingArguments)

    def image_size(self, size):
        return real_configs.clip_vit_b32_vision().image_size if size == "real" else None

    def _model(self, a, size, device, dtype=None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, GPT2LMHeadModel

        sp, m = a.SoftPromptArguments, a.ModelArguments
        options = dict(prompt_length=sp.prompt_length, projection=sp.projection,
                       vision_features=sp.vision_features)
        if size == "tiny":
            vision_path, language_path = (resolve_model_path(sp.vision_model),
                                          resolve_model_path(sp.language_model))
            model = self.train.SoftPromptCaptioner.from_parts(
                vision_path, language_path, dtype=dtype or compute_dtype(m),
                attn_implementation=m.attn_implementation, revision=m.revision, **options)
        else:
            vision_path, language_path = (resolve_model_path("tiny:clip-vision"),
                                          resolve_model_path("tiny:gpt2"))
            vision = on_device(CLIPVisionModel, real_configs.clip_vit_b32_vision(), m, device, dtype)
            language = on_device(GPT2LMHeadModel, real_configs.gpt2_small(), m, device, dtype)
            with torch.device(device):
                model = self.train.SoftPromptCaptioner.from_models(vision, language, **options)
        # As train.py: GPT-2 has no pad token; padding is masked out of attention and loss anyway.
        tokenizer = AutoTokenizer.from_pretrained(language_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_processor = AutoImageProcessor.from_pretrained(vision_path)
        if size == "real":
            resize_image_processor(image_processor, self.image_size(size))
        if sp.prompt_init_text:
            model.init_soft_prompt_from_text(tokenizer, sp.prompt_init_text)
        return model, tokenizer, image_processor

    def build(self, a, size, device):
        return self._model(a, size, device)

    def setup(self, model, a):
        from recipes.common.peft_setup import apply_freezing, apply_peft

        # As train.py: optional LoRA on the LM; then only the soft prompt and projection (+ LoRA) train.
        model = apply_peft(model, a.PeftArguments)
        apply_freezing(model, a.FreezeArguments)
        return model

    def dataset(self, records, tokenizer, model, a):
        d = a.DataArguments
        ds, _ = self.train.tokenize_captions(records, tokenizer, prefix_length=model.config.prefix_length,
                                             prompt=d.prompt, max_length=d.max_length, lang=d.lang)
        self.images = list(ds["image"])  # what collator() caches the vision features of
        return ds

    def collator(self, tokenizer, image_processor, model, a):
        cache = None
        # as train.py: the model's image_features, which it takes back as given
        if a.FeatureCacheArguments.cache_vision_features:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            cache = self.feature_cache(base.vision_model, image_processor, a, encode=base.image_features,
                                       tag=f"image_features:{base.config.vision_features}")
        return self.train.CaptionCollator(image_processor, tokenizer.pad_token_id, cache)

    def baseline_collator(self, tokenizer, image_processor, model, a):
        # pixels, whatever the recipe's option
        return self.train.CaptionCollator(image_processor, tokenizer.pad_token_id)

    def trainer_class(self):
        return self.train.SoftPromptTrainer

    def trainer_kwargs(self, tokenizer, image_processor, a):
        return {**super().trainer_kwargs(tokenizer, image_processor, a), "image_processor": image_processor}

    def baseline(self, a, size, device):
        if a.PeftArguments.peft_method != "none":
            raise ValueError("the soft_prompt_caption baseline trains the soft prompt and projection only; "
                             "bench the recipe's LoRA option with --no-baseline.")
        model, _, _ = self._model(a, size, device, dtype=torch.float32)
        return model

    def flop_chains(self, model, batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        n = batch["pixel_values"].shape[0]
        # --cache_vision_features: image_features given, the tower not run
        cached = batch["pixel_values"].dim() == 3
        return [[Part("vision", ("vision_model",),
                      0 if cached else n * vision_positions(config.vision_config)),
                 Part("bridge", ("soft_prompt", "projection"), n * config.num_vision_tokens),
                 Part("language", ("language_model",),
                      int(batch["attention_mask"].sum()) + n * config.prefix_length)]]


# --- llava_instruct and qlora_vqa ---------------------------------------------------------------------------
# LoRA on every linear layer of the LM and nowhere else (the benchmark shape): peft has no default targets for
# these models, and "all-linear" would put LoRA on the vision tower and the projector too. LLaVA's Llama and
# Qwen2.5-VL's Qwen2 name them alike (model.language_model.layers.N.self_attn.q_proj, ...).
LM_LINEARS = r"model\.language_model\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def unquantized(model) -> list[str]:
    """What QLoRA keeps 16-bit, found from the model's structure as train.py finds it
    (`recipes.common.quantization.unquantized_modules`): the vision tower, the bridge and the LM head."""
    from recipes.common.peft_setup import find_components

    parts = find_components(model)
    return [*parts.vision, *parts.bridge, parts.output]


class Llava15:
    """`--model llava` (the default): LLaVA-1.5-7B, CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B."""

    name, tiny = "llava", "tiny:llava"
    image_tokens = "576 per image; 64 at --size tiny"
    bridge = "projector"

    @staticmethod
    def model_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def image_size(self, size):
        return real_configs.llava_1_5_7b().vision_config.image_size if size == "real" else None

    def real_config(self, processor):
        """The real config, and the tiny processor made to write and fill its image tokens."""
        config = real_configs.llava_1_5_7b()
        # The tiny tokenizer's `<image>` id (inside the real vocabulary): the model finds the image positions
        # by it.
        config.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        # 336 px in patches of 14: the processor expands `<image>` into the 576 tokens the model fills.
        processor.patch_size = config.vision_config.patch_size
        resize_image_processor(processor.image_processor, config.vision_config.image_size)
        return config

    def flop_chains(self, model, batch, tokens: int):
        config = model.config
        n_images = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        positions = vision_positions(config.vision_config)
        # The whole tower runs (LLaVA reads layer -2, the last layer is computed all the same); the projector
        # and LM see the patches alone ("default" feature strategy: no class token).
        return [[Part("vision", ("model.vision_tower",), n_images * positions),
                 Part("bridge", ("model.multi_modal_projector",), n_images * (positions - 1)),
                 Part("language", ("model.language_model", "lm_head"), tokens)]]


class Qwen2_5_VL:
    """`--model qwen2_5_vl`: Qwen2.5-VL-7B-Instruct, a window-attention ViT over images at their own
    resolution, its 2 x 2 patch merger, Qwen2.5-7B.

    Qwen's processor sizes each image to a multiple of 28 px (patch 14, merged 2 x 2) between min_pixels and
    max_pixels, so the image tokens follow the image. The bench's images are 448 x 448 px: 32 x 32 patches,
    256 LM tokens per image (a 640 x 480 px photo gives 391 at the checkpoint's settings; LLaVA-1.5 gives
    576 for any image).
    """

    name, tiny = "qwen2_5_vl", "tiny:qwen2_5_vl"
    image_tokens = "256 per 448 x 448 px image; 16 at --size tiny (64 x 64 px)"
    bridge = "patch merger"
    REAL_SIDE = 448

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def image_size(self, size):
        from recipes.common.tiny.models import IMAGE_SIZE

        return self.REAL_SIDE if size == "real" else IMAGE_SIZE

    def real_config(self, processor):
        """The real config, and the tiny processor made to cut images into its patches."""
        config = real_configs.qwen2_5_vl_7b()
        # The tiny tokenizer's ids (inside the real vocabulary): the model finds the images by them.
        ids = processor.tokenizer.convert_tokens_to_ids
        config.image_token_id, config.video_token_id = ids("<|image_pad|>"), ids("<|video_pad|>")
        config.vision_start_token_id = ids("<|vision_start|>")
        config.vision_end_token_id = ids("<|vision_end|>")
        v, old = config.vision_config, processor.image_processor
        # min_pixels 3136 and max_pixels 12845056: the checkpoint's preprocessor_config.json
        processor.image_processor = type(old)(
            size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size, image_mean=old.image_mean, image_std=old.image_std)
        return config

    def flop_chains(self, model, batch, tokens: int):
        merge = model.config.vision_config.spatial_merge_size
        # t x h x w patches per image; the merger's MLP runs once per 2 x 2 of them
        patches = int(batch["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in batch else 0
        return [[Part("vision", ("model.visual.patch_embed", "model.visual.blocks"), patches),
                 Part("bridge", ("model.visual.merger",), patches // merge**2),
                 Part("language", ("model.language_model", "lm_head"), tokens)]]


CHAT_MODELS = {m.name: m for m in (Llava15, Qwen2_5_VL)}


class ChatAdapter(Adapter):
    """What the two chat recipes share: the model (the recipe's tiny one of the architecture, or its real
    dims: LLaVA-1.5-7B or Qwen2.5-VL-7B-Instruct), the chat samples filled to the length budget
    (bench.data.fill_conversations), the collator and the FLOP chain."""

    real_batch_size = 8  # the benchmark shape's micro-batch

    def __init__(self, model: str = "llava"):
        super().__init__()
        self.chat = CHAT_MODELS[model]()

    @property
    def tiny_argv(self):
        return ("--model_name_or_path", self.chat.tiny)

    @property
    def tokens_counted(self):
        return (f"LM positions but padding: the image tokens ({self.chat.image_tokens}), the chat template, "
                "questions and answers")

    @property
    def arg_types(self):
        from recipes.common.chat import ChatBatchArguments

        extra = self.train.InstructArguments if self.name == "llava_instruct" else self.train.VqaArguments
        return (ModelArguments, DataArguments, PeftArguments, FreezeArguments, LearningRateArguments,
                LossArguments, GenerationEvalArguments, extra, ChatBatchArguments, TrainingArguments)

    def image_size(self, size):
        return self.chat.image_size(size)

    def skip_quantization(self, path: str, m: ModelArguments) -> list[str] | None:
        """skip_quantization of the recipe's loader at --size tiny (train.py passes none)."""
        return None

    def _model(self, a, size, device, dtype=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        m = a.ModelArguments
        if size == "tiny":
            path = resolve_model_path(m.model_name_or_path)
            return load_model_and_processor(AutoModelForImageTextToText, path, m,
                                            skip_quantization=self.skip_quantization(path, m))
        processor = AutoProcessor.from_pretrained(resolve_model_path(self.chat.tiny))
        config = self.chat.real_config(processor)
        model = on_device(self.chat.model_class(), config, m, device, dtype)
        processor.tokenizer.model_max_length = config.text_config.max_position_embeddings
        return model, processor

    def build(self, a, size, device):
        from recipes.common.chat import chat_encoder

        model, processor = self._model(a, size, device)
        self.encoder = chat_encoder(processor)  # dataset() renders conversations with it, as train.py does
        return model, processor.tokenizer, processor.image_processor

    def setup(self, model, a):
        from recipes.common.peft_setup import apply_lora_and_freezing

        # As train.py (stage 2): LoRA on the LM; a trained projector / vision layers go to modules_to_save.
        return apply_lora_and_freezing(model, a.PeftArguments, a.FreezeArguments)

    def conversations(self, records, a):
        """The recipe's conversations of its training records."""
        raise NotImplementedError

    def dataset(self, records, tokenizer, model, a):
        from bench.data import fill_conversations
        from recipes.common.chat import tokenize_conversations

        max_length = a.DataArguments.max_length
        filled = fill_conversations(self.conversations(records, a), self.encoder, max_length)
        ds, _ = tokenize_conversations(filled, self.encoder, max_length)
        return ds

    def collator(self, tokenizer, image_processor, model, a):
        from recipes.common.chat import ChatCollator

        return ChatCollator(self.encoder, a.ChatBatchArguments.padding_free)

    def baseline_collator(self, tokenizer, image_processor, model, a):
        from recipes.common.chat import ChatCollator

        # right-padded, whatever the recipe's option
        return ChatCollator(self.encoder)

    def _baseline_lora(self, model, a):
        """LoRA on the LM's linears with PEFT's defaults (alpha 8, no dropout), the recipe's r, and in full
        what the recipe trains in full (the projector: the modules_to_save its set-up chose, setup() having
        run first)."""
        from peft import LoraConfig, get_peft_model

        if a.PeftArguments.peft_method != "lora":
            raise ValueError(f"the {self.name} baseline is LoRA; bench --peft_method "
                             f"{a.PeftArguments.peft_method} with --no-baseline.")
        return get_peft_model(model, LoraConfig(r=a.PeftArguments.lora_r, target_modules=LM_LINEARS,
                                                modules_to_save=a.PeftArguments.modules_to_save or None))

    def _sft_rows(self, records, a) -> list[dict]:
        """The recipe's samples (its conversations filled to the length budget and cut to the whole turns that
        fit, as dataset() makes them) as TRL's conversational rows: string contents, the image (if any) placed
        by TRL before the first user text."""
        from bench.data import fill_conversations
        from data_tools.images import load_image
        from recipes.common.chat import ROLES, ChatLengthReport, fit_conversation, record_images, to_messages

        max_length, rows = a.DataArguments.max_length, []
        for r in fill_conversations(self.conversations(records, a), self.encoder, max_length):
            paths = record_images(r)
            enc = self.encoder.encode(to_messages(r["conversations"], n_images=len(paths)),
                                      [load_image(p) for p in paths])
            fitted = fit_conversation(enc, max_length, ChatLengthReport())
            if fitted is None:
                continue
            # each kept answer (with its end of turn) is one run of labels
            labels = fitted[2]
            kept = sum(1 for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100))
            turns = []
            for t in r["conversations"]:
                if kept == 0:
                    break
                turns.append(t)
                kept -= t["from"] == "gpt"
            rows.append({"images": [r["image"]] if r.get("image") else [],
                         "messages": [{"role": ROLES[t["from"]], "content": t["value"].replace(
                             IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")} for t in turns]})
        return rows

    def _sft_lora(self, a):
        from peft import LoraConfig

        return LoraConfig(r=a.PeftArguments.lora_r, target_modules=LM_LINEARS,
                          modules_to_save=a.PeftArguments.modules_to_save or None)

    def samples(self, batch):
        if "attention_mask" not in batch and "position_ids" in batch:
            # one packed row (--padding_free): its position_ids restart at each sample; summed on the
            # batch's device, without a host sync
            return (batch["position_ids"] == 0).sum()
        return batch["input_ids"].shape[0]  # text-only samples have no pixel_values

    def flop_chains(self, model, batch):
        return self.chat.flop_chains(model, batch, int(self.tokens(batch)))


class LlavaInstruct(ChatAdapter):
    name, task = "llava_instruct", "instruct"
    real_argv = ("--max_length", "832", "--unfreeze_last_n_vision_layers", "0")

    @property
    def tiny_argv(self):
        # Stage 2 as in the benchmark shape: the projector and LoRA on the LM train, the whole vision tower is
        # frozen (the recipe's config.yaml also trains the last vision layer it reads, for the tiny model).
        return (*super().tiny_argv, "--unfreeze_last_n_vision_layers", "0")

    @property
    def baseline_loaded_as(self):
        return (f"{self.chat.model_class().__name__} in bf16 on a GPU (float32 on the CPU) + "
                "get_peft_model(LoraConfig(r=lora_r, target_modules=the LM's "
                f"q/k/v/o/gate/up/down_proj, modules_to_save=[{self.chat.bridge}])): PEFT's defaults "
                "otherwise (alpha 8, no dropout); vision tower frozen")

    def conversations(self, records, a):
        return records  # instruct records are conversations already (stage 2)

    def trainer_class(self):
        return self.train.InstructTrainer

    def baseline(self, a, size, device):
        model, _ = self._model(a, size, device, dtype=user_dtype(device))
        return self._baseline_lora(model, a)

    @property
    def sft_loaded_as(self):
        return (f"trl.SFTTrainer on {self.chat.model_class().__name__} in bf16 on a GPU (float32 on the CPU) "
                "with its AutoProcessor and chat template, rows {images, messages} (TRL's default for "
                "them: loss on every non-pad token, image tokens included), "
                "peft_config=LoraConfig(r=lora_r, target_modules=the LM's q/k/v/o/gate/up/down_proj, "
                f"modules_to_save=[{self.chat.bridge}])")

    def sft(self, a, size, device, records):
        model, processor = self._model(a, size, device, dtype=user_dtype(device))
        return SftBaseline(model, processor, self._sft_rows(records, a), self._sft_lora(a))


class QloraVqa(ChatAdapter):
    name, task = "qlora_vqa", "vqa"
    real_argv = ("--max_length", "832")

    @property
    def baseline_loaded_as(self):
        return (f"plain QLoRA: the same 4-bit {self.chat.model_class().__name__} (NF4, double quant, the "
                "LM's linears only), peft's prepare_model_for_kbit_training (every other weight to "
                "float32, checkpointing with the input-gradient hook) + "
                "get_peft_model(LoraConfig(r=lora_r, target_modules=the LM's "
                f"q/k/v/o/gate/up/down_proj, modules_to_save=[{self.chat.bridge}])): PEFT's defaults "
                "otherwise (alpha 8, no dropout)")

    def skip_quantization(self, path, m):
        from transformers import AutoModelForImageTextToText

        from recipes.common.quantization import unquantized_modules

        # as train.py: the vision tower, bridge and LM head stay 16-bit
        return unquantized_modules(AutoModelForImageTextToText, path, m)

    def parse(self, argv):
        from recipes.common.quantization import fall_back_to_cpu_optimizer

        a = super().parse(argv)
        fall_back_to_cpu_optimizer(a.TrainingArguments)  # as train.py: paged 8-bit AdamW needs CUDA
        return a

    def _model(self, a, size, device, dtype=None):
        model, processor = super()._model(a, size, device, dtype)
        m = a.ModelArguments
        # At --size real the weights are random and in memory: quantize them as from_pretrained quantizes a
        # checkpoint, the same modules left 16-bit. The meta device has no values to quantize: its LM stays
        # nn.Linear, of the same shapes (FLOPs, what trains).
        if size == "real" and device != "meta" and (m.load_in_4bit or m.load_in_8bit):
            model = load_quantized(model, m, unquantized(model), device)
            if device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()  # the 16-bit copy's blocks are not the training's reserved memory
        return model, processor

    def setup(self, model, a):
        from recipes.common.quantization import prepare_quantized_for_training

        model = super().setup(model, a)
        prepare_quantized_for_training(model)  # as train.py: only what trains goes to float32
        return model

    def conversations(self, records, a):
        return self.train.vqa_conversations(records, a.VqaArguments.answer_prompt)

    def trainer_class(self):
        return self.train.VqaTrainer

    def baseline(self, a, size, device):
        from peft import prepare_model_for_kbit_training

        model, _ = self._model(a, size, device)
        return self._baseline_lora(prepare_model_for_kbit_training(model), a)

    @property
    def sft_loaded_as(self):
        return (f"trl.SFTTrainer on the same 4-bit {self.chat.model_class().__name__} (NF4, double quant, "
                "the LM's linears only) with its AutoProcessor and chat template, rows {images, messages} "
                "(TRL's default: loss on every non-pad token, image tokens included), "
                "peft_config=LoraConfig(r=lora_r, target_modules=the LM's q/k/v/o/gate/up/down_proj, "
                f"modules_to_save=[{self.chat.bridge}]); TRL casts the LoRA weights to bf16")

    def sft(self, a, size, device, records):
        model, processor = self._model(a, size, device)
        return SftBaseline(model, processor, self._sft_rows(records, a), self._sft_lora(a))


ADAPTERS = {a.name: a for a in (Blip2LoraCaption, ClipRetrieval, SoftPromptCaption, LlavaInstruct, QloraVqa)}
