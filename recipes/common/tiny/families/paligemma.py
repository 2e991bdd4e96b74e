"""Tiny PaliGemma 2 (`PaliGemmaForConditionalGeneration`: SigLIP vision tower, linear projector, Gemma 2).

Format (https://huggingface.co/docs/transformers/model_doc/paligemma): no chat template. The processor is
given a prefix (`text=`, the task prompt such as `caption en` or `answer en <question>`) and, for
training, a `suffix=` (the target). It builds `<image>*image_seq_length` per image, `<bos>`, the
prefix, `\\n`, then the suffix and `<eos>`, and returns `token_type_ids` (0 on image + prefix, 1 on the
suffix) and `labels` (the suffix and its `<eos>`; everything else -100). The model attends
bidirectionally within image + prefix and causally over the suffix when given `token_type_ids`; without
a suffix (inference) the processor returns `token_type_ids` of zeros.

Images are resized to 64x64 whatever their size; one token per 8x8 patch: 64 tokens per image. The
processor adds PaliGemma's `<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>` tokens to the
vocabulary, as the real one has them.
"""

from __future__ import annotations

from tokenizers import processors

from ..models import _fast_tokenizer, train_byte_bpe
from .smolvlm import init_patch_positions

IMAGE_SIZE = 64


def build(corpus, *, vision_hidden=64, text_hidden=128, layers=2, patch_size=8, vocab_size=1500):
    """PaliGemmaForConditionalGeneration (Gemma 2 text) and a PaliGemmaProcessor with SiglipImageProcessor."""
    from transformers import (
        Gemma2Config,
        GenerationConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    bpe = train_byte_bpe(corpus, specials, vocab_size)
    # The processor writes <bos> itself (after the image tokens) and turns the Gemma tokenizer's own bos
    # off; the suffix (second sequence) is type 1, which is where the labels come from.
    bpe.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    tokenizer = _fast_tokenizer(bpe, None, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=2048,
                                extra_special_tokens={"image_token": "<image>"})
    num_image_tokens = (IMAGE_SIZE // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor.image_seq_length = num_image_tokens
    # Built before the model: the processor adds the <loc>/<seg> tokens, which the vocabulary must cover.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=layers, num_attention_heads=max(1, vision_hidden // 32),
                                image_size=IMAGE_SIZE, patch_size=patch_size, vision_use_head=False,
                                projection_dim=text_hidden)
    heads = max(1, text_hidden // 32)
    text = Gemma2Config(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 2), head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=256, max_position_embeddings=2048,
                        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
                        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=ids["<image>"], projection_dim=text_hidden,
                             hidden_size=text_hidden, vocab_size=len(tokenizer))
    model = PaliGemmaForConditionalGeneration(config)
    init_patch_positions(model.model.vision_tower.embeddings.position_embedding, IMAGE_SIZE // patch_size)
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"]],
                                               pad_token_id=ids["<pad>"])
    return model, processor
