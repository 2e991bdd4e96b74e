"""Tiny Gemma 3 (`Gemma3ForConditionalGeneration`: SigLIP vision tower, average-pooled projector, Gemma 3).

Format (gemma-3 -it, https://huggingface.co/docs/transformers/model_doc/gemma3): `<bos>`, then per turn
`<start_of_turn>user\\n` or `<start_of_turn>model\\n` (the assistant role is written `model`), the
turn's parts with text trimmed, `<end_of_turn>\\n`; a system message has no turn of its own, its text
and a blank line open the first user turn. The generation prompt is `<start_of_turn>model\\n`. An image
part is written `<start_of_image>`, which the processor expands to
`\\n\\n<start_of_image><image_soft_token>*mm_tokens_per_image<end_of_image>\\n\\n`. Several images per
conversation are allowed.

Images are resized to 64x64 whatever their size (no pan-and-scan); the 8x8 patch grid is average-pooled
2x2 to `mm_tokens_per_image` = 16 tokens per image. The processor returns `token_type_ids` (1 on image
tokens), which the model needs in training for the bidirectional attention among an image's tokens.

As the Gemma tokenizer, this one prepends `<bos>` itself; the template writes `<bos>` too, so a rendered
conversation is tokenized with `add_special_tokens=False`. As in gemma-3 -it, eos is `<eos>` and
the generation config stops on `<eos>` and `<end_of_turn>`.
"""

from __future__ import annotations

from ..models import _fast_tokenizer, train_byte_bpe
from .smolvlm import init_patch_positions

IMAGE_SIZE = 64

GEMMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] | trim + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, mm_tokens_per_image=16,
          vocab_size=1500):
    """Gemma3ForConditionalGeneration and a Gemma3Processor (Gemma3ImageProcessor) with a chat template."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    # Gemma's ids: pad 0, eos 1, bos 2, unk 3.
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    bpe = train_byte_bpe(corpus, specials, vocab_size)
    tokenizer = _fast_tokenizer(bpe, "<bos>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=2048,
                                extra_special_tokens={"boi_token": "<start_of_image>",
                                                      "eoi_token": "<end_of_image>",
                                                      "image_token": "<image_soft_token>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                image_size=IMAGE_SIZE, patch_size=patch_size, vision_use_head=False)
    heads = max(1, text_hidden // 32)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=text_hidden,
                            intermediate_size=2 * text_hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=32,
                            query_pre_attn_scalar=32, sliding_window=256, max_position_embeddings=2048,
                            # Gemma 3 mixes local (sliding) and global layers; alternate them here.
                            layer_types=[("sliding_attention", "full_attention")[i % 2]
                                         for i in range(layers)],
                            pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    # The pooling kernel is (image_size / patch_size) / sqrt(mm_tokens_per_image): 8 / 4 = 2.
    if (IMAGE_SIZE // patch_size) % int(mm_tokens_per_image**0.5):
        raise ValueError(f"mm_tokens_per_image={mm_tokens_per_image} does not pool a "
                         f"{IMAGE_SIZE // patch_size}x{IMAGE_SIZE // patch_size} patch grid evenly")
    config = Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          mm_tokens_per_image=mm_tokens_per_image, boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config)
    init_patch_positions(model.model.vision_tower.embeddings.position_embedding,
                         IMAGE_SIZE // patch_size)
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                              do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                image_seq_length=mm_tokens_per_image, chat_template=GEMMA3_CHAT_TEMPLATE)
    return model, processor
