"""LoRA, freezing and per-module learning rates by component, found from the model's structure: "vision"
(the image encoder), "bridge" (what feeds it to the LM), "language" (the LM; CLIP: the text tower) and
"other" (CLIP's logit_scale)."""

import logging
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from .args import FreezeArguments, LearningRateArguments, PeftArguments, did_you_mean

COMPONENTS = ("vision", "bridge", "language")

# Families whose projector lives inside the vision tower (Qwen's patch mergers map to the LM's width).
BRIDGE_INSIDE_VISION = {"qwen2_vl": ("merger",), "qwen2_5_vl": ("merger",),
                        "qwen3_vl": ("merger", "deepstack_merger_list")}
# A dual encoder's projection heads belong to their towers; its temperature and bias are "other".
TOWER_HEADS = {"visual_projection": "vision", "text_projection": "language"}

PEFT_PREFIX = "base_model.model."
logger = logging.getLogger(__name__)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Components:
    """Module-name prefixes (base-model names) of a model's vision tower, bridge and language model."""

    vision: tuple[str, ...]
    bridge: tuple[str, ...]
    language: tuple[str, ...]
    output: str | None  # the LM head of a generative model (None: a dual encoder)

    def of(self, name: str) -> str:
        """'vision', 'bridge', 'language' or 'other' for a parameter or module name (peft's names too)."""
        name = name.removeprefix(PEFT_PREFIX)
        for component in ("bridge", "vision", "language"):  # a bridge may sit inside the vision tower
            if any(_has_prefix(name, p) for p in getattr(self, component)):
                return component
        return "other"


def find_components(model: torch.nn.Module) -> Components:
    """The submodule built from `config.vision_config` is the vision tower, the one built from
    `config.text_config` (with the output embeddings) the LM, the rest the bridge (generative models) or
    "other" (dual encoders, TOWER_HEADS aside)."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None:
        raise ValueError(f"{type(base).__name__} has no transformers config: its components cannot be found.")
    sub = {"vision": getattr(config, "vision_config", None), "language": getattr(config, "text_config", None)}
    found = {"vision": [], "language": []}
    modules = dict(base.named_modules())
    for name, module in modules.items():
        if not name or any(_has_prefix(name, p) for p in found["vision"] + found["language"]):
            continue
        for component, sub_config in sub.items():
            if sub_config is not None and getattr(module, "config", None) is sub_config:
                found[component].append(name)
    if not found["vision"] or not found["language"]:
        raise ValueError(f"{type(base).__name__} (model_type={config.model_type!r}): no submodule built from "
                         "its config.vision_config and config.text_config, so its vision tower and language "
                         "model cannot be told apart. The recipes train vision-language models with both "
                         "sub-configs.")
    output = getattr(base, "get_output_embeddings", lambda: None)()
    output_name = next((n for n, m in modules.items() if output is not None and m is output), None)
    if output_name is not None and not any(_has_prefix(output_name, p) for p in found["language"]):
        found["language"].append(output_name)
    leaves = BRIDGE_INSIDE_VISION.get(config.model_type, ())
    inside = [f"{v}.{leaf}" for v in found["vision"] for leaf in leaves]
    bridge = [n for n in inside if n in modules]
    rest = _outside(base, found["vision"] + found["language"])
    if output_name is None:  # a dual encoder
        for name in rest:
            if name in TOWER_HEADS:
                found[TOWER_HEADS[name]].append(name)
    else:
        bridge += rest
    return Components(tuple(found["vision"]), tuple(bridge), tuple(found["language"]), output_name)


def _outside(base: torch.nn.Module, taken: list[str]) -> list[str]:
    """The largest submodules and the parameters of `base` outside every prefix in `taken`."""
    out = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        out.extend(f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False))
        for n, child in module.named_children():
            full = f"{prefix}{n}"
            if full in taken:
                continue
            if any(t.startswith(full + ".") for t in taken):
                walk(full + ".", child)
            elif any(True for _ in child.parameters()):
                out.append(full)

    walk("", base)
    return out


def default_lora_targets(model: torch.nn.Module, components: tuple[str, ...] | None = None) -> str:
    """A regex (peft fullmatches it) of the default LoRA targets in `components` (default: a generative
    model's LM, both towers of a dual encoder): every linear layer of a generative LM but its head, the
    linear layers of an encoder's attention modules."""
    base = _base(model)
    parts = find_components(base)
    generative = parts.output is not None
    if components is None:
        components = ("language",) if generative else ("vision", "language")
    modules = dict(base.named_modules())
    targets = []
    for name, module in modules.items():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name == parts.output:
            continue
        component = parts.of(name)
        if component not in components:
            continue
        parent = modules[name.rsplit(".", 1)[0]] if "." in name else base
        if isinstance(parent, torch.nn.MultiheadAttention):
            continue  # torch's fused attention reads its projections' weights directly, past LoRA
        if (component == "language" and generative) or type(parent).__name__.endswith("Attention"):
            targets.append(name)
    if not targets:
        raise ValueError(f"no linear layer found for LoRA in {components} of {type(base).__name__}: set "
                         "lora_target_modules. Linear layer names in this model: "
                         f"{_linear_leaf_names(base)}.")
    # A compact regex (prefixes x leaf names) when it selects exactly these modules, else the names.
    prefixes = [p for c in components for p in getattr(parts, c) if any(_has_prefix(t, p) for t in targets)]
    leaves = list(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
    compact = (rf"(?:{'|'.join(re.escape(p) for p in prefixes)})\..*\."
               rf"(?:{'|'.join(re.escape(leaf) for leaf in leaves)})")
    if {n for n in modules if re.fullmatch(compact, n)} == set(targets):
        return compact
    return "|".join(re.escape(t) for t in targets)


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    # bitsandbytes' linear layers subclass nn.Linear; GPT-2's are transformers' Conv1D, which LoRA wraps too.
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def check_targets(model: torch.nn.Module, targets, what: str = "lora_target_modules") -> None:
    """Refuse a target name (or regex) that matches no module: peft raises only when *no* target matches,
    so a typo next to a correct name would silently train less."""
    if targets is None or targets == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules() if name]
    linear_leaves = _linear_leaf_names(model)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in module_names):
            raise ValueError(f"{what}: the regex {targets!r} matches no module name (it must match the full "
                             "dotted name, e.g. '.*language_model.*\\.q_proj'). Linear layer names in this "
                             f"model: {linear_leaves}.")
        return
    for target in targets:
        # peft's rule for a list entry: the full name equals it or ends with "." + it.
        if not any(name == target or name.endswith("." + target) for name in module_names):
            hint = did_you_mean(target, linear_leaves, cutoff=0.5)
            raise ValueError(f"{what}: {target!r} matches no module.{hint} Linear layer names in this model: "
                             f"{linear_leaves}.")


