"""``tokprune eval spec``: speculative generation on the real SmolLM2-135M, many prompts.

For every drafter (Token Recycling with tokprune's prompt fill and a fresh matrix per prompt, Token
Recycling with the paper's template and mode (the matrix persists across the prompts, in order), DySpec
(batched and exact greedy expansion) / RSD-C / RSD-S / SpecInfer / top-k trees drafted by the target's
first ``--layers`` layers) and every prompt (windows of held-out Python stdlib source, plus short
natural-language prompts), greedy speculative output is compared token for token with
``model.generate(do_sample=False)``; the mean tokens per target forward (accepted drafts + bonus), the
accept-length histogram and the wall time are reported. ``--batch`` runs the prompts as left-padded
batches (rows advance by their own accept length). ``--sample`` adds seeded sampling runs (acceptance
only; losslessness is proven by the χ² tests of the ops). Wall times are printed for information only
(one pass, not interleaved with the baseline): speed ratios come from ``tokprune bench spec``
(warm-up, interleaved rounds, medians, consistency check against tokens per forward).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Dict, List

import torch

NATURAL = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "Here is a list of the planets of the solar system:\n1.",
    "Q: What is the boiling point of water at sea level?\nA:",
]


def _prompts(tok, n_code: int, context: int) -> List[str]:
    from tokprune.models import held_out_text

    text = held_out_text(60000)
    step = len(text) // max(n_code, 1)
    out = []
    for i in range(n_code):
        ids = tok(text[i * step: i * step + 8 * context]).input_ids[:context]
        out.append(tok.decode(ids))
    return out + NATURAL


def _drafters(model, layers: int, tr_budget: int):
    from tokprune.spec import LayerSkipDrafter, TokenRecyclingDrafter

    return {
        "token_recycling": lambda: TokenRecyclingDrafter(k=8, budget=tr_budget, prompt_fill=True),
        "token_recycling_paper": lambda: TokenRecyclingDrafter(k=8, template="paper"),
        "dyspec_layerskip": lambda: LayerSkipDrafter(model, layers, tree="dyspec", budget=8, width=4),
        "dyspec_exact_layerskip": lambda: LayerSkipDrafter(model, layers, tree="dyspec", budget=8, exact=True),
        "rsd_layerskip": lambda: LayerSkipDrafter(model, layers, tree="rsd", branching=(3, 2, 1)),
        "rsd_s_layerskip": lambda: LayerSkipDrafter(model, layers, tree="rsd_s", beam_width=3, depth=3),
        "specinfer_layerskip": lambda: LayerSkipDrafter(model, layers, tree="specinfer", branching=(3, 2, 1)),
        "topk_layerskip": lambda: LayerSkipDrafter(model, layers, tree="topk", branching=(2, 2, 1)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval spec", description=__doc__.split("\n")[0])
    parser.add_argument("--code-prompts", type=int, default=6)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tr-budget", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="prompts per left-padded batch")
    parser.add_argument("--drafters", default="all", help="comma-separated subset")
    parser.add_argument("--sample", action="store_true", help="also run seeded sampling (temperature 0.7)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokprune.models import load_smollm2
    from tokprune.spec import generate

    model, tok = load_smollm2()
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = _prompts(tok, args.code_prompts, args.context)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    encoded = [tok(b, return_tensors="pt", padding=True) for b in batches]
    common = dict(max_new_tokens=args.new_tokens, pad_token_id=pad)
    print(f"SmolLM2-135M, {len(prompts)} prompts ({args.code_prompts} code windows of {args.context} tokens + "
          f"{len(NATURAL)} natural), batch {args.batch}, {args.new_tokens} new tokens, threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    refs = [model.generate(**enc, do_sample=False, **common) for enc in encoded]
    t_ref = time.perf_counter() - t0
    print(f"  {'hf_greedy':<22} time {t_ref:7.2f}s")
    drafters = _drafters(model, args.layers, args.tr_budget)
    names = list(drafters) if args.drafters == "all" else args.drafters.split(",")
    modes = [False, True] if args.sample else [False]
    for do_sample in modes:
        for name in names:
            identical = total = 0
            acc: Counter = Counter()
            fwd = steps = tokens = 0
            t0 = time.perf_counter()
            shared = drafters[name]() if name.endswith("_paper") else None  # paper's mode: one matrix
            for i, (enc, ref) in enumerate(zip(encoded, refs)):
                kw = dict(do_sample=True, temperature=0.7, generator=torch.Generator().manual_seed(i)) \
                    if do_sample else {}
                out, st = generate(model, enc.input_ids, attention_mask=enc.attention_mask, drafter=shared or drafters[name](),
                                   return_stats=True, **common, **kw)
                if not do_sample:
                    same = [bool(torch.equal(out[r], ref[r])) if out.shape == ref.shape else False
                            for r in range(out.shape[0])]
                    identical += sum(same)
                total += out.shape[0]
                acc.update(st.accept_lens)
                fwd += st.target_forwards
                steps += st.row_steps
                tokens += st.accepted_draft_tokens + st.row_steps
            wall = time.perf_counter() - t0
            hist = " ".join(f"{k}:{acc[k]}" for k in sorted(acc))
            label = name + (" (sample)" if do_sample else "")
            same_txt = f"identical {identical}/{total}" if not do_sample else "sampling"
            print(f"  {label:<30} {same_txt:<17} tokens/forward {tokens / max(steps, 1):5.2f}  target forwards {fwd:4d}"
                  f"  time {wall:7.2f}s  accept-length histogram {hist}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
