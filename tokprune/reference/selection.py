"""Oracles for token selection and gathering."""

from __future__ import annotations

import torch


def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, Hkv, N, D)``, ``index (B, H, K)`` -> ``(B, H, K, D)`` with ``H // Hkv`` heads per KV head.

    Query head ``h`` reads KV head ``h // (H // Hkv)``; the KV heads are not expanded in memory.
    """
    batch, kv_heads, _, head_dim = x.shape
    heads, n_keep = index.shape[1], index.shape[2]
    flat = index.long().reshape(batch, kv_heads, (heads // kv_heads) * n_keep, 1)
    out = torch.gather(x, 2, flat.expand(-1, -1, -1, head_dim))
    return out.reshape(batch, heads, n_keep, head_dim)