def apply_peft(model: torch.nn.Module, peft_args: PeftArguments, components: tuple[str, ...] | None = None,
               revision: str | None = None) -> torch.nn.Module:
    """`model` with LoRA as `peft_args` says; `components` picks where the default targets go (("vision",):
    CLIP's image tower only). `revision` goes into the adapter config: merge, export and serve load the base
    at it."""
    if peft_args.peft_method == "none":
        return model
    targets = peft_args.lora_target_modules
    if targets is None:
        targets = default_lora_targets(model, components)
    check_targets(model, targets)
    check_targets(model, peft_args.modules_to_save, what="modules_to_save")
    return get_peft_model(model, LoraConfig(
        r=peft_args.lora_r, lora_alpha=peft_args.lora_alpha, lora_dropout=peft_args.lora_dropout,
        target_modules=targets, modules_to_save=peft_args.modules_to_save, bias="none",
        use_dora=peft_args.use_dora, use_rslora=peft_args.use_rslora, revision=revision))


def _set_trainable(model: torch.nn.Module, names: set[str], trainable: bool) -> None:
    for name, param in model.named_parameters():
        if name not in names:
            continue
        if trainable:
            # peft keeps the original next to a modules_to_save copy: the original stays frozen.
            if ".original_module." in name:
                continue
            if not param.is_floating_point():
                raise ValueError(f"Cannot train {name}: its weights are quantized ({param.dtype}). Load the "
                                 "model without load_in_4bit/load_in_8bit, or keep this part frozen and "
                                 "train it through LoRA.")
            param.requires_grad_(True)
        elif ".lora_" not in name and ".modules_to_save." not in name:  # not an adapter weight
            param.requires_grad_(False)


