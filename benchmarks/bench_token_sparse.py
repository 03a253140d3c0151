"""Token sparse attention prefill vs dense SDPA, and whole-model prefill with and without the patch.

    python -m benchmarks.bench_token_sparse      (or: tokprune bench token-sparse)

Part 1 (attention op): causal prefill attention of one layer, SmolLM2-135M head shapes by default
(9 query heads, 3 KV heads, head_dim 64), ``tokprune.ops.token_sparse_attention(keep=0.25)`` (scores
+ selection + compress + SDPA on the kept tokens + decompress, everything included) against
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` in the same run.

Part 2 (whole model): prefill forward of SmolLM2-135M (real weights, offline, ``logits_to_keep=1``) with
and without ``patch_attention(model, prefill=TokenSparseAttention(...))``: explicit budget ``keep`` or the
paper's coverage rule ``tau``, layers ``second_half`` or ``profile`` (the shipped drift profile), and the
policy's defaults (which decline below the measured ``min_tokens``). Interleaved round-robin rounds after
a warm-up round, medians, ratios against dense in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.runner import compare
from tokprune.ops import token_sparse_attention, token_sparse_scores


def bench_attention(tokens, keep, heads, kv_heads, head_dim, window, min_run_time, rounds=0):
    """One layer's causal prefill attention: token sparse (everything included) vs SDPA. ``compare`` times
    each provider (``torch.utils.benchmark``); with ``rounds`` > 0 also interleaved round-robin rounds of
    process CPU time (robust on a shared CPU), whose medians give the crossover that ``MIN_TOKENS`` uses."""
    import statistics
    import time

    for n in tokens:
        q = torch.randn(1, heads, n, head_dim)
        k = torch.randn(1, kv_heads, n, head_dim)
        v = torch.randn(1, kv_heads, n, head_dim)
        n_keep = max(int(keep * n), window)
        providers = {"sdpa causal (baseline)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True),
                     f"token_sparse keep={keep}": lambda: token_sparse_attention(q, k, v, keep=keep, window=window),
                     "  of which: scores": lambda: token_sparse_scores(q, k, window=window)}
        compare("token_sparse_attention", f"N={n},keep={keep}", providers,
                baseline="sdpa causal (baseline)", min_run_time=min_run_time,
                params=dict(tokens=n, keep=keep, n_keep=n_keep, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, window=window))
        if rounds:
            reps = max(1, int(2e8 // (n * n * heads)))  # ~ the same work per sample at every length
            cpu = {name: [] for name in providers}
            for _ in range(rounds + 1):  # the first round is a warm-up
                for name, fn in providers.items():
                    c0 = time.process_time()
                    for _ in range(reps):
                        fn()
                    cpu[name].append((time.process_time() - c0) / reps)
            base = statistics.median(cpu["sdpa causal (baseline)"][1:])
            print(f"  interleaved CPU-time medians ({rounds} rounds x {reps} calls):")
            for name, values in cpu.items():
                med = statistics.median(values[1:])
                print(f"  {name:<28} {med * 1e3:10.3f} ms  x{base / med:5.2f} vs sdpa")


CONFIGS = ("keep:second_half", "keep:profile", "tau:second_half", "tau:profile", "default")


def _policy(config, keep, tau, window):
    """``config`` = ``"<budget>:<layers>"`` (budget ``keep`` forced sparse at every length, or ``tau`` with
    the paper's ``min_tokens = 1024 + window``) or ``"default"`` (``TokenSparseAttention()`` as shipped,
    which declines below its measured ``min_tokens``)."""
    from tokprune.methods.token_sparse import TokenSparseAttention

    if config == "default":
        return TokenSparseAttention()
    budget, layers = config.split(":")
    if budget == "keep":
        return TokenSparseAttention(keep=keep, window=window, min_tokens=0, layers=layers)
    return TokenSparseAttention(keep=None, tau=tau, window=window, min_tokens=1024 + window, layers=layers)


def bench_model(tokens, keep, tau, window, rounds, configs):
    """Whole-model prefill (``logits_to_keep=1``, as ``generate`` does), interleaved round-robin rounds after
    one warm-up round; medians and ratios vs dense in the same run."""
    import json
    import statistics
    import time

    from benchmarks.runner import append_rows, device_name
    from tokprune.hf.attention import patch_attention
    from tokprune.models import held_out_text, load_smollm2

    model, tokenizer = load_smollm2()
    all_ids = tokenizer(held_out_text(6 * max(tokens)), return_tensors="pt").input_ids
    for n in tokens:
        ids = all_ids[:, :n]
        providers = {"dense sdpa (baseline)": (None, lambda: model(ids, use_cache=False, logits_to_keep=1))}
        for config in configs:
            policy = _policy(config, keep, tau, window)

            def run(policy=policy):
                with patch_attention(model, prefill=policy):
                    return model(ids, use_cache=False, logits_to_keep=1)

            label = config if config == "default" else config.replace("keep:", f"keep={keep} ").replace(
                "tau:", f"tau={tau} ")
            providers[label] = (policy, run)
        samples = {name: [] for name in providers}
        with torch.no_grad():
            for round_ in range(rounds + 1):  # round 0 is the warm-up
                for name, (policy, fn) in providers.items():
                    calls = policy.calls if policy is not None else 0
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    if round_:
                        samples[name].append(time.perf_counter() - t0)
                        samples.setdefault(name + "#cpu", []).append(time.process_time() - c0)
                    sparse_calls = policy.calls - calls if policy is not None else 0
                    samples.setdefault(name + "#calls", []).append(sparse_calls)
        base = statistics.median(samples["dense sdpa (baseline)"])
        base_cpu = statistics.median(samples["dense sdpa (baseline)#cpu"])
        print(f"\n[token_sparse_model] SmolLM2-135M prefill N={n}, {rounds} interleaved rounds "
              f"({device_name(torch.device('cpu'))}); wall = wall-clock, cpu = process CPU time (less sensitive "
              "to other processes on a shared CPU)")
        rows = []
        for name in providers:
            med, cpu = statistics.median(samples[name]), statistics.median(samples[name + "#cpu"])
            calls = samples[name + "#calls"][-1]
            print(f"  {name:<24} wall {med * 1e3:9.1f} ms x{base / med:5.2f}  cpu {cpu * 1e3:9.1f} ms "
                  f"x{base_cpu / cpu:5.2f} vs dense  sparse layers/call {calls:2d}  "
                  f"(wall runs: {', '.join(f'{v:.2f}s' for v in samples[name])})")
            rows.append(dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), device=device_name(torch.device("cpu")),
                             benchmark="token_sparse_model", case=f"SmolLM2-135M prefill N={n}", provider=name,
                             params=json.dumps(dict(tokens=n, keep=keep, tau=tau, window=window, rounds=rounds)),
                             median_ms=f"{med * 1e3:.3f}", ratio_vs_baseline=f"{base / med:.4f}",
                             baseline="dense sdpa (baseline)",
                             metrics=json.dumps(dict(sparse_calls=calls, cpu_ms=round(cpu * 1e3, 1),
                                                     cpu_ratio=round(base_cpu / cpu, 4)))))
        append_rows("token_sparse_model", rows)


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
    parser.add_argument("--tau", type=float, default=0.005, help="coverage threshold of the tau configs (paper)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="whole-model policies next to dense")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (after a warm-up)")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_attention(args.tokens, args.keep, args.heads, args.kv_heads, args.head_dim, args.window, args.min_run_time,
                    args.rounds)
    if args.model_tokens:
        from tokprune.models import smollm2_available

        reason = smollm2_available()
        if reason is not None:
            print(f"skipping whole-model prefill: {reason}")
        else:
            bench_model(args.model_tokens, args.keep, args.tau, args.window, args.rounds, args.configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
