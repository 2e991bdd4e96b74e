"""Chat-template conversations for LLaVA-style models: prompts, assistant-only labels, image-aware length
budget.

A conversation record (`data_tools` instruct schema: LLaVA `conversations`, or OpenAI `messages` that
`data_tools.records` normalises into them) becomes one training sample:

1. `to_messages`: turns -> chat messages whose content is a list of parts; the `<image>` placeholder
   becomes an image part where it stands (or leads the first user turn when the text has none);
2. `ChatEncoder.encode`: the processor's own chat template renders the conversation (never string
   concatenation, so a real checkpoint's template is used as is), the tokenizer tokenizes the whole
   text once, and the image placeholder is expanded to the processor's number of image tokens. The
   labels come from the template too: an assistant turn is the text that rendering the turn adds
   after rendering the conversation before it with the generation prompt. Tokens whose first
   character lies there are learned (the trailing whitespace that separates turns is not); system,
   user, image and padding tokens are -100. A template that renders no end-of-turn token (the
   llava-hf LLaVA-1.5 one) gets the tokenizer's eos after each answer, which is how LLaVA-1.5 was
   trained (its `conv_vicuna_v1` separator is `</s>`), so that the model learns to stop;
3. `fit_conversation`: a conversation over `max_length` (image tokens counted) is cut after the last
   whole assistant turn that fits, never inside the image tokens; when not even the first exchange
   (with the image) fits, it is dropped. `ChatLengthReport` counts every cut and drop.

Because the whole sequence is tokenized at once, input_ids equal what the processor itself gives for
the rendered text and image (no tokenization mismatch), and an image sample has exactly the image
tokens its features fill (no image-feature/token mismatch).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import datasets
import torch
from PIL import Image

from data_tools.images import load_image
from data_tools.records import IMAGE_TOKEN

from .lengths import IGNORE_INDEX, pad_batch

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class ChatTemplateError(ValueError):
    """The processor's chat template cannot be used to find the assistant turns."""


def to_messages(conversations: list[dict], has_image: bool) -> list[dict]:
    """LLaVA turns ({"from", "value"}) -> chat messages with content parts ({"type": "text"|"image"}).

    The newline LLaVA data puts between `<image>` and the text is dropped: templates render their own.
    """
    messages, placed = [], False
    for i, turn in enumerate(conversations):
        role, text = ROLES[turn["from"]], turn["value"]
        parts = []
        if IMAGE_TOKEN in text:
            if role != "user" or not has_image or placed:
                raise ValueError(f"conversations[{i}]: '{IMAGE_TOKEN}' is only allowed once, in a user turn "
                                 "of a record with an image")
            before, after = text.split(IMAGE_TOKEN, 1)
            before, after = before.rstrip("\n"), after.lstrip("\n")
            parts += [{"type": "text", "text": before}] if before.strip() else []
            parts.append({"type": "image"})
            parts += [{"type": "text", "text": after}] if after.strip() else []
            placed = True
        else:
            parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
    if has_image and not placed:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("conversations: a record with an image needs a user turn to put it in")
        first_user["content"].insert(0, {"type": "image"})
    return messages


@dataclass
class EncodedConversation:
    """Token ids (image placeholder expanded), labels, and where the sequence may be cut.

    turn_ends[k]: the length of the sequence that ends with assistant turn k (its separator included).
    image_end: the length up to the last image token (0 without an image): a cut must keep it.
    """

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]
    image_end: int
    eos_added: int = 0


def count_image_tokens(processor) -> int:
    """How many tokens the processor expands one `<image>` into, measured by calling it on a blank image."""
    image = Image.new("RGB", (64, 64), "white")
    ids = processor(text=processor.image_token, images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == image_token_id(processor)).sum())


def image_token_id(processor) -> int:
    """Id of the processor's image placeholder token."""
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


