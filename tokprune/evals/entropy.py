"""``tokprune eval entropy``: the visual matrix-entropy curve, the collapse layer EntropyPrune picks, and
the token counts before/after pruning, on tiny Llava and Qwen2-VL models.

No VLM weights are reachable from this machine (offline, no hub), so the models are built from configs
with random weights (seeded): the curve shows the machinery and the calibration, NOT the entropy
collapse of a trained LLaVA (the paper finds it around layer 2 of LLaVA-1.5-7B). Point ``--checkpoint``
at a local Llava / Qwen2-VL folder to run the same report on trained weights.

    tokprune eval entropy [--model llava|qwen2-vl|all] [--layers 8] [--keep 8] [--images 2]
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch


def _tiny_llava(layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=7, projection_dim=64)  # 64 visual tokens per image
    text = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=250,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=64)
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


def _llava_inputs(images: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    parts = [torch.randint(0, 200, (4,), generator=g)]
    for _ in range(images):
        parts += [torch.full((64,), 250), torch.randint(0, 200, (6,), generator=g)]
    return dict(input_ids=torch.cat(parts)[None], pixel_values=torch.randn(images, 3, 56, 56, generator=g))


_QWEN_IDS = dict(image_token_id=251, video_token_id=252, vision_start_token_id=253, vision_end_token_id=254)


def _tiny_qwen2_vl(layers: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)
    config._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(config).eval()


def _qwen_inputs(images: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    grid = (1, 8, 16)  # 128 patches -> 32 visual tokens per image
    tokens = grid[1] * grid[2] // 4
    parts = [torch.randint(3, 200, (4,), generator=g)]
    for _ in range(images):
        parts += [torch.tensor([_QWEN_IDS["vision_start_token_id"]]), torch.full((tokens,), _QWEN_IDS["image_token_id"]),
                  torch.tensor([_QWEN_IDS["vision_end_token_id"]]), torch.randint(3, 200, (6,), generator=g)]
    ids = torch.cat(parts)[None]
    return dict(input_ids=ids, pixel_values=torch.randn(images * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g),
                image_grid_thw=torch.tensor([grid] * images),
                mm_token_type_ids=(ids == _QWEN_IDS["image_token_id"]).int())


def report(name: str, model, inputs, keep: int) -> Tuple[int, List[float]]:
    from tokprune.hf.vlm import prune_visual_tokens
    from tokprune.methods.entropy_prune import EntropyPrune, find_collapse_layer

    layer, curve = find_collapse_layer(model, **inputs)
    print(f"\n{name}: {len(curve) - 1} language-model layers, random weights (seeded)")
    print("  layer  visual matrix entropy (input of the layer; last = output of the last layer)  drop")
    for i, value in enumerate(curve):
        drop = "" if i == 0 else f"{curve[i - 1] - value:+.4f}"
        mark = "  <- collapse layer (prune here)" if i == layer else ""
        print(f"  {i:5d}  {value:.4f}  {'#' * int(round(value * 40)):<40}  {drop}{mark}")
    with prune_visual_tokens(model, EntropyPrune(keep=keep, layer="auto"), calibration=inputs) as handle:
        with torch.no_grad():
            model(**inputs)
    last = handle.info["last"]
    print(f"  EntropyPrune(keep={keep}, layer='auto') -> layer {handle.info['layer']}: sequence {last['tokens_before']} -> "
          f"{last['tokens_after']} tokens in layers >= {handle.info['layer']}; visual tokens {last['visual_before']} -> "
          f"{last['visual_kept']}")
    return layer, curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval entropy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llava", "qwen2-vl", "all"], default="all")
    parser.add_argument("--layers", type=int, default=8, help="language-model layers of the tiny models")
    parser.add_argument("--keep", type=int, default=16, help="visual tokens kept per row")
    parser.add_argument("--images", type=int, default=2, help="images in the prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("No VLM weights are reachable offline here: tiny Llava / Qwen2-VL built from configs with random "
          "weights.\nThe curve exercises the calibration; it is not a trained model's entropy collapse.")
    if args.model in ("llava", "all"):
        torch.manual_seed(args.seed)
        model = _tiny_llava(args.layers)
        report("tiny Llava (CLIP 2x64 + Llama 128-wide, 64 visual tokens/image)", model,
               _llava_inputs(args.images, torch.Generator().manual_seed(args.seed)), args.keep)
    if args.model in ("qwen2-vl", "all"):
        torch.manual_seed(args.seed)
        model = _tiny_qwen2_vl(args.layers)
        report("tiny Qwen2-VL (2-block ViT + Qwen2 128-wide with M-RoPE, 32 visual tokens/image)", model,
               _qwen_inputs(args.images, torch.Generator().manual_seed(args.seed)), args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
