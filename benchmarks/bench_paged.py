"""Decode-step attention on a paged KV cache (vLLM layout): FASA paged ops vs dense paged attention.

    python -m benchmarks.bench_paged
    python -m benchmarks.bench_paged --tokens 2048 8192 --batch 1 8 --dtype bfloat16 --rounds 7

One layer, SmolLM2-135M attention shape by default (9 query heads, 3 KV heads, head_dim 64), vLLM CPU
cache layout (``[num_blocks, kv_heads, 128, 2*D]``, K transposed, read through
:func:`tokprune.ops.vllm_cpu_kv_views`), physical blocks shuffled, every request ``--tokens`` long.
Providers, timed in the same run with interleaved rounds (median over rounds; CPU time of the process by
default, ``--clock wall`` for elapsed time):

  dense paged          paged_decode_attention over all cached tokens (the exact path)
  SDPA contiguous      torch SDPA on a contiguous (batch, kv_heads, T, D) cache: dense without paging,
                       for reference (no gather)
  FASA paged           paged_fc_scores on the packed FC side cache (reduce="max" over the GQA group)
                       + paged_select + paged_sparse_decode_attention
  FASA attend only     paged_sparse_decode_attention over fixed slots (the floor of the method)

The FC side-cache write of the step's new token (write_paged_fc_keys) is timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokprune.ops import (
    fasa_bytes_per_step,
    paged_decode_attention,
    paged_fc_scores,
    paged_select,
    paged_sparse_decode_attention,
    vllm_cpu_kv_views,
    write_paged_fc_keys,
)


def build(batch, n_tokens, heads, kv_heads, head_dim, block_size, num_fcs, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    per_row = -(-n_tokens // block_size)
    num_blocks = batch * per_row + 4
    kv = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=gen).to(dtype)
    k, v = vllm_cpu_kv_views(kv, head_dim)
    table = torch.randperm(num_blocks, generator=gen)[:batch * per_row].view(batch, per_row).int()
    seq_lens = torch.full((batch,), n_tokens, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    n_fc = head_dim // 2
    fc_index = torch.stack([torch.randperm(n_fc, generator=gen)[:num_fcs] for _ in range(kv_heads)])
    fc_cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * num_fcs, dtype=dtype)
    # fill the side cache for every used slot, as the per-token writes would have
    slots = (table.long()[:, :, None] * block_size + torch.arange(block_size)).flatten()
    blk, off = slots // block_size, slots % block_size
    keys = k[blk, :, off]  # (T, Hkv, D)
    write_paged_fc_keys(fc_cache, keys, slots, fc_index)
    return q, k, v, fc_cache, fc_index, table, seq_lens


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def timed(fn, iters):
    start = _clock()
    for _ in range(iters):
        fn()
    return (_clock() - start) / iters * 1e3


def interleaved(providers, rounds, min_time):
    """``{name: median ms}``: each round times every provider once (round-robin), after a warm-up."""
    iters = {}
    for name, fn in providers.items():
        fn()
        n, t = 1, timed(fn, 1)
        while t * n < min_time * 1e3 and n < 10000:
            n *= 2
        iters[name] = n
    samples = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            samples[name].append(timed(fn, iters[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--num-fcs", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per provider and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: CPU time of this process (with 1 thread, the ops' own work: robust on a shared "
                             "machine where wall time includes waiting for a core); wall: elapsed time")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim ** -0.5
    print(f"paged decode, 1 layer: heads={args.heads} kv_heads={args.kv_heads} head_dim={args.head_dim} "
          f"block_size={args.block_size} budget={args.budget} F={args.num_fcs} {args.dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} clock={args.clock} backend=torch")
    for n_tokens in args.tokens:
        for batch in args.batch:
            q, k, v, fc_cache, fc_index, table, seq_lens = build(batch, n_tokens, args.heads, args.kv_heads,
                                                                 args.head_dim, args.block_size, args.num_fcs, dtype)
            fixed = paged_select(torch.randn(batch, args.kv_heads, n_tokens), args.budget, args.sink, args.window,
                                 seq_lens, table, args.block_size)
            new_key = torch.randn(batch, args.kv_heads, args.head_dim).to(dtype)
            new_slot = fixed[:, 0, -1].clone()

            def fasa():
                scores = paged_fc_scores(q, fc_cache, table, seq_lens, fc_index, reduce="max", max_len=n_tokens)
                slots = paged_select(scores, args.budget, args.sink, args.window, seq_lens, table, args.block_size)
                return paged_sparse_decode_attention(q, k, v, slots, scale)

            k_flat = torch.randn(batch, args.kv_heads, n_tokens, args.head_dim).to(dtype)
            v_flat = torch.randn_like(k_flat)
            q4 = q[:, :, None]
            providers = {
                "dense paged": lambda: paged_decode_attention(q, k, v, table, seq_lens, scale, max_len=n_tokens),
                "SDPA contiguous": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q4, k_flat, v_flat, scale=scale, enable_gqa=True),
                "FASA paged": fasa,
                "FASA attend only": lambda: paged_sparse_decode_attention(q, k, v, fixed, scale),
                "FC side-cache write": lambda: write_paged_fc_keys(fc_cache, new_key, new_slot, fc_index),
            }
            ms = interleaved(providers, args.rounds, args.min_time)
            elem = torch.finfo(dtype).bits // 8
            b = fasa_bytes_per_step(n_tokens, args.head_dim, args.kv_heads, args.num_fcs, args.budget,
                                    element_bytes=elem, batch=batch)
            base = ms["dense paged"]
            print(f"T={n_tokens} batch={batch}: bytes-moved bound {b['ratio']:.1f}x")
            for name, t in ms.items():
                ratio = f"{base / t:6.2f}x vs dense" if name != "FC side-cache write" else ""
                print(f"  {name:22s} {t:9.3f} ms  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
