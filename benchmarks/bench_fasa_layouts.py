"""FASA key layouts on tokprune's cache: decode step time, resident bytes and bytes read per step, per tier.

    python -m benchmarks.bench_fasa_layouts [--context 8192] [--batch 1] [--budget 256] [--rounds 3]
                                            [--new-tokens 8] [--layouts packed split offload]

SmolLM2-135M (real weights, fp32, 1 thread; the shipped calibration, 8 FCs). Each layout runs
``model.generate`` from the same prefilled keys/values (:func:`benchmarks.bench_e2e.build_cache`) in rotating
order, ``--rounds`` times after a warm-up; the step time is the median interval of the thread's CPU clock
between forwards (first forward excluded, it splits the layers), median over rounds
(:mod:`benchmarks.bench_kv_step`'s method). Memory: :meth:`tokprune.methods.FASA.memory_report` of the cache
after the run (allocated buffers; on a CPU both tiers of ``offload`` are host memory).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_fasa_layouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=["packed", "split", "offload"],
                        choices=["packed", "split", "offload"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.bench_e2e import build_cache, cached_prefill_kv, load_model, prompt_ids
    from benchmarks.bench_kv_step import _Stamps
    from tokprune.demo import SMOLLM2_FCS
    from tokprune.methods import FASA

    model, tokenizer, name = load_model(False)
    ids = prompt_ids(tokenizer, model.config.vocab_size, args.context)
    kv = cached_prefill_kv(model, ids, name, True)
    layouts = list(args.layouts)
    times = {layout: [] for layout in layouts}
    reports = {}
    prompt = ids[:, :args.context].expand(args.batch, -1)
    for r in range(args.rounds + 1):
        for layout in layouts[r % len(layouts):] + layouts[:r % len(layouts)]:
            policy = FASA(budget=args.budget, fcs=SMOLLM2_FCS, num_fcs=8, layout=layout)
            cache = build_cache(model, "fasa", kv, args.context, args.batch, args.new_tokens)
            stamps = _Stamps()
            with policy.patch(model), torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               logits_processor=[stamps], pad_token_id=0)
            if r:
                times[layout].append(statistics.median(b - a for a, b in zip(stamps.times, stamps.times[1:])))
            reports[layout] = policy.memory_report(cache)
    print(f"{name}, 1 thread, T={args.context} B={args.batch} budget {args.budget}, thread CPU ms per decode step "
          f"(median of {args.rounds} interleaved rounds), MiB per tier", flush=True)
    base = statistics.median(times[layouts[0]])
    for layout in layouts:
        step = statistics.median(times[layout])
        res = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in reports[layout]["resident"].items())
        read = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in reports[layout]["read_per_step"].items())
        print(f"{layout}: {step * 1e3:.1f} ms/step (x{step / base:.2f} of {layouts[0]}) | resident {res} | "
              f"KV read per step {read}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
