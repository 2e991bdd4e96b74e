"""Tiny Qwen2.5-VL: `Qwen2_5_VLForConditionalGeneration`, `Qwen2_5_VLProcessor`, `Qwen2VLImageProcessor`.

Format (ChatML, https://huggingface.co/docs/transformers/model_doc/qwen2_5_vl): every turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, a default system turn "You are a helpful assistant." when the
conversation has none, and each image is `<|vision_start|><|image_pad|><|vision_end|>` where the image
part stands. The processor repeats `<|image_pad|>` once per merged patch: an image resized to a multiple
of `patch_size * merge_size` px (between `min_pixels` and `max_pixels`) gives
`(h / patch_size) * (w / patch_size) / merge_size**2` tokens, so the count follows the image's size.
eos is `<|im_end|>` (the end of an assistant turn), pad `<|endoftext|>`.

Training needs `mm_token_type_ids` (the processor returns it) passed to the model, with `image_grid_thw`:
without it the model cannot build its 3-D (M-RoPE) position ids and falls back to 1-D ones.

The ChatML template, tokenizer and eos helpers here serve the other ChatML families too (Qwen3-VL,
LLaVA-OneVision, InternVL). Like theirs, this family's transformers processor holds a video processor, which
needs torchvision.
"""

from __future__ import annotations

from ..models import CLIP_MEAN, CLIP_STD, _fast_tokenizer, train_byte_bpe

# In the order of Qwen's vocabulary (151643 onward), so ids keep the same relative layout.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def require_torchvision(model_type: str) -> None:
    """Fail with what to do: transformers builds this family's processor with its video processor, and its
    video processors need torchvision."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(f"tiny:{model_type} needs torchvision: the {model_type} processor of transformers "
                          "holds a video processor, which needs it; install torchvision built for your "
                          "torch")


def chatml_template(image: str, video: str, default_system: str | None = None) -> str:
    """A ChatML chat template (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, `add_generation_prompt`
    opens an assistant turn); an image part renders as `image`, a video part as `video`, where they stand.
    `default_system` opens a conversation that has no system turn (Qwen2.5-VL has one, the others not)."""
    opening = ""
    if default_system is not None:
        opening = ("{%- if messages[0]['role'] != 'system' -%}"
                   "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}"
                   "{%- endif -%}")
    return (
        opening
        + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'video' -%}{{ '" + video + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


def chatml_tokenizer(corpus, specials: list[str], vocab_size: int, chat_template: str,
                     **extra_special_tokens):
    """Byte-level BPE with `specials` first; eos `<|im_end|>` (the end of an assistant turn), pad
    `<|endoftext|>`, no bos, as the Qwen tokenizers these families use."""
    bpe = train_byte_bpe(corpus, specials, vocab_size)
    tokenizer = _fast_tokenizer(bpe, None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                model_max_length=1024, extra_special_tokens=extra_special_tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def set_generation_eos(model, tokenizer) -> None:
    """Generation stops at `<|im_end|>` or `<|endoftext|>`, as in the chat checkpoints' generation_config."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.eos_token_id = ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")


def qwen_image_processor_options(patch_size: int, merge_size: int, max_side: int, mean, std) -> dict:
    """Options of Qwen's dynamic-resolution image and video processors: at least 2 x 2 merged tokens per
    image (or frame), at most a max_side x max_side image."""
    factor = patch_size * merge_size
    return {"size": {"shortest_edge": 4 * factor * factor, "longest_edge": max_side**2},
            "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": merge_size,
            "image_mean": mean, "image_std": std}


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, merge_size=2, heads=4,
          max_side=128, vocab_size=1500):
    """Qwen2.5-VL at toy size: 64x64 image -> 16 image tokens, 128x96 -> 48."""
    require_torchvision("qwen2_5_vl")
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    template = chatml_template(QWEN_IMAGE, QWEN_VIDEO, default_system="You are a helpful assistant.")
    tokenizer = chatml_tokenizer(corpus, SPECIALS, vocab_size, template, image_token="<|image_pad|>",
                                 video_token="<|video_pad|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    head_dim = text_hidden // heads
    # Qwen2.5-VL splits the rotary half-dimension 16:24:24 over (time, height, width); same ratio here.
    half = head_dim // 2
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    # Windows of 2 x 2 merged tokens; the last layer attends to the whole image (as every 8th layer of the
    # real model does).
    vision = Qwen2_5_VLVisionConfig(
        depth=layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
        num_heads=max(1, vision_hidden // 32), patch_size=patch_size, spatial_merge_size=merge_size,
        temporal_patch_size=2, out_hidden_size=text_hidden, window_size=2 * merge_size * patch_size,
        fullatt_block_indexes=[layers - 1])
    text = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024, max_window_layers=layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(config)
    set_generation_eos(model, tokenizer)
    options = qwen_image_processor_options(patch_size, merge_size, max_side, CLIP_MEAN, CLIP_STD)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**options), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**options), chat_template=template)
    return model, processor
