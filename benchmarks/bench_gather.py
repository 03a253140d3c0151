"""Token gather per (batch, head) with GQA: tokprune.ops.gather_tokens vs expand-then-gather.

    python -m benchmarks.bench_gather      (or: tokprune bench gather)
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.runner import compare
from tokprune.ops import gather_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--keep", type=float, default=0.25)
    args = parser.parse_args(argv)
    batch, heads, kv_heads, head_dim = 1, 32, 8, 128
    for n_tokens in args.tokens:
        x = torch.randn(batch, kv_heads, n_tokens, head_dim)
        n_keep = int(n_tokens * args.keep)
        index = torch.stack([torch.randperm(n_tokens)[:n_keep] for _ in range(heads)]).unsqueeze(0)

        def expand_then_gather():
            full = x.repeat_interleave(heads // kv_heads, dim=1)
            return torch.gather(full, 2, index.unsqueeze(-1).expand(-1, -1, -1, head_dim))

        compare("gather", f"T={n_tokens},keep={n_keep}",
                {"expand+gather (baseline)": expand_then_gather,
                 "tokprune.gather_tokens": lambda: gather_tokens(x, index)},
                baseline="expand+gather (baseline)",
                params=dict(tokens=n_tokens, keep=n_keep, heads=heads, kv_heads=kv_heads, head_dim=head_dim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
