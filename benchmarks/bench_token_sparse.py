"""Token sparse attention prefill vs dense SDPA, and whole-model prefill with and without the patch.

    python -m benchmarks.bench_token_sparse      (or: tokprune bench token-sparse)

Part 1 (attention op): causal prefill attention of one layer, SmolLM2-135M head shapes by default
(9 query heads, 3 KV heads, head_dim 64), ``tokprune.ops.token_sparse_attention(keep=0.25)`` (scores
+ selection + compress + SDPA on the kept tokens + decompress, everything included) against
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` in the same run.

Part 2 (whole model): prefill forward of SmolLM2-135M (real weights, offline) with and without
``patch_attention(model, prefill=TokenSparseAttention(keep=0.25, layers=...))``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.runner import compare
from tokprune.ops import token_sparse_attention, token_sparse_scores


def bench_attention(tokens, keep, heads, kv_heads, head_dim, window, min_run_time):
    for n in tokens:
        q = torch.randn(1, heads, n, head_dim)
        k = torch.randn(1, kv_heads, n, head_dim)
        v = torch.randn(1, kv_heads, n, head_dim)
        n_keep = max(int(keep * n), window)
        compare("token_sparse_attention", f"N={n},keep={keep}",
                {"sdpa causal (baseline)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True),
                 f"token_sparse keep={keep}": lambda: token_sparse_attention(q, k, v, keep=keep, window=window),
                 "  of which: scores": lambda: token_sparse_scores(q, k, window=window)},
                baseline="sdpa causal (baseline)", min_run_time=min_run_time,
                params=dict(tokens=n, keep=keep, n_keep=n_keep, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, window=window))


def bench_model(tokens, keep, window, min_run_time):
    from tokprune.hf.attention import patch_attention
    from tokprune.methods.token_sparse import TokenSparseAttention
    from tokprune.models import held_out_text, load_smollm2

    model, tokenizer = load_smollm2()
    all_ids = tokenizer(held_out_text(6 * max(tokens)), return_tensors="pt").input_ids
    for n in tokens:
        ids = all_ids[:, :n]
        providers = {"dense sdpa (baseline)": lambda: model(ids, use_cache=False)}
        for layers in ("second_half", None):
            policy = TokenSparseAttention(keep=keep, window=window, min_tokens=0, layers=layers)

            def run(policy=policy):
                with patch_attention(model, prefill=policy):
                    return model(ids, use_cache=False)

            providers[f"token_sparse keep={keep} layers={layers or 'all'}"] = run
        with torch.no_grad():
            compare("token_sparse_model", f"SmolLM2-135M prefill N={n}", providers,
                    baseline="dense sdpa (baseline)", min_run_time=min_run_time,
                    params=dict(tokens=n, keep=keep, window=window))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192],
                        help="attention-op lengths (empty to skip)")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--model-tokens", type=int, nargs="*", default=[2048, 4096],
                        help="whole-model prefill lengths (empty to skip)")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_attention(args.tokens, args.keep, args.heads, args.kv_heads, args.head_dim, args.window, args.min_run_time)
    if args.model_tokens:
        from tokprune.models import smollm2_available

        reason = smollm2_available()
        if reason is not None:
            print(f"skipping whole-model prefill: {reason}")
        else:
            bench_model(args.model_tokens, args.keep, args.window, args.min_run_time)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