def vision_layer_names(model: torch.nn.Module) -> list[str]:
    """The vision tower's layers whose output the model uses, in the order they run: its longest list of
    blocks, after it the other lists of the same block (Mllama's global encoder runs after its local one;
    Qwen3-VL's mergers are not blocks). Those after `vision_feature_layer` (-2 in LLaVA) get no gradient."""
    base = _base(model)
    parts = find_components(base)
    lists = [(name, m) for name, m in base.named_modules()
             if isinstance(m, torch.nn.ModuleList) and parts.of(name) == "vision" and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(base).__name__}: no list of layers in its vision tower {parts.vision}.")
    prefix, layers = max(lists, key=lambda item: len(item[1]))

    def block(layer):  # the layer's own class, also once peft wrapped it as a modules_to_save copy
        return type(getattr(layer, "original_module", layer))

    chained = [(name, m) for name, m in lists if block(m[0]) is block(layers[0])]  # in registration order
    n_used = len(layers)
    feature_layers = getattr(base.config, "vision_feature_layer", None)
    if feature_layers is not None and len(chained) == 1:
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k-1.
        n_used = max(k if k >= 0 else len(layers) + 1 + k for k in feature_layers)
        return [f"{prefix}.{i}" for i in range(n_used)]
    return [f"{name}.{i}" for name, m in chained for i in range(len(m))]


def last_vision_layers(model: torch.nn.Module, n: int) -> list[str]:
    """The last `n` of `vision_layer_names`; an error when the tower uses fewer."""
    used = vision_layer_names(model)
    if n > len(used):
        raise ValueError(f"unfreeze_last_n_vision_layers={n}, but the vision tower uses only {len(used)} "
                         "layers.")
    return used[-n:]


def apply_freezing(model: torch.nn.Module, freeze_args: FreezeArguments) -> None:
    """Set requires_grad per component as `freeze_args` says (None: as it is). Apply after `apply_peft`,
    which freezes every base weight."""
    parts = find_components(model)
    by_component = {c: set() for c in (*COMPONENTS, "other")}
    for name, _ in model.named_parameters():
        by_component[parts.of(name)].add(name)

    flags = {"vision": freeze_args.freeze_vision_tower, "bridge": freeze_args.freeze_bridge,
             "language": freeze_args.freeze_language_model}
    for component, freeze in flags.items():
        if freeze is not None:
            _set_trainable(model, by_component[component], trainable=not freeze)

    if freeze_args.freeze_vision_tower and freeze_args.unfreeze_last_n_vision_layers > 0:
        last = last_vision_layers(model, freeze_args.unfreeze_last_n_vision_layers)
        names = {name for name in by_component["vision"]
                 if any(_has_prefix(name.removeprefix(PEFT_PREFIX), layer) for layer in last)}
        _set_trainable(model, names, trainable=True)


RATE_FLAGS = {"vision": "vision_lr", "bridge": "bridge_lr", "language": "lm_lr"}


def check_learning_rates(model: torch.nn.Module, learning_rates: LearningRateArguments) -> list[str]:
    """Warn of (and return) the per-component rates of parts where nothing trains. Not an error: a recipe's
    config.yaml may set the rate of a part a command then freezes."""
    parts = find_components(model)
    trained = {parts.of(name) for name, p in model.named_parameters() if p.requires_grad}
    unused = [f"--{flag}" for c, flag in RATE_FLAGS.items()
              if getattr(learning_rates, flag) is not None and c not in trained]
    if unused:
        logger.warning("%s: nothing trains in that part of the model (frozen, no LoRA there), so the rate is "
                       "unused; unfreeze it (the --freeze_* flags) to train it", ", ".join(unused))
    return unused


def param_groups(model: torch.nn.Module, learning_rates: LearningRateArguments, base_lr: float,
                 weight_decay: float, decay: set[str]) -> list[dict]:
    """Optimizer groups of the trainable parameters, one per component and decay / no decay ("vision",
    "vision_no_decay", ...), at the component's rate; `decay`: the names that get weight decay."""
    parts = find_components(model)
    lrs = {c: getattr(learning_rates, flag) for c, flag in RATE_FLAGS.items()} | {"other": None}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = parts.of(name)
        decays = name in decay
        key = component if decays else f"{component}_no_decay"
        if key not in groups:
            lr = lrs[component] if lrs[component] is not None else base_lr
            groups[key] = {"name": key, "params": [], "lr": lr,
                           "weight_decay": weight_decay if decays else 0.0}
        groups[key]["params"].append(param)
    return list(groups.values())


