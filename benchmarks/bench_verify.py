"""Token-tree verification: tokprune.ops (torch backend; Triton on a GPU) vs a per-row Python loop.

    python -m benchmarks.bench_verify            (or: tokprune bench verify)
    python -m benchmarks.bench_verify --batch 1 16 --vocab 32000 --rules greedy specinfer

The baseline is the plain-torch oracle ``tokprune.reference.spec`` (a Python loop over batch rows and
tree nodes, the way a straightforward implementation verifies). Trees: N = 64 random nodes biased
towards depth; greedy trees have tokens equal to the target argmax with probability 0.5 (a few accepted
levels), stochastic trees have tokens drawn from the draft.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.runner import compare
from tokprune.ops import verify_tree_greedy, verify_tree_stochastic
from tokprune.reference.spec import verify_tree_greedy_reference, verify_tree_stochastic_reference


def random_tree(bsz: int, n: int, gen: torch.Generator, recent: int = 4) -> torch.Tensor:
    """Each node picks its parent among the ``recent`` most recent nodes (trees ~ depth n / recent)."""
    node = torch.arange(n)
    lo = (node - recent).clamp_min(0)
    parents = lo + (torch.rand(bsz, n, generator=gen) * (node - lo)).long()
    parents[:, 0] = -1
    return parents.to(torch.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--rules", nargs="+", default=["greedy", "specinfer", "rsd", "target_only"])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.nodes
    gen = torch.Generator().manual_seed(0)
    for vocab in args.vocab:
        for bsz in args.batch:
            parents = random_tree(bsz, n, gen)
            logits = torch.randn(bsz, n, vocab, generator=gen) * 3
            tp = dp = None
            for rule in args.rules:
                if rule == "greedy":
                    best = logits.argmax(-1).gather(1, parents.long().clamp_min(0))
                    tokens = torch.where(torch.rand(bsz, n, generator=gen) < 0.5, best,
                                         torch.randint(vocab, (bsz, n), generator=gen))
                    args_dev = [t.to(device) for t in (tokens, parents, logits)]
                    providers = {"per-row loop (baseline)": lambda: verify_tree_greedy_reference(*args_dev),
                                 "tokprune torch": lambda: verify_tree_greedy(*args_dev, backend="torch")}
                    if device.type == "cuda":
                        providers["tokprune triton"] = lambda: verify_tree_greedy(*args_dev, backend="triton")
                    accepted = verify_tree_greedy(tokens, parents, logits)[1].float().mean().item()
                else:
                    if tp is None:  # draft = target perturbed by N(0, 1) logits noise (memory-lean)
                        tp = torch.softmax(logits, -1)
                        for row in logits:
                            row.add_(torch.randn(row.shape, generator=gen))
                        dp = torch.softmax(logits, -1)
                        logits = None
                        tokens_s = torch.multinomial(dp.view(-1, vocab), 1, generator=gen).view(bsz, n)
                        u = torch.rand(bsz, n, generator=gen)
                    draft = dp if rule != "target_only" else None
                    args_dev = [t.to(device) if t is not None else None for t in (tokens_s, parents, tp, draft, u)]

                    def run(backend, a=args_dev, r=rule):
                        return verify_tree_stochastic(a[0], a[1], a[2], a[3], rule=r, uniforms=a[4], backend=backend)

                    providers = {"per-row loop (baseline)":
                                 lambda a=args_dev, r=rule: verify_tree_stochastic_reference(a[0], a[1], a[2], a[3], r, a[4]),
                                 "tokprune torch": lambda: run("torch")}
                    if device.type == "cuda":
                        providers["tokprune triton"] = lambda: run("triton")
                    accepted = run("torch")[1].float().mean().item()
                compare("verify", f"{rule},B={bsz},N={n},V={vocab}", providers, baseline="per-row loop (baseline)",
                        params=dict(rule=rule, batch=bsz, nodes=n, vocab=vocab, threads=torch.get_num_threads()),
                        metrics={"tokprune torch": {"mean_accept_len": round(accepted, 2)}},
                        device=device, min_run_time=args.min_run_time)
            del logits, tp, dp
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
