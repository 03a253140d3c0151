"""FASA calibration variants on SmolLM2-135M: prefill vs decode queries, k = 32 vs k = the budget, per KV
head vs per query head (union per group on the packed layout, or per-head FCs with unpacked scoring).

Quality is measured as in ``tokprune eval fasa`` (its prefill / decode / pass-key helpers): top-1 agreement
of the next-token argmax with full attention and the perplexity change over ``--steps`` teacher-forced decode
steps after a ``--tokens`` prompt of held-out text, plus pass-key retrieval. Every variant runs the same
policy (``FASA(budget, sink=4, window=budget // 4, num_fcs=--num-fcs, decline_ratio=0)``, group selection);
only the FC ranking differs. Calibration text: ``calibration_text('stdlib')`` (disjoint from the held-out
text). Run: ``python -m benchmarks.bench_fasa_calibration [--tokens 2048 --steps 32 --out file.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch


def _variants(model, tokenizer, budgets, args):
    from tokprune.methods.fasa_calibration import calibration_text, per_kv_view, rank_fcs, record_queries

    text = calibration_text("stdlib")
    rec = {src: record_queries(model, tokenizer, text, n_tokens=args.calib_tokens, n_queries=args.calib_queries,
                               source=src) for src in ("prefill", "decode")}
    out = {}
    for src in ("prefill", "decode"):
        head32 = rank_fcs(rec[src], topk=32, per_head=True)
        out[f"{src} k=32 kv"] = {b: per_kv_view(head32) for b in budgets}
        out[f"{src} k=32 head-union"] = {b: head32 for b in budgets}
        if src == "decode":
            per_b = {b: rank_fcs(rec[src], topk=b, per_head=True) for b in budgets}
            out[f"{src} k=budget kv"] = {b: per_kv_view(c) for b, c in per_b.items()}
            out[f"{src} k=budget head-union"] = per_b
            out[f"{src} k=budget head-unpacked"] = per_b
    return out


def fc_set_recall(record, cal, num_fcs: int, k: int, per_head: bool = False) -> float:
    """Mean over layers, query heads and recorded queries of ``|top_k(partial) ∩ top_k(full)| / k``, where
    ``partial`` sums the logits of the calibration's first ``num_fcs`` FCs (per KV head, or per query head
    with ``per_head``): how well the FC set FASA scores with ranks the keys full attention ranks top."""
    from tokprune.reference.fasa import fc_dims

    total = []
    for layer in sorted(record["keys"]):
        q, keys = record["queries"][layer], record["keys"][layer]  # (H, P, D), (Hkv, T, D)
        heads, n_q, head_dim = q.shape
        n_tokens, group = keys.shape[1], heads // keys.shape[0]
        fc = cal.head_fc_index(layer, num_fcs) if per_head else cal.fc_index(layer, num_fcs).repeat_interleave(group, 0)
        dims = fc_dims(fc, head_dim, cal.chunk)  # (H, nd)
        kk = keys.repeat_interleave(group, 0)
        visible = torch.arange(n_tokens)[None, :] <= torch.arange(n_tokens - n_q, n_tokens)[:, None]
        full = torch.einsum("hpd,htd->hpt", q, kk).masked_fill(~visible, float("-inf"))
        qd = torch.gather(q, 2, dims[:, None, :].expand(-1, n_q, -1))
        kd = torch.gather(kk, 2, dims[:, None, :].expand(-1, n_tokens, -1))
        part = torch.einsum("hpd,htd->hpt", qd, kd).masked_fill(~visible, float("-inf"))
        kk_ = min(k, n_tokens - n_q + 1)
        top = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(kk_, -1).indices, True)
        total.append(torch.gather(top, -1, part.topk(kk_, -1).indices).float().mean())
    return torch.stack(total).mean().item()


def _policy(name, cal, budget, num_fcs):
    from tokprune.methods import FASA

    kw = dict(budget=budget, sink=4, window=max(1, budget // 4), fcs=cal, num_fcs=num_fcs, decline_ratio=0)
    if not name.endswith("head-unpacked"):
        return FASA(**kw)

    class _HeadFCs(FASA):  # per-query-head FCs, scored from the full keys (no packed copy)
        def fc_index(self, layer, kv_heads, head_dim, device):
            from tokprune.reference.fasa import fc_dims

            key = (layer, kv_heads, head_dim, str(device))
            if key not in self._fc_cache:
                index = self._calibration.head_fc_index(layer, self.num_fcs).contiguous().to(device)
                self._fc_cache[key], self._fc_cache[key + ("dims",)] = index, fc_dims(index, head_dim, self.chunk)
            return self._fc_cache[key]

    return _HeadFCs(packed=False, **kw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--num-fcs", type=int, default=8)
    parser.add_argument("--calib-tokens", type=int, default=1024)
    parser.add_argument("--calib-queries", type=int, default=64)
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048])
    parser.add_argument("--passkey-depths", type=float, nargs="*", default=[0.2, 0.5, 0.8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", default=None, help="write the calibrations there (json)")
    parser.add_argument("--load-dir", default=None, help="read the calibrations written by --save-dir")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variant names")
    parser.add_argument("--passkey-only", action="store_true", help="skip the language-modelling table")
    parser.add_argument("--recall-only", action="store_true",
                        help="only the FC-set recall on held-out decode queries (no decoding with FASA)")
    parser.add_argument("--out", default=None, help="write the results table as json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tokprune.evals.fasa import _decode, _prefill, passkey_prompt
    from tokprune.models import held_out_text, load_smollm2

    t0 = time.time()
    model, tokenizer = load_smollm2()
    if args.load_dir:
        from tokprune.methods.fasa_calibration import FCCalibration, per_kv_view

        names = ["prefill k=32 kv", "prefill k=32 head-union", "decode k=32 kv", "decode k=32 head-union",
                 "decode k=budget kv", "decode k=budget head-union", "decode k=budget head-unpacked"]
        variants = {n: {b: FCCalibration.load(os.path.join(args.load_dir, n.replace(" ", "_").replace("=", "")
                                                           + f"_b{b}.json")) for b in args.budgets} for n in names}
    else:
        variants = _variants(model, tokenizer, args.budgets, args)
    if args.variants:
        variants = {n: v for n, v in variants.items() if n in args.variants}
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        for name, by_b in variants.items():
            for b, cal in by_b.items():
                cal.save(os.path.join(args.save_dir, name.replace(" ", "_").replace("=", "") + f"_b{b}.json"))
    print(f"calibrations ready in {time.time() - t0:.0f}s", flush=True)

    text = held_out_text(min_chars=8 * (args.tokens + args.steps + 16))
    if args.recall_only:
        from tokprune.methods.fasa_calibration import record_queries

        rec = record_queries(model, tokenizer, text, n_tokens=args.tokens, n_queries=args.steps, source="decode")
        print(f"FC-set recall (top-k of {args.num_fcs} FCs vs full logits, k = budget) on {args.steps} held-out "
              f"greedy decode queries after {args.tokens} tokens:", flush=True)
        results = {}
        for name, by_b in variants.items():
            cells = {b: fc_set_recall(rec, by_b[b], args.num_fcs, b, per_head=name.endswith("unpacked"))
                     for b in args.budgets}
            results[name] = dict(recall=cells)
            print(f"  {name:<28}" + "".join(f"  b={b}: {r:.3f}" for b, r in cells.items()), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(args=vars(args), results=results), f, indent=1)
        return 0
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens + args.steps + 1]
    prompt, targets = ids[:, : args.tokens], ids[0, args.tokens:]
    cache, _, _ = _prefill(model, prompt)
    inputs, labels = targets[:-1], targets[1:]
    full = _decode(model, cache, inputs[0], args.steps, teacher=inputs[1:])
    nll_full = torch.nn.functional.cross_entropy(full, labels[: args.steps]).item()
    results = {}
    print(f"prompt {args.tokens} tokens, {args.steps} teacher-forced steps, full ppl {math.exp(nll_full):.3f}; "
          f"cells: top-1 agreement / dppl", flush=True)
    for name, by_b in ({} if args.passkey_only else variants).items():
        cells = {}
        for b in args.budgets:
            logits = _decode(model, cache, inputs[0], args.steps, policy=_policy(name, by_b[b], b, args.num_fcs),
                             teacher=inputs[1:])
            nll = torch.nn.functional.cross_entropy(logits, labels[: args.steps]).item()
            cells[b] = dict(top1=(logits.argmax(-1) == full.argmax(-1)).float().mean().item(),
                            dppl=math.exp(nll) - math.exp(nll_full))
        results[name] = dict(lm=cells)
        print(f"  {name:<28}" + "".join(f"  b={b}: {c['top1']:.3f} {c['dppl']:+.3f}" for b, c in cells.items()),
              flush=True)

    gen = torch.Generator().manual_seed(0)
    cases = []
    for length in args.passkey_lengths:
        for depth in args.passkey_depths:
            key = str(int(torch.randint(10000, 99999, (1,), generator=gen)))
            p_ids = passkey_prompt(tokenizer, length, depth, key)
            pcache, last, _ = _prefill(model, p_ids)
            first = last.argmax(-1)[0]

            def answer(policy, pcache=pcache, first=first, key=key):
                out = _decode(model, pcache, first, 7, policy=policy)
                return key in tokenizer.decode([int(first)] + out.argmax(-1).tolist()).replace(" ", "")

            if answer(None):
                cases.append((pcache, first, key, answer))
    print(f"pass key: full attention solves {len(cases)} of "
          f"{len(args.passkey_lengths) * len(args.passkey_depths)} cases", flush=True)
    for name, by_b in variants.items():
        hits = {b: sum(c[3](_policy(name, by_b[b], b, args.num_fcs)) for c in cases) for b in args.budgets}
        results.setdefault(name, {})["passkey"] = dict(hits=hits, cases=len(cases))
        print(f"  {name:<28}" + "".join(f"  b={b}: {h}/{len(cases)}" for b, h in hits.items()), flush=True)
    print(f"total {time.time() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
