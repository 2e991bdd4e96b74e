"""Tiny SmolVLM (`SmolVLMForConditionalGeneration`: SigLIP-style vision tower, pixel-shuffle connector,
Llama).

Format (SmolVLM2 Instruct, https://huggingface.co/docs/transformers/model_doc/smolvlm): one
`<|im_start|>` at the start, then per turn `User:` / `Assistant:` / `System:`, a space before text that
does not start with an image, the turn's parts, `<end_of_utterance>\\n`; the generation prompt is
`Assistant:` (the model writes the leading space). Each `<image>` placeholder is expanded by the processor
to `<fake_token_around_image><row_i_col_j><image>*n` per tile, a blank line, then
`<fake_token_around_image><global-img><image>*n<fake_token_around_image>` for the whole image.
Several images per conversation are allowed.

Images: the longest edge is resized to `size` (128 px), padded up to whole 64 px tiles, split into those
tiles plus the whole image at 64 px; each 64 px view gives (64 / 8)^2 / 4^2 = 4 tokens, so a 64x64
image (upscaled to 128) gives 2x2 tiles + 1 = 20 image tokens.

The processor is `Idefics3Processor` (the prompt expansion and image splitting SmolVLM's own processor
inherits), with the real `SmolVLMImageProcessor`: `SmolVLMProcessor` also holds a video processor,
which cannot be built without torchvision.
"""

from __future__ import annotations

import torch

from ..models import _fast_tokenizer, sincos_position_init, train_byte_bpe

TILE = 64  # the vision encoder's input size: each tile and the global image
MAX_SPLITS = 6  # <row_i_col_j> tokens for up to 6x6 tiles, as the processor looks them up

SMOLVLM_CHAT_TEMPLATE = (
    "{{- '<|im_start|>' -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}"
    "{%- if message['content'] is string -%}{{- ': ' + message['content'] -}}"
    "{%- else -%}"
    "{%- if message['content'][0]['type'] == 'image' -%}{{- ':' -}}{%- else -%}{{- ': ' -}}{%- endif -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<end_of_utterance>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def init_patch_positions(embedding: torch.nn.Embedding, grid: int) -> None:
    """`sincos_position_init` for a SigLIP-style position table: one row per patch, no class token."""
    table = torch.zeros(grid * grid + 1, embedding.weight.shape[-1])
    sincos_position_init(table, grid)
    with torch.no_grad():
        embedding.weight.copy_(table[1:])


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, scale_factor=4,
          longest_edge=2 * TILE, vocab_size=1500):
    """SmolVLMForConditionalGeneration, an Idefics3Processor with SmolVLMImageProcessor and a chat
    template."""
    from transformers import (
        GenerationConfig,
        Idefics3Processor,
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMVisionConfig,
    )

    image_specials = ["<fake_token_around_image>", "<image>", "<global-img>"] + [
        f"<row_{i + 1}_col_{j + 1}>" for i in range(MAX_SPLITS) for j in range(MAX_SPLITS)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"] + image_specials
    bpe = train_byte_bpe(corpus, specials, vocab_size)
    # As SmolVLM2 Instruct: no bos added by the tokenizer (the template writes <|im_start|>), the
    # end-of-turn token is eos, <|im_end|> pads.
    tokenizer = _fast_tokenizer(bpe, None, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=2048,
                                extra_special_tokens={"image_token": "<image>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    vision = SmolVLMVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                 num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                 image_size=TILE, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=layers, num_attention_heads=max(1, text_hidden // 32),
                       num_key_value_heads=max(1, text_hidden // 64), max_position_embeddings=2048,
                       rms_norm_eps=1e-5, pad_token_id=ids["<|im_end|>"], bos_token_id=ids["<|im_start|>"],
                       eos_token_id=ids["<end_of_utterance>"], tie_word_embeddings=False)
    config = SmolVLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                           scale_factor=scale_factor, image_token_id=ids["<image>"],
                           pad_token_id=ids["<|im_end|>"])
    model = SmolVLMForConditionalGeneration(config)
    init_patch_positions(model.model.vision_model.embeddings.position_embedding, TILE // patch_size)
    model.generation_config = GenerationConfig(bos_token_id=ids["<|im_start|>"],
                                               eos_token_id=[ids["<end_of_utterance>"]],
                                               pad_token_id=ids["<|im_end|>"])
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": longest_edge},
                                               max_image_size={"longest_edge": TILE}, do_image_splitting=True,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_seq_len = (TILE // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)
    return model, processor
