"""Quality of token sparse prefill on the real SmolLM2-135M with held-out text.

    tokprune eval token-sparse [--context 1024 --continuation 128 --segments 4 --keeps 0.5 0.25 0.1]

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

Every configuration is run with the paper's layer setting (second half of the layers) and with every
layer sparse.
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
             layer_modes, min_tokens: int = 0, log=print) -> List[dict]:
    from tokprune.methods.token_sparse import TokenSparseAttention

    data = _segments(tokenizer, segments, context + continuation)
    dense = [_run(model, ids, context, window) for ids in data]
    targets = torch.cat([ids[0, context:] for ids in data])
    dense_cont = torch.cat([d[0] for d in dense])
    dense_nll = torch.nn.functional.cross_entropy(dense_cont, targets).item()
    rows = []
    log(f"dense: ppl {math.exp(dense_nll):.3f} on {targets.numel()} continuation tokens "
        f"({segments} segments x {context}+{continuation} tokens)")
    log(f"{'layers':<12} {'keep':>5} {'top1':>7} {'KL':>8} {'ppl':>9} {'Δppl':>8} {'top1_win':>9} {'s':>6}")
    for mode in layer_modes:
        for keep in keeps:
            policy = TokenSparseAttention(keep=keep, window=window, min_tokens=min_tokens,
                                          layers="second_half" if mode == "second_half" else None)
            start = time.perf_counter()
            runs = [_run(model, ids, context, window, policy) for ids in data]
            seconds = time.perf_counter() - start
            cont = torch.cat([r[0] for r in runs])
            win = torch.cat([r[1] for r in runs])
            dense_win = torch.cat([d[1] for d in dense])
            nll = torch.nn.functional.cross_entropy(cont, targets).item()
            kl = torch.nn.functional.kl_div(cont.log_softmax(-1), dense_cont.log_softmax(-1), log_target=True,
                                            reduction="batchmean").item()
            row = dict(layers=mode, keep=keep, top1=(cont.argmax(-1) == dense_cont.argmax(-1)).float().mean().item(),
                       kl=kl, ppl=math.exp(nll), dense_ppl=math.exp(dense_nll),
                       ppl_change=math.exp(nll - dense_nll) - 1.0,
                       top1_window=(win.argmax(-1) == dense_win.argmax(-1)).float().mean().item(),
                       sparse_calls=policy.calls, seconds=seconds)
            rows.append(row)
            log(f"{mode:<12} {keep:>5} {row['top1']:>7.3f} {kl:>8.4f} {row['ppl']:>9.3f} "
                f"{100 * row['ppl_change']:>7.1f}% {row['top1_window']:>9.3f} {seconds:>6.1f}")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval token-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens prefilled sparsely")
    parser.add_argument("--continuation", type=int, default=128, help="real next tokens scored densely")
    parser.add_argument("--segments", type=int, default=4, help="independent text segments")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--window", type=int, default=64, help="observation window (paper: 128 at 128K)")
    parser.add_argument("--layers", nargs="+", choices=["second_half", "all"], default=["second_half", "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokprune.models import load_smollm2, smollm2_available

    reason = smollm2_available()
    if reason is not None:
        print(f"error: {reason}")
        return 2
    model, tokenizer = load_smollm2()
    evaluate(model, tokenizer, context=args.context, continuation=args.continuation, segments=args.segments,
             keeps=args.keeps, window=args.window, layer_modes=args.layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