def _numel(param: torch.nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit weights per byte of its storage dtype.
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.quant_storage.itemsize
    return param.numel()


@dataclass
class ParameterCounts:
    """Trainable and total parameter counts per component; str() gives a small table."""

    rows: dict[str, tuple[int, int]]  # component -> (trainable, total)

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.rows.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.rows.values())

    def __str__(self) -> str:
        lines = [f"{'component':<10} {'trainable':>14} {'total':>14} {'%':>7}"]
        for name, (t, n) in [*self.rows.items(), ("all", (self.trainable, self.total))]:
            lines.append(f"{name:<10} {t:>14,} {n:>14,} {100 * t / max(n, 1):>6.2f}%")
        return "\n".join(lines)


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    """Trainable / total parameters per component of the model as it computes: tied weights count once, a
    `modules_to_save` module as its trained copy alone."""
    parts = find_components(model)
    rows = {c: [0, 0] for c in (*COMPONENTS, "other")}
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        row = rows[parts.of(name)]
        row[1] += _numel(param)
        if param.requires_grad:
            row[0] += _numel(param)
    return ParameterCounts({c: (t, n) for c, (t, n) in rows.items()})


def trained_modules_to_save(model: torch.nn.Module, freeze_args: FreezeArguments) -> list[str]:
    """What `freeze_args` trains outside the LM, for `modules_to_save`: peft saves only the adapter and
    those, so a base weight merely unfrozen would be lost. Containers (Qwen3-VL's deepstack mergers) go in
    as their items, which peft can copy."""
    parts = find_components(model)
    modules = dict(_base(model).named_modules())

    def copies(prefixes):
        out = []
        for p in prefixes:
            if p not in modules:  # a parameter of the base model itself, which peft cannot save
                logger.warning("%s stays as loaded: under LoRA only modules train beside the adapter, and it "
                               "is a parameter (--peft_method none trains it)", p)
                continue
            container = isinstance(modules[p], (torch.nn.ModuleList, torch.nn.ModuleDict))
            out += [f"{p}.{child}" for child, _ in modules[p].named_children()] if container else [p]
        return out

    names = []
    if freeze_args.freeze_bridge is False:
        names += copies(parts.bridge)
    if freeze_args.freeze_vision_tower is False:
        names += copies(parts.vision)
    elif freeze_args.unfreeze_last_n_vision_layers > 0:
        names += last_vision_layers(model, freeze_args.unfreeze_last_n_vision_layers)
    return names


def apply_lora_and_freezing(model: torch.nn.Module, peft_args: PeftArguments, freeze_args: FreezeArguments,
                            revision: str | None = None) -> torch.nn.Module:
    """`apply_peft` then `apply_freezing`; under LoRA, what trains outside the adapter goes into
    `modules_to_save` so that the adapter and a merge hold it (the arguments are updated to match)."""
    if peft_args.peft_method != "none":
        if freeze_args.freeze_language_model is False:
            raise ValueError("freeze_language_model=false with LoRA: the language model trains through its "
                             "adapter, and its base weights would train without being saved. Use "
                             "--peft_method none to train it in full.")
        extra = trained_modules_to_save(model, freeze_args)
        peft_args.modules_to_save = sorted(set(peft_args.modules_to_save or []) | set(extra))
        if freeze_args.freeze_bridge is False:
            freeze_args.freeze_bridge = None  # peft has made exactly those copies trainable
    model = apply_peft(model, peft_args, revision=revision)
    apply_freezing(model, freeze_args)
    trainable_in_float32(model)
    return model


def trainable_in_float32(model: torch.nn.Module) -> int:
    """Cast the trainable parameters to float32 (a bf16 weight loses every update below 2^-8 of its value);
    frozen ones stay as loaded, autocast picks their matmul dtype. Returns how many tensors were cast."""
    cast = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not param.is_floating_point() or param.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise ValueError(f"{name} is quantized and cannot train; freeze it and train it through LoRA.")
        if param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast

