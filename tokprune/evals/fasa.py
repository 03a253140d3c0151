"""``tokprune eval fasa``: FASA vs Quest / SnapKV-style / StreamingLLM on the real SmolLM2-135M.

1. Language modelling on held-out real text (:func:`tokprune.models.held_out_text`, Python stdlib
   sources not used for calibration): one full-attention prefill of ``--tokens`` tokens, then
   ``--steps`` teacher-forced decode steps per method and budget (the decode steps use the sparse policy,
   the prefill cache is shared). Reported: top-1 agreement of the next-token argmax with full attention and
   the perplexity of the true next tokens vs full attention.
2. Pass-key retrieval: a 5-digit number hidden at several depths of filler text; greedy decoding of the
   answer with each method; reported only for the cases the full model gets right.

The FCs come from ``--fcs`` (a ``tokprune calibrate fasa`` file) or are calibrated on the fly on a
different text (``--calib-text stdlib``). Every method gets the same sink / window (``--sink``, default 4;
``--window``, default ``budget // 4``; ``--window -1``: ``budget // 4``) and fills the rest of its budget
its own way: FASA by FC scores, SnapKV by its prefill ranking, Quest by whole pages of 16 ranked by their
bounds (:class:`QuestSinkWindow`; the lowest-ranked page is cut to fit the budget), StreamingLLM by recency.
``--sink 0 --window 0`` gives Quest the paper's pages only (the newest page always kept).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from typing import Dict, List

import torch


def _quest_sink_window_class():
    from tokprune.methods import Quest
    from tokprune.ops import select_sparse_indices

    class QuestSinkWindow(Quest):
        """Quest with the same ``sink`` / ``window`` as the other methods: the ``sink`` first and ``window``
        newest valid tokens, then the other tokens of the pages ranked best by Quest's bounds, best page first,
        until ``budget`` tokens are attended (the last page cut). With
        ``sink == window == 0`` it is :class:`tokprune.methods.Quest` (pages only)."""

        def select(self, scores: torch.Tensor, ctx) -> torch.Tensor:
            if self.sink == 0 and self.window == 0:
                return super().select(scores, ctx)
            ps, n_tokens = self.page_size, ctx.n_tokens
            batch, heads, n_pages = scores.shape
            fixed_n = min(self.sink + self.window, self.budget, n_tokens)
            fixed = select_sparse_indices(torch.zeros(batch, 1, n_tokens, device=scores.device), fixed_n,
                                          sink=self.sink, window=self.window, valid=ctx.valid)[:, 0]  # (B, k)
            covered = torch.zeros(batch, n_tokens + 1, dtype=torch.bool, device=scores.device)
            covered.scatter_(1, fixed.masked_fill(fixed < 0, n_tokens), True)
            covered = covered[:, :n_tokens]
            if ctx.valid is not None:
                covered |= ~ctx.valid  # padding never attended
            pad = n_pages * ps - n_tokens
            page_free = ~torch.nn.functional.pad(covered, (0, pad), value=True).view(batch, n_pages, ps).all(-1)
            rest = max(0, self.budget - fixed_n)
            # pages cut by the sink, the window or padding hold fewer free tokens: 3 spare pages cover them
            keep_pages = min(n_pages, -(-rest // ps) + 3)
            ranked = scores.float().masked_fill(~page_free[:, None, :], float("-inf"))
            best, pages = ranked.topk(keep_pages, dim=-1, sorted=True)  # best first
            tokens = pages[..., None] * ps + torch.arange(ps, device=scores.device)  # (B, H, kp, ps)
            safe = tokens.clamp(max=n_tokens - 1).flatten(2)
            ok = (best[..., None] > float("-inf")) & (tokens < n_tokens)
            ok &= ~torch.gather(covered[:, None, :].expand(-1, heads, -1), 2, safe).view_as(ok)
            # best pages first until `rest` free tokens are taken (the last one cut)
            ok = ok.flatten(2)
            ok &= ok.cumsum(-1) <= rest
            page_tokens = tokens.flatten(2).masked_fill(~ok, -1)
            return torch.cat([fixed[:, None, :].expand(-1, heads, -1), page_tokens], dim=-1)

    return QuestSinkWindow


def _policies(name: str, budget: int, fcs, num_fcs: int, snap_scores, sink: int = 4, window: int = -1,
              score_dtype=None):
    """The policy ``name`` at ``budget``; every method gets ``sink`` first and ``window`` newest tokens
    (``window < 0``: ``budget // 4``); ``score_dtype``: FASA's packed FC key dtype (on tokprune's cache)."""
    from tokprune.methods import FASA, SnapKV, StreamingLLM

    window = max(1, budget // 4) if window < 0 else window
    if name == "fasa":
        # decline_ratio=0 (every method): the quality of the method itself, never the dense fallback
        return FASA(budget=budget, sink=sink, window=window, fcs=fcs, num_fcs=num_fcs, decline_ratio=0,
                    score_dtype=score_dtype)
    if name == "fasa-ref":  # the reference's selection: per query head, layer 0 dense, no sink / window
        return FASA(budget=budget, sink=0, window=0, fcs=fcs, num_fcs=num_fcs, decline_ratio=0, selection="head",
                    dense_layers=(0,))
    if name == "fasa-uncal":
        return FASA(budget=budget, sink=sink, window=window, fcs="uncalibrated", num_fcs=num_fcs, decline_ratio=0)
    if name == "quest":
        return _quest_sink_window_class()(budget=budget, sink=sink, window=window, page_size=16, decline_ratio=0)
    if name == "snapkv":
        return SnapKV(budget=budget, sink=sink, window=window, decline_ratio=0).set_prompt_scores(snap_scores)
    if name == "streaming":  # recency fills the rest: the window setting changes nothing
        return StreamingLLM(budget=budget, sink=sink, window=window, decline_ratio=0)
    raise ValueError(f"unknown method {name!r}")


def _prefill(model, ids):
    """Full-attention prefill; also records SnapKV's prompt ranking. Returns (cache, last logits, snap scores)."""
    from tokprune.hf.attention import patch_attention
    from tokprune.methods import SnapKV

    observer = SnapKV(budget=1)
    with patch_attention(model, decode=observer, cache=False), torch.no_grad():  # observes the prefill
        out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1].float(), observer.prompt_scores


def _decode(model, cache, first_input: torch.Tensor, steps: int, policy=None, teacher=None,
            tokprune_cache: bool = False) -> torch.Tensor:
    """Run ``steps`` single-token decode calls on a copy of ``cache``; returns ``(steps, vocab)`` logits.

    ``teacher`` (``(steps,)`` ids) feeds the true tokens; otherwise greedy. ``tokprune_cache``: decode on a
    :class:`tokprune.hf.kv_cache.TokpruneCache` holding the same keys/values (the path ``policy.patch(model)``
    gives ``model.generate``: FASA's packed FC keys and fused step) instead of a copy of the ``DynamicCache``.
    """
    from tokprune.hf.attention import patch_attention

    if tokprune_cache:
        from tokprune.hf.kv_cache import TokpruneCache

        copied = TokpruneCache(model.config, capacity=cache.get_seq_length() + steps + 1)
        for i, layer in enumerate(cache.layers):
            copied.update(layer.keys, layer.values, i)
        cache = copied
    else:
        cache = copy.deepcopy(cache)
    handle = patch_attention(model, decode=policy, cache=False) if policy is not None else None
    logits = []
    token = first_input.view(1, 1)
    try:
        with torch.no_grad():
            for i in range(steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[0, -1].float())
                if i + 1 < steps:
                    nxt = teacher[i] if teacher is not None else logits[-1].argmax()
                    token = nxt.view(1, 1)
    finally:
        if handle is not None:
            handle.remove()
    return torch.stack(logits)


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of a pass-key prompt of about ``n_tokens`` tokens with the key sentence at ``depth``."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head = ("There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there. ")
    tail = " What is the pass key? The pass key is"
    unit = len(tokenizer(FILLER).input_ids)
    n_fill = max(1, (n_tokens - 80) // unit)
    before = int(round(n_fill * depth))
    text = head + FILLER * before + needle + FILLER * (n_fill - before) + tail
    return tokenizer(text, return_tensors="pt").input_ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval fasa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length (SmolLM2 allows 8192)")
    parser.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps per method")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--methods", nargs="+", default=["fasa", "quest", "snapkv", "streaming"],
                        choices=["fasa", "fasa-ref", "fasa-uncal", "quest", "snapkv", "streaming"])
    parser.add_argument("--fcs", default=None, help="calibration file; default: calibrate on --calib-text")
    parser.add_argument("--calib-text", default="stdlib")
    parser.add_argument("--num-fcs", type=int, default=8, help="dominant FCs per KV head (of 32 for SmolLM2)")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--passkey-depths", type=float, nargs="*", default=[0.2, 0.5, 0.8])
    parser.add_argument("--sink", type=int, default=4, help="first tokens every method keeps")
    parser.add_argument("--window", type=int, default=-1,
                        help="newest tokens every method keeps (default -1: budget // 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--cache", choices=["dynamic", "tokprune"], default="dynamic",
                        help="decode on transformers' DynamicCache (scores from the keys) or on tokprune's cache "
                             "(what policy.patch(model) gives generate: FASA's packed FC keys and fused step)")
    parser.add_argument("--score-dtype", choices=["cache", "float32", "bfloat16", "int8"], default="cache",
                        help="FASA's packed FC key dtype with --cache tokprune (default 'cache': FASA's own default, "
                             "bf16 keys for an fp32 model on the fused CPU step)")
    args = parser.parse_args(argv)
    if args.score_dtype != "cache" and args.cache != "tokprune":
        parser.error("--score-dtype needs --cache tokprune (the packed FC keys live in tokprune's cache)")
    score_dtype = None if args.score_dtype == "cache" else getattr(torch, args.score_dtype)
    on_tokprune = args.cache == "tokprune"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokprune.methods.fasa import FCCalibration, calibrate, calibration_text
    from tokprune.models import held_out_text, load_smollm2

    t0 = time.time()
    model, tokenizer = load_smollm2()
    if args.fcs:
        fcs = FCCalibration.load(args.fcs)
    else:
        fcs = calibrate(model, tokenizer, calibration_text(args.calib_text), n_tokens=1024)
    print(f"model loaded + FCs ready in {time.time() - t0:.1f}s; num_fcs={args.num_fcs} of {fcs.ranking.shape[-1]}; "
          f"every method: sink={args.sink}, window={'budget//4' if args.window < 0 else args.window}")

    # 1. language modelling
    text = held_out_text(min_chars=8 * (args.tokens + args.steps + 16))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens + args.steps + 1]
    if ids.shape[1] < args.tokens + args.steps + 1:
        raise SystemExit(f"held-out text has only {ids.shape[1]} tokens")
    prompt, targets = ids[:, : args.tokens], ids[0, args.tokens:]
    cache, first_logits, snap = _prefill(model, prompt)
    inputs, labels = targets[:-1], targets[1:]
    # The first decode input is the first target token; step i predicts labels[i].
    full = _decode(model, cache, inputs[0], args.steps, teacher=inputs[1:])
    full_top = full.argmax(-1)
    nll_full = torch.nn.functional.cross_entropy(full, labels[: args.steps]).item()
    print(f"\nheld-out text: prompt {args.tokens} tokens, {args.steps} teacher-forced decode steps; "
          f"full attention ppl {math.exp(nll_full):.3f}")
    print(f"{'method':<12}" + "".join(f"{'b=' + str(b):>22}" for b in args.budgets))
    print(f"{'':<12}" + "".join(f"{'top1-agree  dppl':>22}" for _ in args.budgets))
    results: Dict[str, List[str]] = {}
    for name in args.methods:
        cells = []
        for budget in args.budgets:
            policy = _policies(name, budget, fcs, args.num_fcs, snap, args.sink, args.window, score_dtype)
            logits = _decode(model, cache, inputs[0], args.steps, policy=policy, teacher=inputs[1:],
                             tokprune_cache=on_tokprune)
            agree = (logits.argmax(-1) == full_top).float().mean().item()
            nll = torch.nn.functional.cross_entropy(logits, labels[: args.steps]).item()
            cells.append(f"{agree:10.3f} {math.exp(nll) - math.exp(nll_full):+10.3f}")
        results[name] = cells
        print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells), flush=True)

    # 2. pass-key retrieval
    if args.passkey_lengths:
        print("\npass-key retrieval (greedy, 8 new tokens; success = the 5 digits appear):")
        gen = torch.Generator().manual_seed(0)
        rows = []
        for length in args.passkey_lengths:
            for depth in args.passkey_depths:
                key = str(int(torch.randint(10000, 99999, (1,), generator=gen)))
                p_ids = passkey_prompt(tokenizer, length, depth, key)
                cache, last_logits, snap = _prefill(model, p_ids)
                first = last_logits.argmax(-1)[0]

                def answer(policy):
                    out = _decode(model, cache, first, 7, policy=policy, tokprune_cache=on_tokprune and policy is not None)
                    toks = [int(first)] + out.argmax(-1).tolist()
                    return tokenizer.decode(toks)

                full_ans = answer(None)
                ok_full = key in full_ans.replace(" ", "")
                row = dict(case=f"T={p_ids.shape[1]},depth={depth}", full=ok_full, ans=full_ans.strip())
                if ok_full:
                    for name in args.methods:
                        row[name] = [key in answer(_policies(name, b, fcs, args.num_fcs, snap, args.sink, args.window,
                                                                       score_dtype))
                                     .replace(" ", "")
                                     for b in args.budgets]
                rows.append(row)
                shown = "  ".join(f"{n}:{''.join('Y' if x else '.' for x in row[n])}" for n in args.methods
                                  if n in row)
                print(f"  {row['case']:<22} full={'Y' if ok_full else 'n'} ({row['ans']!r})  {shown}", flush=True)
        solved = [r for r in rows if r["full"]]
        print(f"  full model solves {len(solved)}/{len(rows)} cases; successes among those "
              f"(budgets {args.budgets}):")
        for name in args.methods:
            counts = [sum(r[name][i] for r in solved) for i in range(len(args.budgets))]
            print(f"    {name:<12} " + "  ".join(f"b={b}: {c}/{len(solved)}" for b, c in zip(args.budgets, counts)))
    print(f"\ntotal time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
