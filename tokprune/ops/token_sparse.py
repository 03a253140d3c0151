"""Token sparse attention (Jo et al., "Token Sparse Attention: Efficient Long-Context Inference with
Interleaved Token Selection", 2026): per head, score tokens cheaply, keep a subset, compress Q/K/V to
it, run dense attention on the short sequence, scatter the output back.

The rules follow the authors' released code (``sparse_attn/token_sparse/sparse_cluster.py``, read
2026-11-24):

* **score** (:func:`token_sparse_scores`): the mean, over the last ``window`` queries (128 in the
  paper), of the softmax attention probability each key receives (softmax over *all* keys, causal
  inside the window), smoothed over the prefix with an average pool of width ``kernel_size`` (7).
  Cost ``O(window * N)`` per head, never the ``N x N`` map.
* **select**: per query head, the top tokens by that score; the last ``window`` tokens (the
  observation window) are always kept; indices sorted ascending so that a causal mask on the
  compressed sequence is the causal mask of the original positions.
* **decompress** (:func:`decompress`): rows of tokens that were not selected are **zero**: in this
  layer and head the token gets no attention update and keeps only its residual path; the next
  layer re-scores every token (interleaved selection, never a permanent eviction).

Kept count: the paper sets it adaptively from a coverage threshold ``tau`` (0.005) over the head-mean
score distribution with a floor ``min_tokens`` (1024 prefix tokens + the window):
``keep=None, tau=...`` (:func:`coverage_keep_count`). ``keep`` (a fraction or a count) is tokprune's
explicit budget, with the same floor, which makes speed and quality comparable across inputs. The paper
applies the method to the layers whose hidden-state drift is below the ``delta`` quantile;
:class:`tokprune.methods.TokenSparseAttention` has ``layers="profile"`` for that.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from tokprune._backend import resolve_backend
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_index, check_tensor
from tokprune.ops.selection import select_tokens
from tokprune.ops.window import window_attention_scores

Keep = Union[float, int]


# ----------------------------------------------------------------------------------------------- checks
def _check_qk(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, heads, n, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != n or k.shape[3] != dim:
        raise ValueError(f"k must be (batch={batch}, kv_heads, n_tokens={n}, head_dim={dim}), got {tuple(k.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q heads ({heads}) must be a multiple of k heads ({k.shape[1]})")
    if v is not None:
        check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v must be (batch, kv_heads, n_tokens, head_dim_v) matching k {tuple(k.shape[:3])}, "
                             f"got {tuple(v.shape)}")


def _check_padding(key_padding_mask: Optional[torch.Tensor], batch: int, n: int, device) -> Optional[torch.Tensor]:
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=device)
    if tuple(key_padding_mask.shape) != (batch, n):
        raise ValueError(f"key_padding_mask must be (batch={batch}, n_tokens={n}) bool, True = real token, "
                         f"got {tuple(key_padding_mask.shape)}")
    return None if bool(key_padding_mask.all()) else key_padding_mask


def _check_indices(indices: torch.Tensor, upper: int) -> None:
    """dtype always; the value range (reads the data: a host sync) only in debug mode."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if debug_checks():
        check_index("indices", indices, upper)


def resolve_keep(keep: Keep, n_tokens: int) -> int:
    """Number of tokens kept for ``keep`` (fraction in ``(0, 1]`` -> ``ceil(keep * n)``, or a count).

    Raises:
        ValueError: ``keep`` is a float outside ``(0, 1]``, an int outside ``[1, n_tokens]``, or a bool.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a float in (0, 1] or an int in [1, n_tokens], got {keep!r}")
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0) or math.isnan(keep):
            raise ValueError(f"keep must be a float in (0, 1] (fraction of tokens kept), got {keep}")
        return max(1, min(n_tokens, math.ceil(keep * n_tokens - 1e-9)))
    if keep < 1 or keep > n_tokens:
        raise ValueError(f"keep={keep} tokens: an int keep must lie in [1, n_tokens={n_tokens}]")
    return keep


# ----------------------------------------------------------------------------------------------- scores
def token_sparse_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int = 128,
    kernel_size: int = 7,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-head token importance from the attention of the last ``window`` queries.

    ``score[b, h, j] = mean_{i in last window} softmax_j(scale * q[b, h, i] . k[b, h // g, j])``
    (causal inside the window), average-pooled over the prefix ``j < N - window`` with width
    ``kernel_size`` (zero padded, ``count_include_pad``). Cost ``O(window * N * D)`` per head.

    Args:
        q: ``(batch, heads, n_tokens, head_dim)`` fp32/fp16/bf16 queries (after RoPE).
        k: ``(batch, kv_heads, n_tokens, head_dim)`` keys; ``heads % kv_heads == 0`` (GQA, not expanded).
        window: observation window (last queries); clamped to ``n_tokens``. Paper: 128.
        kernel_size: odd pooling width, ``1`` disables pooling. Paper: 7.
        scale: softmax scale, default ``head_dim ** -0.5``.
        causal: mask keys after each window query.
        key_padding_mask: optional ``(batch, n_tokens)`` bool, ``True`` for real tokens.
        backend: ``"auto" | "torch"``.

    Returns:
        ``(batch, heads, n_tokens)`` float32; padding keys are ``-inf``.
    """
    _check_qk(q, k)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    resolve_backend(backend, q.device, ("torch",), "token_sparse_scores")
    batch, heads, n, dim = q.shape
    pad = _check_padding(key_padding_mask, batch, n, q.device)
    if n == 0:
        return q.new_zeros(batch, heads, 0, dtype=torch.float32)
    # The shared window op (SnapKV / UNComp use it too): per query head, mean over the window,
    # average pool (zero padding counted) over the prefix keys only.
    return window_attention_scores(q, k, window, kernel_size, scale, pad, None, window_reduce="mean",
                                   pool_mode="avg", pool_prefix_only=True, causal=causal)


