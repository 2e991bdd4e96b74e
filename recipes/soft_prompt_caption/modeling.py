"""The soft-prompt captioner: a frozen CLIP vision encoder and a frozen causal LM, joined by what is trained.

    [soft prompt: prompt_length vectors] + [projection(CLIP features): 1 pooled or all patch vectors] + [text
    embeddings]
        -> the frozen language model (GPT-2 by default) -> next-token loss on the caption tokens only

Only `soft_prompt` and `projection` train (plus LoRA on the LM when asked). The idea is prefix tuning
for captioning: ClipCap (Mokady et al., 2021, "ClipCap: CLIP Prefix for Image Captioning") maps CLIP
features to a prefix of a frozen GPT-2; prompt tuning (Lester et al., 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning") learns free prompt vectors in front of a frozen LM.

On disk, two forms:
- a training run (`save_trained`): `trained.safetensors` holds only what was trained, `config.json`
  the architecture plus where the frozen parts come from (`vision_model_name_or_path`,
  `language_model_name_or_path`). Kilobytes to a few MB; `SoftPromptCaptioner.from_trained(run)`
  rebuilds the model from the two bases.
- a full checkpoint (`export.py`, `save_pretrained`): every weight, loadable offline with
  `SoftPromptCaptioner.from_pretrained` (or `AutoModel` once this module is imported). As large as
  both bases together (about 850 MB in float32 for CLIP-B/32 + GPT-2: 88M + 124M weights), but needs
  neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from safetensors.torch import load_file, save
from torch import nn
from transformers import (CONFIG_MAPPING, AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec

from data_tools.files import atomic_write
from recipes.common.losses import label_positions_only
from recipes.common.models import loading

# Hyphens, not the recipe's folder name: scripts/new_recipe.py renames every mention of that in a copy.
MODEL_TYPE = "soft-prompt-captioner"
TRAINED_WEIGHTS = "trained.safetensors"
LORA_CONFIG = "adapter_config.json"
IGNORE_INDEX = -100


@strict
class SoftPromptCaptionerConfig(PreTrainedConfig):
    """Sub-configs of the vision encoder and the LM, and the shape of the trained parts."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    prompt_length: int = 10
    projection: Literal["linear", "mlp"] = "linear"
    vision_features: Literal["pooled", "patches"] = "pooled"
    # Where the frozen parts were loaded from: what `from_trained` loads them from again.
    vision_model_name_or_path: str | None = None
    language_model_name_or_path: str | None = None
    base_revision: str | None = None  # the --revision both were loaded at
    initializer_range: float = 0.02  # std of the soft prompt and projection at initialisation (GPT-2's value)
    tie_word_embeddings: bool = False  # the LM ties its own embeddings; nothing is tied across the parts

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}.")
        for name, allowed in (("projection", ("linear", "mlp")), ("vision_features", ("pooled", "patches"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")

    @property
    def num_vision_tokens(self) -> int:
        """Vectors the image contributes: 1 (pooled) or one per patch (the CLS token is left out)."""
        if self.vision_features == "pooled":
            return 1
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def prefix_length(self) -> int:
        """Positions in front of the text: soft prompt + image. The length budget counts them."""
        return self.prompt_length + self.num_vision_tokens


class SoftPromptCaptioner(PreTrainedModel):
    """Frozen vision encoder -> projection, learned soft prompt, frozen causal LM; `generate()` writes
    captions."""

    config_class = SoftPromptCaptionerConfig
    main_input_name = "pixel_values"
    base_model_prefix = ""
    _supports_sdpa = True  # the attention kernel is the sub-models' own
    _supports_flash_attn = True
    supports_gradient_checkpointing = True  # the sub-models' layers are checkpointed

    def __init__(self, config: SoftPromptCaptionerConfig, vision_model: PreTrainedModel | None = None,
                 language_model: PreTrainedModel | None = None):
        super().__init__(config)
        # Parts passed in (already loaded) are kept: post_init skips weights marked as loaded.
        self.vision_model = (vision_model if vision_model is not None
                             else AutoModel.from_config(config.vision_config))
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        d_vision = config.vision_config.hidden_size
        d_text = self.language_model.get_input_embeddings().embedding_dim
        if config.projection == "linear":
            self.projection = nn.Linear(d_vision, d_text)
        # LLaVA-1.5's "mlp2x_gelu" projector (Liu et al., 2023, "Improved Baselines with Visual Instruction
        # Tuning")
        else:
            self.projection = nn.Sequential(nn.Linear(d_vision, d_text), nn.GELU(), nn.Linear(d_text, d_text))
        self.soft_prompt = nn.Parameter(torch.empty(config.prompt_length, d_text))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)  # the projection's Linear layers: N(0, initializer_range), zero bias
        if module is self:
            init.normal_(self.soft_prompt, mean=0.0, std=self.config.initializer_range)

    # --- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, vision_model: str, language_model: str, *, dtype=None,
                   attn_implementation: str | None = None, revision: str | None = None,
                   **options) -> "SoftPromptCaptioner":
        """Load the frozen parts from two checkpoints (a full CLIP one is fine) and add fresh trained parts.

        `options` are config fields: prompt_length, projection, vision_features. The trained parts stay
        float32 whatever `dtype` the frozen parts are loaded in: they are what the optimizer updates.
        """
        kwargs = {k: v for k, v in dict(dtype=dtype, attn_implementation=attn_implementation,
                                        revision=revision).items() if v is not None}
        vision_config = AutoConfig.from_pretrained(vision_model, revision=revision)
        # A CLIP checkpoint holds both towers; its vision_config names the vision-only class.
        vision_config = getattr(vision_config, "vision_config", vision_config)
        vision = AutoModel._model_mapping[type(vision_config)].from_pretrained(vision_model, **kwargs)
        language = AutoModelForCausalLM.from_pretrained(language_model, **kwargs)
        return cls.from_models(vision, language, vision_model_name_or_path=str(vision_model),
                               language_model_name_or_path=str(language_model), base_revision=revision,
                               **options)

    @classmethod
    def from_models(cls, vision: PreTrainedModel, language: PreTrainedModel,
                    **options) -> "SoftPromptCaptioner":
        """The captioner around two models already built (loaded, or from configs as `bench/` does): both
        frozen, fresh trained parts in float32. `options` are config fields (prompt_length, ..., the
        *_name_or_path)."""
        # A new config resets its sub-configs' attention kernel unless told; keep the one each part was loaded
        # with.
        kernels = {"vision_config": vision.config._attn_implementation,
                   "text_config": language.config._attn_implementation}
        config = SoftPromptCaptionerConfig(vision_config=vision.config, text_config=language.config,
                                           attn_implementation=kernels, **options)
        model = cls(config, vision_model=vision, language_model=language)
        model.vision_model.requires_grad_(False)
        model.language_model.requires_grad_(False)
        model.projection.float()
        model.soft_prompt.data = model.soft_prompt.data.float()
        return model

    @classmethod
    def from_trained(cls, run: str | Path, *, vision_model: str | None = None,
                     language_model: str | None = None, dtype=None) -> "SoftPromptCaptioner":
        """A training run (or checkpoint-N) as a model: the frozen bases from the paths in its config.json,
        the trained weights from trained.safetensors, LoRA merged into the LM when the run used it.

        `vision_model` / `language_model` replace the recorded base paths (e.g. after moving them).
        """
        run = Path(run)
        if not (run / TRAINED_WEIGHTS).is_file():
            raise FileNotFoundError(f"{run}: no {TRAINED_WEIGHTS}; give the output_dir (or a checkpoint-N "
                                    "folder) of a soft_prompt_caption training run.")
        config = SoftPromptCaptionerConfig.from_pretrained(run)
        options = dict(prompt_length=config.prompt_length, projection=config.projection,
                       vision_features=config.vision_features)
        if config.base_revision is not None and bool(vision_model) != bool(language_model):
            # one revision loads both bases: the recorded one is of the recorded bases only
            raise ValueError(f"{run} trained on bases at revision {config.base_revision!r}: give both "
                             "--vision_model and --language_model (each where it is now), not one of them.")
        bases = (vision_model or config.vision_model_name_or_path,
                 language_model or config.language_model_name_or_path)
        try:
            with loading(*bases):  # a base that moved: one line naming it, not a traceback
                # the recorded revision is of the recorded bases, not of ones given instead
                revision = None if vision_model or language_model else config.base_revision
                model = cls.from_parts(*bases, dtype=dtype, revision=revision, **options)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. {run / 'config.json'} names the bases the run was trained on; if "
                                    "they moved, give where they are now (export.py --vision_model ... "
                                    "--language_model ...).") from None
        if (run / LORA_CONFIG).is_file():
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig.from_pretrained(run))
            load_trained(model, run)
            return model.merge_and_unload()
        load_trained(model, run)
        return model

    @torch.no_grad()
    def init_soft_prompt_from_text(self, tokenizer, text: str) -> None:
        """Start the soft prompt at the LM's embeddings of `text`, its tokens repeated to fill prompt_length.

        Initialising prompt vectors from vocabulary embeddings rather than at random is the start Lester et
        al. (2021, sec. 3.2) found better for prompt tuning; repeating a short text to the length is what
        peft's PromptTuningInit.TEXT does.
        """
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt_init_text {text!r} has no tokens: give some words, or leave it out for "
                             "N(0, 0.02).")
        ids = torch.tensor([ids[i % len(ids)] for i in range(self.config.prompt_length)], dtype=torch.long)
        embeddings = self.language_model.get_input_embeddings().weight
        self.soft_prompt.copy_(embeddings[ids.to(embeddings.device)].to(self.soft_prompt.dtype))

    # --- forward ------------------------------------------------------------------------------------------
    def get_output_embeddings(self) -> torch.nn.Module:
        """The language model's head: what makes this a generative model to the shared LoRA set-up."""
        return self.language_model.get_output_embeddings()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision vectors before the projection: [batch, num_vision_tokens, vision hidden size].

        A 3-D `pixel_values` is these vectors already, from the cache of a frozen tower
        (--cache_vision_features).
        """
        if pixel_values.dim() == 3:
            return pixel_values
        dtype = next(self.vision_model.parameters()).dtype
        out = self.vision_model(pixel_values=pixel_values.to(dtype))
        if self.config.vision_features == "pooled":
            return out.pooler_output.unsqueeze(1)
        # the patches; CLIP's CLS comes first
        hidden, n = out.last_hidden_state, self.config.num_vision_tokens
        if hidden.shape[1] < n:  # a tower that takes any size: the length budget counted n
            vision = self.config.vision_config
            raise ValueError(
                f"vision_features='patches': the vision encoder gave {hidden.shape[1]} vectors for "
                f"{pixel_values.shape[-2]} x {pixel_values.shape[-1]} px images, fewer than the {n} patches "
                f"of its config (image_size {vision.image_size} / patch_size {vision.patch_size}). Give the "
                "image processor the config's image size, or use vision_features='pooled'.")
        return hidden[:, -n:]

    def prefix_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[soft prompt, projected image] for each image: [batch, prefix_length, LM hidden size], in the LM's
        dtype."""
        features = self.image_features(pixel_values)
        vision = self.projection(features.to(next(self.projection.parameters()).dtype))
        prompt = self.soft_prompt.unsqueeze(0).expand(vision.shape[0], -1, -1).to(vision.dtype)
        lm_dtype = self.language_model.get_input_embeddings().weight.dtype
        return torch.cat([prompt, vision], dim=1).to(lm_dtype)

    def _inputs(self, pixel_values, input_ids, attention_mask):
        """Embeddings and attention mask of [prefix, text]; the prefix is always attended to."""
        prefix = self.prefix_embeddings(pixel_values)
        batch, n_prefix = prefix.shape[:2]
        if input_ids is None:
            input_ids = torch.zeros((batch, 0), dtype=torch.long, device=prefix.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.language_model.get_input_embeddings()(input_ids)
        mask = torch.cat([attention_mask.new_ones((batch, n_prefix)), attention_mask], dim=1)
        return torch.cat([prefix, text], dim=1), mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_on_label_positions: bool = False, **kwargs):
        """The LM's output over [prefix, text]. `input_ids`, `attention_mask` and `labels` cover the text
        only; labels get -100 over the prefix, so the first caption token is predicted from the last image
        vector.

        `loss_on_label_positions`: logits (flattened) and the same loss at the caption positions only
        (recipes/common/losses.py). `kwargs` reach the LM: `num_items_in_batch` from the Trainer (the count of
        labels that are not -100, which are exactly the targets here) keeps the loss right under gradient
        accumulation.
        """
        embeds, mask = self._inputs(pixel_values, input_ids, attention_mask)
        if labels is not None:
            n_prefix = embeds.shape[1] - labels.shape[1]
            labels = torch.cat([labels.new_full((labels.shape[0], n_prefix), IGNORE_INDEX), labels], dim=1)
            if loss_on_label_positions:
                kwargs.update(label_positions_only(labels))
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """Continue [prefix, prompt] with the LM's `generate` (greedy, beam, sampling: its kwargs).

        The LM generates from `inputs_embeds` and returns only the new tokens; the prompt ids are put
        back in front, so the result reads like any decoder's `generate` (and BLIP-2's): prompt + caption.
        """
        embeds, mask = self._inputs(pixel_values, input_ids, attention_mask)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        if input_ids is None:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out


