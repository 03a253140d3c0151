"""Decode-step attention on the CPU: FASA (FC scoring + selection + sparse attention) vs full SDPA.

    python -m benchmarks.bench_fasa            (or: tokprune bench fasa)
    python -m benchmarks.bench_fasa --tokens 2048 8192 32768 --budget 256 --num-fcs 16

One layer, batch 1, Llama-3-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, fp32).
Providers, timed in the same run:
  full SDPA              torch scaled_dot_product_attention over the whole cache (enable_gqa)
  FASA packed keys       fc_scores on the packed FC keys + group softmax vote + select_sparse_indices
                         + sparse_decode_attention (what tokprune.methods.FASA runs per layer and step)
  FASA strided keys      the same, reading the FC dims from the full key cache
  FASA attend only       sparse_decode_attention over a given index set (the floor of the method)
Bytes read per step (KV cache only) come from tokprune.ops.fasa_bytes_per_step.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.runner import compare
from tokprune.ops import fasa_bytes_per_step, fc_scores, pack_fc_keys, select_sparse_indices, sparse_decode_attention


def fasa_step(q, keys, v_cache, k_cache, fc, budget, sink, window, packed, scale):
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    scores = fc_scores(q, keys, fc, packed=packed)
    votes = torch.softmax(scores.view(batch, kv_heads, heads // kv_heads, -1) * scale, -1).sum(2)
    index = select_sparse_indices(votes, budget, sink=sink, window=window)
    return sparse_decode_attention(q, k_cache, v_cache, index, scale)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--num-fcs", type=int, default=16, help="FCs per KV head (head_dim/2 = 64 pairs)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads stall on "
                             "small ops whenever one is descheduled)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    scale = head_dim ** -0.5
    n_fc = head_dim // 2
    for n_tokens in args.tokens:
        torch.manual_seed(0)
        q = torch.randn(1, heads, 1, head_dim, dtype=dtype)
        k = torch.randn(1, kv_heads, n_tokens, head_dim, dtype=dtype)
        v = torch.randn(1, kv_heads, n_tokens, head_dim, dtype=dtype)
        fc = torch.stack([torch.randperm(n_fc)[: args.num_fcs] for _ in range(kv_heads)])
        k_fc = pack_fc_keys(k, fc)
        fixed_index = select_sparse_indices(torch.randn(1, kv_heads, n_tokens), args.budget)
        elem = torch.finfo(dtype).bits // 8
        b = fasa_bytes_per_step(n_tokens, head_dim, kv_heads, args.num_fcs, args.budget, element_bytes=elem)
        mb = lambda x: f"{x / 2**20:.2f}MiB"  # noqa: E731
        metrics = {"full SDPA": {"kv_bytes": mb(b["full"])},
                   "FASA packed keys": {"kv_bytes": mb(b["fasa"]), "bytes_ratio": f"{b['ratio']:.1f}x"},
                   "FASA strided keys": {"kv_bytes": mb(b["fasa"]) + "(strided)"},
                   "FASA attend only": {"kv_bytes": mb(b["fasa_attend"])}}
        compare("fasa", f"T={n_tokens},budget={args.budget},F={args.num_fcs}",
                {"full SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                 "FASA packed keys": lambda: fasa_step(q, k_fc, v, k, fc, args.budget, args.sink, args.window,
                                                       True, scale),
                 "FASA strided keys": lambda: fasa_step(q, k, v, k, fc, args.budget, args.sink, args.window,
                                                        False, scale),
                 "FASA attend only": lambda: sparse_decode_attention(q, k, v, fixed_index, scale)},
                baseline="full SDPA", metrics=metrics, min_run_time=args.min_run_time,
                params=dict(tokens=n_tokens, budget=args.budget, num_fcs=args.num_fcs, heads=heads,
                            kv_heads=kv_heads, head_dim=head_dim, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