def coverage_keep_count(scores: torch.Tensor, window: int, tau: float, min_tokens: int = 0) -> int:
    """Tokens kept (window included) by the paper's coverage rule: one count per layer call.

    Over the prefix keys ``j < N - w`` (``w = min(window, N)``), the head-mean score
    ``g[b, j] = mean_h scores[b, h, j]`` is normalised to a distribution (``g / (sum g + 1e-8)``, padding
    and ``-inf`` count as 0); sorted ascending, its cumulative sum gives the number of *sparse* tokens
    ``s_b = #{cumsum < tau}`` (the least-attended tokens that together hold less than ``tau`` of the
    mass). One count for the batch: ``s = min_b s_b`` (no row drops more than its own rule allows). If
    ``s == 0`` nothing is dropped (returns ``N``); else ``s + 1`` tokens are dropped, with a floor of
    ``min_tokens - w`` kept prefix tokens:
    ``n_keep = w + max(min_tokens - w, N - w - s - 1)``, at most ``N``.

    Args:
        scores: ``(batch, heads, N)`` float, e.g. :func:`token_sparse_scores` (larger = more attended).
        window: observation window (the last ``window`` tokens are always kept and not counted).
        tau: coverage threshold in ``[0, 1)`` (paper: 0.005).
        min_tokens: floor on the kept count, window included.

    Returns:
        ``n_keep`` (python int, in ``[min(window, N), N]``). Reads the scores on the host (one sync).
    """
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) < 1.0:
        raise ValueError(f"tau must be a float in [0, 1) (coverage threshold; paper: 0.005), got {tau!r}")
    n = scores.shape[-1]
    w = min(window, n)
    prefix = n - w
    if prefix <= 0 or tau == 0:
        return n
    g = scores[..., :prefix].float().nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0.0).mean(1)  # (B, P)
    g = g / (g.sum(-1, keepdim=True) + 1e-8)
    sparse = int((g.sort(-1).values.cumsum(-1) < float(tau)).sum(-1).min())
    if sparse == 0:
        return n
    return min(n, w + max(min_tokens - w, prefix - sparse - 1))


