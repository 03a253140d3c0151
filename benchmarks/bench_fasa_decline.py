"""Where a KV method wins: one layer's decode step, the method (score + select + sparse attention) vs dense.

    python -m benchmarks.bench_fasa_decline [--methods fasa quest streaming] [--budgets 128 256 512]
                                            [--batches 1 4] [--threads 1] [--cold-mib 512]

``--methods fasa_fused`` times ``FASA(fused=True)``: the whole step as one call of the C++ op
:func:`tokprune.ops.paged.paged_fasa_decode` where the extension has it (the torch path otherwise), with its
default bf16 FC keys; ``fasa`` times ``FASA(fused=False)``, the torch path (fp32 FC keys).

All run on tokprune's KV cache with SmolLM2-135M shapes (9 query heads, 3 KV heads, head dim 64, fp32):
dense is :func:`tokprune.ops.decode.dense_decode_attention` (what a declining policy runs); the methods are
``policy.attend_decode`` with ``decline_ratio=0`` (FASA with 8 FCs and its packed FC keys as a side buffer
of the cache, Quest with its page min/max side buffer, StreamingLLM). Interleaved rounds, median per
(batch, budget, context). Everything else of a decode step (weights, MLP, the cache append) is the same for
both, so the per-layer difference decides.

The cost model fitted per method and budget: ``t_method(T) - t_dense(T) = a + b * T`` (the method saves
``-b`` per cached token, pays ``a`` for selection and the attention over ``budget`` tokens); dense wins while
the difference is positive, i.e. below ``T* = -a / b``. Printed: ``T* / budget`` per method, the largest over
batches and budgets, and per batch (the largest over budgets) as a ``{batch: ratio}`` table, which each
method's ``DECLINE_RATIO`` is set from (so that it is never chosen where it loses; a call of another batch uses
the entry of the largest measured batch below it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _layer_inputs(batch: int, n_tokens: int, heads=9, kv_heads=3, dim=64):
    from tokprune.hf.kv_cache import TokpruneLayer

    layer = TokpruneLayer(capacity=n_tokens + 64, layer_idx=0)
    k = torch.randn(batch, kv_heads, n_tokens, dim)
    layer.update(k[:, :, :-1], torch.randn(batch, kv_heads, n_tokens - 1, dim))
    layer.update(k[:, :, -1:], torch.randn(batch, kv_heads, 1, dim))
    return layer, torch.randn(batch, heads, 1, dim)


def _policy(method: str, budget: int):
    from tokprune.methods import FASA, Quest, StreamingLLM

    if method in ("fasa", "fasa_fused"):  # fasa_fused: the C++ step (tokprune.ops.paged.paged_fasa_decode)
        return FASA(fcs="uncalibrated", budget=budget, sink=4, window=budget // 4, num_fcs=8, decline_ratio=0,
                    fused=method == "fasa_fused")
    if method == "quest":
        return Quest(budget=budget, page_size=16, decline_ratio=0)
    return StreamingLLM(budget=budget, sink=4, decline_ratio=0)


def measure(batch: int, n_tokens: int, budget: int, method: str = "fasa", rounds: int = 7, reps: int = 20,
            cpu_time: bool = True, cold_mib: float = 0.0):
    """``(dense_ms, method_ms)`` medians of one layer's decode attention (CPU time of the thread by default:
    on a shared machine wall time also counts the time other processes held the core).

    ``cold_mib > 0``: the calls rotate over as many independent layers (own cache, own side buffers) as hold
    ``cold_mib`` MiB of keys and values, so that each call reads its cache from memory as in a model's
    decode step (where the other layers' caches and the weights pass through the CPU caches in between);
    ``0``: one layer, called repeatedly, its cache staying in the CPU caches (favours dense attention)."""
    from tokprune.methods.base import DecodeContext
    from tokprune.ops.decode import dense_decode_attention

    class _Module:
        layer_idx = 0

    layer_bytes = 2 * batch * 3 * n_tokens * 64 * 4
    count = 1 if cold_mib <= 0 else max(reps, min(4096, -(-int(cold_mib * 2 ** 20) // layer_bytes)))
    policy = _policy(method, budget)
    ctxs = []
    for _ in range(count):
        layer, q = _layer_inputs(batch, n_tokens)
        ctxs.append(DecodeContext(_Module(), q, layer.keys, layer.values, None, 0.125, layer))
    runs = {"dense": lambda c: dense_decode_attention(c.query, c.key, c.value, 0.125),
            "fasa": lambda c: policy.attend_decode(c)}
    times = {name: [] for name in runs}
    for fn in runs.values():
        for c in ctxs:  # warm-up; creates every layer's side buffers
            fn(c)
    clock = time.thread_time if cpu_time else time.perf_counter
    at = 0
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            chosen = [ctxs[(at + i) % count] for i in range(reps)]
            at += reps
            fn = runs[name]
            t0 = clock()
            for c in chosen:
                fn(c)
            times[name].append((clock() - t0) / reps * 1e3)
    return statistics.median(times["dense"]), statistics.median(times["fasa"])


def fit_crossover(contexts, dense, fasa) -> float:
    """``T*`` where the least-squares line of ``fasa - dense`` over ``contexts`` crosses zero (``inf`` if FASA
    never wins, ``0`` if it always does)."""
    diff = [f - d for f, d in zip(fasa, dense)]
    n = len(contexts)
    mx, my = sum(contexts) / n, sum(diff) / n
    sxx = sum((x - mx) ** 2 for x in contexts)
    b = sum((x - mx) * (y - my) for x, y in zip(contexts, diff)) / sxx
    a = my - b * mx
    if b >= 0:
        return float("inf") if a > 0 else 0.0
    return max(0.0, -a / b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_fasa_decline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fasa", "quest", "streaming"],
                        choices=["fasa", "fasa_fused", "quest", "streaming"],
                        help="fasa_fused: FASA(fused=True), the C++ step where the extension has it")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2, 3, 4, 6, 8, 12, 16],
                        help="contexts as multiples of the budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold-mib", type=float, default=512.0,
                        help="rotate over layers holding this many MiB of KV so that every call reads its cache from "
                             "memory, as inside a model (default 512; 0: one layer, its cache kept in the CPU caches)")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of the thread's CPU time "
                        "(CPU time is robust to other processes sharing the cores; needs --threads 1)")
    args = parser.parse_args(argv)
    if not args.wall and args.threads != 1:
        parser.error("the thread CPU clock needs --threads 1 (or pass --wall)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = "wall" if args.wall else "thread CPU"
    cold = f"caches read from memory (rotating over {args.cold_mib:g} MiB of KV)" if args.cold_mib > 0 else \
        "one layer (cache kept in the CPU caches)"
    print(f"threads={args.threads}, {clock} time, {cold}, per-layer decode attention, ms (dense | method | "
          f"method/dense)", flush=True)
    for method in args.methods:
        worst = 0.0
        per_batch = {}
        for batch in args.batches:
            for budget in args.budgets:
                contexts = [int(r * budget) for r in args.ratios if r * budget <= 16384]
                dense, fasa = [], []
                for t in contexts:
                    d, f = measure(batch, t, budget, method, cpu_time=not args.wall, cold_mib=args.cold_mib)
                    dense.append(d)
                    fasa.append(f)
                    print(f"  {method} batch={batch} budget={budget:4d} T={t:6d}: {d:7.3f} | {f:7.3f} | "
                          f"{f / d:5.2f}", flush=True)
                cross = fit_crossover(contexts, dense, fasa)
                print(f"{method} batch={batch} budget={budget}: break-even T* = {cross:.0f} = "
                      f"{cross / budget:.2f} x budget", flush=True)
                worst = max(worst, cross / budget)
                per_batch[batch] = max(per_batch.get(batch, 0.0), cross / budget)
        table = ", ".join(f"{b}: {r:.1f}" for b, r in per_batch.items())
        print(f"{method}: largest break-even ratio T*/budget: {worst:.2f}; per batch (DECLINE_RATIO table): "
              f"{{{table}}}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