# --- the trained parts on disk
# --------------------------------------------------------------------------------
def trained_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train (soft prompt, projection, LoRA), as `model` names them."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def saved_parameter_names(model: nn.Module) -> list[str]:
    """What trained.safetensors holds: the parameters that train, and the soft prompt and projection even when
    frozen (--freeze_bridge true): their random start is in no base, and a rebuild would draw another."""
    bases = ("vision_model.", "language_model.")
    return [name for name, p in model.named_parameters()
            if p.requires_grad or not name.removeprefix("base_model.model.").startswith(bases)]


def _base(model: nn.Module) -> SoftPromptCaptioner:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, SoftPromptCaptioner):
        raise TypeError(f"expected a SoftPromptCaptioner (or one wrapped by peft), got {type(base).__name__}")
    return base


def save_trained(model: nn.Module, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Write what trains and the soft prompt and projection to `folder`: trained.safetensors, config.json (+
    adapter_config.json with LoRA).

    `state_dict` is a full state dict gathered by the caller (FSDP, DeepSpeed); the trained entries are
    taken from it. Frozen weights are never written: they are the bases named in config.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not trained_parameter_names(model):
        raise ValueError("nothing in the model is trainable: there is nothing to save.")
    names = saved_parameter_names(model)
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    missing = [n for n in names if n not in source]
    if missing:
        raise KeyError(f"the state dict lacks trained parameters {missing[:5]}")
    # contiguous + clone: safetensors refuses views and tensors that share memory.
    tensors = {n: source[n].detach().to("cpu").contiguous().clone() for n in names}
    # A kill or a full disk mid-save must leave the previous weights, not a truncated file resume would read.
    with atomic_write(folder / TRAINED_WEIGHTS, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    _base(model).config.save_pretrained(folder)
    if hasattr(model, "peft_config"):
        model.peft_config["default"].save_pretrained(folder)
    return folder / TRAINED_WEIGHTS


def load_trained(model: nn.Module, folder: str | Path) -> None:
    """Load trained.safetensors into `model` (built the same way); every saved parameter must be in it."""
    path = Path(folder) / TRAINED_WEIGHTS
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    absent = sorted(set(saved_parameter_names(model)) - set(tensors))
    if unknown or absent:
        lora = f" and {LORA_CONFIG}" if (path.parent / LORA_CONFIG).exists() else ""
        raise ValueError(f"{path} does not fit this model: {len(unknown)} unknown tensor(s) {unknown[:3]}, "
                         f"{len(absent)} parameter(s) of the model not in the file {absent[:3]}. Build the "
                         f"model with the settings of the run (its config.json{lora}).")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(params[name].shape)}.")
            params[name].copy_(value)


def trained_sizes(model: nn.Module) -> str:
    """What trains, in one line: 'soft_prompt 10 x 768 + projection.weight 768 x 768 + projection.bias 768 = N
    parameters', with LoRA tensors summed into one term."""
    parts, lora = [], 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:
            lora += p.numel()
        else:
            parts.append(f"{name.removeprefix('base_model.model.')} {' x '.join(map(str, p.shape))}")
    if lora:
        parts.append(f"LoRA {lora:,}")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trained: {' + '.join(parts)} = {total:,} parameters"


# The first import registers: a copy of this recipe imported in the same process (recipes/<copy>/modeling.py)
# must not point the Auto classes at its own classes.
if MODEL_TYPE not in CONFIG_MAPPING:
    AutoConfig.register(MODEL_TYPE, SoftPromptCaptionerConfig)
    AutoModel.register(SoftPromptCaptionerConfig, SoftPromptCaptioner)
