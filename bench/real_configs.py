"""The real architectures the recipes fine-tune, as configs for `python -m bench <recipe> --size real` (random
weights).

Every number comes from the checkpoint's config.json on the Hugging Face Hub; where a field is not in that
file the checkpoint uses transformers' default, and the default is what these configs leave in place (checked
against the installed transformers 5 classes by tests/test_bench.py: hidden sizes, layer counts, parameter
counts).
"""

from __future__ import annotations


def blip2_opt_2_7b():
    """Salesforce/blip2-opt-2.7b: EVA ViT-g/14 at 224 px, a 12-layer Q-Former with 32 queries, OPT-2.7B.

    config.json sets num_query_tokens 32, image_token_index 50265 and, for the OPT: hidden 2560, ffn 10240,
    32 layers, 32 heads, word_embed_proj_dim 2560, vocab 50304 (OPT's 50272 with `<image>` added, padded),
    eos 50118. It sets no size fields of the vision tower or Q-Former: theirs are transformers' defaults
    (Blip2VisionConfig: 1408 wide, 39 layers, 16 heads, MLP 6144, patch 14, 224 px; Blip2QFormerConfig: 768
    wide, 12 layers, cross-attention every 2nd layer), which are ViT-g and the Q-Former of the BLIP-2 paper
    (Li et al. 2023, table 1 and sec. 3.1).
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    text = OPTConfig(vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, word_embed_proj_dim=2560, eos_token_id=50118)
    return Blip2Config(vision_config=Blip2VisionConfig().to_dict(),
                       qformer_config=Blip2QFormerConfig().to_dict(), text_config=text.to_dict(),
                       num_query_tokens=32, image_token_index=50265)


def clip_vit_b32():
    """openai/clip-vit-base-patch32: ViT-B/32 at 224 px, a 12-layer 512-wide text tower over 77 positions,
    512-d embeddings.

    transformers' CLIPConfig defaults are this checkpoint's dims. Its config.json keeps the legacy text ids
    bos 0, pad 1, eos 2; with eos 2 the text tower pools at the largest token id (argmax), which for CLIP's
    tokenizer, and for the tiny one the e2e mode uses, is the end-of-text token.
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(bos_token_id=0, pad_token_id=1, eos_token_id=2)
    return CLIPConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig().to_dict())


def clip_vit_b32_vision():
    """The vision tower of openai/clip-vit-base-patch32 (CLIPVisionConfig's defaults: 768 wide, 12 layers,
    patch 32, 224 px)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig()


def gpt2_small():
    """gpt2 (124M): GPT2Config's defaults are its config.json (768 wide, 12 layers, 12 heads, 1024 positions,
    vocab 50257)."""
    from transformers import GPT2Config

    return GPT2Config()


def llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 image tokens from layer -2), a 2-layer GELU
    projector, Vicuna-7B.

    config.json: image_token_index 32000, pad 32001, projector gelu, vision_feature_layer -2, strategy
    "default"; vision 1024 wide, MLP 4096, 24 layers, 16 heads, patch 14, 336 px, projection_dim 768; text
    (lmsys/vicuna-7b-v1.5, a Llama-2-7B) vocab 32064, 4096 positions, rms_norm_eps 1e-5, the rest
    LlamaConfig's defaults (4096 wide, MLP 11008, 32 layers, 32 heads).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                       pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def siglip2_base_patch16_224():
    """google/siglip2-base-patch16-224: SigLIP 2's fixed-resolution ViT-B/16 at 224 px (196 patches, an
    attention-pooling head) and a 12-layer 768-wide text tower over 64 positions with Gemma's 256k vocabulary;
    768-d embeddings.

    The fixed-resolution SigLIP 2 checkpoints are SiglipModel (model_type "siglip"), the NaFlex ones
    Siglip2Model. The dims are SigLIP 2's B/16 (Tschannen et al. 2025, "SigLIP 2", sec. 2 and table 1: ViT-B,
    Gemma tokenizer, text length 64); the rest are SiglipConfig's defaults (768 wide, MLP 3072, 12 layers, 12
    heads, gelu_pytorch_tanh, patch 16, 224 px), which are also SigLIP's B/16. Gemma's ids: pad 0, eos 1.
    """
    from transformers import SiglipConfig, SiglipTextConfig, SiglipVisionConfig

    text = SiglipTextConfig(vocab_size=256_000, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2)
    return SiglipConfig(text_config=text.to_dict(), vision_config=SiglipVisionConfig().to_dict())


def qwen2_5_vl_7b():
    """Qwen/Qwen2.5-VL-7B-Instruct: a 32-block window-attention ViT (patch 14, 2 x 2 patch merger) over images
    at their own resolution, and a 28-layer Qwen2.5-7B LM with M-RoPE.

    config.json, text: hidden 3584, MLP 18944, 28 layers, 28 heads, 4 key/value heads, vocab 152064,
    rms_norm_eps 1e-6, rope_theta 1e6, 128000 positions, rope_scaling {"type": "mrope", "mrope_section":
    [16, 24, 24]}, tie_word_embeddings false, bos 151643, eos 151645; vision_start 151652, vision_end 151653,
    image 151655, video 151656. vision_config: depth 32, hidden 1280, MLP 3420, 16 heads, out_hidden_size
    3584, patch 14, spatial_merge_size 2, temporal_patch_size 2, window_size 112, full attention in blocks
    7, 15, 23 and 31, tokens_per_second 2, silu. transformers 5 takes the text fields as a text_config and
    the mrope rope_scaling as rope_parameters of type "default" with the mrope_section.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    vision = Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                    out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                                    temporal_patch_size=2, window_size=112,
                                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                                    hidden_act="silu")
    text = Qwen2_5_VLTextConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                rms_norm_eps=1e-6, max_position_embeddings=128000,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [16, 24, 24]},
                                bos_token_id=151643, eos_token_id=151645)
    return Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                            video_token_id=151656, tie_word_embeddings=False)
