"""Speculative generation on SmolLM2-135M (CPU): tokens/s and tokens per target forward, side by side.

Providers (batch 1, greedy, ``max_new_tokens`` new tokens per prompt):

* ``hf_greedy`` -- ``model.generate(do_sample=False)`` (baseline).
* ``hf_prompt_lookup`` -- ``model.generate(prompt_lookup_num_tokens=10)``.
* ``tr_paper`` -- Token Recycling, the paper's 81-node "2.2.2" template, the paper's mode (adjacency
  matrix kept across prompts: hot start from the warm-up prompts, no prompt fill).
* ``tr_auto`` -- Token Recycling, the template the measured cost model picks on this device
  (:mod:`tokprune.spec.cost`), paper's mode.
* ``tr_auto_fill`` -- as ``tr_auto`` plus tokprune's prompt fill (the matrix also filled from the
  prompt's logits at prefill).
* ``tr_auto_cold_fill`` -- as ``tr_auto_fill`` with a fresh matrix per prompt (tokprune's old default).
* with ``--all``: ``hf_assisted_layerskip``, ``tp_dyspec_layerskip``, ``tp_dyspec_exact_layerskip``,
  and sampling providers ``hf_sample`` / ``tp_rsd_c_layerskip_sample`` / ``tp_rsd_s_layerskip_sample``.

Hot start without leaking the answer: the Token Recycling matrix is warmed by running the drafter on
``--warm-prompts`` other windows of the same source (never the timed ones); every timed call starts from
a copy of that warmed matrix, so repeated rounds on one prompt do not learn its continuation.

Timing: one warm-up call per provider and prompt, then ``--rounds`` interleaved rounds (each round calls
every provider once, in a rotated order), medians. Printed per provider: tokens/s, ratio vs
``hf_greedy``, tokens per target forward (tpf) and the bound ``tpf x t_step / t(N)``: ``t(N)`` from the
measured cost table, ``t_step`` the median 1-token forward as ``model.generate`` runs it (``DynamicCache``,
no explicit mask, unpacked weights), measured by this command (the tree path's ``t(1)`` is printed too). A consistency check fails the run (exit status 1) if a speed-up exceeds its tokens per
forward (impossible: each target forward costs at least a 1-token forward) and warns if it exceeds the
cost-model bound by more than 25%. Every greedy provider's output is checked against ``hf_greedy``.

Usage::

    tokprune bench spec [--new-tokens 64] [--prompts 2] [--rounds 3] [--threads 1] [--all]
                        [--providers hf_prompt_lookup,tr_auto] [--rank-probs 0.47,0.1,0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch


def _windows(tok, n: int, context: int, offset: int = 0) -> List[torch.Tensor]:
    from tokprune.models import held_out_text

    text = held_out_text(80000)
    out = []
    step = len(text) // (n + offset + 1)
    for i in range(offset, offset + n):
        chunk = text[i * step: i * step + 6 * context]
        out.append(tok(chunk, return_tensors="pt").input_ids[:, :context])
    return out


class _RankRecorder:
    """Per-rank acceptance of a Token Recycling template: ``hits[r] / trials[r]`` where ``trials[r]``
    counts accepted-path nodes that have a rank-``r`` child and ``hits[r]`` those whose rank-``r``
    child was accepted next."""

    def __init__(self, template):
        self.par = template.parents.tolist()
        self.rank = template.ranks.tolist()
        self.kids: Dict[int, List[int]] = {}
        for i, p in enumerate(self.par):
            if p >= 0:
                self.kids.setdefault(p, []).append(i)
        k = max(self.rank) + 1 if len(self.rank) > 1 else 1
        self.hits = [0] * k
        self.trials = [0] * k

    def record(self, accept_index: torch.Tensor) -> None:
        path = [int(v) for v in accept_index[0].tolist() if v >= 0]
        for j, node in enumerate(path):
            nxt = path[j + 1] if j + 1 < len(path) else None
            for c in self.kids.get(node, []):
                self.trials[self.rank[c]] += 1
                if c == nxt:
                    self.hits[self.rank[c]] += 1

    def probs(self) -> List[float]:
        return [round(h / t, 3) if t else float("nan") for h, t in zip(self.hits, self.trials)]


def plain_step_ms(model, context: int = 256, rounds: int = 9) -> float:
    """Median ms of one 1-token forward as ``model.generate`` runs it after ``context`` cached tokens:
    transformers' ``DynamicCache`` (one ``torch.cat`` per layer), no explicit mask, the model's own
    weights, logits of the last token only; the cache is cropped back after every forward."""
    from transformers import DynamicCache

    from tokprune.spec._kv import _cache_kwarg

    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    name = _cache_kwarg(model)
    cache = DynamicCache()
    times = []
    with torch.no_grad():
        model(input_ids=torch.randint(0, vocab, (1, context), generator=g), use_cache=True, logits_to_keep=1,
              **{name: cache})
        for r in range(rounds + 1):
            token = torch.randint(0, vocab, (1, 1), generator=g)
            t0 = time.perf_counter()
            model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache})
            if r:
                times.append((time.perf_counter() - t0) * 1e3)
            cache.crop(-1)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune bench spec", description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2, help="timed prompts (windows of Python stdlib source)")
    parser.add_argument("--warm-prompts", type=int, default=2, help="other windows that warm the TR matrix")
    parser.add_argument("--context", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (medians)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the layer-skip draft (--all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="also the draft-model and sampling providers")
    parser.add_argument("--refresh-cost", action="store_true", help="re-measure the cost table")
    parser.add_argument("--providers", default=None, help="comma-separated subset (hf_greedy is always run)")
    parser.add_argument("--rank-probs", default=None,
                        help="comma-separated per-rank acceptance for the cost model (default: DEFAULT_RANK_PROBS)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tokprune.models import load_smollm2
    from tokprune.spec import LayerSkipDrafter, TokenRecyclingDrafter, generate, layer_skip_model
    from tokprune.spec.cost import DEFAULT_RANK_PROBS, choose_recycling_template, forward_cost, interpolate_cost
    from tokprune.spec.trees import paper_template

    model, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_new = args.new_tokens
    t0 = time.perf_counter()
    cost = forward_cost(model, refresh=args.refresh_cost)
    rank_probs = DEFAULT_RANK_PROBS if not args.rank_probs else tuple(float(x) for x in args.rank_probs.split(","))
    auto = choose_recycling_template(model, k=8, rank_probs=rank_probs)
    paper = paper_template()
    print(f"cost table (ms per target forward, {torch.get_num_threads()} thread(s); "
          f"{time.perf_counter() - t0:.1f}s incl. measuring if not cached): "
          + " ".join(f"{n}:{ms:.1f}" for n, ms in sorted(cost.items())))
    print(f"cost-model choice on this device: {auto.num_nodes} nodes (depth {len(auto.levels) - 1}); "
          f"paper template: {paper.num_nodes} nodes")
    t_step = plain_step_ms(model, args.context)
    print(f"1-token forward as model.generate runs it (t_step): {t_step:.1f} ms; tree path t(1): "
          f"{interpolate_cost(cost, 1):.1f} ms")

    timed = _windows(tok, args.prompts, args.context)
    warm = _windows(tok, args.warm_prompts, args.context, offset=args.prompts)
    common = dict(max_new_tokens=n_new, pad_token_id=pad, eos_token_id=None)

    # warm (hot-start) matrices: paper's mode, run on the warm-up windows only
    hot: Dict[str, torch.Tensor] = {}
    recorders = {"tr_paper": _RankRecorder(paper), "tr_auto": _RankRecorder(auto)}
    warm_names = {"tr_paper"} if not args.providers or "tr_paper" in args.providers.split(",") else set()
    warm_names |= {"tr_auto"} if not args.providers or "tr_auto" in args.providers else set()
    for name, template in (("tr_paper", paper), ("tr_auto", auto)):
        if name not in warm_names:
            hot[name] = None
            continue
        d = TokenRecyclingDrafter(k=8, template=template)
        for ids in warm:
            generate(model, ids, drafter=d, **common)
        hot[name] = d.adjacency.clone()

    class Recording(TokenRecyclingDrafter):
        recorder: Optional[_RankRecorder] = None

        def commit(self, tree, target_logits, accept_index, accept_len, next_token):
            if self.recorder is not None:
                self.recorder.record(accept_index)
            super().commit(tree, target_logits, accept_index, accept_len, next_token)

    def tr(template, hot_name: Optional[str], fill: bool, rec: Optional[str] = None):
        def make():
            d = Recording(k=8, template=template, prompt_fill=fill)
            d.recorder = recorders.get(rec) if rec else None
            if hot_name is not None:
                d.adjacency = hot[hot_name].clone()
            return d
        return make

    tp_makers: Dict[str, Callable[[], object]] = {
        "tr_paper": tr(paper, "tr_paper", False, "tr_paper"),
        "tr_auto": tr(auto, "tr_auto", False, "tr_auto"),
        "tr_auto_fill": tr(auto, "tr_auto", True),
        "tr_auto_cold_fill": tr(auto, None, True),
    }
    hf_kwargs: Dict[str, dict] = {"hf_greedy": dict(do_sample=False),
                                  "hf_prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=10)}
    sample_kw = dict(do_sample=True, temperature=0.7, top_k=50)
    tp_kwargs: Dict[str, dict] = {}
    if args.all:
        assistant = layer_skip_model(model, args.layers)
        hf_kwargs["hf_assisted_layerskip"] = dict(do_sample=False, assistant_model=assistant)
        hf_kwargs["hf_sample"] = sample_kw
        tp_makers["tp_dyspec_layerskip"] = lambda: LayerSkipDrafter(model, args.layers, tree="dyspec", budget=8,
                                                                    width=4, max_children=4)
        tp_makers["tp_dyspec_exact_layerskip"] = lambda: LayerSkipDrafter(model, args.layers, tree="dyspec",
                                                                          budget=8, exact=True, max_children=4)
        tp_makers["tp_rsd_c_layerskip_sample"] = lambda: LayerSkipDrafter(model, args.layers, tree="rsd",
                                                                          branching=(3, 2, 1))
        tp_makers["tp_rsd_s_layerskip_sample"] = lambda: LayerSkipDrafter(model, args.layers, tree="rsd_s",
                                                                          beam_width=3, depth=3)
        for name in ("tp_rsd_c_layerskip_sample", "tp_rsd_s_layerskip_sample"):
            tp_kwargs[name] = dict(sample_kw, generator=None)
    nodes = {"tr_paper": paper.num_nodes, "tr_auto": auto.num_nodes, "tr_auto_fill": auto.num_nodes,
             "tr_auto_cold_fill": auto.num_nodes, "tp_dyspec_layerskip": 8, "tp_dyspec_exact_layerskip": 8,
             "tp_rsd_c_layerskip_sample": 1 + 3 + 6 + 6, "tp_rsd_s_layerskip_sample": 10}

    if args.providers:
        wanted = set(args.providers.split(",")) | {"hf_greedy"}
        unknown = wanted - set(hf_kwargs) - set(tp_makers)
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; known: {list(hf_kwargs) + list(tp_makers)}")
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k in wanted}
        tp_makers = {k: v for k, v in tp_makers.items() if k in wanted}
    names = list(hf_kwargs) + list(tp_makers)
    times: Dict[str, List[float]] = {n: [] for n in names}  # per prompt: median seconds
    tokens_fwd: Dict[str, List[int]] = {n: [0, 0] for n in tp_makers}  # (row tokens, forwards)
    identical: Dict[str, bool] = {n: True for n in names}
    for case, ids in enumerate(timed):
        mask = torch.ones_like(ids)
        ref = None

        def run(name: str):
            nonlocal ref
            if name in hf_kwargs:
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=mask, **common, **hf_kwargs[name])
                st = None
            else:
                kw = dict(tp_kwargs.get(name, {}))
                if "generator" in kw:
                    kw["generator"] = torch.Generator().manual_seed(0)
                out, st = generate(model, ids, drafter=tp_makers[name](), return_stats=True, **common, **kw)
            return out, st

        ref, _ = run("hf_greedy")  # warm-up + reference
        for name in names[1:]:
            out, _ = run(name)  # warm-up
            if "sample" not in name:
                identical[name] &= bool(torch.equal(out, ref))
        per: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t = time.perf_counter()
                out, st = run(name)
                per[name].append(time.perf_counter() - t)
                if st is not None:
                    tokens_fwd[name][0] += st.accepted_draft_tokens + st.row_steps
                    tokens_fwd[name][1] += st.row_steps
                if "sample" not in name:
                    identical[name] &= bool(torch.equal(out, ref))
        print(f"\nprompt {case} (L={ids.shape[1]}, {n_new} new tokens): median s over {args.rounds} rounds")
        for name in names:
            med = sorted(per[name])[len(per[name]) // 2]
            times[name].append(med)
            print(f"  {name:<28} {med:7.2f} s  x{times['hf_greedy'][-1] / med:5.2f}")

    print(f"\nsummary over {len(timed)} prompts (tokens/s = new tokens / summed medians; ratio vs hf_greedy; "
          f"tpf = tokens per target forward; bound = tpf x t_step/t(N))")
    base = sum(times["hf_greedy"])
    rows, ok = [], True
    t1 = t_step
    for name in names:
        total = sum(times[name])
        speed = base / total
        tps = n_new * len(timed) / total
        line = f"  {name:<28} {tps:7.2f} tok/s  x{speed:5.2f}"
        metrics = {"tokens_per_s": round(tps, 3), "identical": identical[name]}
        if name in tokens_fwd and tokens_fwd[name][1]:
            tpf = tokens_fwd[name][0] / tokens_fwd[name][1]
            n = nodes.get(name, 1)
            bound = tpf * t1 / interpolate_cost(cost, n)
            line += f"  tpf {tpf:5.2f}  nodes {n:3d}  bound x{bound:5.2f}"
            metrics.update(tokens_per_forward=round(tpf, 3), nodes=n, bound=round(bound, 3))
            if "sample" not in name and speed > tpf:
                line += "  INCONSISTENT: speed-up > tokens per forward"
                ok = False
            elif "sample" not in name and speed > 1.25 * bound:
                line += "  (warning: > 1.25x the bound; cost table stale or load changed)"
        if "sample" not in name:
            line += f"  identical={identical[name]}"
        print(line)
        rows.append(dict(provider=name, median_s=total, ratio=speed, metrics=metrics))
    for name, rec in recorders.items():
        if sum(rec.trials):
            print(f"  per-rank acceptance {name}: {rec.probs()}  (cost-model assumption: "
                  f"{[round(p, 3) for p in rank_probs]})")
    if not args.no_csv:
        from benchmarks.runner import append_rows, device_name
        import datetime as _dt
        import tokprune

        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        append_rows("spec", [dict(date=stamp, device=device_name(torch.device("cpu")),
                                  tokprune_version=tokprune.__version__, torch_version=torch.__version__,
                                  backend="torch", benchmark="spec", case=f"{len(timed)} prompts",
                                  params=json.dumps(dict(context=args.context, new_tokens=n_new, rounds=args.rounds,
                                                         auto_nodes=auto.num_nodes), sort_keys=True),
                                  provider=r["provider"], median_ms=f"{r['median_s'] * 1e3:.3f}", iqr_ms="",
                                  ratio_vs_baseline=f"{r['ratio']:.4f}", baseline="hf_greedy",
                                  metrics=json.dumps(r["metrics"], sort_keys=True)) for r in rows])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
