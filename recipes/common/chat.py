"""Chat-template conversations for image-text-to-text models: prompts, assistant-only labels, an
image-aware length budget. Any family whose processor has a chat template: LLaVA, LLaVA-OneVision,
Qwen2.5/3-VL, SmolVLM, Gemma 3, Mllama, InternVL, ...

A conversation record (`data_tools` instruct schema: LLaVA `conversations`, or OpenAI `messages` that
`data_tools.records` normalises into them) becomes one training sample:

1. `to_messages`: turns -> chat messages whose content is a list of parts; each `<image>` placeholder
   becomes an image part where it stands (images without one lead the first user turn);
2. `ChatEncoder.encode`: the processor's own chat template renders the conversation (never string
   concatenation, so a real checkpoint's template is used as is). The assistant turns are found from the
   template too: an assistant turn is the text that rendering the turn adds after rendering the
   conversation before it with the generation prompt; its tokens (the end-of-turn token included) are
   learned, nothing else (system, user, image tokens, separators, padding). A template that renders no
   end-of-turn token (the llava-hf LLaVA-1.5 one) gets the tokenizer's eos after each answer, which is
   how LLaVA-1.5 was trained (its `conv_vicuna_v1` separator is `</s>`), so that the model learns to stop.
   The processor then tokenizes the text with the images, expanding each image placeholder into the
   family's image tokens for that image (Qwen's grid, SmolVLM's tiles, Gemma 3's fixed count; Mllama's
   cross-attention has none in the text); the labels are carried over to its tokens by aligning them with
   the plain tokenization, and an answer token that cannot be carried over exactly is an error;
3. `fit_conversation`: a conversation over `max_length` (image tokens counted) is cut after the last
   whole assistant turn that fits, never inside an image's tokens. The cut keeps the images placed before
   it and leaves out those placed after it (in a later user turn): the sample is then the cut conversation
   encoded again with the kept images, as the processor expands them without the others. A conversation
   whose first exchange does not fit is dropped. `ChatLengthReport` counts every cut and drop.

The collators give the processor the same (cut) text and images, so a batch holds exactly what the
processor makes of them, with every extra input the family needs (image_grid_thw, pixel_attention_mask,
token_type_ids, cross_attention_mask, ...).
"""

from __future__ import annotations

import bisect
import difflib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import torch
from datasets.fingerprint import generate_random_fingerprint
from tqdm import tqdm

from data_tools.errors import DataError
from data_tools.images import load_image
from data_tools.jsonl import write_jsonl
from data_tools.records import IMAGE_TOKEN, find_reserved

from .args import arg, check_at_least
from .data import launch_rank
from .lengths import IGNORE_INDEX
from .models import special_strings, text_reserved
from .run import first
from .trainer import GenerationEval

logger = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class NeedsImageError(ValueError):
    """The model takes no text-only samples (PaliGemma): such a sample is skipped and counted."""


class ChatTemplateError(ValueError):
    """The processor's chat template cannot be used to find the assistant turns."""


def with_answer_prompt(question: str, answer_prompt: str | None) -> str:
    """A question as qlora_vqa trains, scores and (chat.py, serve) asks it: its --answer_prompt on a line of
    its own after it, unless the question already ends with it (LLaVA-1.5's VQA data writes it in)."""
    if answer_prompt and not question.rstrip().endswith(answer_prompt):
        return f"{question.strip()}\n{answer_prompt}"
    return question


def to_messages(conversations: list[dict], n_images: int = 0) -> list[dict]:
    """LLaVA turns ({"from", "value"}) -> chat messages with content parts ({"type": "text"|"image"}).

    Each `<image>` in a user turn is an image part, in order; images the text does not place lead the
    first user turn. The newline LLaVA data puts around `<image>` is dropped: templates render their own.
    """
    messages, placed = [], 0
    for i, turn in enumerate(conversations):
        role, text = ROLES[turn["from"]], turn["value"]
        if IMAGE_TOKEN in text and role != "user":
            raise ValueError(f"conversations[{i}]: '{IMAGE_TOKEN}' is only allowed in a user turn")
        pieces, parts = text.split(IMAGE_TOKEN), []
        for k, piece in enumerate(pieces):
            piece = piece.lstrip("\n") if k > 0 else piece
            piece = piece.rstrip("\n") if k < len(pieces) - 1 else piece
            if piece.strip():
                parts.append({"type": "text", "text": piece})
            if k < len(pieces) - 1:
                parts.append({"type": "image"})
                placed += 1
        messages.append({"role": role, "content": parts})
    if placed > n_images:
        raise ValueError(f"conversations: {placed} '{IMAGE_TOKEN}' placeholders for {n_images} image(s)")
    if placed < n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("conversations: a record with an image needs a user turn to put it in")
        first_user["content"][:0] = [{"type": "image"}] * (n_images - placed)
    return messages


