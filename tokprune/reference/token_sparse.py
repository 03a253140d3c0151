"""Oracles for token sparse attention, written for clarity rather than speed.

Every function here works on small inputs with explicit expansion of the KV heads and full
``N x N`` attention maps, so that the fast paths in :mod:`tokprune.ops.token_sparse` and the Triton
kernels can be checked against an independent formulation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def token_sparse_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int,
    kernel_size: int,
    scale: float,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean attention probability that the last ``window`` queries give each key, per head.

    ``q (B, H, N, D)``, ``k (B, Hkv, N, D)`` -> ``(B, H, N)`` float32. The full ``N x N`` softmax is
    computed and the last ``window`` rows are averaged (padding query rows count as zero). Prefix
    scores (keys before the window) are smoothed with an average pool of ``kernel_size`` (zero
    padded, ``count_include_pad``); window keys keep their raw score. Padding keys get ``-inf``.
    """
    batch, heads, n, _ = q.shape
    w = min(window, n)
    kk = _expand_kv(k, heads).double()
    logits = (q.double() @ kk.transpose(-1, -2)) * scale  # (B, H, N, N)
    if causal:
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)
    mean = probs[:, :, n - w:, :].sum(2) / w  # (B, H, N)
    out = mean.clone()
    prefix = n - w
    if prefix > 0 and kernel_size > 1:
        half = kernel_size // 2
        padded = F.pad(mean[..., :prefix], (half, half))
        out[..., :prefix] = torch.stack([padded[..., i:i + kernel_size].sum(-1) / kernel_size
                                         for i in range(prefix)], dim=-1)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
    return out.float()


def compress_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor):
    """``q (B, H, N, D)``, ``k/v (B, Hkv, N, D)``, ``indices (B, H, K)`` -> three ``(B, H, K, D)``.

    Query head ``h`` reads KV head ``h // (H // Hkv)``; written with an explicit expansion.
    """
    heads = q.shape[1]
    idx = indices.long()[..., None]

    def take(x):
        return torch.gather(x, 2, idx.expand(-1, -1, -1, x.shape[-1]))

    return take(q), take(_expand_kv(k, heads)), take(_expand_kv(v, heads))


def decompress_reference(out_compressed: torch.Tensor, indices: torch.Tensor, seq_len: int,
                         fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, H, K, D)`` rows scattered to ``(B, H, seq_len, D)``; other rows are ``fill`` (or zero)."""
    batch, heads, n_keep, dim = out_compressed.shape
    out = torch.zeros(batch, heads, seq_len, dim, dtype=out_compressed.dtype) if fill is None else fill.clone()
    for b in range(batch):
        for h in range(heads):
            out[b, h, indices[b, h].long()] = out_compressed[b, h]
    return out


def token_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token sparse attention given the selected tokens, as a masked dense attention.

    For head ``h`` with selected set ``S_h = indices[b, h]``: a selected query ``i`` attends to the
    selected keys ``j in S_h`` with ``j <= i`` (when ``causal``) that are not padding; a query not in
    ``S_h`` outputs zeros (the paper's rule: the token keeps only its residual path in this layer).
    Computed in float64 on the full ``N x N`` map; returns ``(B, H, N, D)`` in ``q.dtype``.
    """
    batch, heads, n, _ = q.shape
    selected = torch.zeros(batch, heads, n, dtype=torch.bool)
    selected.scatter_(2, indices.long(), True)
    kk, vv = _expand_kv(k, heads).double(), _expand_kv(v, heads).double()
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    allowed = selected[:, :, None, :].expand(-1, -1, n, -1).clone()
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = weights @ vv
    out = out.masked_fill(~selected[..., None], 0.0)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
    return out.to(q.dtype)
