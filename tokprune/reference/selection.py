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


def gather_tokens_naive(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The oracle of :func:`tokprune.ops.gather_tokens`, written independently of its torch backend
    (which is :func:`gather_tokens_reference`): KV heads expanded explicitly, then one advanced index
    ``out[b, h, j] = x_expanded[b, h, index[b, h, j]]``. ``x (B, Hkv, N, D)``, ``index (B, H, K)``."""
    batch, kv_heads = x.shape[0], x.shape[1]
    heads, n_keep = index.shape[1], index.shape[2]
    expanded = x.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, N, D)
    b = torch.arange(batch).view(batch, 1, 1).expand(batch, heads, n_keep)
    h = torch.arange(heads).view(1, heads, 1).expand(batch, heads, n_keep)
    return expanded[b, h, index.long()]


def select_tokens_reference(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Oracle of :func:`tokprune.ops.select_tokens` without ``keep_mask``: per row of ``scores (R, N)``, the
    indices of the ``min(keep, N)`` largest values (ties to the lower index; ``-0.0 == 0.0``), sorted
    ascending, as ``(R, min(keep, N))`` int64. Python sorting, one row at a time."""
    rows = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        rows.append(sorted(order[:min(keep, len(row))]))
    return torch.tensor(rows, dtype=torch.int64).reshape(scores.shape[0], -1)
