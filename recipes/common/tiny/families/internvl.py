"""Tiny InternVL (3.x, transformers-native): `InternVLForConditionalGeneration` (InternViT + Qwen2),
`InternVLProcessor`, `GotOcr2ImageProcessor`.

Format (ChatML, https://huggingface.co/docs/transformers/model_doc/internvl): every turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, no default system turn, each image `<IMG_CONTEXT>\\n` where the
image part stands; the processor replaces each `<IMG_CONTEXT>` by `<img>` + `<IMG_CONTEXT>` x
(image_seq_length * tiles) + `</img>`. eos is `<|im_end|>`, pad `<|endoftext|>`.

Image tokens: the image is cut into tiles of the vision tower's `image_size` on the grid (at most
`max_patches` tiles) whose aspect ratio is closest to the image's (ties go to more tiles while they cover
less than twice the image's area), plus a thumbnail tile when there is more than one; each tile gives
`image_seq_length = (image_size / patch_size)^2 * downsample_ratio^2` tokens (pixel shuffle). The processor's
`pixel_values` hold every tile of every image, one row per tile.
"""

from __future__ import annotations

from .qwen2_5_vl import chatml_template, chatml_tokenizer, require_torchvision, set_generation_eos

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", "<video>\n")


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, image_size=32, patch_size=8, heads=4,
          max_patches=6, vocab_size=1500):
    """InternVL at toy size: 32 px tiles of 4 tokens each; 64x64 image -> 2 x 2 tiles + thumbnail = 20 image
    tokens, 128x96 -> 3 x 2 tiles + thumbnail = 28."""
    require_torchvision("internvl")
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    # The attributes InternVLProcessor reads from the tokenizer, as the InternVL-hf tokenizers have them.
    tokenizer = chatml_tokenizer(corpus, SPECIALS, vocab_size, CHAT_TEMPLATE, start_image_token="<img>",
                                 end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                                 video_token="<video>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    downsample_ratio = 0.5
    image_seq_length = int((image_size // patch_size) ** 2 * downsample_ratio**2)
    vision = InternVLVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                  image_size=image_size, patch_size=patch_size)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=image_seq_length, downsample_ratio=downsample_ratio,
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=True)
    model = InternVLForConditionalGeneration(config)
    set_generation_eos(model, tokenizer)
    size = {"height": image_size, "width": image_size}
    # InternVL's processors normalise with ImageNet statistics.
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1,
                                            max_patches=max_patches, image_mean=mean, image_std=std)
    video_processor = InternVLVideoProcessor(size=size, image_mean=mean, image_std=std)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=image_seq_length,
                                  chat_template=CHAT_TEMPLATE)
    return model, processor
