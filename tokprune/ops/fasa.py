"""Frequency-chunk sparse attention (FASA): cheap token scoring from dominant RoPE frequency chunks,
token selection with sinks and a recent window, and exact attention over the selected tokens.

Frequency-chunk (FC) layout, following Hugging Face's ``rotate_half`` RoPE: with head dimension ``D``,
rotation pair ``p`` (``0 <= p < D/2``) is the 2-D plane of dimensions ``(p, p + D/2)``; FC ``c`` groups
``chunk`` consecutive pairs ``c*chunk ... (c+1)*chunk - 1`` (default ``chunk=1``: one FC = one pair),
so a head has ``D / (2*chunk)`` FCs and ``F`` FCs read ``2*chunk*F`` of its ``D`` dimensions.

Bytes read per decode step and KV head (``T`` cached tokens, ``K`` kept, ``e`` bytes per element):
full attention reads ``2*T*D*e`` (all keys and values); FASA reads ``T*2*chunk*F*e`` to score (only the
FC dimensions; contiguous with the packed layout of :func:`pack_fc_keys`, strided otherwise) plus
``2*K*D*e`` for the exact attention over the kept tokens (:func:`fasa_bytes_per_step`). With
``D=64, F=8, chunk=1`` scoring reads 1/8 of the K+V bytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokprune._backend import resolve_backend
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_finite, check_tensor


def _check_qk(q, k_cache, name_k="k_cache"):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(name_k, k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    batch, heads, q_len, _ = q.shape
    if q_len != 1:
        raise ValueError(f"q must be (batch, heads, 1, head_dim) for one decode step, got {tuple(q.shape)}")
    if k_cache.shape[0] != batch:
        raise ValueError(f"{name_k} batch {k_cache.shape[0]} must equal q batch {batch}")
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of {name_k} kv_heads ({kv_heads})")
    return batch, heads, kv_heads


def _check_fc_index(fc_index, heads, kv_heads, head_dim, chunk, device):
    check_tensor("fc_index", fc_index, ndim=2, device=device)
    if fc_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fc_index must be int32 or int64, got {fc_index.dtype}")
    if fc_index.shape[0] not in (kv_heads, heads):
        raise ValueError(f"fc_index must be (kv_heads={kv_heads} or heads={heads}, F), got {tuple(fc_index.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or head_dim % (2 * chunk):
        raise ValueError(f"chunk must be a positive int dividing head_dim/2 ({head_dim // 2}), got {chunk!r}")
    n_fc = head_dim // (2 * chunk)
    if fc_index.numel() and debug_checks():  # reads data: debug mode only (sync-free hot path)
        lo, hi = int(fc_index.min()), int(fc_index.max())
        if lo < 0 or hi >= n_fc:
            raise IndexError(f"fc_index values must lie in [0, {n_fc}) (head_dim={head_dim}, chunk={chunk}), "
                             f"got range [{lo}, {hi}]")


def pack_fc_keys(k_cache: torch.Tensor, fc_index: torch.Tensor, *, chunk: int = 1) -> torch.Tensor:
    """Copy the dominant-FC dimensions of the keys into a contiguous tensor (packed key layout).

    Args:
        k_cache: ``(batch, kv_heads, n_tokens, head_dim)`` post-RoPE keys, fp32/fp16/bf16.
        fc_index: ``(kv_heads, F)`` FC ids per KV head (packing needs the FCs shared by a KV group).
        chunk: rotation pairs per FC.

    Returns:
        ``(batch, kv_heads, n_tokens, 2*chunk*F)`` contiguous, in the order of
        :func:`tokprune.reference.fasa.fc_dims`. Pass it to :func:`fc_scores` with ``packed=True``.
    """
    from tokprune.reference.fasa import fc_dims

    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    _check_fc_index(fc_index, kv_heads, kv_heads, head_dim, chunk, k_cache.device)
    if fc_index.shape[0] != kv_heads:
        raise ValueError(f"pack_fc_keys needs fc_index per KV head ({kv_heads}, F), got {tuple(fc_index.shape)}")
    dims = fc_dims(fc_index, head_dim, chunk)  # (Hkv, nd)
    index = dims[None, :, None, :].expand(k_cache.shape[0], -1, k_cache.shape[2], -1)
    return torch.gather(k_cache, 3, index).contiguous()


def fc_scores(q: torch.Tensor, k_cache: torch.Tensor, fc_index: torch.Tensor, *, chunk: int = 1,
              packed: bool = False, reduce: Optional[str] = None, backend: Optional[str] = None,
              dims: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Partial attention logits of one decode query from the dominant frequency chunks only.

    ``scores[b, h, t] = sum_{d in dims(fc(h))} q[b, h, 0, d] * k[b, h // g, t, d]`` (no softmax scale),
    where ``g = heads / kv_heads`` and ``fc(h)`` is row ``h`` of ``fc_index`` (per query head) or row
    ``h // g`` (per KV head).

    Args:
        q: ``(batch, heads, 1, head_dim)`` post-RoPE query, fp32/fp16/bf16.
        k_cache: ``(batch, kv_heads, n_tokens, head_dim)`` post-RoPE keys, or with ``packed=True`` the
            ``(batch, kv_heads, n_tokens, 2*chunk*F)`` output of :func:`pack_fc_keys`.
        fc_index: ``(kv_heads or heads, F)`` int32/int64 FC ids in ``[0, head_dim / (2*chunk))``.
        chunk: rotation pairs per FC (see the module docstring for the layout).
        packed: ``k_cache`` holds only the FC dimensions (needs ``fc_index`` per KV head).
        reduce: ``None`` -> per query head ``(batch, heads, n_tokens)``; ``"max"`` or ``"mean"`` ->
            aggregated over the query heads of each KV group, ``(batch, kv_heads, n_tokens)``.
        backend: ``"auto" | "torch" | "triton"``.
        dims: optional precomputed ``tokprune.reference.fasa.fc_dims(fc_index, head_dim, chunk)`` on ``q``'s
            device, ``(kv_heads or heads, 2*chunk*F)`` int64 (a policy scoring every decode step computes it
            once per layer).

    Returns:
        fp32 scores, ``(batch, heads, n_tokens)`` or ``(batch, kv_heads, n_tokens)``.
    """
    batch, heads, kv_heads = _check_qk(q, k_cache)
    head_dim = q.shape[-1]
    _check_fc_index(fc_index, heads, kv_heads, head_dim, chunk, q.device)
    n_dims = 2 * chunk * fc_index.shape[1]
    if packed:
        if fc_index.shape[0] != kv_heads:
            raise ValueError(f"packed=True needs fc_index per KV head ({kv_heads}, F), got {tuple(fc_index.shape)}")
        if k_cache.shape[3] != n_dims:
            raise ValueError(f"packed k_cache must have last dimension 2*chunk*F = {n_dims}, got {k_cache.shape[3]}")
    elif k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} must equal q head_dim {head_dim}")
    if reduce not in (None, "max", "mean"):
        raise ValueError(f"reduce must be None, 'max' or 'mean', got {reduce!r}")
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "fc_scores")
    if dims is None:
        from tokprune.reference.fasa import fc_dims

        dims = fc_dims(fc_index, head_dim, chunk).to(q.device)  # (Hf, nd)
    elif tuple(dims.shape) != (fc_index.shape[0], n_dims) or dims.device != q.device:
        raise ValueError(f"dims must be fc_dims(fc_index) ({fc_index.shape[0]}, {n_dims}) on {q.device}, got "
                         f"{tuple(dims.shape)} on {dims.device}")
    if chosen == "triton":
        from tokprune.kernels.triton.fasa import fc_scores_triton

        scores = fc_scores_triton(q, k_cache, dims, packed)
    else:
        scores = _fc_scores_torch(q, k_cache, dims, packed)
    if reduce is None:
        return scores
    grouped = scores.view(batch, kv_heads, heads // kv_heads, -1)
    return grouped.amax(2) if reduce == "max" else grouped.mean(2)


def _fc_scores_torch(q, k_cache, dims, packed):
    batch, heads, _, head_dim = q.shape
    kv_heads, n_tokens = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    n_dims = dims.shape[1]
    if dims.shape[0] == kv_heads:
        # FCs shared by the group: one batched matmul per KV head over the (packed) FC dims.
        q_fc = torch.gather(q.view(batch, kv_heads, group, head_dim), 3,
                            dims[None, :, None, :].expand(batch, -1, group, -1))
        if packed:
            k_fc = k_cache
        else:
            k_fc = torch.gather(k_cache, 3, dims[None, :, None, :].expand(batch, -1, n_tokens, -1))
        ct = torch.promote_types(q.dtype, k_fc.dtype)
        if ct != torch.float32 and q.device.type == "cpu":
            ct = torch.float32
        out = torch.matmul(q_fc.to(ct), k_fc.to(ct).transpose(-1, -2))  # (B, Hkv, g, T)
        return out.reshape(batch, heads, n_tokens).float()
    # FCs per query head: gather each head's dims from its KV head.
    head_map = torch.arange(heads, device=q.device) // group
    q_fc = torch.gather(q[:, :, 0, :], 2, dims[None].expand(batch, -1, -1))  # (B, H, nd)
    k_sel = k_cache[:, head_map]  # (B, H, T, D)
    k_fc = torch.gather(k_sel, 3, dims[None, :, None, :].expand(batch, -1, n_tokens, -1))
    return torch.einsum("bhd,bhtd->bht", q_fc.float(), k_fc.float())


def select_sparse_indices(scores: torch.Tensor, budget: int, *, sink: int = 0, window: int = 0,
                          valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens to attend: ``sink`` first and ``window`` most recent valid tokens plus the best-scoring rest.

    ``budget`` is the total number of tokens kept per row (sinks and window count toward it; the window
    is shortened to ``budget - sink`` when it does not fit). One ``torch.topk`` plus a sort of the ``budget``
    winners: no host synchronisation and static output shapes (``torch.compile(fullgraph=True)`` traces it).
    Among tokens with *exactly* equal scores the choice is ``torch.topk``'s (deterministic for a given
    input and device, not necessarily the lower index; :func:`tokprune.ops.select_tokens` is the stable op).

    Args:
        scores: ``(batch, heads, n_tokens)`` float scores (larger = more important); NaN is rejected in
            debug mode (``TOKPRUNE_DEBUG=1``), unspecified otherwise.
        budget: tokens kept per row, ``>= 0``.
        sink, window: counted among valid tokens (with left padding the sinks are the first real tokens).
        valid: optional ``(batch, n_tokens)`` bool, ``False`` for padding (never selected).

    Returns:
        ``(batch, heads, min(budget, n_tokens))`` int64 token indices, ascending among the selected valid
        tokens; ``-1`` marks slots left empty because a row has fewer valid tokens than the budget (they
        may sit anywhere in the row).
    """
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    for name, value in (("budget", budget), ("sink", sink), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if debug_checks():
        check_finite("scores", scores)
    batch, _, n_tokens = scores.shape
    if valid is not None:
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), device=scores.device)
        if tuple(valid.shape) != (batch, n_tokens):
            raise ValueError(f"valid must be (batch={batch}, n_tokens={n_tokens}), got {tuple(valid.shape)}")
    keep = min(budget, n_tokens)
    sink = min(sink, budget)
    window = min(window, budget - sink)
    if valid is None:  # forced slots are two static slices: one copy, two in-place fills (no full-size mask)
        work = scores.to(torch.float32, copy=True)
        if sink:
            work[..., :sink] = float("inf")
        if window:
            work[..., n_tokens - window:] = float("inf")
    else:
        rank = valid.long().cumsum(-1)  # 1-based rank among valid tokens
        n_valid = rank[:, -1:]
        forced = valid & ((rank <= sink) | (rank > n_valid - window))
        work = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
        work = work.masked_fill(forced[:, None, :], float("inf"))
    index = work.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    if valid is None:
        return index
    chosen_valid = torch.gather(valid[:, None, :].expand(-1, index.shape[1], -1), 2, index)
    return index.masked_fill(~chosen_valid, -1)


def _select_top_cpu(work: torch.Tensor, keep: int) -> torch.Tensor:
    """``select_tokens(work, keep)`` semantics (ties to the lower index, ascending output) in O(n) with
    ``torch.topk`` + a threshold, instead of a full stable sort (6x faster at 8K tokens on the CPU).

    Synchronises with the host (tie check, ``nonzero``): used by :mod:`tokprune.ops.paged`, not by the
    decode hot path of :func:`select_sparse_indices`."""
    rows = work.reshape(-1, work.shape[-1])
    if keep == 0 or rows.shape[0] == 0:
        return torch.zeros(*work.shape[:-1], keep, dtype=torch.long, device=work.device)
    tau = rows.topk(keep, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # keep-th largest
    chosen = rows >= tau
    if bool((chosen.sum(-1) == keep).all()):  # common case: no tie straddles the boundary
        return chosen.nonzero()[:, 1].view(*work.shape[:-1], keep)
    above = rows > tau
    tie = rows == tau
    need = keep - above.sum(-1, keepdim=True)
    chosen = above | (tie & (tie.long().cumsum(-1) <= need))
    index = chosen.nonzero()[:, 1]  # row-major: ascending within each row, exactly `keep` per row
    return index.view(*work.shape[:-1], keep)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor,
                            scale: float, *, backend: Optional[str] = None, padded: bool = True) -> torch.Tensor:
    """Exact decode attention of one query per head over the cached tokens listed in ``indices``.

    ``out[b, h] = softmax(scale * q[b, h] . K[b, h // g, I]) @ V[b, h // g, I]`` with
    ``I = {i in indices[b, h or h // g] : i >= 0}``; softmax and accumulation in fp32 (the Triton and CUDA
    kernels use an online softmax split over the selected tokens with a combine step).

    Args:
        q: ``(batch, heads, 1, head_dim)`` fp32/fp16/bf16.
        k_cache, v_cache: ``(batch, kv_heads, n_tokens, head_dim)``, same dtype as ``q``; ``heads`` is a
            multiple of ``kv_heads`` (query head ``h`` reads KV head ``h // (heads // kv_heads)``).
        indices: ``(batch, kv_heads or heads, K)`` int32/int64 token ids ``< n_tokens``; entries ``< 0`` are
            padding and ignored. A row with no valid index gives zeros. The range is checked only in debug
            mode (``TOKPRUNE_DEBUG=1``): the decode hot path never reads index values on the host.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        padded: ``False`` promises that no entry of ``indices`` is negative (e.g. what
            :func:`select_sparse_indices` returns without ``valid``); the torch backend then skips the masking
            and runs one fused SDPA call over the gathered rows. Not checked (that would read data).

    Returns:
        ``(batch, heads, 1, head_dim)`` in q's dtype.
    """
    batch, heads, kv_heads = _check_qk(q, k_cache)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache and v_cache must both be (batch, kv_heads, n_tokens, head_dim={q.shape[3]}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check_tensor("indices", indices, ndim=3, device=q.device)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.shape[0] != batch or indices.shape[1] not in (kv_heads, heads):
        raise ValueError(f"indices must be (batch={batch}, kv_heads={kv_heads} or heads={heads}, K), "
                         f"got {tuple(indices.shape)}")
    n_tokens = k_cache.shape[2]
    if debug_checks() and indices.numel() and int(indices.max()) >= n_tokens:  # reads data: debug only
        raise IndexError(f"indices values must be < n_tokens={n_tokens}, got max {int(indices.max())}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    chosen = resolve_backend(backend, q.device, ("torch", "triton", "cuda"), "sparse_decode_attention")
    from tokprune._codes import ATTN_MAX_HEAD_DIM

    if chosen == "cuda" and q.shape[3] > ATTN_MAX_HEAD_DIM:  # the kernel's limit, checked here, not in _C
        if backend not in (None, "auto"):
            raise ValueError(f"q head_dim D={q.shape[3]} must be in [1, {ATTN_MAX_HEAD_DIM}] for backend='cuda' "
                             "(tokprune._C); use backend='triton' or 'torch'")
        chosen = resolve_backend(backend, q.device, ("torch", "triton"), "sparse_decode_attention")
    if chosen == "cuda":
        from tokprune.kernels.cuda import sparse_decode_attention_cuda

        return sparse_decode_attention_cuda(q, k_cache, v_cache, indices, float(scale))
    if chosen == "triton":
        from tokprune.kernels.triton.fasa import sparse_decode_attention_triton

        return sparse_decode_attention_triton(q, k_cache, v_cache, indices, float(scale))
    if not padded and indices.shape[1] == kv_heads:
        return _sparse_decode_torch_dense(q, k_cache, v_cache, indices, float(scale))
    return _sparse_decode_torch(q, k_cache, v_cache, indices, float(scale))


_OFFSETS: dict = {}


def _row_offsets(batch: int, heads: int, sb: int, sh: int, device) -> torch.Tensor:
    """``(batch, heads, 1)`` int64 first-row offsets of each (batch, head) in the 2-D row view, cached per shape
    and strides (a decode step calls this once per layer with the same arguments)."""
    key = (batch, heads, sb, sh, str(device))
    offsets = None if torch.compiler.is_compiling() else _OFFSETS.get(key)
    if offsets is None:
        offsets = (torch.arange(batch, device=device)[:, None] * sb
                   + torch.arange(heads, device=device)[None, :] * sh)[..., None]
        if torch.compiler.is_compiling():  # traced: no tensor kept in module state
            return offsets
        if len(_OFFSETS) > 256:
            _OFFSETS.clear()
        _OFFSETS[key] = offsets
    return offsets


def _row_gather(cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``cache[b, h, idx[b, h, r]]`` -> ``(B, Hkv, R, D)`` for ``idx (B, Hkv, R)`` int64 in range.

    One ``index_select`` over a 2-D row view of the cache's storage (a strided view of a preallocated
    buffer is read in place: no copy of the cache, and row copies instead of the element-wise
    ``torch.gather``, about 7x faster on the CPU); ``torch.gather`` when the strides do not allow it."""
    batch, heads, n_tokens, dim = cache.shape
    s0, s1, s2, s3 = cache.stride()
    sb = s0 // s2 if s2 and s0 % s2 == 0 else None
    sh = s1 // s2 if s2 and s1 % s2 == 0 else None
    if s3 != 1 or s2 < dim or (batch > 1 and sb is None) or (heads > 1 and sh is None):
        return torch.gather(cache, 2, idx[..., None].expand(-1, -1, -1, dim))
    sb = sb if batch > 1 else 0
    sh = sh if heads > 1 else 0
    n_rows = (batch - 1) * sb + (heads - 1) * sh + n_tokens
    rows_view = cache.as_strided((n_rows, dim), (s2, 1))
    rows = (idx + _row_offsets(batch, heads, sb, sh, idx.device)).reshape(-1)
    return rows_view.index_select(0, rows).view(batch, heads, idx.shape[2], dim)


def _sparse_decode_torch_dense(q, k_cache, v_cache, indices, scale):
    """No padding entries, one index list per KV head: gather the rows and run one fused SDPA call with the
    group's query heads as query rows (as :func:`tokprune.ops.decode.dense_decode_attention`)."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if indices.shape[2] == 0:
        return torch.zeros_like(q)
    rows = indices if indices.dtype == torch.long else indices.long()
    k = _row_gather(k_cache, rows)  # (B, Hkv, K, D)
    v = _row_gather(v_cache, rows)
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    if q.dtype != torch.float32 and q.device.type == "cpu":  # fp32 softmax and accumulation, as the masked path
        out = F.scaled_dot_product_attention(qg.float(), k.float(), v.float(), scale=scale).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qg, k, v, scale=scale)
    return out.reshape(batch, heads, 1, v.shape[3])


def _sparse_decode_torch(q, k_cache, v_cache, indices, scale):
    """Gather the selected rows per KV head (the query heads of a group laid onto their KV head, as the dense
    decode op), masked softmax in fp32. Few dispatcher calls: on the CPU the per-call overhead, not the
    arithmetic, is what a 256-token attention costs."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    n_idx_heads, n_keep = indices.shape[1], indices.shape[2]
    if n_keep == 0:
        return torch.zeros_like(q)
    per_query_head = n_idx_heads != kv_heads
    # (B, Hkv, R): rows of each KV head; per query head the g heads' lists are concatenated
    idx = indices.reshape(batch, kv_heads, -1) if per_query_head else indices
    valid = idx >= 0
    rows = idx.clamp(min=0).to(torch.long)
    k = _row_gather(k_cache, rows).float()  # (B, Hkv, R, D)
    v = _row_gather(v_cache, rows).float()
    qg = q.float().view(batch, kv_heads, group, head_dim) * scale
    if per_query_head:  # (B, Hkv, g, 1, D) x (B, Hkv, g, K, D): each head reads its own K rows
        k = k.view(batch, kv_heads, group, n_keep, head_dim)
        v = v.view(batch, kv_heads, group, n_keep, -1)
        s = torch.matmul(qg[..., None, :], k.transpose(-1, -2))  # (B, Hkv, g, 1, K)
        s = s.masked_fill(~valid.view(batch, kv_heads, group, 1, n_keep), float("-inf"))
    else:
        s = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, g, K)
        s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).min)  # a row without tokens: finite, p = 0
    p = torch.exp(s - m)
    out = torch.matmul(p, v) / p.sum(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    return out.reshape(batch, heads, 1, -1).to(q.dtype)


def fasa_bytes_per_step(n_tokens: int, head_dim: int, kv_heads: int, n_fc: int, budget: int, *,
                        chunk: int = 1, element_bytes: int = 2, batch: int = 1) -> dict:
    """Bytes of KV cache read by one decode step of one layer: full attention vs FASA (packed keys).

    Returns ``{"full": 2*T*D*e*Hkv*B, "fasa_score": T*2*chunk*F*e*Hkv*B, "fasa_attend": 2*K*D*e*Hkv*B,
    "fasa": score + attend, "ratio": full / fasa}`` with ``K = min(budget, T)``.
    """
    full = 2 * n_tokens * head_dim * element_bytes * kv_heads * batch
    kept = min(budget, n_tokens)
    score = n_tokens * 2 * chunk * n_fc * element_bytes * kv_heads * batch
    attend = 2 * kept * head_dim * element_bytes * kv_heads * batch
    return dict(full=full, fasa_score=score, fasa_attend=attend, fasa=score + attend,
                ratio=full / max(score + attend, 1))