class ChatEncoder:
    """Renders, tokenizes and labels conversations with `processor`'s chat template (see the module
    docstring)."""

    def __init__(self, processor, num_image_tokens: int | None = None):
        if not getattr(processor, "chat_template", None):
            raise ChatTemplateError(
                f"{type(processor).__name__} has no chat template: set processor.chat_template (a Jinja "
                "string, as on the Hub in chat_template.json) before training a chat model."
            )
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_token_id = image_token_id(processor)
        self.num_image_tokens = (num_image_tokens if num_image_tokens is not None
                                 else count_image_tokens(processor))
        self.eos_token_id = self.tokenizer.eos_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template writes it, with one image placeholder per image."""
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant turns
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        # As processor.apply_chat_template(tokenize=True) does: the tokenizer adds bos unless the template
        # wrote it.
        bos = self.tokenizer.bos_token
        enc = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)),
                             return_offsets_mapping=True)
        return enc["input_ids"], [start for start, _ in enc["offset_mapping"]]

    def _assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int, int]]:
        """(first char, end of the answer without trailing whitespace, end of the turn) of each assistant
        turn."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatTemplateError(
                    "the chat template does not render a conversation as the rendering of its first turns "
                    f"followed by the rest (turn {i}), so the assistant turns cannot be located from it. "
                    f"Rendered:\n{before!r}\nthen\n{upto!r}\nUse a template that renders turn by turn."
                )
            spans.append((len(before), len(upto.rstrip()), len(upto)))
        return spans

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> EncodedConversation:
        """Tokens and assistant-only labels of a conversation; with `add_generation_prompt`, a prompt to
        answer."""
        full = self.render(messages, add_generation_prompt=add_generation_prompt)
        spans = self._assistant_spans(messages, full)
        ids, starts = self._tokenize(full)
        # A token belongs to the answer its first character is in.
        answer_of = [next((k for k, (a, b, _) in enumerate(spans) if a <= s < b), None) for s in starts]
        last = {k: pos for pos, k in enumerate(answer_of) if k is not None}
        if len(last) < len(spans):
            k = min(set(range(len(spans))) - set(last))
            raise ChatTemplateError(f"assistant turn {k} renders to no token of its own: "
                                    f"{full[spans[k][0]:spans[k][2]]!r}")
        # Cut after answer k: before the first later token that starts at or after the end of its turn.
        cut_at = [next((p for p in range(last[k] + 1, len(ids)) if starts[p] >= end), len(ids))
                  for k, (_, _, end) in enumerate(spans)]
        n_images = sum(part["type"] == "image" for m in messages for part in m["content"])
        if n_images > 1 or ids.count(self.image_token_id) != n_images:
            raise ValueError(f"{n_images} image(s) rendered as {ids.count(self.image_token_id)} "
                             f"'{IMAGE_TOKEN}' tokens; one image per conversation, written once by the "
                             "template")
        out = EncodedConversation([], [], [], 0)
        for pos in range(len(ids) + 1):
            out.turn_ends += [len(out.input_ids)] * cut_at.count(pos)
            if pos == len(ids):
                break
            token, k = ids[pos], answer_of[pos]
            if token == self.image_token_id:
                if k is not None:
                    raise ValueError(f"'{IMAGE_TOKEN}' inside an assistant answer")
                out.input_ids += [token] * self.num_image_tokens
                out.labels += [IGNORE_INDEX] * self.num_image_tokens
                out.image_end = len(out.input_ids)
                continue
            out.input_ids.append(token)
            out.labels.append(token if k is not None else IGNORE_INDEX)
            if (k is not None and pos == last[k] and token != self.eos_token_id
                    and self.eos_token_id is not None):
                # the template writes no end of turn: see the module docstring
                out.input_ids.append(self.eos_token_id)
                out.labels.append(self.eos_token_id)
                out.eos_added += 1
        return out

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids that ask the model to answer the last user turn, formatted exactly as in training."""
        return self.encode(messages, add_generation_prompt=True).input_ids


@dataclass
class ChatLengthReport:
    """What the length budget did to a set of conversations; printed before training."""

    samples: int = 0
    cut: int = 0  # conversations cut at a turn boundary
    turns_cut: int = 0  # assistant turns removed by those cuts
    tokens_cut: int = 0
    dropped: int = 0  # not even the first answer (with the image tokens) fits
    eos_added: int = 0  # answers that got an eos the template does not write

    def __str__(self) -> str:
        return (
            f"length budget: {self.samples} conversations, {self.cut} cut at a turn boundary "
            f"({self.turns_cut} assistant turns, {self.tokens_cut} tokens removed), {self.dropped} dropped "
            f"(first answer with its image tokens over budget); image tokens are never cut; {self.eos_added} "
            "answers got the eos the template does not write"
        )


def fit_conversation(enc: EncodedConversation, max_length: int | None,
                     report: ChatLengthReport) -> tuple[list[int], list[int]] | None:
    """`(input_ids, labels)` within `max_length`, cut after the last whole assistant turn that fits; None:
    dropped."""
    report.samples += 1
    report.eos_added += enc.eos_added
    n = len(enc.input_ids)
    if max_length is None or n <= max_length:
        return enc.input_ids, enc.labels
    k = bisect.bisect_right(enc.turn_ends, max_length) - 1  # the last turn that ends within the budget
    if k < 0 or enc.turn_ends[k] < enc.image_end:
        report.dropped += 1
        return None
    end = enc.turn_ends[k]
    report.cut += 1
    report.turns_cut += len(enc.turn_ends) - 1 - k
    report.tokens_cut += n - end
    return enc.input_ids[:end], enc.labels[:end]


def tokenize_conversations(records: datasets.Dataset, encoder: ChatEncoder, max_length: int | None,
                           source: str = "data") -> tuple[datasets.Dataset, ChatLengthReport]:
    """Instruct records -> training samples (image, input_ids, labels, length, has_image), and the length
    report.

    `length` and `has_image` are what `ModalityLengthGroupedSampler` groups by.
    """
    report, rows = ChatLengthReport(), []
    for i, record in enumerate(records):
        image = record.get("image")
        try:
            enc = encoder.encode(to_messages(record["conversations"], has_image=image is not None))
        except ValueError as e:
            raise type(e)(f"{source}: record {i} (counting valid rows from 0): {e}") from None
        fitted = fit_conversation(enc, max_length, report)
        if fitted is None:
            continue
        ids, labels = fitted
        rows.append({"image": image, "input_ids": ids, "labels": labels, "length": len(ids),
                     "has_image": image is not None})
    if not rows:
        raise ValueError(f"{source}: no conversation fits in max_length={max_length} ({report}); raise "
                         "--max_length")
    return datasets.Dataset.from_list(rows), report


def _pixel_values(image_processor, features: list[dict]) -> torch.Tensor | None:
    images = [load_image(f["image"]) for f in features if f.get("image") is not None]
    return image_processor(images, return_tensors="pt")["pixel_values"] if images else None


@dataclass
class ChatBatchArguments:
    """How the LLaVA recipes batch their training samples."""

    padding_free: bool = field(
        default=False,
        metadata={"help": "Put each micro-batch's samples end to end in one row, no padding, position_ids "
                          "restarting at each sample (the same loss). Meant for --attn_implementation "
                          "flash_attention_2 (variable-length kernels attend within each sample); with sdpa "
                          "or eager the row gets a block-diagonal mask, and the attention over it is as "
                          "dense as over one sequence that long."},
    )


@dataclass
class ChatCollator:
    """Training batches: right-padded ids and labels; pixel_values for the samples that have an image, in
    order.

    LLaVA fills the image tokens of the whole batch with the image features in order, so text-only
    samples simply contribute no image; a batch without any image has no pixel_values.

    `padding_free`: the samples end to end in a batch of one row, with `position_ids` that restart at 0 at
    each sample, no attention_mask and `use_cache=False`. transformers reads the restarts as sequence
    boundaries (its mask functions build a block-diagonal causal mask; FlashAttention-2 runs
    variable-length sequences) and RoPE sees each sample's own positions. It does so only without a KV
    cache, and a Llama forward makes one whenever `use_cache` is on (its config's default, in training
    too): the samples would then attend to the ones before them, silently. Each sample's first label is
    -100, so the last token of a sample does not learn to predict the next sample; that label is the
    sample's first token, which nothing predicts in a padded batch either. Same loss as padded
    (tests/test_llava_chat.py).
    """

    image_processor: object
    pad_token_id: int
    padding_free: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._packed(features)
        return self._with_pixels(pad_batch(features, self.pad_token_id), features)

    def _packed(self, features: list[dict]) -> dict[str, torch.Tensor]:
        labels = [torch.tensor(f["labels"]) for f in features]
        for row in labels:
            row[0] = IGNORE_INDEX
        batch = {"input_ids": torch.cat([torch.tensor(f["input_ids"]) for f in features])[None],
                 "position_ids": torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None],
                 "labels": torch.cat(labels)[None], "use_cache": False}
        return self._with_pixels(batch, features)

    def _with_pixels(self, batch: dict, features: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = _pixel_values(self.image_processor, features)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch


@dataclass
class ChatPromptCollator:
    """Eval items -> `generate` inputs: left-padded generation prompts (so every answer starts at the same
    position), pixel_values of the items with an image, and the items' "key"s.

    An item is {"key", "image" (or None), "conversations": the turns up to the user turn to answer}.
    """

    encoder: ChatEncoder
    image_processor: object
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        prompts = [self.encoder.encode_prompt(to_messages(it["conversations"],
                                                          has_image=it.get("image") is not None))
                   for it in items]
        batch = {**pad_batch([{"input_ids": p} for p in prompts], self.pad_token_id, left=True),
                 "keys": [it["key"] for it in items]}
        pixel_values = _pixel_values(self.image_processor, items)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch
