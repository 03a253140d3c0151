"""Prefill of a LLaVA-shaped language model, unpruned vs EntropyPrune at layer 2.

    python -m benchmarks.bench_vlm_prefill      (or: tokprune bench vlm-prefill)

Shape: 576 visual + 64 text tokens, 32 decoder layers, 32 heads (no GQA), MLP ratio 2.6875 like
LLaVA-1.5-7B, vocab 32000, batch 1, fp32. The width is scaled down (default hidden 1024, head dim 32
instead of 4096/128) because a 7B model does not fit this 24 GiB CPU in fp32; the number of heads is
kept so EntropyPrune's per-token ``H x H`` Gram/eigen work is the real one, which makes the scoring
overhead here PESSIMISTIC (a 7B prefill is ~16x more work for the same scoring cost). The vision tower
is a 1-layer 64-wide CLIP (its cost is in every provider). Prefill = one forward with
``logits_to_keep=1`` (what ``generate`` does). One torch thread by default (``--threads``): on this
shared 2-core machine, 2-thread runs put a ~20 ms straggler floor under every op (measured: an 8-layer
prefill took 12.0 s with 2 threads and 5.0 s with 1), which hides what pruning saves.

Printed per provider: median prefill time and ratio vs unpruned (benchmarks.runner.compare), analytic
FLOPs of the language model (linear layers + causal attention + one lm_head row) and their ratio,
KV-cache bytes actually held after the prefill, and the scoring overhead (policy.score + top-k, measured
inside the prefill) as % of the pruned prefill time.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.runner import compare


def build_model(hidden: int, layers: int, heads: int, visual: int, vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    side = int(round(visual ** 0.5))
    if side * side != visual:
        raise ValueError(f"--visual must be a square number of patches, got {visual}")
    patch = 14
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=side * patch, patch_size=patch, projection_dim=64)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=visual)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, side * patch


def lm_flops(cfg, lengths) -> float:
    """Forward FLOPs of the decoder for per-layer sequence lengths ``lengths`` (causal attention)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    kv = cfg.num_key_value_heads * hd
    inter = cfg.intermediate_size
    total = 0.0
    for n in lengths:
        linear = 2 * n * (d * d + 2 * d * kv + d * d + 3 * d * inter)
        attention = 2 * 2 * heads * hd * n * (n + 1) / 2
        total += linear + attention
    return total + 2 * d * cfg.vocab_size  # one lm_head row (logits_to_keep=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--flops-matched", action="store_true",
                        help="treat --keep as the layer-average budget (EntropyPrune's FLOPs-matched 192/128/64 "
                             "-> 166/98/29 kept from layer 2)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="extra interleaved rounds (every provider once per round, round-robin) whose median "
                             "ratios are printed too: fairer than back-to-back timing when the load drifts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on this shared, oversubscribed 2-core machine every 2-thread "
                             "op waits ~20 ms for a descheduled thread, a floor that pruning cannot remove)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tokprune.hf.vlm import prune_visual_tokens
    from tokprune.methods.entropy_prune import EntropyPrune, flops_matched_keep

    model, image_size = build_model(args.hidden, args.layers, args.heads, args.visual, args.vocab)
    cfg = model.config.text_config
    g = torch.Generator().manual_seed(0)
    before = args.text // 2
    ids = torch.cat([torch.randint(0, args.vocab - 2, (before,), generator=g),
                     torch.full((args.visual,), args.vocab - 1),
                     torch.randint(0, args.vocab - 2, (args.text - before,), generator=g)])[None]
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=g)
    n = ids.shape[1]
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token_layer = 2 * cfg.num_key_value_heads * hd * 4

    def prefill():
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        return out

    def cache_bytes(out) -> int:
        cache = getattr(out, "cache", None) or out.past_key_values
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)

    full_flops = lm_flops(cfg, [n] * args.layers)
    full_kv = cache_bytes(prefill())
    assert full_kv == kv_bytes_per_token_layer * n * args.layers
    providers = {"unpruned": prefill}
    metrics = {"unpruned": dict(tokens=n, GFLOPs=round(full_flops / 1e9, 1), kv_MiB=round(full_kv / 2 ** 20, 2))}
    handles, scoring = {}, {}
    for budget in args.keep:
        keep = flops_matched_keep(budget, args.visual, args.layers, args.layer) if args.flops_matched else budget
        name = f"EntropyPrune keep={keep}" + (f" (avg {budget})" if args.flops_matched else "")
        handle = prune_visual_tokens(model, EntropyPrune(keep=keep, layer=args.layer))
        out = prefill()
        after = handle.info["last"]["tokens_after"]
        kv = cache_bytes(out)
        flops = lm_flops(cfg, [n] * args.layer + [after] * (args.layers - args.layer))
        handle.remove()
        times = []

        def run(keep=keep, times=times):
            with prune_visual_tokens(model, EntropyPrune(keep=keep, layer=args.layer)) as h:
                prefill()
            times.append(h.info["last"]["scoring_seconds"])

        providers[name] = run
        scoring[name] = times
        metrics[name] = dict(tokens=after, GFLOPs=round(flops / 1e9, 1), flops_ratio=round(full_flops / flops, 2),
                             kv_MiB=round(kv / 2 ** 20, 2), kv_ratio=round(full_kv / kv, 2))
    params = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, visual=args.visual, text=args.text,
                  layer=args.layer, flops_matched=args.flops_matched, threads=torch.get_num_threads())
    rows = compare("vlm-prefill", f"LLaVA-shaped LM {args.visual}+{args.text} tokens, hidden {args.hidden}",
                   providers, baseline="unpruned", params=params, metrics=metrics, min_run_time=args.min_run_time,
                   write_csv=False)
    print("\n  scoring overhead (EntropyPrune scores + top-k, median over the timed runs):")
    timed = {r["provider"]: float(r["median_ms"]) for r in rows}
    for name, times in scoring.items():
        ms = statistics.median(times) * 1e3
        metrics[name]["scoring_ms"] = round(ms, 3)
        metrics[name]["scoring_pct"] = round(100 * ms / timed[name], 2)
        print(f"  {name:<28} {ms:8.3f} ms = {100 * ms / timed[name]:5.2f}% of its prefill "
              f"({100 * ms / timed['unpruned']:5.2f}% of the unpruned prefill)")
    if args.rounds > 0:
        import time

        samples = {name: [] for name in providers}
        for _ in range(args.rounds):
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        base = statistics.median(samples["unpruned"])
        print(f"\n  interleaved medians over {args.rounds} round-robin rounds:")
        for name, values in samples.items():
            ms = statistics.median(values) * 1e3
            metrics[name]["interleaved_ms"] = round(ms, 1)
            metrics[name]["interleaved_ratio"] = round(base * 1e3 / ms, 2)
            print(f"  {name:<32} {ms:10.1f} ms  x{base * 1e3 / ms:5.2f} vs unpruned  "
                  f"(runs: {', '.join(f'{v:.1f}s' for v in values)})")
    from benchmarks.runner import append_rows

    for r in rows:
        import json

        r["metrics"] = json.dumps(metrics[r["provider"]], sort_keys=True)
    append_rows("vlm-prefill", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
