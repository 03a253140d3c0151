"""Quality of token sparse prefill on the real SmolLM2-135M with held-out text.

    tokprune eval token-sparse [--context 1024 --continuation 128 --segments 4 --keeps 0.5 0.25 0.1]
                               [--taus 0.005] [--layers second_half profile all]

Token sparse attention is a *prefill* method: the prompt is processed sparsely, then generation reads
the KV cache that prefill wrote. So the measurement is the one that matters for generation: for each
text segment, prefill ``context`` tokens (sparse, through ``patch_attention``), then score the next
``continuation`` tokens of the real text with dense attention on top of that cache (the policy
declines prefill chunks on a cache). Reported against the dense model on the same tokens:

* ``top1``: agreement of the argmax next-token prediction on the continuation tokens;
* ``KL``: mean ``KL(dense || sparse)`` of the next-token distributions (nats);
* ``ppl``: perplexity of the real continuation, dense and sparse, and the relative change;
* ``top1_win``: agreement on the last ``window`` prompt positions (the always-kept window, whose
  attention runs over the compressed keys).

Budgets: explicit ``keep`` fractions and/or the paper's coverage threshold ``tau`` (``keep=None``).
Layers: ``second_half`` (layers ``L // 2 ..``), ``profile`` (the paper's drift rule, the shipped profile of the
model, see ``tokprune calibrate token-sparse``) and ``all``. ``--min-tokens`` is the policy's floor on the
kept count (window included; 0 by default so that short contexts are sparse at all).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import List, Optional

import torch


def _segments(tokenizer, n_segments: int, length: int) -> List[torch.Tensor]:
    from tokprune.models import held_out_text

    chars = 6 * n_segments * length
    while True:
        ids = tokenizer(held_out_text(chars), return_tensors="pt").input_ids[0]
        if ids.numel() >= n_segments * length or chars > 4_000_000:
            break
        chars *= 2
    if ids.numel() < n_segments * length:
        raise RuntimeError(f"held-out text has {ids.numel()} tokens, need {n_segments * length}")
    return [ids[i * length:(i + 1) * length][None] for i in range(n_segments)]


@torch.no_grad()
def _run(model, ids: torch.Tensor, context: int, window: int, policy=None):
    """``(continuation logits, last-window prompt logits)`` with ``policy`` used for the prefill only."""
    from tokprune.hf.attention import patch_attention

    ctx, cont = ids[:, :context], ids[:, context:]
    if policy is None:
        first = model(ctx, use_cache=True)
    else:
        with patch_attention(model, prefill=policy):
            first = model(ctx, use_cache=True)
    cache = getattr(first, "cache", None)
    if cache is None:  # transformers < 5.x names it past_key_values
        cache = first.past_key_values
    second = model(cont[:, :-1], **{"cache" if hasattr(first, "cache") else "past_key_values": cache},
                   use_cache=True)
    logits = torch.cat([first.logits[:, -1:], second.logits], dim=1)[0].float()  # predicts cont
    return logits, first.logits[0, -window:].float()


def evaluate(model, tokenizer, *, context: int, continuation: int, segments: int, keeps, window: int,
             layer_modes, min_tokens: int = 0, taus=(), log=print) -> List[dict]:
    from tokprune.methods.token_sparse import TokenSparseAttention

    data = _segments(tokenizer, segments, context + continuation)
    dense = [_run(model, ids, context, window) for ids in data]
    targets = torch.cat([ids[0, context:] for ids in data])
    dense_cont = torch.cat([d[0] for d in dense])
    dense_nll = torch.nn.functional.cross_entropy(dense_cont, targets).item()
    rows = []
    log(f"dense: ppl {math.exp(dense_nll):.3f} on {targets.numel()} continuation tokens "
        f"({segments} segments x {context}+{continuation} tokens)")
    log(f"{'layers':<12} {'budget':>11} {'top1':>7} {'KL':>8} {'ppl':>9} {'Δppl':>8} {'top1_win':>9} "
        f"{'kept':>6} {'s':>6}")
    budgets = [("keep", k) for k in keeps] + [("tau", t) for t in taus]
    for mode in layer_modes:
        for kind, value in budgets:
            keep = value if kind == "keep" else None
            kept_counts: List[float] = []
            policy = TokenSparseAttention(keep=keep, tau=value if kind == "tau" else None, window=window,
                                          min_tokens=min_tokens, layers=None if mode == "all" else mode)
            policy.bind(model)
            _record_kept(policy, kept_counts)
            start = time.perf_counter()
            runs = [_run(model, ids, context, window, policy) for ids in data]
            seconds = time.perf_counter() - start
            cont = torch.cat([r[0] for r in runs])
            win = torch.cat([r[1] for r in runs])
            dense_win = torch.cat([d[1] for d in dense])
            nll = torch.nn.functional.cross_entropy(cont, targets).item()
            kl = torch.nn.functional.kl_div(cont.log_softmax(-1), dense_cont.log_softmax(-1), log_target=True,
                                            reduction="batchmean").item()
            kept = sum(kept_counts) / max(len(kept_counts), 1)
            row = dict(layers=mode, keep=keep, tau=value if kind == "tau" else None, kept_fraction=kept,
                       top1=(cont.argmax(-1) == dense_cont.argmax(-1)).float().mean().item(),
                       kl=kl, ppl=math.exp(nll), dense_ppl=math.exp(dense_nll),
                       ppl_change=math.exp(nll - dense_nll) - 1.0,
                       top1_window=(win.argmax(-1) == dense_win.argmax(-1)).float().mean().item(),
                       sparse_calls=policy.calls, seconds=seconds)
            rows.append(row)
            log(f"{mode:<12} {kind + '=' + str(value):>11} {row['top1']:>7.3f} {kl:>8.4f} {row['ppl']:>9.3f} "
                f"{100 * row['ppl_change']:>7.1f}% {row['top1_window']:>9.3f} {kept:>6.3f} {seconds:>6.1f}")
    return rows


def _record_kept(policy, out: List[float]) -> None:
    """Wrap ``policy.attend`` to record the kept fraction (mean over heads) of every sparse call."""
    from tokprune.ops import token_sparse as ts_ops

    attend = policy.attend

    def recording(module, query, key, value, attention_mask, scaling, **kwargs):
        result = attend(module, query, key, value, attention_mask, scaling, **kwargs)
        if result is not None:
            n = query.shape[2]
            if policy.keep is not None:
                count = max(ts_ops.resolve_keep(policy.keep, n), min(policy.min_tokens, n), min(policy.window, n))
            else:
                scores = ts_ops.token_sparse_scores(query, key, window=policy.window, kernel_size=policy.kernel_size,
                                                    scale=scaling)
                count = max(ts_ops.coverage_keep_count(scores, policy.window, policy.tau, policy.min_tokens),
                            min(policy.min_tokens, n), min(policy.window, n))
            out.append(count / n)
        return result

    policy.attend = recording


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval token-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens prefilled sparsely")
    parser.add_argument("--continuation", type=int, default=128, help="real next tokens scored densely")
    parser.add_argument("--segments", type=int, default=4, help="independent text segments")
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.5, 0.25, 0.1])
    parser.add_argument("--taus", type=float, nargs="*", default=[], help="coverage thresholds (paper: 0.005)")
    parser.add_argument("--window", type=int, default=64, help="observation window (paper: 128 at 128K)")
    parser.add_argument("--min-tokens", type=int, default=0, help="floor on the kept count (paper: 1024 + window)")
    parser.add_argument("--layers", nargs="+", choices=["second_half", "profile", "all"],
                        default=["second_half", "profile", "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    from tokprune.models import load_smollm2_for_command

    loaded = load_smollm2_for_command(args.threads)
    if loaded is None:
        return 2
    model, tokenizer = loaded
    evaluate(model, tokenizer, context=args.context, continuation=args.continuation, segments=args.segments,
             keeps=args.keeps, window=args.window, layer_modes=args.layers, min_tokens=args.min_tokens, taus=args.taus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
