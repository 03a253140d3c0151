"""Window-attention token scores (SnapKV style): how much the last few queries attend each key.

One op serves every method that ranks prompt tokens by the attention of an observation window:
SnapKV (:class:`tokprune.methods.SnapKV`, sum over the window and the query group, max-pool),
UNComp's token selection (:class:`tokprune.methods.UNComp`, same) and token sparse attention
(:func:`tokprune.ops.token_sparse_scores`, per query head, mean over the window, average-pool over the
prefix only). The oracle is :func:`tokprune.reference.window.window_attention_scores_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokprune._backend import resolve_backend
from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

GROUP_REDUCES = ("sum", "mean", None)
WINDOW_REDUCES = ("sum", "mean")
POOL_MODES = ("max", "avg")


def window_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    window: int,
    pool: int = 1,
    scale: Optional[float] = None,
    valid: Optional[torch.Tensor] = None,
    group_reduce: Optional[str] = "sum",
    *,
    window_reduce: str = "sum",
    pool_mode: str = "max",
    pool_prefix_only: bool = False,
    causal: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention that the last ``window`` queries pay to every key, reduced over the window and the group.

    Query ``i`` of ``query`` sits at key position ``T - n_q + i`` (the queries are the newest tokens of the
    sequence; ``n_q == T`` in a plain prefill). With ``w = min(window, n_q)`` observation queries::

        p[b, h, i, j] = softmax_j(scale * q[b, h, n_q - w + i] . k[b, h // g, j])   (causal, valid keys)
        s[b, h, j]    = sum_i p[b, h, i, j]          (window_reduce="sum"; "mean" divides by w)
        out[b, r, j]  = sum / mean over the g query heads of KV head r of s (group_reduce), or s (None)

    then pooled along ``j`` with an odd kernel ``pool`` (``"max"``: max-pool, ``"avg"``: average pool
    with zero padding counted, as ``F.avg_pool1d``), over all keys or, with ``pool_prefix_only``, only over
    the keys before the window (token sparse attention). Padding keys come out as ``-inf``.

    Args:
        query: ``(batch, heads, n_q, head_dim)`` post-RoPE queries, fp32/fp16/bf16; ``n_q >= 1``.
        key: ``(batch, kv_heads, T, head_dim)`` post-RoPE keys, same dtype and device; ``T >= n_q``,
            ``heads % kv_heads == 0`` (grouped-query attention, never expanded).
        window: observation queries (``>= 1``; clamped to ``n_q``).
        pool: odd pooling width ``>= 1`` (``1``: no pooling).
        scale: softmax scale (default ``head_dim ** -0.5``).
        valid: optional ``(batch, T)`` bool, ``True`` for real keys (padding never attended, ``-inf`` out).
            A window query whose every key is masked contributes zeros.
        group_reduce: ``"sum"`` / ``"mean"`` over the query heads of a KV head -> ``(batch, kv_heads, T)``,
            or ``None`` -> per query head ``(batch, heads, T)``.
        window_reduce: ``"sum"`` or ``"mean"`` over the window queries.
        pool_mode: ``"max"`` or ``"avg"``.
        pool_prefix_only: pool only the keys ``j < T - w`` (the window keys are left as they are).
        causal: window query ``i`` does not see keys after its own position.
        backend: ``"auto" | "torch"``.

    Returns:
        float32 ``(batch, kv_heads, T)`` (``group_reduce`` given) or ``(batch, heads, T)`` (``None``).
    """
    check_tensor("query", query, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("key", key, ndim=4, dtypes=FLOAT_DTYPES, device=query.device)
    batch, heads, n_q, head_dim = query.shape
    kv_heads, n_tokens = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"key must be (batch={batch}, kv_heads, T, head_dim={head_dim}), got {tuple(key.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key kv_heads ({kv_heads})")
    if n_q < 1 or n_q > n_tokens:
        raise ValueError(f"query must hold 1 <= n_q <= T={n_tokens} queries, got n_q={n_q}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be a positive odd int, got {pool!r}")
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")
    if window_reduce not in WINDOW_REDUCES:
        raise ValueError(f"window_reduce must be one of {WINDOW_REDUCES}, got {window_reduce!r}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
    if valid is not None:
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), device=query.device)
        if tuple(valid.shape) != (batch, n_tokens):
            raise ValueError(f"valid must be (batch={batch}, T={n_tokens}) bool, got {tuple(valid.shape)}")
    resolve_backend(backend, query.device, ("torch",), "window_attention_scores")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return _window_scores_torch(query, key, min(window, n_q), pool, scale, valid, group_reduce, window_reduce,
                                pool_mode, pool_prefix_only, causal)


def _window_scores_torch(query, key, w, pool, scale, valid, group_reduce, window_reduce, pool_mode,
                         pool_prefix_only, causal):
    batch, heads, n_q, head_dim = query.shape
    kv_heads, n_tokens = key.shape[1], key.shape[2]
    group = heads // kv_heads
    # (B, Hkv, g*w, D): the window queries of the g heads sharing a KV head; the scale is folded into the
    # (small) window queries instead of the (w, T) logits.
    qw = (query[:, :, n_q - w:].float() * scale).reshape(batch, kv_heads, group * w, head_dim)
    logits = torch.matmul(qw, key.float().transpose(-1, -2)).view(batch, kv_heads, group, w, n_tokens)
    if causal and w > 1:  # only the (w, w) block of the newest keys can lie in a window query's future
        future = torch.ones(w, w, dtype=torch.bool, device=query.device).triu(1)
        logits[..., n_tokens - w:].masked_fill_(future, float("-inf"))
    if valid is not None:
        logits.masked_fill_(~valid[:, None, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if valid is not None:
        probs = probs.nan_to_num_(0.0)  # a window query that sees no key (padding) contributes nothing
    score = probs.sum(3)  # (B, Hkv, g, T)
    if window_reduce == "mean":
        score = score.div_(w)
    if group_reduce == "sum":
        score = score.sum(2)
    elif group_reduce == "mean":
        score = score.mean(2)
    else:
        score = score.reshape(batch, heads, n_tokens)
    if pool > 1:
        end = n_tokens - w if pool_prefix_only else n_tokens
        if end > 0:
            fn = F.max_pool1d if pool_mode == "max" else F.avg_pool1d
            pooled = fn(score[..., :end], kernel_size=pool, stride=1, padding=pool // 2)
            score = pooled if end == n_tokens else torch.cat([pooled, score[..., end:]], dim=-1)
    if valid is not None:
        score = score.masked_fill(~valid[:, None, :], float("-inf"))
    return score


__all__ = ["window_attention_scores"]
