"""Trained runs as servable models: what a run folder is, how it loads, and how a batch of requests becomes
`generate` inputs.

A folder is recognised by what it holds, so a training output_dir, a checkpoint-N in it and a merged or
exported checkpoint all load:
- `index.json` (written by recipes/clip_retrieval/embed.py): retrieval over that index, with the model it
  names (a clip_retrieval run, SigLIP included);
- `trained.safetensors`, or a config of model_type `soft-prompt-captioner`: a soft_prompt_caption run
  (or its export.py folder);
- otherwise an image-text-to-text model (a peft adapter on its base, or a full checkpoint) loaded through
  `AutoModelForImageTextToText`: a chat model when its processor has a chat template (llava_instruct,
  qlora_vqa and every family those recipes take), a captioner when it has none (BLIP-2).

Adapter runs on the same base share one copy of the base: the first is loaded with the recipes' own
`load_trained_run` (a QLoRA run's base quantized as in training), the others are added to it with peft's
`load_adapter` and chosen per batch with `set_adapter`.

Generation inputs are built by the recipes' own eval collators (`CaptionPromptCollator`,
`ChatPromptCollator`) and decode options (`generate_kwargs`), so a greedy answer is the one the recipe's
evaluation writes to its predictions file for the same image and prompt.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_tools.images import load_image
from recipes.common.args import GenerationEvalArguments
from recipes.common.captions import CaptionPromptCollator
from recipes.common.chat import (
    ChatEncoder,
    ChatPromptCollator,
    ChatTemplateError,
    PrefixSuffixEncoder,
    chat_encoder,
    to_messages,
)
from recipes.common.merge import (
    adapter_base,
    check_final_model,
    evaluated_precision,
    is_adapter_run,
    load_run,
    load_trained_run,
    trained_with,
    with_adapter,
)
from recipes.common.models import answer_text, load_processor, resolve_model_path, text_reserved
from recipes.common.quantization import QUANTIZATION_FILE
from recipes.common.trainer import generate_kwargs, stop_token_ids
from recipes.soft_prompt_caption.modeling import MODEL_TYPE as SOFT_PROMPT_MODEL_TYPE
from recipes.soft_prompt_caption.modeling import TRAINED_WEIGHTS as SOFT_PROMPT_WEIGHTS

RETRIEVAL_TYPES = ("clip", "siglip", "siglip2")  # dual encoders: served as an embed.py index, not as a run


class RunLoadError(ValueError):
    """A RUN_DIR that cannot be served: the message says what the folder lacks."""


@dataclass
class GenerativeRun:
    """A captioner or chat run: its model (possibly shared with other adapters), processors and collator."""

    id: str
    path: Path
    task: str  # "caption" or "chat"
    model: object
    tokenizer: object
    image_processor: object
    adapter: str | None = None  # the peft adapter to activate; None: the model as loaded
    encoder: ChatEncoder | None = None  # chat runs
    prefix_ids: tuple[int, ...] = ()  # captioners: image placeholder tokens before the prompt (BLIP-2)
    extra_positions: int = 0  # positions before the ids, as embeddings (the soft prompt and image vectors)
    trained_prompt: str | None = None  # captioners: the --prompt the run trained with (run.json)
    mixable: bool = False  # its adapter can share a batch with other adapters on the model (see load_runs)
    autocast: torch.dtype | None = None  # a --bf16 / --fp16 run's evaluation generated under it
    answer_prompt: str | None = None  # qlora_vqa's --answer_prompt: added after a question, as it trained
    lock: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time on a shared model
    # A fast tokenizer sets its padding on the object for each call: a batch padded in one thread while a
    # prompt is counted in another could come out unpadded.
    tokenizing: threading.Lock = field(default_factory=threading.Lock)
    longest_token: int = field(init=False)  # see least_positions

    def __post_init__(self):
        # The most characters one token decodes to, +1 for a SentencePiece word's leading space the single
        # token's decoding drops. Measured at load: the check it serves must not wait for a worker.
        ids = [[i] for i in range(len(self.tokenizer))]
        self.longest_token = 1 + max(map(len, self.tokenizer.batch_decode(ids)), default=0)

    @functools.cached_property
    def special_text(self) -> tuple[str, ...]:
        """The run's --special_text: its answers keep them."""
        return tuple(trained_with(self.path, "special_text") or ())

    def answer_text(self, ids: list[int]) -> str:
        return answer_text(self.tokenizer, ids, self.special_text)

    def least_positions(self, texts: list[str]) -> int:
        """A lower bound of the positions `texts` take, counted without rendering or tokenizing them: a
        conversation far over the context length is refused before its (costly) rendering."""
        return sum(len(text.strip()) for text in texts) // self.longest_token

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(self, items: list[dict], prompt: str | None = None) -> dict:
        """`generate` inputs (+ "keys") for items {"key", "image": path or None, "conversations"}, as the
        recipe's evaluation builds them; captioners take one `prompt` for the whole batch."""
        if self.task == "caption":
            collator = CaptionPromptCollator(self.image_processor, self.tokenizer, prompt, self.prefix_ids)
        else:
            collator = ChatPromptCollator(self.encoder)
        with self.tokenizing:
            return collator(items)

    def generate_kwargs(self, max_new_tokens: int, temperature: float | None, top_p: float | None) -> dict:
        """The recipes' decode options: greedy unless a temperature above 0 asks for sampling."""
        sample = bool(temperature)
        args = GenerationEvalArguments(max_new_tokens=max_new_tokens, do_sample=sample,
                                       temperature=temperature if sample else None,
                                       top_p=top_p if sample else None)
        return generate_kwargs(args, self.tokenizer.pad_token_id, stop_token_ids(self.model, self.tokenizer))

    def batch_group(self, has_image: bool) -> tuple:
        """Requests whose runs give the same group can be generated in one call: one run's, or for mixable
        adapters those of every run on the model whose processor prepares inputs alike (with or without
        an image: an adapter on the vision tower needs one image per request of the batch)."""
        if not self.mixable:
            return ("run", self.id)
        return ("model", id(self.model), self._inputs_signature, self.autocast, has_image)

    @functools.cached_property
    def _inputs_signature(self) -> tuple:
        template = self.encoder.processor.chat_template if self.encoder is not None else None
        return (template, len(self.tokenizer), self.image_processor.to_json_string(), self.prefix_ids)

    def prompt_positions(self, item: dict, prompt: str | None = None) -> int:
        """Positions the prompt of `item` takes in the language model (image tokens and any soft prefix
        included); ValueError when the chat template cannot render the conversation."""
        if self.encoder is not None:
            images = [] if item.get("image") is None else [load_image(item["image"])]
            messages = to_messages(item["conversations"], n_images=len(images))
            with self.tokenizing:
                return len(self.encoder.encode_prompt(messages, images))
        with self.tokenizing:
            ids = self.tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
        return self.extra_positions + len(self.prefix_ids) + len(ids)

    @functools.cached_property
    def reserved(self) -> tuple[str, ...]:
        """The strings its tokenizer reads as special tokens (but the run's --special_text): not to be taken
        as a request's text."""
        if self.encoder is not None:
            return self.encoder.reserved
        return text_reserved(self.tokenizer, trained_with(self.path, "special_text"))

    @property
    def needs_image(self) -> bool:
        """A captioner, or a chat model that takes no text-only input (PaliGemma's prefix + suffix)."""
        return self.task == "caption" or isinstance(self.encoder, PrefixSuffixEncoder)

    @property
    def max_positions(self) -> int | None:
        """The language model's context length, where it has one."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)


@dataclass
class SearchRun:
    """A retrieval index (embed.py's folder) and the dual encoder that made it."""

    id: str
    path: Path
    model: object
    processor: object
    collator: object
    images: list[str]  # the files, for /v1/gallery
    keys: list[str]  # what clients see of them: their paths under the image root
    texts: list[str]
    image_bank: np.ndarray
    text_bank: np.ndarray
    max_length: int | None = None  # a query's tokens: the index's captions were cut there
    special_text: list[str] | None = None  # the run's --special_text: the index's captions may hold them
    task: str = "retrieval"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @functools.cached_property
    def reserved(self) -> tuple[str, ...]:
        """The strings its tokenizer reads as special tokens (but the run's --special_text): not to be taken
        as a query's text."""
        return text_reserved(self.processor.tokenizer, self.special_text)

    def search_text(self, text: str, k: int) -> list[dict]:
        from recipes.clip_retrieval.embed import encode_texts
        from recipes.clip_retrieval.search import top_k

        with self.lock, torch.inference_mode():
            q = encode_texts(self.model, self.processor, self.collator, [text], max_length=self.max_length)[0]
        return [{"rank": r + 1, "score": s, "image": self.keys[i], "index": i}
                for r, (i, s) in enumerate(top_k(q, self.image_bank, k))]

    def search_image(self, path: str, k: int) -> list[dict]:
        from recipes.clip_retrieval.search import top_k
        from recipes.clip_retrieval.trainer import embed_images

        with self.lock, torch.inference_mode():
            q = embed_images(self.model, self.collator, [path], 1, "cpu")[0]
        return [{"rank": r + 1, "score": s, "text": self.texts[i], "index": i}
                for r, (i, s) in enumerate(top_k(q, self.text_bank, k))]


def run_id(path: Path) -> str:
    """The id clients name a run by: its folder's name (checkpoint-N: `<run>/checkpoint-N`)."""
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def _config(path: Path) -> dict:
    f = path / "config.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _base_config(path: Path) -> dict:
    """The config of adapter run `path`'s base; {} where it cannot be read (the loader then says why)."""
    from transformers import PretrainedConfig

    try:
        base, revision = adapter_base(path)
        return PretrainedConfig.get_config_dict(resolve_model_path(base), revision=revision)[0]
    except (OSError, ValueError):
        return {}


def _load_search(path: Path, rid: str) -> SearchRun:
    from recipes.clip_retrieval.embed import load

    index = json.loads((path / "index.json").read_text(encoding="utf-8"))
    clip, processor, collator = load(index["model"], "cpu")
    image_bank, text_bank = np.load(path / "images.npy"), np.load(path / "texts.npy")
    if image_bank.shape[0] != len(index["images"]) or text_bank.shape[0] != len(index["texts"]):
        raise RunLoadError(f"{path}: images.npy/texts.npy do not match index.json's lists; re-run embed.py")
    # an index.json without image_root: its file's folder, the root embed.py defaults to
    root = Path(index.get("image_root") or Path(index["file"]).parent)
    images = [str(root / p) for p in index["images"]]  # root / an absolute path is that path
    return SearchRun(rid, path, clip, processor, collator, images, [gallery_key(p, root) for p in images],
                     index["texts"], image_bank, text_bank, max_length=index.get("max_length"),
                     special_text=index.get("special_text"))


def gallery_key(image: str, root: Path) -> str:
    """How clients see gallery image `image`: its path under the image root, else (a symlinked folder that
    leads elsewhere) its file name; never the server's own path."""
    try:
        return Path(image).relative_to(root).as_posix()
    except ValueError:
        return Path(image).name


def _load_soft_prompt(path: Path, rid: str) -> GenerativeRun:
    from transformers import AutoImageProcessor, AutoTokenizer

    from recipes.soft_prompt_caption.modeling import SoftPromptCaptioner

    if (path / SOFT_PROMPT_WEIGHTS).is_file():  # the frozen bases in the dtype its evaluation ran in
        model = SoftPromptCaptioner.from_trained(path, dtype=getattr(torch, evaluated_precision(path)[0]))
    else:
        model = SoftPromptCaptioner.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # as training set it: GPT-2 has none
        tokenizer.pad_token = tokenizer.eos_token
    return GenerativeRun(rid, path, "caption", model.eval(), tokenizer,
                         AutoImageProcessor.from_pretrained(path), extra_positions=model.config.prefix_length,
                         trained_prompt=trained_with(path, "prompt"), autocast=evaluated_precision(path)[1])


def _image_text_run(path: Path, rid: str, model, processor, adapter: str | None) -> GenerativeRun:
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    try:
        # its chat template, or its prefix + suffix (PaliGemma); texts may hold what training's could
        encoder = chat_encoder(processor, trained_with(path, "special_text"))
    except ChatTemplateError:
        encoder = None
    autocast = evaluated_precision(path)[1]
    if encoder is not None:
        return GenerativeRun(rid, path, "chat", model, tokenizer, image_processor, adapter, encoder=encoder,
                             autocast=autocast, answer_prompt=trained_with(path, "answer_prompt"))
    config = model.config
    if getattr(config, "num_query_tokens", None) is None or getattr(config, "image_token_id", None) is None:
        raise RunLoadError(f"{path}: {config.model_type} has neither a chat template nor BLIP-2's query "
                           "tokens; give its processor a chat template (chat_template.json)")
    prefix = (config.image_token_id,) * config.num_query_tokens  # as blip2_lora_caption/train.py
    return GenerativeRun(rid, path, "caption", model, tokenizer, image_processor, adapter, prefix_ids=prefix,
                         trained_prompt=trained_with(path, "prompt"), autocast=autocast)


def load_runs(paths: list[str | Path]) -> dict[str, GenerativeRun | SearchRun]:
    """{id: run} for the RUN_DIRs; adapter runs on the same base share the base's weights."""
    from transformers import AutoModelForImageTextToText

    runs: dict[str, GenerativeRun | SearchRun] = {}
    # (base path, revision, quantization, dtype) -> the PeftModel with its adapters
    shared: dict[tuple, object] = {}
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise RunLoadError(f"{path}: no such folder; give a training output_dir, a checkpoint-N, a "
                               "merged checkpoint or an embed.py index folder")
        check_final_model(path)  # a run resumed and stopped: its folder's model is not its newest weights
        rid = run_id(path)
        if rid in runs:
            raise RunLoadError(f"{path}: a second run named {rid!r}; serve runs whose folders have different "
                               "names")
        config = _config(path)
        if (path / "index.json").is_file():
            runs[rid] = _load_search(path, rid)
        elif (path / SOFT_PROMPT_WEIGHTS).is_file() or config.get("model_type") == SOFT_PROMPT_MODEL_TYPE:
            runs[rid] = _load_soft_prompt(path, rid)
        elif config.get("model_type") in RETRIEVAL_TYPES or (  # a LoRA run: its base's config says
                is_adapter_run(path) and _base_config(path).get("model_type") in RETRIEVAL_TYPES):
            raise RunLoadError(f"{path}: a retrieval run; serve an index of it instead: python "
                               f"recipes/clip_retrieval/embed.py --model {path} --file IMAGES.jsonl "
                               "--out INDEX, then python -m serve INDEX")
        elif is_adapter_run(path):
            # a QLoRA run's base is quantized as in training; it is shared only with runs quantized alike
            quantization = path / QUANTIZATION_FILE
            base_path, revision = adapter_base(path)
            dtype = evaluated_precision(path)[0]  # as its evaluation ran: it answers as it scored
            base = (str(Path(base_path).resolve()), revision,
                    quantization.read_text() if quantization.is_file() else None, dtype)
            if base in shared:
                # a name of our own, not the run id: a run named "default" would replace the first run's
                # adapter, and peft refuses a name with a dot (outputs/v1.2)
                model = shared[base]
                adapter = f"adapter_{len(model.peft_config)}"
                with_adapter(model, path, adapter)
                processor = load_processor(path, model.config.model_type)
            else:  # loaded as it trained (a QLoRA base quantized), its adapter named "default"
                (model, processor) = load_trained_run(path, AutoModelForImageTextToText, dtype)
                adapter = "default"
                shared[base] = model
            runs[rid] = _image_text_run(path, rid, model, processor, adapter)
        elif config:
            model, processor = load_run(path, AutoModelForImageTextToText, evaluated_precision(path)[0])
            runs[rid] = _image_text_run(path, rid, model, processor, None)
        else:
            raise RunLoadError(f"{path}: no adapter_config.json, config.json, trained.safetensors or "
                               "index.json; give a training output_dir, a checkpoint-N, a merged checkpoint "
                               "or an embed.py index folder")
    # runs sharing a model share its lock, so that one batch at a time sets the adapter and generates
    locks: dict[int, threading.Lock] = {}
    for run in runs.values():
        run.lock = locks.setdefault(id(run.model), run.lock)
        # peft mixes adapters in one batch (generate(adapter_names=...)) only for LoRA layers; a trained full
        # copy of another module (modules_to_save: a projector, a Q-Former) or a DoRA adapter anywhere on the
        # model rules it out
        if isinstance(run, GenerativeRun) and run.adapter is not None:
            run.mixable = not any(c.modules_to_save or c.use_dora for c in run.model.peft_config.values())
    return runs

