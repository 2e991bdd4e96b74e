"""Tiny LLaVA-OneVision: `LlavaOnevisionForConditionalGeneration` (SigLIP vision tower + Qwen2),
`LlavaOnevisionProcessor`, `LlavaOnevisionImageProcessor`.

Format (ChatML as the llava-hf OneVision checkpoints write it,
https://huggingface.co/docs/transformers/model_doc/llava_onevision): every turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, no default system turn, each image `<image>\\n` where the image
part stands. eos is `<|im_end|>`, pad `<|endoftext|>`.

Image tokens ("anyres"): the image is resized to the best of `image_grid_pinpoints` and cut into tiles of the
vision tower's `image_size`, plus one tile of the whole image. A lone image in its sample gives
`base + unpadded + newlines` tokens, where base = (image_size / patch_size)^2 for the whole-image tile and the
tile grid's features are cropped back to the image's aspect ratio with one newline token per row; each image
of a sample with several images gives base + 1 tokens (the whole-image tile and one newline), as the
checkpoints were trained on multi-image data. The processor knows which samples have several images only when
it is given them nested per sample (`images=[[a, b], [c], []]`); given a flat list it treats every image as
alone. The model needs the processor's `image_sizes` and `batch_num_images` to agree with it.
"""

from __future__ import annotations

from .qwen2_5_vl import chatml_template, chatml_tokenizer, require_torchvision, set_generation_eos

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# SigLIP's normalisation, as the OneVision checkpoints' processors have it.
HALF = [0.5, 0.5, 0.5]

CHAT_TEMPLATE = chatml_template("<image>\n", "<video>\n")


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, image_size=64, patch_size=16, heads=4,
          vocab_size=1500):
    """LLaVA-OneVision at toy size: 64 px tiles of 4 x 4 patches; a lone 64x64 image -> 36 image tokens,
    128x96 -> 70, an image among several -> 17."""
    require_torchvision("llava_onevision")
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = chatml_tokenizer(corpus, SPECIALS, vocab_size, CHAT_TEMPLATE, image_token="<image>",
                                 video_token="<video>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    # Tiles of 1x1 up to 2x2 (the real model: 1x1 up to 6x6 tiles of 384 px).
    pinpoints = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                  tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config)
    set_generation_eos(model, tokenizer)
    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints, do_pad=True,
                                                   image_mean=HALF, image_std=HALF)
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=HALF, image_std=HALF)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor,
                                        num_image_tokens=(image_size // patch_size) ** 2,
                                        vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9",
                                        chat_template=CHAT_TEMPLATE)
    return model, processor
