"""Tiny models of the real architectures, built offline, for tests and the default run of each recipe.

Every recipe's default run and every test needs a model, but no weights can be downloaded. So each
tiny model here is the *real* architecture (the same `transformers` model, config, tokenizer and
processor classes a Hub checkpoint uses) at toy size, with random weights:

1. a text corpus is drawn from the procedural shapes data set (`data_tools.synth`): captions, VQA
   questions and answers, instructions, in English and Chinese;
2. a byte-level BPE tokenizer (~1,500 tokens) is trained on it with the `tokenizers` library, with the
   special tokens of the architecture (bos/eos/pad/unk, `<image>`). Byte-level, so any Unicode text
   tokenizes without an unknown token;
3. the model is built from its config (hidden size 64-128, 2 layers) with a fixed seed, and saved with
   the processor via `save_pretrained`. Callers load it with `from_pretrained`, exactly as they would
   load a Hub checkpoint, so the recipe code path is the same.

Models are built on first use into `$VLM_RECIPES_CACHE/tiny/<name>-v<BUILD_VERSIONS[name]>` (default cache
root `~/.cache/vlm-recipes`). Bump a model's version whenever its builder changes so old caches are not
reused. To rebuild one by hand (e.g. to inspect it):

    python -m recipes.common.tiny.models blip2-opt --out /tmp/tiny-blip2

Names: `blip2-opt`, `llava`, `clip`, `clip-vision`, `gpt2`, `siglip`, `siglip2`. Sizes are keyword
overrides of `build_tiny(name, out_dir, **overrides)` (see each builder's defaults).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..cache import build_once, cache_root
from . import families

# Per model: bump one whenever its builder changes (every cached base built from it is rebuilt then).
BUILD_VERSIONS = {"blip2-opt": 2, "llava": 2, "clip": 2, "clip-vision": 2, "gpt2": 2}
BUILD_VERSIONS |= {"siglip": 1, "siglip2": 1}
IMAGE_SIZE = 64  # matches data_tools.synth's default image size
IMAGE_TOKEN = "<image>"
# CLIP normalisation constants: the processors of every architecture here use them on the Hub.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5 / Vicuna style. Content may be a string or a list of {"type": "image"|"text"} parts (the
# form `processor.apply_chat_template` is given); an image part renders as the `<image>` placeholder
# that the processor expands to one token per image feature.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


# --- corpus and tokenizers ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)  # one process often builds several models from the same corpus
def synthetic_corpus(n: int = 300, seed: int = 0) -> tuple[str, ...]:
    """Texts of the synthetic data set (captions, questions, answers, instructions; English and Chinese)."""
    from data_tools.synth import make_synthetic

    texts = []
    with tempfile.TemporaryDirectory() as tmp:
        for lang in ("en", "zh"):
            for task in ("caption", "vqa", "instruct"):
                path = make_synthetic(task, n, Path(tmp) / lang, lang=lang, seed=seed, progress=False)
                for line in path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    texts += record.get("captions", [])
                    if "question" in record:
                        texts += [record["question"], *record["answers"]]
                    texts += [turn["value"].replace(IMAGE_TOKEN, "")
                              for turn in record.get("conversations", [])]
    return tuple(texts)


def train_byte_bpe(corpus: tuple[str, ...], specials: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE; `specials` get the first ids, in order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 bytes are in the vocabulary, so no text ever needs an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _fast_tokenizer(tok: Tokenizer, bos: str | None, **special_tokens):
    """Wrap a trained tokenizer; prepend `bos` (if given) to every sequence, as OPT and Llama tokenizers
    do."""
    from transformers import PreTrainedTokenizerFast

    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def clip_tokenizer(corpus: tuple[str, ...], vocab_size: int):
    """A `CLIPTokenizer` (CLIP's lower-casing, `</w>` end-of-word BPE) trained on `corpus`.

    The vocabulary is laid out as OpenAI's: the 256 byte symbols, the same with `</w>`, the merges,
    then `<|startoftext|>` and `<|endoftext|>` last, so eos is not id 2 (CLIP's legacy argmax pooling).
    """
    from transformers import CLIPTokenizer

    # Train with CLIP's own normaliser and pre-tokeniser so the merges fit what CLIPTokenizer does.
    pipeline = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    # Every byte also as a word end: the trainer only adds the `</w>` forms it saw, and an unseen one
    # would become an unknown token.
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab = {}
    for s in symbols + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(s, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


# --- builders -----------------------------------------------------------------------------------------
def _clip_image_processor():
    """CLIP-style preprocessing at the synthetic data set's 64 px."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def sincos_position_init(weight: torch.Tensor, grid: int) -> None:
    """Fill a ViT position embedding (cls + grid x grid patches; shape [1, N, D] or [N, D]) with fixed 2-D
    sine-cosine values, in place; the cls position gets zeros.

    Random N(0, 0.02) position embeddings are tiny next to the patch embeddings, and a tiny model
    trained for minutes barely learns where anything is. 2-D sine-cosine initialisation is what MAE
    uses for its ViTs (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners", sec. 3),
    here as a starting value that still trains.
    """
    dim = weight.shape[-1]
    quarter = torch.arange(dim // 4, dtype=torch.float64) / (dim // 4)
    omega = 1.0 / 10000**quarter
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [f(torch.outer(axis.flatten(), omega)) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(parts, dim=1)])
    with torch.no_grad():
        weight.view(-1, dim)[:, : table.shape[1]].copy_(table.to(weight.dtype))


def init_vision_positions(model, grid: int) -> None:
    """`sincos_position_init` on the vision tower of `model`, wherever the architecture keeps it."""
    for module in model.modules():
        if hasattr(module, "patch_embedding") and hasattr(module, "position_embedding"):
            pos = module.position_embedding
            sincos_position_init(pos.weight if isinstance(pos, torch.nn.Embedding) else pos, grid)
            return
    raise ValueError(f"{type(model).__name__} has no vision embeddings")


def _clip_vision_config(hidden: int, layers: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=hidden,
    )


def build_blip2_opt(corpus, *, vision_hidden=64, qformer_hidden=64, text_hidden=128, layers=2,
                    num_query_tokens=8, patch_size=8, vocab_size=1500):
    """Blip2ForConditionalGeneration with an OPT language model and a Blip2Processor.

    No dropout in the Q-Former and OPT (the real configs have 0.1): a tiny model trained for minutes
    underfits, and dropout only slows it down.
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    # OPT convention: "</s>" is both bos and eos, and every sequence starts with it.
    bpe = train_byte_bpe(corpus, ["<pad>", "</s>", "<unk>", IMAGE_TOKEN], vocab_size)
    # No `image_token` attribute on the tokenizer: Blip2Processor 5.x expects an AddedToken there, not the
    # string a saved tokenizer gives back, and registers "<image>" itself (here already id 3).
    tokenizer = _fast_tokenizer(bpe, "</s>", bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=256)
    # Blip2VisionConfig's default initializer_range, 1e-10 (real BLIP-2 always loads a pre-trained image
    # encoder), is kept on purpose: the vision layers start at zero, so the encoder begins as a linear
    # read of each patch (plus its position) and its layers grow from there. Measured: with 0.02 instead,
    # the pre-trained base fine-tunes to a held-out CIDEr of 0.69 rather than 1.01 (config.yaml settings).
    vision = Blip2VisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                               num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                               image_size=IMAGE_SIZE, patch_size=patch_size)
    qformer = Blip2QFormerConfig(hidden_size=qformer_hidden, intermediate_size=2 * qformer_hidden,
                                 num_hidden_layers=layers, num_attention_heads=max(1, qformer_hidden // 32),
                                 encoder_hidden_size=vision_hidden, vocab_size=len(tokenizer),
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, word_embed_proj_dim=text_hidden,
                     ffn_dim=4 * text_hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, text_hidden // 32),
                     max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = Blip2ForConditionalGeneration(config)
    init_vision_positions(model, IMAGE_SIZE // patch_size)
    # transformers initialises the query tokens to zeros, which a Hub checkpoint overwrites. Left at zero,
    # all queries are identical and the Q-Former's first LayerNorm sees a zero-variance input: a gradient
    # norm of ~1e18 that, clipped, stalls every other weight. The BLIP-2 reference code (LAVIS,
    # `Blip2Base.init_Qformer`) draws them from N(0, initializer_range), as done here.
    with torch.no_grad():
        model.query_tokens.normal_(mean=0.0, std=config.qformer_config.initializer_range)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens)
    return model, processor


def build_llava(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, vocab_size=1500):
    """LlavaForConditionalGeneration (CLIP vision tower + Llama) and a LlavaProcessor with a chat template."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    bpe = train_byte_bpe(corpus, ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN], vocab_size)
    tokenizer = _fast_tokenizer(bpe, "<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=512,
                                extra_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vision = _clip_vision_config(vision_hidden, layers, patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=layers, num_attention_heads=max(1, text_hidden // 32),
                       num_key_value_heads=max(1, text_hidden // 32), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    # "default" drops CLS and keeps one feature per patch: (64 / patch_size)^2 image tokens.
    num_image_tokens = (IMAGE_SIZE // patch_size) ** 2
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=num_image_tokens, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config)
    init_vision_positions(model, IMAGE_SIZE // patch_size)
    processor = LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def build_clip(corpus, *, vision_hidden=64, text_hidden=64, projection_dim=64, layers=2, patch_size=8,
               vocab_size=1500):
    """CLIPModel and CLIPProcessor; text pooled at the first `<|endoftext|>` (the tokenizer's eos)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

    tokenizer = clip_tokenizer(corpus, vocab_size)
    tokenizer.model_max_length = 77
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden,
                          intermediate_size=2 * text_hidden, num_hidden_layers=layers,
                          num_attention_heads=max(1, text_hidden // 32), max_position_embeddings=77,
                          projection_dim=projection_dim, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = _clip_vision_config(vision_hidden, layers, patch_size)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    model = CLIPModel(config)
    init_vision_positions(model, IMAGE_SIZE // patch_size)
    return model, CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer)


def build_clip_vision(corpus, *, vision_hidden=64, layers=2, patch_size=8):
    """CLIPVisionModel and CLIPImageProcessor: the image encoder of a soft-prompt captioner."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(_clip_vision_config(vision_hidden, layers, patch_size))
    init_vision_positions(model, IMAGE_SIZE // patch_size)
    return model, _clip_image_processor()


def build_gpt2(corpus, *, hidden=128, layers=2, vocab_size=1500):
    """GPT2LMHeadModel and its tokenizer (`<|endoftext|>` is bos, eos and pad, as in GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = "<|endoftext|>"
    bpe = train_byte_bpe(corpus, [eot], vocab_size)
    # No bos prepended: GPT-2's tokenizer does not add special tokens.
    tokenizer = _fast_tokenizer(bpe, None, bos_token=eot, eos_token=eot, pad_token=eot, unk_token=eot,
                                model_max_length=256)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 32),
                        n_positions=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config), tokenizer


# --- SigLIP and SigLIP 2 (sigmoid-loss dual encoders) ---------------------------------------------------
SIGLIP_TEXT_LENGTH = 64  # SigLIP and SigLIP 2 read 64 text positions, trained with texts padded to 64


def siglip_tokenizer(corpus: tuple[str, ...], vocab_size: int):
    """A `SiglipTokenizer` (SentencePiece, T5-style: text + `</s>`, `</s>` also pads; lower-cased,
    punctuation removed) with a unigram model trained on `corpus`; byte fallback, so no text needs `<unk>`."""
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    # SigLIP's own vocabulary: pad 0, eos 1, unk 2, no bos. One thread: the same pieces on every machine.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t.lower() for t in corpus), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", num_threads=1, character_coverage=1.0,
        minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spiece.model"
        path.write_bytes(model.getvalue())
        return SiglipTokenizer(vocab_file=str(path), model_max_length=SIGLIP_TEXT_LENGTH)


def siglip2_tokenizer(corpus: tuple[str, ...], vocab_size: int):
    """A `Siglip2Tokenizer` (Gemma's BPE with byte fallback, lower-cased), its merges trained on `corpus`.

    The vocabulary starts as Gemma's: pad 0, eos 1, bos 2, unk 3, mask 4, then the 256 byte tokens
    `<0x00>`..`<0xFF>` that byte fallback needs, then the learned pieces.
    """
    from transformers import Siglip2Tokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = Siglip2Tokenizer().backend_tokenizer.normalizer  # lower-case, " " -> "▁"
    # Trained word by word ("a", "▁small", "▁red"), as Gemma's SentencePiece pieces never span words; the
    # tokenizer itself then applies the merges to the whole text, as Gemma's does.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return Siglip2Tokenizer(vocab=trained["vocab"], merges=merges, model_max_length=SIGLIP_TEXT_LENGTH)


def _siglip_text_config(config_cls, tokenizer, hidden: int, layers: int, projection: int):
    return config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      max_position_embeddings=SIGLIP_TEXT_LENGTH, projection_size=projection,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)


def init_patch_positions(weight: torch.Tensor, grid: int) -> None:
    """`sincos_position_init` for a ViT without a cls token (SigLIP's grid x grid position table)."""
    table = torch.zeros(grid * grid + 1, weight.shape[-1], dtype=weight.dtype)
    sincos_position_init(table, grid)
    with torch.no_grad():
        weight.copy_(table[1:].view_as(weight))


def init_sigmoid_head(model) -> None:
    """The sigmoid loss's starting temperature and bias: t' = log 10, b = -10 (Zhai et al. 2023, "Sigmoid
    Loss for Language Image Pre-Training", sec. 3.2); transformers initialises both to 0, which a Hub
    checkpoint overwrites."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
        model.logit_bias.fill_(-10.0)


def build_siglip(corpus, *, vision_hidden=64, text_hidden=64, layers=2, patch_size=8, vocab_size=1500):
    """SiglipModel (fixed resolution, 64 px) and a SiglipProcessor: SiglipImageProcessor (mean = std =
    0.5) and the SentencePiece SiglipTokenizer; the text is pooled at its last position."""
    from transformers import (SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor,
                              SiglipTextConfig, SiglipVisionConfig)

    tokenizer = siglip_tokenizer(corpus, vocab_size)
    text = _siglip_text_config(SiglipTextConfig, tokenizer, text_hidden, layers, vision_hidden)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                image_size=IMAGE_SIZE, patch_size=patch_size)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    init_patch_positions(model.vision_model.embeddings.position_embedding.weight, IMAGE_SIZE // patch_size)
    init_sigmoid_head(model)
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_siglip2(corpus, *, vision_hidden=64, text_hidden=64, layers=2, patch_size=8, vocab_size=1500):
    """Siglip2Model (NaFlex: each image resized to at most 64 patches at its own aspect ratio, with
    `pixel_attention_mask` and `spatial_shapes`) and a Siglip2Processor (Siglip2ImageProcessor,
    Siglip2Tokenizer); the text is pooled at its last position."""
    from transformers import (Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor,
                              Siglip2TextConfig, Siglip2VisionConfig)

    tokenizer = siglip2_tokenizer(corpus, vocab_size)
    grid = IMAGE_SIZE // patch_size
    text = _siglip_text_config(Siglip2TextConfig, tokenizer, text_hidden, layers, vision_hidden)
    vision = Siglip2VisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                 num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                 num_patches=grid * grid, patch_size=patch_size)
    model = Siglip2Model(Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict()))
    # NaFlex resizes this grid x grid table to each image's own patch grid.
    init_patch_positions(model.vision_model.embeddings.position_embedding.weight, grid)
    init_sigmoid_head(model)
    image_processor = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=grid * grid)
    return model, Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


BUILDERS = {
    "blip2-opt": build_blip2_opt,
    "llava": build_llava,
    "clip": build_clip,
    "clip-vision": build_clip_vision,
    "gpt2": build_gpt2,
    "siglip": build_siglip,
    "siglip2": build_siglip2,
}
# The VLM families of `tiny.families`, named by their model_type.
for _family in families.available():
    BUILDERS[_family] = families.builder(_family)
    BUILD_VERSIONS[_family] = families.VERSIONS[_family]


def build_tiny(name: str, out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Build tiny model `name` into `out_dir` (model + processor/tokenizer, via save_pretrained); return it.

    `overrides` are the builder's size options (e.g. `text_hidden=256`). The same seed gives identical
    weights and vocabulary.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(BUILDERS)}")
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        model, processor = BUILDERS[name](synthetic_corpus(seed=seed), **overrides)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_model.json").write_text(
        json.dumps({"name": name, "build_version": BUILD_VERSIONS[name], "seed": seed,
                    "overrides": overrides}, indent=2)
    )
    return out_dir


# What a distributed launcher tells its ranks; a child process that builds a cache entry must not see it.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def build_outside_process_group(module: str, name: str, final: Path, marker: str, root: Path) -> None:
    """In a rank of a distributed launch, build cache entry `final` with `python -m <module> <name>` in a
    child process.

    Once a process group is up, transformers' `save_pretrained` writes the weights on global rank 0 only,
    while build_once lets whichever rank takes the lock first build (and on a node with a cache of its own, no
    rank is 0): a rank would save a model folder without its weights. The child has no process group, and its
    own build_once keeps the ranks' children from building twice. Outside a launch, or once built, nothing
    happens.
    """
    import subprocess

    import torch.distributed as dist

    if (final / marker).exists() or not (dist.is_available() and dist.is_initialized()):
        return
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    repo = str(Path(__file__).resolve().parents[3])
    env.update(VLM_RECIPES_CACHE=str(root),
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", module, name], env=env, check=True)


def tiny_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of tiny model `name` (default sizes, seed 0), built on first use; safe under concurrent callers.

    `cache_dir` replaces the cache root (`$VLM_RECIPES_CACHE`); the model lives in `<root>/tiny/<name>-v<N>`.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(BUILDERS)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "tiny" / f"{name}-v{BUILD_VERSIONS[name]}"
    build_outside_process_group("recipes.common.tiny.models", name, final, "tiny_model.json", root)
    return build_once(final, lambda tmp: build_tiny(name, tmp))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.common.tiny.models",
                                description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(BUILDERS))
    p.add_argument("--out", help="build into this folder (default: the cache, $VLM_RECIPES_CACHE/tiny/...)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.seed != 0 and not args.out:
        p.error("--seed needs --out: the cache holds the seed-0 models only")
    if args.out:
        path = build_tiny(args.name, args.out, seed=args.seed)
    else:
        path = tiny_model_path(args.name)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
