"""Tiny Llama 3.2 Vision (`MllamaForConditionalGeneration`: tiled ViT, cross-attention layers in Llama).

Format (Llama 3.2 Vision Instruct, https://huggingface.co/docs/transformers/model_doc/mllama):
`<|begin_of_text|>`, then per turn `<|start_header_id|>{role}<|end_header_id|>\\n\\n`, the turn's parts
(an image part is `<|image|>`), `<|eot_id|>`; the generation prompt is
`<|start_header_id|>assistant<|end_header_id|>\\n\\n`. (The Instruct checkpoints' template also writes a
system turn with a knowledge-cutoff date for text-only chats; this one writes a system turn only for a
system message, and without the date.) `<|image|>` stays one token in the text: the
image reaches the language model only through the cross-attention layers, so no image tokens take text
positions. The processor returns `cross_attention_mask` (which text tokens see which image's tiles:
from an image's `<|image|>` on), `aspect_ratio_ids`, `aspect_ratio_mask` and `pixel_values` of shape
(batch, images, max_image_tiles, 3, 64, 64). Several images per conversation are allowed.

Images are tiled: resized to fit the best of the canvases of at most `max_image_tiles` = 2 tiles of 64 px
(1x1, 1x2, 2x1), e.g. a 64x64 image is one tile and a 128x96 image two. Each tile gives 8x8 patches
plus a class token to the cross-attention.

As the Llama 3 tokenizer, this one prepends `<|begin_of_text|>` itself and the template writes it too:
tokenize a rendered conversation with `add_special_tokens=False`. eos is `<|eot_id|>` and the generation
config stops on `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`, as in Llama 3.2 Vision Instruct.
"""

from __future__ import annotations

from ..models import CLIP_MEAN, CLIP_STD, _fast_tokenizer, sincos_position_init, train_byte_bpe

TILE = 64

MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, max_image_tiles=2,
          vocab_size=1500):
    """MllamaForConditionalGeneration (`layers` self-attention layers with one cross-attention layer
    between them) and a MllamaProcessor with MllamaImageProcessor and a chat template."""
    from transformers import (
        GenerationConfig,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    bpe = train_byte_bpe(corpus, specials, vocab_size)
    tokenizer = _fast_tokenizer(bpe, "<|begin_of_text|>", bos_token="<|begin_of_text|>",
                                eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                                model_max_length=2048, extra_special_tokens={"image_token": "<|image|>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    # The canvases of at most `max_image_tiles` tiles, as the image processor enumerates them.
    aspect_ratios = [[w, h] for w in range(1, max_image_tiles + 1) for h in range(1, max_image_tiles + 1)
                     if w * h <= max_image_tiles]
    intermediate_layers = list(range(layers))
    vision = MllamaVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=layers, num_global_layers=1,
                                attention_heads=max(1, vision_hidden // 32), image_size=TILE,
                                patch_size=patch_size, max_num_tiles=max_image_tiles,
                                supported_aspect_ratios=aspect_ratios,
                                intermediate_layers_indices=intermediate_layers,
                                # the last layer's output concatenated with each intermediate layer's
                                vision_output_dim=vision_hidden * (len(intermediate_layers) + 1))
    # Llama 3.2 Vision puts a cross-attention layer after every few self-attention layers; here one
    # sits between the two.
    heads = max(1, text_hidden // 32)
    text = MllamaTextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden,
                            intermediate_size=2 * text_hidden, num_hidden_layers=layers + 1,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                            cross_attention_layers=[layers // 2], max_position_embeddings=2048,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                            bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                            pad_token_id=ids["<|finetune_right_pad_id|>"])
    config = MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=ids["<|image|>"])
    model = MllamaForConditionalGeneration(config)
    sincos_position_init(model.model.vision_model.gated_positional_embedding.embedding, TILE // patch_size)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"], pad_token_id=ids["<|finetune_right_pad_id|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]])
    image_processor = MllamaImageProcessorPil(size={"height": TILE, "width": TILE},
                                              max_image_tiles=max_image_tiles, image_mean=CLIP_MEAN,
                                              image_std=CLIP_STD)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=MLLAMA_CHAT_TEMPLATE)
    return model, processor
