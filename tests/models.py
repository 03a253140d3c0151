"""Tiny models built from configs (no weights, no hub): fast enough for every test.

All use fp32, eval mode and a fixed seed so that two builds give the same weights.
"""

from __future__ import annotations

import torch

TINY_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _build(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    return model


def tiny_llama(attn_implementation: str = "sdpa", **overrides):
    """3-layer Llama, 4 query heads / 2 KV heads (GQA), head_dim 16, vocab 160."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_TEXT, **overrides})
    config._attn_implementation = attn_implementation
    return _build(LlamaForCausalLM, config)


def tiny_qwen2(attn_implementation: str = "sdpa", **overrides):
    """3-layer Qwen2 (q/k/v biases), 4 query heads / 2 KV heads, vocab 160."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**TINY_TEXT, **overrides})
    config._attn_implementation = attn_implementation
    return _build(Qwen2ForCausalLM, config)


LLAVA_IMAGE_TOKEN = 150
LLAVA_IMAGE_SIZE = 28
LLAVA_PATCH = 7
LLAVA_TOKENS_PER_IMAGE = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # 16


def tiny_llava(attn_implementation: str = "sdpa"):
    """Llava with a 1-layer CLIP tower (28x28 images, 7x7 patches -> 16 visual tokens per image)
    and a 3-layer Llama language model; image token id 150."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH, projection_dim=32)
    text = LlamaConfig(**TINY_TEXT)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=LLAVA_TOKENS_PER_IMAGE)
    config._attn_implementation = attn_implementation
    return _build(LlavaForConditionalGeneration, config)


def llava_inputs(batch: int = 1, n_text_before: int = 3, n_text_after: int = 4, seed: int = 0):
    """``input_ids (batch, n)`` with one image placeholder block per row and ``pixel_values``."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(0, 100, (n_text_before,), generator=g),
                       torch.full((LLAVA_TOKENS_PER_IMAGE,), LLAVA_IMAGE_TOKEN),
                       torch.randint(0, 100, (n_text_after,), generator=g)]) for _ in range(batch)]
    pixel_values = torch.randn(batch, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=g)
    return torch.stack(rows), pixel_values


QWEN2VL_IDS = dict(image_token_id=151, video_token_id=152, vision_start_token_id=153, vision_end_token_id=154)


def tiny_qwen2_vl(attn_implementation: str = "sdpa"):
    """Qwen2-VL with a 1-layer vision tower (patch 14, 2x2 merge) and a 3-layer language model using
    multimodal RoPE (mrope_section [2, 3, 3] for head_dim 16)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(TINY_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                             "rope_theta": 10000.0},
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **QWEN2VL_IDS)
    config._attn_implementation = attn_implementation
    return _build(Qwen2VLForConditionalGeneration, config)
