"""Speculative generation on SmolLM2-135M (CPU): tokens/s and tokens per target forward, side by side.

Providers (batch 1, ``max_new_tokens`` new tokens per prompt):

* ``hf_greedy`` -- ``model.generate(do_sample=False)`` (baseline).
* ``hf_prompt_lookup`` -- ``model.generate(prompt_lookup_num_tokens=...)``.
* ``hf_assisted_layerskip`` -- ``model.generate(assistant_model=<first k layers of the target>)``
  (transformers' assisted generation with a weight-sharing layer-skip view, the only assistant model
  available offline; transformers' ``assistant_early_exit`` needs LayerSkip-trained checkpoints).
* ``tp_token_recycling`` -- :class:`tokprune.spec.TokenRecyclingDrafter` (fresh matrix per prompt).
* ``tp_dyspec_layerskip`` -- DySpec tree drafted by the first k layers.
* ``tp_rsd_layerskip_sample`` -- RSD (Gumbel-top-k tree, recursive rejection) with sampling; its
  baseline for tokens/s is ``hf_sample`` (``model.generate(do_sample=True)``), reported alongside.

Every greedy provider's output is checked token for token against ``hf_greedy``.

Usage::

    tokprune bench spec [--new-tokens 64] [--prompts 3] [--layers 8] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List

import torch

from benchmarks.runner import compare


def _prompts(tok, n: int, context: int) -> List[torch.Tensor]:
    from tokprune.models import held_out_text

    text = held_out_text(40000)
    out = []
    step = len(text) // (n + 1)
    for i in range(n):
        chunk = text[i * step: i * step + 6 * context]
        ids = tok(chunk, return_tensors="pt").input_ids[:, :context]
        out.append(ids)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune bench spec", description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="prompts (windows of Python stdlib source)")
    parser.add_argument("--context", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--layers", type=int, default=8, help="layers of the layer-skip draft")
    parser.add_argument("--tr-budget", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokprune.models import load_smollm2
    from tokprune.spec import LayerSkipDrafter, TokenRecyclingDrafter, generate, layer_skip_model

    model, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_new = args.new_tokens
    assistant = layer_skip_model(model, args.layers)
    totals: Dict[str, List[float]] = {}
    for case, ids in enumerate(_prompts(tok, args.prompts, args.context)):
        common = dict(max_new_tokens=n_new, pad_token_id=pad, eos_token_id=None)
        results: Dict[str, object] = {}
        stats: Dict[str, object] = {}

        def hf(**kw) -> Callable[[], torch.Tensor]:
            def run():
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **common, **kw)
                results[name_of[id(run)]] = out
                return out
            return run

        def tp(make, **kw) -> Callable[[], torch.Tensor]:
            def run():
                out, st = generate(model, ids, drafter=make(), return_stats=True, **common, **kw)
                stats[name_of[id(run)]] = st
                results[name_of[id(run)]] = out
                return out
            return run

        providers: Dict[str, Callable[[], torch.Tensor]] = {
            "hf_greedy": hf(do_sample=False),
            "hf_prompt_lookup": hf(do_sample=False, prompt_lookup_num_tokens=10),
            "hf_assisted_layerskip": hf(do_sample=False, assistant_model=assistant),
            "tp_token_recycling": tp(lambda: TokenRecyclingDrafter(k=8, budget=args.tr_budget)),
            "tp_dyspec_layerskip": tp(lambda: LayerSkipDrafter(model, args.layers, tree="dyspec", budget=8,
                                                               width=4, max_children=4)),
            "hf_sample": hf(do_sample=True, temperature=0.7, top_k=50),
            "tp_rsd_layerskip_sample": tp(lambda: LayerSkipDrafter(model, args.layers, tree="rsd", branching=(3, 2, 1)),
                                          do_sample=True, temperature=0.7, top_k=50,
                                          generator=torch.Generator().manual_seed(0)),
        }
        name_of = {id(fn): name for name, fn in providers.items()}
        # outputs and statistics are recorded by every call (compare's warm-up call included); the
        # metrics dict is filled in place before compare prints it, from the warm-up results
        metrics: Dict[str, Dict[str, object]] = {name: {} for name in providers}

        def annotate(name, fn):
            def run():
                out = fn()
                m = metrics[name]
                if "sample" not in name:
                    m["identical"] = bool(torch.equal(out, results.get("hf_greedy", out)))
                if name in stats:
                    m["tok_per_fwd"] = round(stats[name].tokens_per_forward, 3)
                    m["target_fwd"] = stats[name].target_forwards
                return out
            return run

        providers = {name: annotate(name, fn) for name, fn in providers.items()}
        rows = compare("spec", f"prompt{case} L={ids.shape[1]} new={n_new}", providers, baseline="hf_greedy",
                       params=dict(context=int(ids.shape[1]), new_tokens=n_new, layers=args.layers,
                                   tr_budget=args.tr_budget), metrics=metrics, min_run_time=args.min_run_time,
                       write_csv=not args.no_csv)
        for row in rows:
            ms = float(row["median_ms"])
            totals.setdefault(row["provider"], []).append(ms)
            print(f"    {row['provider']:<28} {n_new / (ms / 1e3):7.1f} new tokens/s")
    print("\nmean over prompts (tokens/s, ratio vs hf_greedy):")
    base = sum(totals["hf_greedy"])
    for name, ms in totals.items():
        print(f"  {name:<28} {n_new * len(ms) / (sum(ms) / 1e3):7.1f} tok/s   x{base / sum(ms):5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
