"""Matrix-entropy ops on the CPU: dual (small) Gram side vs the large side; per-token scores batched vs a loop.

    python -m benchmarks.bench_entropy      (or: tokprune bench entropy)

Cases:
* ``matrix_entropy`` of ``N`` tokens x ``D`` features (LLaVA-1.5: 576 visual tokens, 4096 wide):
  eigendecomposition of the ``N x N`` Gram matrix (tokprune's default) vs forming and decomposing the
  ``D x D`` covariance (``side="features"``), both float64 eigvalsh.
* ``token_information_scores`` (EntropyPrune) of 576 tokens with 32 heads x 128: one batched eigvalsh
  on ``[576, 32, 32]`` vs a Python loop over tokens (the reference oracle).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.runner import compare
from tokprune.ops import matrix_entropy, token_information_scores
from tokprune.reference.entropy import token_information_scores_reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n, d = args.tokens, args.dim
    x = torch.randn(1, n, d)

    small = float(matrix_entropy(x))
    large = float(matrix_entropy(x, side="features"))
    print(f"matrix_entropy N={n} D={d}: small side {small:.6f}, large side {large:.6f}, "
          f"|diff| {abs(small - large):.2e}")
    compare("entropy", f"matrix_entropy N={n},D={d}",
            {f"large side D x D ({d}^2)": lambda: matrix_entropy(x, side="features"),
             f"small side N x N ({n}^2)": lambda: matrix_entropy(x)},
            baseline=f"large side D x D ({d}^2)", params=dict(tokens=n, dim=d),
            min_run_time=args.min_run_time)

    h = args.heads
    scores = token_information_scores(x, num_heads=h)
    loop = token_information_scores_reference(x, h).float()
    print(f"token_information_scores N={n} H={h}: max |batched - loop| = {(scores - loop).abs().max():.2e}")
    compare("entropy", f"token_information_scores N={n},H={h},d_h={d // h}",
            {"per-token loop (oracle)": lambda: token_information_scores_reference(x, h),
             "tokprune batched eigvalsh": lambda: token_information_scores(x, num_heads=h)},
            baseline="per-token loop (oracle)", params=dict(tokens=n, heads=h, head_dim=d // h),
            min_run_time=args.min_run_time)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
