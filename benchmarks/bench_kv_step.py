"""Whole-model decode step of the KV methods, interleaved in one run, thread CPU time (robust on a shared CPU).

    python -m benchmarks.bench_kv_step [--contexts 2048 4096 8192] [--batches 1 4] [--budget 256]
                                       [--rounds 5] [--new-tokens 6]

SmolLM2-135M (real weights, fp32, 1 thread). For each (context, batch) the providers run ``model.generate``
from the same prefilled keys/values (the prompt's prefill is computed once and cached by
:mod:`benchmarks.bench_e2e`) in rotating order, ``--rounds`` times after a warm-up; a logits processor
stamps the thread's CPU clock after each forward and the step time is the median interval (first forward
excluded), median over rounds. Providers:

* ``unpatched``: transformers' ``DynamicCache`` and SDPA (the model as loaded);
* ``cache``: full attention on tokprune's KV cache (``use_tokprune_cache``);
* ``fasa`` / ``quest`` / ``streaming``: ``with policy.patch(model):`` at ``--budget`` (FASA with the shipped
  SmolLM2 calibration, 8 FCs);
* ``evicted``: full attention on tokprune's cache holding only ``--budget`` tokens: the decode step of an
  evicting method (UNComp / SnapKV eviction) that keeps the same budget.

Ratios are printed against ``unpatched`` and, for FASA, against ``evicted`` (issue targets: FASA >= 1.5x at
8K batch 1, >= 2x at 4K batch 4, never < 0.97x; within 1.15x of ``evicted``; Quest / StreamingLLM never slower
than ``cache``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROVIDERS = ("unpatched", "cache", "fasa", "quest", "streaming", "evicted")


class _Stamps:
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.thread_time())
        return scores


def _factories(model, budget):
    from tokprune.demo import SMOLLM2_FCS
    from tokprune.hf.kv_cache import use_tokprune_cache
    from tokprune.methods import FASA, Quest, StreamingLLM

    return {
        "unpatched": None,
        "cache": lambda: use_tokprune_cache(model),
        "evicted": lambda: use_tokprune_cache(model),
        "fasa": lambda: FASA(budget=budget, fcs=SMOLLM2_FCS, num_fcs=8).patch(model),
        "quest": lambda: Quest(budget=budget).patch(model),
        "streaming": lambda: StreamingLLM(budget=budget).patch(model),
    }


def step_time(model, provider, factory, kv, ids, context, batch, budget, new_tokens) -> float:
    from benchmarks.bench_e2e import _Null, build_cache

    if provider == "evicted":  # the budget's worth of tokens: the sink and the newest ones
        keep = [(torch.cat([k[:, :, :4], k[:, :, context - budget + 3:context - 1]], 2),
                 torch.cat([v[:, :, :4], v[:, :, context - budget + 3:context - 1]], 2)) for k, v in kv]
        cache = build_cache(model, "cache", keep, budget, batch, new_tokens)
        prompt = ids[:, context - budget:context].expand(batch, -1)
    else:
        cache = build_cache(model, provider, kv, context, batch, new_tokens)
        prompt = ids[:, :context].expand(batch, -1)
    stamps = _Stamps()
    with (factory() if factory is not None else _Null()), torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, logits_processor=[stamps], pad_token_id=0)
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    return statistics.median(steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_kv_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.bench_e2e import cached_prefill_kv, load_model, prompt_ids

    model, tokenizer, name = load_model(False)
    ids = prompt_ids(tokenizer, model.config.vocab_size, max(args.contexts))
    kv = cached_prefill_kv(model, ids, name, True)
    factories = _factories(model, args.budget)
    print(f"{name}, 1 thread, thread CPU time per decode step (ms), budget {args.budget}, "
          f"{args.rounds} interleaved rounds", flush=True)
    for context in args.contexts:
        for batch in args.batches:
            times = {p: [] for p in args.providers}
            for r in range(args.rounds + 1):
                order = args.providers[r % len(args.providers):] + args.providers[:r % len(args.providers)]
                for p in order:
                    t = step_time(model, p, factories[p], kv, ids, context, batch, args.budget,
                                  args.new_tokens if r else 2)
                    if r:
                        times[p].append(t)
            med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
            base = med.get("unpatched")
            parts = []
            for p in args.providers:
                ratio = f" x{base / med[p]:.2f}" if base else ""
                parts.append(f"{p} {med[p]:.1f}{ratio}")
            extra = ""
            if "fasa" in med and "evicted" in med:
                extra = f" | fasa/evicted step {med['fasa'] / med['evicted']:.2f}"
            print(f"T={context} B={batch}: " + ", ".join(parts) + extra, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