@dataclass
class EncodedConversation:
    """The processor's token ids, labels, and where the sequence may be cut.

    turn_ends[k]: the length of the sequence that ends with assistant turn k (its separator included), and
    turn_chars[k] the length of the text that ends there. image_end: the length up to the last image token
    (0 without an image): a cut before it leaves images out. turn_images[k]: how many images are placed
    before assistant turn k, the ones a cut after it keeps (None: a conversation that is never cut between
    its images).
    """

    text: str
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]
    turn_chars: list[int]
    image_end: int
    eos_turns: tuple[int, ...] = ()  # the assistant turns that got an eos the template does not write
    suffix: str | None = None  # the answer, for processors that take it apart (PrefixSuffixEncoder)
    turn_images: list[int] | None = None


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(token, start, length) of each run of equal tokens."""
    runs = []
    for pos, token in enumerate(ids):
        if runs and runs[-1][0] == token:
            runs[-1] = (token, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((token, pos, 1))
    return runs


def align(plain: list[int], expanded: list[int]) -> list[int]:
    """For each token of `expanded` (the processor's ids), the index of the same token in `plain` (the
    tokenizer's ids of the same text, image placeholders unexpanded), or -1 where the processor inserted it.

    Runs of a repeated token are compared whole (an image's hundreds of equal tokens are one item), so the
    diff stays fast; a run whose length changed (the placeholder expanded) maps nowhere.
    """
    a, b = _runs(plain), _runs(expanded)
    matcher = difflib.SequenceMatcher(None, [t for t, _, _ in a], [t for t, _, _ in b], autojunk=False)
    mapping = [-1] * len(expanded)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            continue
        for (_, start_a, n_a), (_, start_b, n_b) in zip(a[i1:i2], b[j1:j2], strict=True):
            if n_a == n_b:
                mapping[start_b:start_b + n_b] = range(start_a, start_a + n_a)
    return mapping


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for images in the processor's output (placeholder and image tokens)."""
    tokenizer = processor.tokenizer
    attributes = ("image_token", "boi_token", "eoi_token", "image_start_token", "image_end_token",
                  "fake_image_token", "global_image_token")
    names = [getattr(processor, k, None) for k in attributes]
    ids = {tokenizer.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
    ids |= {getattr(processor, "image_token_id", None)}
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def reserved_in(messages: list[dict], reserved: tuple[str, ...]) -> tuple[int, str] | None:
    """(message index, string) of the first message whose text holds a `reserved` special string, or None."""
    for i, message in enumerate(messages):
        found = find_reserved("".join(p["text"] for p in message["content"] if p["type"] == "text"), reserved)
        if found is not None:
            return i, found
    return None


def check_plain_text(messages: list[dict], reserved: tuple[str, ...]) -> None:
    """Refuse a turn whose text holds a `reserved` special string: tokenized, it is the control token, not the
    text (in an answer, an end-of-turn token the model would learn to stop at)."""
    if (hit := reserved_in(messages, reserved)) is not None:  # one message per turn: its index names it
        raise ValueError(f"conversations[{hit[0]}]: holds {hit[1]!r}, which the tokenizer reads as its "
                         "special token, not as text; remove or rewrite it in the data")


class ChatEncoder:
    """Renders, tokenizes and labels conversations with `processor`'s chat template (see the module
    docstring)."""

    def __init__(self, processor, special_text=None):
        if not getattr(processor, "chat_template", None):
            raise ChatTemplateError(
                f"{type(processor).__name__} has no chat template: set processor.chat_template (a Jinja "
                "string, as on the Hub in chat_template.json) before training a chat model."
            )
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_ids = image_token_ids(processor)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.specials = special_strings(self.tokenizer)  # also the tokens that can end a turn
        self.reserved = text_reserved(self.tokenizer, special_text)  # what no text may hold (--special_text)
        self.special_text = tuple(special_text or ())

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template writes it, with one image placeholder per image."""
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant turns
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e

    def add_special_tokens(self, text: str) -> bool:
        # As processor.apply_chat_template(tokenize=True) does: the tokenizer adds bos unless the template
        # wrote it.
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def process(self, texts: list[str], images: list[list], padding_side: str = "right",
                suffixes: list[str] | None = None) -> dict:
        """The processor's batch for `texts` and each text's images (a list per text), padded."""
        kwargs = {} if suffixes is None else {"suffix": suffixes}
        if any(images):
            # nested per text: LLaVA-OneVision sizes the tiles of a multi-image sample's images apart
            kwargs["images"] = images
        try:
            return self.processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt",
                                  add_special_tokens=self.add_special_tokens(texts[0]), **kwargs)
        except ValueError as e:
            raise ValueError(f"{type(self.processor).__name__}: {e}") from None

    def _assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int, int]]:
        """(first char, end of the answer without trailing whitespace, end of the turn) of each assistant
        turn."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:  # processors cannot render the empty conversation before it (an IndexError)
                raise ValueError("an assistant turn before any user turn: there is no prompt to answer")
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

    def _with_eos(self, full: str, spans: list) -> tuple[str, list, tuple[int, ...]]:
        """`full` with the eos written after every answer that ends in no special token (see the module
        docstring)."""
        eos = self.tokenizer.eos_token
        if eos is None:
            return full, spans, ()
        out, shift, added, pos = [], 0, [], 0
        new_spans = []
        for k, (a, b, end) in enumerate(spans):
            if full[a:b].endswith(self.specials):
                new_spans.append((a + shift, b + shift, end + shift))
                continue
            out.append(full[pos:b] + eos)
            pos = b
            new_spans.append((a + shift, b + shift + len(eos), end + shift + len(eos)))
            shift += len(eos)
            added.append(k)
        return "".join(out) + full[pos:], new_spans, tuple(added)

    def _text(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list, tuple[int, ...]]:
        """The rendered text with the eos written where the template has none, the assistant spans in it,
        and the answers that got one."""
        full = self.render(messages, add_generation_prompt=add_generation_prompt)
        spans = self._assistant_spans(messages, full)
        if add_generation_prompt:
            # A prompt that ends in a space would end in a token that training never saw there (the
            # tokenizer joins the space to the answer's first word): the model gets it from the answer.
            full = full.rstrip(" ")
        return self._with_eos(full, spans)

    def encode(self, messages: list[dict], images: list | None = None,
               add_generation_prompt: bool = False) -> EncodedConversation:
        """Tokens and assistant-only labels of a conversation with its images (PIL images, in order); with
        `add_generation_prompt`, a prompt to answer."""
        images = list(images or [])
        n_parts = sum(part["type"] == "image" for m in messages for part in m["content"])
        if n_parts != len(images):
            raise ValueError(f"{n_parts} image part(s) in the conversation for {len(images)} image(s)")
        check_plain_text(messages, self.reserved)
        full, spans, eos_turns = self._text(messages, add_generation_prompt)
        enc = self.tokenizer(full, add_special_tokens=self.add_special_tokens(full),
                             return_offsets_mapping=True)
        plain, offsets = enc["input_ids"], enc["offset_mapping"]
        # A token belongs to an answer when it overlaps it (a token joining the prompt's trailing space to
        # the first word included).
        answer_of = [next((k for k, (a, b, _) in enumerate(spans) if s < b and e > a), None)
                     for s, e in offsets]
        missing = set(range(len(spans))) - set(answer_of)
        if missing:
            k = min(missing)
            raise ChatTemplateError(f"assistant turn {k} renders to no token of its own: "
                                    f"{full[spans[k][0]:spans[k][2]]!r}")
        ids = self.process([full], [images])["input_ids"][0].tolist()
        mapping = align(plain, ids)
        labels = [IGNORE_INDEX if m < 0 or answer_of[m] is None else plain[m] for m in mapping]
        if sum(label != IGNORE_INDEX for label in labels) != sum(k is not None for k in answer_of):
            raise ChatTemplateError(
                f"{type(self.processor).__name__} tokenizes an answer differently with the images expanded "
                "than without: its labels cannot be placed exactly.")
        # Cut after answer k: before the first token that ends past its turn, and the text where that token
        # starts. A Llama tokenizer joins the separator after "</s>" to the next word ("▁USER:"): the cut
        # text must leave the space out, else the processor reads it as a token of its own.
        position = {m: pos for pos, m in enumerate(mapping) if m >= 0}
        turn_ends, turn_chars = [], []
        for _, _, end in spans:
            first_after = next((p for p, (_, e) in enumerate(offsets) if e > end and p in position), None)
            turn_ends.append(len(ids) if first_after is None else position[first_after])
            turn_chars.append(end if first_after is None else min(end, offsets[first_after][0]))
        image_positions = [pos for pos, (m, t) in enumerate(zip(mapping, ids, strict=True))
                           if m < 0 or t in self.image_ids]
        image_end = image_positions[-1] + 1 if images and image_positions else 0
        placed, turn_images = 0, []
        for message in messages:  # one span per assistant message, in order
            if message["role"] == "assistant":
                turn_images.append(placed)
            placed += sum(part["type"] == "image" for part in message["content"])
        return EncodedConversation(full, ids, labels, turn_ends, turn_chars, image_end, eos_turns,
                                   turn_images=turn_images)

    def usable(self, items: datasets.Dataset) -> datasets.Dataset:
        """The eval items this model can answer: all of them."""
        return items

    def fitting(self, items: datasets.Dataset, max_length: int | None,
                limit: int | None = None) -> tuple[datasets.Dataset, int]:
        """The first `limit` (None: all) eval items whose prompt (image tokens included) leaves room for an
        answer within `max_length`, the budget the training samples were cut to: a longer one would be
        answered past what the model trained on, or past its context. Returns them and how many items
        before the last one kept were left out (for metrics.json; logged too)."""
        if max_length is None or len(items) == 0:
            return first(items, limit), 0
        collate, want, kept, lengths = ChatPromptCollator(self), limit or len(items), [], []
        for start in tqdm(range(0, len(items), 32), desc="eval prompt lengths", unit="batch of 32",
                          disable=launch_rank(local=True) != 0):  # each process's bar would be the same
            batch = collate(items.select(range(start, min(start + 32, len(items)))).to_list())
            lengths += batch["attention_mask"].sum(1).tolist()
            kept += [i for i in range(start, len(lengths)) if lengths[i] < max_length]
            if len(kept) >= want:
                break
        kept = kept[:want]
        if not kept:
            raise ValueError(f"no eval item's prompt leaves room for an answer within --max_length "
                             f"{max_length} (the shortest is {min(lengths)} tokens, images included); raise "
                             "it.")
        examined = kept[-1] + 1 if len(kept) == want else len(items)
        left_out = examined - len(kept)
        if left_out:
            logger.warning("%d of %d eval items left out: their prompt is --max_length %d tokens or more",
                           left_out, examined, max_length)
        return items.select(kept), left_out

    def prompt_text(self, messages: list[dict]) -> str:
        """The text that asks the model to answer the last user turn, formatted exactly as in training."""
        return self._text(messages, add_generation_prompt=True)[0]

    def encode_prompt(self, messages: list[dict], images: list | None = None) -> list[int]:
        """Token ids that ask the model to answer the last user turn, formatted exactly as in training."""
        return self.process([self.prompt_text(messages)], [list(images or [])])["input_ids"][0].tolist()


class PrefixSuffixEncoder(ChatEncoder):
    """For a processor that takes a prefix and the answer as `suffix=` instead of a chat template (PaliGemma):
    it writes the image tokens, bos, the prefix and a newline, then the suffix and eos, and labels the
    suffix alone. A conversation becomes one sample: the prefix is the text of every turn before the last
    answer (earlier answers are context), the suffix the last answer.
    """

    def __init__(self, processor, special_text=None):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_ids = image_token_ids(processor)
        self.reserved = text_reserved(self.tokenizer, special_text)
        self.special_text = tuple(special_text or ())

    @staticmethod
    def _split(messages: list[dict]) -> tuple[str, str | None, int]:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        context = messages if last is None or messages[-1]["role"] != "assistant" else messages[:last]
        prefix = "\n".join(p["text"] for m in context for p in m["content"] if p["type"] == "text")
        n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        return prefix, None if context is messages else _answer(messages[last]), n_images

    def add_special_tokens(self, text: str) -> bool:
        return True

    def usable(self, items: datasets.Dataset) -> datasets.Dataset:
        """The eval items with an image (a text-only one cannot be asked); says how many were left out."""
        kept = items.filter(lambda it: bool(record_images(it)))
        if len(kept) < len(items):
            logger.warning("%d text-only eval items left out: %s takes no text-only input",
                           len(items) - len(kept), type(self.processor).__name__)
        return kept

    def prompt_text(self, messages: list[dict]) -> str:
        prefix, _, n_images = self._split(messages)
        return self.processor.image_token * n_images + prefix

    def encode(self, messages: list[dict], images: list | None = None,
               add_generation_prompt: bool = False) -> EncodedConversation:
        images = list(images or [])
        # A question after the last answer teaches nothing (chat templates give it no label): left out.
        while (not add_generation_prompt and messages and messages[-1]["role"] == "user"
               and all(p["type"] != "image" for p in messages[-1]["content"])):
            messages = messages[:-1]
        prefix, suffix, n_images = self._split(messages)
        if not images:
            raise NeedsImageError(f"{type(self.processor).__name__} takes no text-only sample")
        check_plain_text(messages, self.reserved)
        if n_images != len(images):
            raise ValueError(f"{n_images} image part(s) in the conversation for {len(images)} image(s)")
        if suffix is None or add_generation_prompt:
            raise ValueError("a training sample needs an answer after the last user turn")
        text = self.processor.image_token * n_images + prefix
        batch = self.process([text], [images], suffixes=[suffix])
        ids = batch["input_ids"][0].tolist()
        labels = [t if kind else IGNORE_INDEX for t, kind in zip(ids, batch["token_type_ids"][0].tolist(),
                                                                  strict=True)]
        image_end = max((i + 1 for i, t in enumerate(ids) if t in self.image_ids), default=0)
        return EncodedConversation(text, ids, labels, [len(ids)], [len(text)], image_end, suffix=suffix)


def _answer(message: dict) -> str:
    return "\n".join(p["text"] for p in message["content"] if p["type"] == "text")


def chat_encoder(processor, special_text=None) -> ChatEncoder:
    """The encoder for `processor`: its chat template, or its prefix + `suffix=` (PaliGemma). `special_text`:
    the special strings texts may hold (--special_text)."""
    import inspect

    takes_suffix = "suffix" in inspect.signature(processor.__call__).parameters
    if getattr(processor, "chat_template", None) or not takes_suffix:
        return ChatEncoder(processor, special_text)  # raises for a processor without a chat template
    return PrefixSuffixEncoder(processor, special_text)


@dataclass
class ChatLengthReport:
    """What the length budget did to a set of conversations; printed before training."""

    samples: int = 0
    cut: int = 0  # conversations cut at a turn boundary
    turns_cut: int = 0  # assistant turns removed by those cuts
    tokens_cut: int = 0
    dropped: int = 0  # no cut after a whole answer fits
    text_only_skipped: int = 0  # a model that takes no text-only sample (PaliGemma)
    eos_added: int = 0  # kept answers that got an eos the template does not write
    rejected: int = 0  # rows the processor could not encode, skipped with --skip_bad_rows

    def __str__(self) -> str:
        return (
            f"length budget: {self.samples} conversations, {self.cut} cut at a turn boundary "
            f"({self.turns_cut} assistant turns, {self.tokens_cut} tokens removed; an image placed after "
            f"the cut goes with it, image tokens are never cut), {self.dropped} dropped (no cut after a "
            f"whole answer fits); {self.eos_added} kept answers got the eos the template does not write"
            + (f"; {self.text_only_skipped} text-only skipped (the model takes none)"
               if self.text_only_skipped else "")
            + (f"; {self.rejected} rejected (the processor could not encode them)" if self.rejected else "")
        )


def fit_conversation(enc: EncodedConversation, max_length: int | None, report: ChatLengthReport,
                     encode_cut: Callable[[int, int], EncodedConversation] | None = None,
                     ) -> tuple[str, list[int], list[int], int | None] | None:
    """`(text, input_ids, labels, n_images)` within `max_length`, cut after the last whole assistant turn
    that fits; n_images: how many of the images (the first ones) the sample keeps, None: all. None: dropped,
    no cut after a whole answer fits.

    A cut before an image's tokens leaves that image out. `encode_cut(k, n)` gives the conversation up to
    assistant turn k encoded with its first n images: the processor may expand the kept images differently
    without the others (LLaVA-OneVision tiles a sample's only image), so such a cut is made on it, cut again
    if it is still too long. Without it, the cut is a slice of `enc`.
    """
    report.samples += 1
    eos_turns = enc.eos_turns
    n, turns = len(enc.input_ids), len(enc.turn_ends)
    text, ids, labels, kept, kept_turns = enc.text, enc.input_ids, enc.labels, None, turns
    while max_length is not None and len(ids) > max_length:
        k = bisect.bisect_right(enc.turn_ends, max_length) - 1  # the last turn that ends within the budget
        past = k >= 0 and enc.turn_ends[k] < enc.image_end  # images after the cut
        # No progress: the template writes a kept image's tokens after the turn that places it.
        if k < 0 or (past and (enc.turn_images is None or enc.turn_images[k] == kept)):
            report.dropped += 1
            return None
        kept_turns = k + 1
        if past:
            kept = enc.turn_images[k]
            if encode_cut is not None:
                enc = encode_cut(k, kept)
                text, ids, labels = enc.text, enc.input_ids, enc.labels
                continue
        end = enc.turn_ends[k]
        text, ids, labels = enc.text[: enc.turn_chars[k]], enc.input_ids[:end], enc.labels[:end]
    report.eos_added += sum(k < kept_turns for k in eos_turns)
    if len(ids) < n:  # within the budget now, so shorter: cut
        report.cut += 1
        report.turns_cut += turns - kept_turns
        report.tokens_cut += n - len(ids)
    return text, ids, labels, kept


def record_images(record: dict) -> list[str]:
    """The image paths of a record: its `images` list, or its one `image` (None: a text-only record)."""
    if record.get("images") is not None:
        return list(record["images"])
    return [] if record.get("image") is None else [record["image"]]


# The columns of `tokenize_conversations`' samples; "report": what each row adds to the ChatLengthReport.
_IDS = datasets.Sequence(datasets.Value("int64"))
SAMPLE_FEATURES = datasets.Features({
    "images": datasets.Sequence(datasets.Value("string")), "text": datasets.Value("string"),
    "input_ids": _IDS, "labels": _IDS, "length": datasets.Value("int64"), "has_image": datasets.Value("bool"),
    "suffix": datasets.Value("string"), "reject": datasets.Value("string"),
    "report": {name: datasets.Value("int64") for name in ChatLengthReport.__dataclass_fields__},
})


def tokenize_conversations(records, encoder: ChatEncoder, max_length: int | None, source: str = "data",
                           num_proc: int | None = None, skip_bad_rows: bool = False,
                           rejects_path: str | Path | None = None,
                           ) -> tuple[datasets.Dataset, ChatLengthReport]:
    """Instruct records -> training samples (images, text, input_ids, labels, length, has_image), and the
    length report. Each image is opened here, the slow part on a large data set: the processor's image token
    count depends on its size. `num_proc` processes share the work (None: this one).

    A row that cannot be encoded (its image does not decode, the chat template or the processor refuses it)
    is an error naming `source`:line; with `skip_bad_rows`, a reject counted in `report.rejected` and
    written with its reason to `rejects_path` (default `<source>.tokenize.rejects.jsonl`), unless every row
    fails: that is the template or processor, not the rows, and the first row's error is raised.

    `length` and `has_image` are what `ModalityLengthGroupedSampler` groups by.
    """
    parent = os.getpid()

    def encode(record: dict, i: int) -> dict:
        if os.getpid() != parent and torch.get_num_threads() != 1:
            # A worker forked by `map`: torch's OpenMP threads do not survive a fork, and the first parallel
            # op (a torchvision-backed image processor's resize) would wait for them forever.
            torch.set_num_threads(1)
        report = ChatLengthReport()
        sample = {"images": [], "text": "", "input_ids": [], "labels": [], "length": 0, "has_image": False,
                  "suffix": None, "reject": None}
        paths = record_images(record)
        try:
            messages = to_messages(record["conversations"], n_images=len(paths))
            images = [load_image(p) for p in paths]
            enc = encoder.encode(messages, images)
            answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
            fitted = fit_conversation(enc, max_length, report, lambda k, n: encoder.encode(
                messages[: answers[k] + 1], images[:n]))
        except NeedsImageError:
            report.text_only_skipped += 1
            return {**sample, "report": vars(report)}
        except ValueError as e:
            line = record.get("line") or None
            where = f"{source}:{line}" if line else f"{source}: record {i}"
            error = ValueError if isinstance(e, DataError) else type(e)  # DataError takes a reason too
            if not skip_bad_rows:
                raise error(f"{where}: {e}; fix or drop the row, or pass --skip_bad_rows to skip and count "
                            "it") from None
            report.rejected += 1
            # load_records' reject shape; raw: the record as encoded (a VQA row as its conversation)
            raw = {k: record.get(k) for k in ("image", "images", "conversations") if record.get(k)}
            reject = {"reason": e.reason if isinstance(e, DataError) else "tokenize_error",
                      "message": str(e) if line else f"record {i}: {e}", "file": source, "line": line,
                      "field": (e.field or "image") if isinstance(e, DataError) else "conversations",
                      "raw": json.dumps(raw, ensure_ascii=False), "error": error.__name__}
            return {**sample, "reject": json.dumps(reject, ensure_ascii=False), "report": vars(report)}
        if fitted is not None:
            text, ids, labels, n_images = fitted
            kept = paths if n_images is None else paths[:n_images]
            sample = {"images": kept, "text": text, "input_ids": ids, "labels": labels, "length": len(ids),
                      "has_image": bool(kept), "suffix": enc.suffix, "reject": None}
        return {**sample, "report": vars(report)}

    if isinstance(records, list):  # every row with every key: from_list keeps only the first row's keys
        keys = dict.fromkeys(k for r in records for k in r)
        records = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in records])
    encoded = records.map(encode, with_indices=True, num_proc=num_proc, features=SAMPLE_FEATURES,
                          remove_columns=records.column_names, desc=f"encoding {source}",
                          new_fingerprint=generate_random_fingerprint())  # in memory: nothing to cache
    report = ChatLengthReport(**{name: sum(r[name] for r in encoded["report"])
                                 for name in ChatLengthReport.__dataclass_fields__})
    rejects = [json.loads(r) for r in encoded["reject"] if r is not None]
    if skip_bad_rows:
        rejects_path = Path(rejects_path or f"{source}.tokenize.rejects.jsonl")
        if rejects:
            write_jsonl(rejects_path, ({k: v for k, v in r.items() if k != "error"} for r in rejects))
            print(f"{source}: skipped {len(rejects)} row(s) of {len(encoded)} that the processor could not "
                  f"encode; reasons in {rejects_path}")
        else:
            rejects_path.unlink(missing_ok=True)  # an earlier run's, in the same output_dir
    if rejects and report.samples == 0:  # no row encoded: not about one row
        first_reject = rejects[0]
        where = f"{source}:{first_reject['line']}" if first_reject["line"] else source
        error = ChatTemplateError if first_reject["error"] == ChatTemplateError.__name__ else ValueError
        raise error(f"{where}: {first_reject['message']}")
    samples = encoded.select([i for i, n in enumerate(encoded["length"]) if n]).remove_columns(
        ["report", "reject"])
    if len(samples) == 0:
        raise ValueError(f"{source}: no conversation fits in max_length={max_length} ({report}); raise "
                         "--max_length")
    if all(suffix is None for suffix in samples["suffix"]):  # the collator passes suffixes only where given
        samples = samples.remove_columns("suffix")
    return samples, report


def encoded_once(encode: Callable[[], tuple[datasets.Dataset, ChatLengthReport]], split: str,
                 training_args) -> tuple[datasets.Dataset, ChatLengthReport]:
    """`encode()` once per launch, not once per process (each would open every image of the data set):
    the process that writes files (rank 0; each node's first with --save_on_each_node) encodes and saves
    the samples to `<output_dir>/.encoded-<split>` while the others wait (up to --ddp_timeout) and then
    read them into memory; the folder is removed once all have."""
    if training_args.world_size == 1:
        return encode()
    folder = Path(training_args.output_dir) / f".encoded-{split}"
    with training_args.main_process_first(local=training_args.save_on_each_node, desc=f"encoding {split}"):
        if training_args.should_save:
            shutil.rmtree(folder, ignore_errors=True)  # a stopped run's
            samples, report = encode()
            tmp = folder.with_name(f"{folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            samples.save_to_disk(str(tmp))
            (tmp / "report.json").write_text(json.dumps(vars(report)))
            tmp.rename(folder)  # the folder appears whole
        elif not (folder / "report.json").is_file():
            raise ValueError(f"{folder}: not written by the process that encodes the {split} data: it "
                             "stopped (its error is above), or --output_dir is not on storage every node "
                             "shares (then pass --save_on_each_node true)")
        else:
            logger.info("reading the %s samples the main process encoded", split)
            samples = datasets.load_from_disk(str(folder), keep_in_memory=True)
            report = ChatLengthReport(**json.loads((folder / "report.json").read_text()))
    training_args.distributed_state.wait_for_everyone()  # every process has read them
    if training_args.should_save:
        shutil.rmtree(folder)
    return samples, report


def _images(items: list[dict]) -> list[list]:
    return [[load_image(p) for p in record_images(it)] for it in items]


@dataclass
class ChatBatchArguments:
    """How the chat recipes make and batch their training samples."""

    preprocessing_num_workers: int | None = arg(
        None, "Processes that encode the conversations before training: each image is opened then to count "
        "its tokens, the slow part on a large data set (a progress bar shows it). None = the main process "
        "alone.")

    padding_free: bool = arg(
        False, "Put each micro-batch's samples end to end in one row, no padding, position_ids restarting "
        "at each sample (the same loss). Meant for --attn_implementation flash_attention_2 "
        "(variable-length kernels attend within each sample); with sdpa or eager the row gets a "
        "block-diagonal mask, and the attention over it is as dense as over one sequence that long. For "
        "families whose inputs are input_ids and pixel_values alone (LLaVA-style, InternVL); not for "
        "M-RoPE (Qwen) or per-token image inputs (Gemma 3, Mllama, SmolVLM).")

    def __post_init__(self):
        check_at_least(self, 1, "preprocessing_num_workers")


# What a padding-free row may carry: per-token inputs other than these would need packing of their own.
PADDING_FREE_KEYS = {"input_ids", "attention_mask", "pixel_values"}


@dataclass
class ChatCollator:
    """Training batches: the processor's batch for the samples' (cut) texts and images, right-padded, with
    the samples' labels. The processor's ids are checked against the ones the labels were made for.

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

    encoder: ChatEncoder
    padding_free: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        suffixes = [f["suffix"] for f in features] if "suffix" in features[0] else None
        batch = dict(self.encoder.process([f["text"] for f in features], _images(features),
                                          suffixes=suffixes))
        ids = batch["input_ids"]
        width = ids.shape[1]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            if ids[row, :n].tolist() != f["input_ids"] or (n < width and batch["attention_mask"][row, n]):
                raise ValueError("the processor tokenized a sample differently from when it was encoded; "
                                 "was the processor changed between the two?")
            labels[row, :n] = torch.tensor(f["labels"])
        batch["labels"] = labels
        return self._packed(batch) if self.padding_free else batch

    def _packed(self, batch: dict) -> dict:
        extra = set(batch) - PADDING_FREE_KEYS - {"labels"}
        if extra:
            raise ValueError(f"--padding_free: this processor's batches also hold {sorted(extra)}, which a "
                             "packed row cannot carry; train with padding (leave --padding_free out).")
        keep = batch.pop("attention_mask").bool()
        lengths = keep.sum(1).tolist()
        labels = batch["labels"].clone()
        labels[:, 0] = IGNORE_INDEX
        packed = {"input_ids": batch["input_ids"][keep][None], "labels": labels[keep][None],
                  "position_ids": torch.cat([torch.arange(n) for n in lengths])[None], "use_cache": False}
        return {**batch, **packed}


def chat_collator(encoder: ChatEncoder, train_dataset, padding_free: bool) -> ChatCollator:
    """The training collator; with `padding_free`, tried on the first sample with an image and the first
    without, so that a processor whose batches a packed row cannot carry is refused before anything is
    scored."""
    collator = ChatCollator(encoder, padding_free)
    if padding_free:
        has_image = train_dataset["has_image"]
        for kind in (True, False):
            if kind in has_image:
                collator([train_dataset[has_image.index(kind)]])
    return collator


@dataclass
class ChatPromptCollator:
    """Eval items -> `generate` inputs: the processor's left-padded batch of generation prompts (so every
    answer starts at the same position) with the items' images, and the items' "key"s.

    An item is {"key", "image" (or None) or "images", "conversations": the turns up to the user turn to
    answer}.
    """

    encoder: ChatEncoder

    def __call__(self, items: list[dict]) -> dict:
        images = _images(items)
        texts = [self.encoder.prompt_text(to_messages(it["conversations"], n_images=len(imgs)))
                 for it, imgs in zip(items, images, strict=True)]
        batch = self.encoder.process(texts, images, padding_side="left")
        return {**batch, "keys": [it["key"] for it in items]}


def chat_generation(items, encoder: ChatEncoder, score, eval_args) -> GenerationEval | None:
    """The generation-based evaluation of a chat recipe: its eval `items` (None: none) prompted through the
    chat template, the answers scored by `score(predictions, items)`."""
    if items is None:
        return None
    return GenerationEval(items, ChatPromptCollator(encoder), score, eval_args, encoder.tokenizer,
                          encoder.special_text)
