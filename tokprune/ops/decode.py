"""Dense single-token decode attention, GQA-aware without ``repeat_kv``.

The query heads of a KV group are laid onto their KV head as query rows (``(B, H, 1, D) -> (B, Hkv, g, D)``),
so one non-causal SDPA call per step scores all ``g`` heads of a group against the cache and reads K and V
once per KV head, never expanded per query head. This is the dense decode path of tokprune's KV cache
(:mod:`tokprune.hf.kv_cache`) and the fallback of pruning policies that decline.

Measured on the 2-core CPU of this project (SmolLM2 shapes H=9, Hkv=3, D=64, batch 4, 2K tokens, one
layer): at 1 thread the grouped matmul form (matmul, softmax, matmul), SDPA with ``enable_gqa`` and SDPA on
the grouped query are within 20% of each other (3.0-3.7 ms); at 2 threads on the loaded, shared CPU the
three-op matmul form took 4x longer than one fused SDPA call (49 vs 12 ms: every op is a parallel region
waiting for both cores). The fused call on the grouped query is kept: one parallel region, any mask as
``attn_mask``, strided cache views read without a copy, no data-dependent control flow (it traces under
``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

__all__ = ["dense_decode_attention"]


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact attention of one query token per row over a KV cache, GQA without ``repeat_kv``.

    Args:
        q: ``(batch, heads, 1, head_dim)`` fp32/fp16/bf16 query.
        k: ``(batch, kv_heads, n_tokens, head_dim)`` keys (any strides with a unit last stride, e.g. a view
            of a preallocated cache); ``heads`` must be a multiple of ``kv_heads``.
        v: ``(batch, kv_heads, n_tokens, head_dim_v)`` values, same dtype.
        scale: softmax scale, default ``head_dim ** -0.5``.
        valid: optional mask of the cached tokens each row may attend to: bool ``(batch, n_tokens)`` or
            ``(batch or 1, 1, 1, n_tokens)`` (True = attend; a row must keep at least one token), or an
            additive float mask ``(batch or 1, 1, 1, n_tokens)`` (0 / -inf), as HF builds for left padding.
            Masks over query heads ``(batch, heads, 1, n_tokens)`` are accepted too.

    Returns:
        ``(batch, heads, 1, head_dim_v)`` in the dtype of ``q`` (softmax accumulated in fp32 for fp16/bf16).

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not fit (checks read no tensor data).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, n_tokens = k.shape[1], k.shape[2]
    if q_len != 1:
        raise ValueError(f"q must hold one query token per row (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be (batch={batch}, kv_heads, n_tokens, head_dim={head_dim}), got {tuple(k.shape)}")
    if v.shape[1] != kv_heads or v.shape[2] != n_tokens:
        raise ValueError(f"v must be (batch, kv_heads={kv_heads}, n_tokens={n_tokens}, head_dim_v), got "
                         f"{tuple(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    group = heads // kv_heads
    if scale is None:
        scale = head_dim ** -0.5
    qg = q.reshape(batch, kv_heads, group, head_dim)  # the g query heads of a group as g "query rows"
    mask = None
    if valid is not None:
        mask = _mask(valid, batch, heads, kv_heads, group, n_tokens, q.dtype, q.device)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, Hkv, g, Dv)
    return out.reshape(batch, heads, 1, v.shape[3])


def _mask(valid: torch.Tensor, batch: int, heads: int, kv_heads: int, group: int, n_tokens: int,
          dtype: torch.dtype, device) -> torch.Tensor:
    """SDPA mask broadcastable to ``(batch, kv_heads, group, n_tokens)`` from a bool or additive float mask."""
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a torch.Tensor or None, got {type(valid).__name__}")
    if valid.device != device:
        raise ValueError(f"valid must be on {device} like q, got {valid.device}")
    if valid.dim() == 2:
        if valid.shape != (batch, n_tokens) or valid.dtype != torch.bool:
            raise ValueError(f"a 2-D valid must be bool (batch={batch}, n_tokens={n_tokens}), got "
                             f"{tuple(valid.shape)} {valid.dtype}")
        valid = valid[:, None, None, :]
    if valid.dim() != 4 or valid.shape[2] != 1 or valid.shape[0] not in (1, batch) or \
            valid.shape[1] not in (1, heads) or valid.shape[3] < n_tokens:
        raise ValueError(f"valid must be (batch|1, 1|heads, 1, n_tokens={n_tokens}), got {tuple(valid.shape)}")
    valid = valid[..., :n_tokens]
    if valid.shape[1] == heads and heads != 1:
        valid = valid.reshape(valid.shape[0], kv_heads, group, n_tokens)
    if valid.dtype == torch.bool:
        return valid
    if not valid.is_floating_point():
        raise TypeError(f"valid must be bool or an additive float mask, got {valid.dtype}")
    return valid.to(dtype)
