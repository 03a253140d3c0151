"""Token selection and gathering shared by every pruning method."""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokprune._backend import resolve_backend
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_finite, check_index, check_tensor


def select_tokens(
    scores: torch.Tensor,
    keep: int,
    *,
    keep_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring tokens per row, in increasing token order.

    Ties are broken by the lower token index (stable), so the result is deterministic.
    Tokens in ``keep_mask`` are always selected and count toward ``keep``. Tokens whose score is
    ``-inf`` (e.g. padding) are selected only if fewer than ``keep`` other tokens exist.

    Args:
        scores: ``(..., n_tokens)`` float scores; larger is more important. NaN is rejected.
        keep: number of tokens to return per row, ``>= 0``; values above ``n_tokens`` clamp to it.
        keep_mask: optional ``(..., n_tokens)`` bool, ``True`` for tokens that must be kept.
        backend: ``"auto" | "torch" | "cuda"``. ``"cuda"`` is the fused radix-select kernel of
            ``tokprune._C`` (its host build on CPU tensors); results are identical on every backend.

    Returns:
        ``(..., min(keep, n_tokens))`` int64 indices, sorted ascending within each row.

    Raises:
        ValueError: ``keep`` is negative; in debug mode (``TOKPRUNE_DEBUG=1``, checks that read tensor
            data) also ``scores`` has NaN or a row of ``keep_mask`` has more ``True`` entries than ``keep``.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES)
    if scores.dim() < 1:
        raise ValueError(f"scores must have a token dimension, got shape {tuple(scores.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative int, got {keep!r}")
    if debug_checks():  # reads data (host sync): debug mode only
        check_finite("scores", scores)
    n_tokens = scores.shape[-1]
    keep = min(keep, n_tokens)
    work = scores.float()
    if keep_mask is not None:
        check_tensor("keep_mask", keep_mask, dtypes=(torch.bool,), device=scores.device)
        if keep_mask.shape != scores.shape:
            raise ValueError(f"keep_mask must have the shape of scores {tuple(scores.shape)}, "
                             f"got {tuple(keep_mask.shape)}")
        forced = keep_mask.sum(-1) if debug_checks() else None  # reads data: debug mode only
        if forced is not None and forced.numel() and int(forced.max()) > keep:
            raise ValueError(f"keep_mask forces {int(forced.max())} tokens in a row but keep={keep}")
        work = work.masked_fill(keep_mask, float("inf"))
    chosen = resolve_backend(backend, scores.device, ("torch", "cuda"), "select_tokens")
    if chosen == "cuda":
        from tokprune.kernels.cuda import select_tokens_cuda

        rows = work.reshape(math.prod(scores.shape[:-1]), n_tokens).contiguous()
        return select_tokens_cuda(rows, keep).reshape(*scores.shape[:-1], keep)
    # Stable descending sort: equal scores keep increasing token order. -inf sorts last.
    order = torch.sort(work, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Gather token rows per (batch, head): ``out[b, h, k] = x[b, h // g, index[b, h, k]]``.

    Args:
        x: ``(batch, kv_heads, n_tokens, head_dim)`` fp32/fp16/bf16.
        index: ``(batch, heads, n_keep)`` int32/int64 token indices in ``[0, n_tokens)`` (range checked in
            debug mode only);
            ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention: query head ``h``
            reads KV head ``h // (heads // kv_heads)``).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(batch, heads, n_keep, head_dim)`` in the dtype of ``x``.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("index", index, ndim=3, device=x.device)
    batch, kv_heads, n_tokens, _ = x.shape
    if index.shape[0] != batch or index.shape[1] % kv_heads:
        raise ValueError(f"index must be (batch={batch}, heads multiple of kv_heads={kv_heads}, n_keep), "
                         f"got {tuple(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if debug_checks():  # reads data (host sync): debug mode only
        check_index("index", index, n_tokens)
    chosen = resolve_backend(backend, x.device, ("torch", "triton"), "gather_tokens")
    if chosen == "triton":
        from tokprune.kernels.triton.gather import gather_tokens_triton

        return gather_tokens_triton(x, index)
    from tokprune.reference.selection import gather_tokens_reference

    return gather_tokens_reference(x, index)