# ----------------------------------------------------------------------------------------------- compress
def compress_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the selected tokens of Q, K and V per (batch, query head), in one fused pass.

    ``qc[b, h, j] = q[b, h, indices[b, h, j]]``, ``kc[b, h, j] = k[b, h // g, indices[b, h, j]]`` and
    the same for ``v``: each query head gets its own token set; the KV heads are read in place
    (grouped-query attention, ``g = heads // kv_heads``) and never expanded to ``(B, H, N, D)``.

    Args:
        q: ``(batch, heads, n_tokens, head_dim)`` fp32/fp16/bf16 (any strides).
        k, v: ``(batch, kv_heads, n_tokens, head_dim)`` in the dtype of ``q``.
        indices: ``(batch, heads, n_keep)`` int32/int64 in ``[0, n_tokens)``, distinct and sorted
            ascending per row when the result feeds causal attention.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(qc, kc, vc)``, each ``(batch, heads, n_keep, head_dim)`` contiguous, dtype of ``q``.
    """
    _check_qk(q, k, v)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v head_dim must equal q head_dim {q.shape[-1]} for compress_qkv, got {v.shape[-1]}")
    check_tensor("indices", indices, ndim=3, device=q.device)
    if tuple(indices.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(f"indices must be (batch={q.shape[0]}, heads={q.shape[1]}, n_keep), got {tuple(indices.shape)}")
    _check_indices(indices, q.shape[2])
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "compress_qkv")
    if chosen == "triton":
        from tokprune.kernels.triton.token_sparse import compress_qkv_triton

        return compress_qkv_triton(q, k, v, indices)
    return _compress_torch(q, k, v, indices)


def _compress_torch(q, k, v, indices):
    from tokprune.reference.selection import gather_tokens_reference

    idx = indices.long()
    qc = torch.gather(q, 2, idx[..., None].expand(-1, -1, -1, q.shape[-1]))
    return qc, gather_tokens_reference(k, idx), gather_tokens_reference(v, idx)


def decompress(
    out_compressed: torch.Tensor,
    indices: torch.Tensor,
    seq_len: int,
    *,
    fill: Union[float, torch.Tensor] = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Scatter per-head outputs back to the full sequence: ``out[b, h, indices[b, h, j]] = oc[b, h, j]``.

    Rows of tokens that were not selected in a head get ``fill``. The paper's rule is zero
    (``fill=0.0``): the token's attention output in that head is empty and it keeps only its
    residual path, so the next layer sees and re-scores it.

    Args:
        out_compressed: ``(batch, heads, n_keep, head_dim)`` fp32/fp16/bf16.
        indices: ``(batch, heads, n_keep)`` int32/int64, distinct per row, in ``[0, seq_len)``.
        seq_len: ``N``, length of the full sequence.
        fill: a float for every non-selected row, or a ``(batch, heads, seq_len, head_dim)`` tensor
            whose rows are used for them (it is not modified).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(batch, heads, seq_len, head_dim)`` in the dtype of ``out_compressed``. The result is a
        ``transpose(1, 2)`` view of a contiguous ``(batch, seq_len, heads, head_dim)`` buffer, so that
        ``out.transpose(1, 2)`` (the layout HF attention functions return) costs nothing.
    """
    check_tensor("out_compressed", out_compressed, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("indices", indices, ndim=3, device=out_compressed.device)
    if tuple(indices.shape) != tuple(out_compressed.shape[:3]):
        raise ValueError(f"indices must be (batch, heads, n_keep) = {tuple(out_compressed.shape[:3])} like "
                         f"out_compressed, got {tuple(indices.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < indices.shape[2]:
        raise ValueError(f"seq_len must be an int >= n_keep={indices.shape[2]}, got {seq_len!r}")
    _check_indices(indices, seq_len)
    batch, heads, _, dim = out_compressed.shape
    chosen = resolve_backend(backend, out_compressed.device, ("torch", "triton"), "decompress")
    buf = torch.empty(batch, seq_len, heads, dim, dtype=out_compressed.dtype, device=out_compressed.device)
    out = buf.transpose(1, 2)
    if isinstance(fill, torch.Tensor):
        check_tensor("fill", fill, ndim=4, device=out_compressed.device)
        if tuple(fill.shape) != (batch, heads, seq_len, dim):
            raise ValueError(f"fill must be (batch, heads, seq_len, head_dim) = {(batch, heads, seq_len, dim)}, "
                             f"got {tuple(fill.shape)}")
        out.copy_(fill)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        buf.fill_(float(fill))
    else:
        raise TypeError(f"fill must be a float or a tensor, got {type(fill).__name__}")
    if chosen == "triton":
        from tokprune.kernels.triton.token_sparse import decompress_triton

        return decompress_triton(out_compressed, indices, out)
    out.scatter_(2, indices.long()[..., None].expand(-1, -1, -1, dim), out_compressed)
    return out


# ----------------------------------------------------------------------------------------------- attention
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                    attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense inner kernel: flash-attn on CUDA fp16/bf16 without a mask when installed, else SDPA.

    ``q (B, H, M, D)``, ``k/v (B, Hk, M, D)`` with ``H % Hk == 0`` -> ``(B, H, M, D)``.
    """
    if (attn_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and _flash_attn_available()):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=causal)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def token_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    keep: Optional[Keep] = 0.25,
    causal: bool = True,
    min_tokens: int = 0,
    window: int = 128,
    kernel_size: int = 7,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_indices: bool = False,
    backend: Optional[str] = None,
    tau: Optional[float] = None,
):
    """Token sparse attention: score -> select per head -> compress -> dense attention -> decompress.

    Every query head keeps ``n_keep = max(budget, min(min_tokens, N), min(window, N))`` tokens, where
    ``budget`` is ``resolve_keep(keep, N)`` (explicit budget) or, with ``keep=None``, the paper's coverage
    count :func:`coverage_keep_count` for ``tau`` (one count per call, from the head-mean scores):
    the last ``window`` tokens plus the best-scored others (:func:`token_sparse_scores`),
    sorted by original position. Selected queries attend causally to the selected keys of their head;
    other queries output zeros (see :func:`decompress`). When every token is kept the call is exactly
    dense attention (the same SDPA call on the uncompressed tensors).

    Args:
        q: ``(batch, heads, n_tokens, head_dim)`` fp32/fp16/bf16, after RoPE.
        k, v: ``(batch, kv_heads, n_tokens, head_dim)`` (GQA not expanded), dtype of ``q``.
        keep: fraction of tokens in ``(0, 1]`` or a count in ``[1, n_tokens]``; ``None``: use ``tau``.
        causal: causal attention (order preserved by original positions).
        min_tokens: floor on the kept count (the paper's ``min_tokens``).
        window, kernel_size: scoring settings, see :func:`token_sparse_scores`.
        scale: softmax scale, default ``head_dim ** -0.5``.
        key_padding_mask: optional ``(batch, n_tokens)`` bool, ``True`` = real token. Padding is never
            attended; padding rows of the output are zero.
        return_indices: also return the ``(batch, heads, n_keep)`` int64 selected indices
            (``None`` when every token was kept).
        backend: gather/scatter backend ``"auto" | "torch" | "triton"``; scoring and selection use torch.
        tau: coverage threshold in ``[0, 1)`` when ``keep is None`` (paper: 0.005 with
            ``min_tokens = 1024 + window``); the call is dense when the rule drops nothing.

    Returns:
        ``(batch, heads, n_tokens, head_dim)`` (a view of a ``(batch, n_tokens, heads, head_dim)``
        buffer on the sparse path), or ``(out, indices)`` with ``return_indices``.
    """
    _check_qk(q, k, v)
    batch, heads, n, dim = q.shape
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if keep is None and tau is None:
        raise ValueError("token_sparse_attention: give keep (a budget) or keep=None with tau (coverage threshold)")
    if keep is not None and tau is not None:
        raise ValueError(f"token_sparse_attention: keep={keep!r} and tau={tau!r} both given; set keep=None to "
                         "use the coverage threshold tau")
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "token_sparse_attention")
    scale = dim ** -0.5 if scale is None else float(scale)
    pad = _check_padding(key_padding_mask, batch, n, q.device)
    if n == 0:
        out = q.new_zeros(batch, heads, 0, v.shape[-1])
        return (out, None) if return_indices else out
    floor = max(min(min_tokens, n), min(window, n))
    n_keep = max(resolve_keep(keep, n), floor) if keep is not None else floor
    scores = None
    if keep is None and n_keep < n:  # coverage rule: the count depends on the scores
        scores = token_sparse_scores(q, k, window=window, kernel_size=kernel_size, scale=scale, causal=causal,
                                     key_padding_mask=pad)
        n_keep = max(coverage_keep_count(scores, window, tau, min_tokens), floor)
    if n_keep >= n:
        out = dense_attention(q, k, v, causal=causal, scale=scale,
                              attn_mask=None if pad is None else _dense_mask(pad, n, causal))
        if pad is not None:
            out = out.masked_fill(~pad[:, None, :, None], 0.0)
        return (out, None) if return_indices else out
    if v.shape[-1] != dim:
        raise ValueError(f"v head_dim must equal q head_dim {dim} on the sparse path, got {v.shape[-1]}")

    w = min(window, n)
    if scores is None:
        scores = token_sparse_scores(q, k, window=w, kernel_size=kernel_size, scale=scale, causal=causal,
                                     key_padding_mask=pad)
    forced = torch.zeros(n, dtype=torch.bool, device=q.device)
    forced[n - w:] = True
    indices = select_tokens(scores, n_keep, keep_mask=forced.expand(batch, heads, n))

    qc, kc, vc = compress_qkv(q, k, v, indices, backend=chosen)
    attn_mask = None
    if pad is not None:
        valid = torch.gather(pad[:, None, :].expand(batch, heads, n), 2, indices)  # (B, H, K)
        attn_mask = valid[:, :, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(n_keep, n_keep, dtype=torch.bool, device=q.device).tril()
    out_c = dense_attention(qc, kc, vc, causal=causal, scale=scale, attn_mask=attn_mask)
    if pad is not None:
        out_c = out_c.masked_fill(~valid[..., None], 0.0)  # padding queries (fully masked rows)
    out = decompress(out_c, indices, n, backend=chosen)
    return (out, indices) if return_indices else out


def _dense_mask(pad: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    mask = pad[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=pad.device).tril()
    return mask


__all__ = ["token_sparse_scores", "compress_qkv", "decompress", "token_sparse_attention", "resolve_keep",
           "coverage_keep_count", "dense_attention"]
