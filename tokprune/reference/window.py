"""Oracle of :func:`tokprune.ops.window_attention_scores`: explicit loops over rows, heads and window queries."""

from __future__ import annotations

from typing import Optional

import torch


def window_attention_scores_reference(query: torch.Tensor, key: torch.Tensor, window: int, pool: int = 1,
                                      scale: Optional[float] = None, valid: Optional[torch.Tensor] = None,
                                      group_reduce: Optional[str] = "sum", *, window_reduce: str = "sum",
                                      pool_mode: str = "max", pool_prefix_only: bool = False,
                                      causal: bool = True) -> torch.Tensor:
    """Same contract as :func:`tokprune.ops.window_attention_scores`, computed in float64 one query at a time
    (pooling as an explicit loop over the pooling window, zero padding counted for ``"avg"``)."""
    batch, heads, n_q, head_dim = query.shape
    kv_heads, n_tokens = key.shape[1], key.shape[2]
    group = heads // kv_heads
    w = min(window, n_q)
    scale = head_dim ** -0.5 if scale is None else scale
    per_head = torch.zeros(batch, heads, n_tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            k = key[b, h // group].double()
            for i in range(n_q - w, n_q):
                pos = n_tokens - n_q + i
                seen = torch.ones(n_tokens, dtype=torch.bool)
                if causal:
                    seen &= torch.arange(n_tokens) <= pos
                if valid is not None:
                    seen &= valid[b].cpu()
                if not bool(seen.any()):
                    continue
                logits = (k @ query[b, h, i].double()) * scale
                p = torch.softmax(logits.masked_fill(~seen, float("-inf")), 0)
                per_head[b, h] += p
    if window_reduce == "mean":
        per_head /= w
    if group_reduce is None:
        score = per_head
    else:
        grouped = per_head.view(batch, kv_heads, group, n_tokens)
        score = grouped.sum(2) if group_reduce == "sum" else grouped.mean(2)
    if pool > 1:
        end = n_tokens - w if pool_prefix_only else n_tokens
        out = score.clone()
        half = pool // 2
        for j in range(end):
            lo, hi = max(0, j - half), min(end, j + half + 1)
            part = score[..., lo:hi]
            out[..., j] = part.amax(-1) if pool_mode == "max" else part.sum(-1) / pool
        score = out
    if valid is not None:
        score = score.masked_fill(~valid.cpu()[:, None, :], float("-inf"))
    return score.float()
