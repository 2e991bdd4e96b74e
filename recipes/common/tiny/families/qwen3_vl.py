"""Tiny Qwen3-VL: `Qwen3VLForConditionalGeneration`, `Qwen3VLProcessor`, `Qwen2VLImageProcessor`.

Format (ChatML, https://huggingface.co/docs/transformers/model_doc/qwen3_vl): every turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n` with no default system turn, each image
`<|vision_start|><|image_pad|><|vision_end|>` where the image part stands. As in Qwen2.5-VL the processor
repeats `<|image_pad|>` `(h / patch_size) * (w / patch_size) / merge_size**2` times for the image resized to
a multiple of `patch_size * merge_size` px. eos is `<|im_end|>`, pad `<|endoftext|>`.

Differences from Qwen2.5-VL the training code sees: interleaved M-RoPE (`mrope_interleaved`), a learned
vision position table interpolated to each image's grid, and "deepstack" features of the listed vision
layers added to the first language-model layers. Training needs `mm_token_type_ids` and `image_grid_thw`
passed to the model, as Qwen2.5-VL.
"""

from __future__ import annotations

from .qwen2_5_vl import (
    QWEN_IMAGE,
    QWEN_VIDEO,
    SPECIALS,
    chatml_template,
    chatml_tokenizer,
    qwen_image_processor_options,
    require_torchvision,
    set_generation_eos,
)

# Qwen3-VL's processors normalise with mean = std = 0.5 (the SigLIP 2 vision tower's convention).
HALF = [0.5, 0.5, 0.5]


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, merge_size=2, heads=4,
          max_side=128, vocab_size=1500):
    """Qwen3-VL at toy size: 64x64 image -> 16 image tokens, 128x96 -> 48."""
    require_torchvision("qwen3_vl")
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLTextConfig,
        Qwen3VLVisionConfig,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    template = chatml_template(QWEN_IMAGE, QWEN_VIDEO)
    tokenizer = chatml_tokenizer(corpus, SPECIALS, vocab_size, template, image_token="<|image_pad|>",
                                 video_token="<|video_pad|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    head_dim = text_hidden // heads
    # Qwen3-VL splits the rotary half-dimension 24:20:20 over (time, height, width), interleaved.
    half = head_dim // 2
    hw = half * 20 // 64
    grid = max_side // patch_size  # the learned vision position table covers the largest image's patches
    vision = Qwen3VLVisionConfig(
        depth=layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
        num_heads=max(1, vision_hidden // 32), patch_size=patch_size, spatial_merge_size=merge_size,
        temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=grid * grid,
        deepstack_visual_indexes=[0])
    text = Qwen3VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                         "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
        pad_token_id=ids["<|endoftext|>"])
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(config)
    set_generation_eos(model, tokenizer)
    options = qwen_image_processor_options(patch_size, merge_size, max_side, HALF, HALF)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**options), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(**options), chat_template=template)
    return model, processor
