"""Plain-torch oracles for frequency-chunk sparse attention (FASA), written for clarity.

Frequency-chunk layout (Hugging Face ``rotate_half`` RoPE): with head dimension ``D``, rotation pair
``p`` (``0 <= p < D/2``) rotates dimensions ``(p, p + D/2)`` with frequency ``theta ** (-2p / D)``.
A frequency chunk (FC) groups ``chunk`` consecutive pairs: FC ``c`` covers pairs
``c*chunk ... (c+1)*chunk - 1``, i.e. dimensions ``{p, p + D/2}`` for those pairs. There are
``D / (2*chunk)`` FCs per head. :func:`fc_dims` lists the dimensions of a set of FCs in the order the
packed key layout stores them.
"""

from __future__ import annotations

import torch


def fc_dims(fc_index: torch.Tensor, head_dim: int, chunk: int = 1) -> torch.Tensor:
    """Head dimensions read by the FCs in ``fc_index``.

    Args:
        fc_index: ``(heads, F)`` int FC ids in ``[0, head_dim / (2*chunk))``.
        head_dim: ``D`` (even).
        chunk: rotation pairs per FC.

    Returns:
        ``(heads, F * 2 * chunk)`` int64: for each FC, its ``chunk`` first-half dims then their
        ``chunk`` second-half partners (``p, ..., p + D/2, ...``).
    """
    half = head_dim // 2
    pairs = fc_index.long().unsqueeze(-1) * chunk + torch.arange(chunk, device=fc_index.device)  # (h, F, chunk)
    dims = torch.cat([pairs, pairs + half], dim=-1)  # (h, F, 2*chunk)
    return dims.flatten(-2)


def other_dims(dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The head dimensions not in ``dims``, ascending, per head.

    Args:
        dims: ``(heads, nd)`` int distinct head-dim indices in ``[0, head_dim)`` (e.g. :func:`fc_dims`).
        head_dim: ``D``.

    Returns:
        ``(heads, D - nd)`` int64 on ``dims``' device.
    """
    keep = torch.ones(dims.shape[0], head_dim, dtype=torch.bool, device=dims.device)
    keep.scatter_(1, dims.long(), False)
    return torch.arange(head_dim, device=dims.device).expand(dims.shape[0], -1)[keep].view(dims.shape[0], -1)


def fc_scores_reference(q: torch.Tensor, k_cache: torch.Tensor, fc_index: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """``scores[b, h, t] = sum_{d in dims(h)} q[b, h, 0, d] * k[b, h // g, t, d]`` in fp32.

    ``q (B, H, 1, D)``, ``k_cache (B, Hkv, T, D)``, ``fc_index (Hkv or H, F)``; returns ``(B, H, T)`` fp32.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    dims = fc_dims(fc_index, head_dim, chunk)
    out = torch.empty(batch, heads, k_cache.shape[2], dtype=torch.float32, device=q.device)
    for h in range(heads):
        d = dims[h if fc_index.shape[0] == heads else h // group]
        qh = q[:, h, 0, :].float()[:, d]  # (B, nd)
        kh = k_cache[:, h // group].float()[:, :, d]  # (B, T, nd)
        out[:, h] = torch.einsum("bd,btd->bt", qh, kh)
    return out


def sparse_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention of one query per head over the tokens listed in ``indices`` (fp32 math).

    ``q (B, H, 1, D)``, ``k_cache``/``v_cache (B, Hkv, T, D)``, ``indices (B, Hkv or H, K)`` with
    entries ``< 0`` ignored. A row with no valid index gives zeros. Returns ``(B, H, 1, D)`` in q's dtype.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, 1, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        for h in range(heads):
            row = indices[b, h if indices.shape[1] == heads else h // group]
            row = row[row >= 0].long()
            if row.numel() == 0:
                continue
            k = k_cache[b, h // group, row].float()
            v = v_cache[b, h // group, row].float()
            w = torch.softmax((k @ q[b, h, 0].float()) * scale, dim=0)
            out[b, h, 0] = w @ v
    return out.to(q.dtype)
