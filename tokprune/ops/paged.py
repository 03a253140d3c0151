"""Paged, ragged decode ops: FASA scoring, token selection and sparse decode attention that read a paged
KV cache through a block table (the layout of vLLM, SGLang and FlashInfer), one query token per request.

Paged layout (vLLM's conventions):

* ``k_cache``, ``v_cache``: ``(num_blocks, kv_heads, block_size, head_dim)``; any strides (they may be
  views of one interleaved tensor, see :func:`vllm_cpu_kv_views`).
* ``block_table``: ``(R, max_blocks)`` int32/int64; row ``r``'s logical token ``t`` lives in physical
  block ``block_table[r, t // block_size]`` at offset ``t % block_size``. Entries past a row's last
  used block are never read (they may hold anything, e.g. 0 or -1).
* ``seq_lens``: ``(R,)`` int32/int64 cached tokens per request, the current token included.
* A *slot* is ``block * block_size + offset`` (``slot_mapping`` in vLLM); ``-1`` means "no token".
* The FASA side cache ``fc_cache``: ``(num_blocks, kv_heads, block_size, 2*chunk*F)``, the packed FC
  dimensions of every key (:func:`tokprune.ops.pack_fc_keys` order), written once per token with
  :func:`write_paged_fc_keys` next to the K/V write; scoring reads ``2*chunk*F / head_dim`` of the K bytes.

A decode step of FASA on a paged cache::

    write_paged_fc_keys(fc_cache, key, slot_mapping, fc_index)       # with the K/V write
    scores = paged_fc_scores(q, fc_cache, block_table, seq_lens, fc_index, reduce="max")
    slots = paged_select(scores, budget, sink, window, seq_lens, block_table, block_size)
    out = paged_sparse_decode_attention(q, k_cache, v_cache, slots, scale)

The same FASA step fused in one call (the host build of ``tokprune._C``: vote, selection and attention per
request and KV head, per-call std::threads, K/V/FC read in place): :func:`paged_fasa_decode`; bound once to a
layer's caches for a decode loop (checks once, a few field writes per call): :func:`paged_fasa_decoder`.

Quest on the same layout: :func:`update_paged_page_bounds` (per-page key min/max, pages of 16 inside
blocks, updated for the written slots only), :func:`paged_quest_scores`, :func:`paged_select_pages`.
The exact dense path: :func:`paged_decode_attention`.

Ragged batches: decode ops take one query per request; :func:`split_decode_rows` separates the decode
rows (query length 1) of a mixed prefill + decode batch from the others, which the caller runs densely.
The contiguous tokprune cache ``(B, Hkv, capacity, D)`` is the special case ``block_size = capacity``,
``block_table = [[0], [1], ...]``.

Checks that read tensor values (slot/table ranges, NaN) run only in debug mode
(:func:`tokprune._debug.debug_checks`); shapes and dtypes are always checked. Ops that produce a
length-dependent width (``paged_fc_scores``, ``paged_decode_attention``) read ``seq_lens.max()`` unless
``max_len`` is given; give it to keep a decode step free of host synchronisation.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch

from tokprune._backend import resolve_backend, unavailable_reason
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

INT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------------------------

def vllm_cpu_kv_views(kv_cache: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V views of vLLM's CPU attention cache of one layer, without copying.

    Assumed layout (vLLM 0.32 ``CPU_ATTN`` with the vector ISAs): ``kv_cache`` is
    ``(num_blocks, kv_heads, block_size, 2*head_dim)`` and, inside each ``(block, head)`` slab of
    ``block_size * 2*head_dim`` contiguous elements, K is stored transposed as ``[head_dim, block_size]``
    followed by V as ``[block_size, head_dim]``. The layout is ISA-dependent in vLLM; a caller that
    cannot guarantee it should check one written token against vLLM's own cache-write op.

    Args:
        kv_cache: ``(num_blocks, kv_heads, block_size, 2*head_dim)`` fp32/fp16/bf16 whose last two
            dimensions are contiguous (``stride(3) == 1``, ``stride(2) == 2*head_dim``).
        head_dim: ``D``.

    Returns:
        ``(k_view, v_view)``, both ``(num_blocks, kv_heads, block_size, head_dim)`` strided views of
        ``kv_cache`` (``k_view`` has strides ``(s0, s1, 1, block_size)``, ``v_view``
        ``(s0, s1, head_dim, 1)`` at offset ``head_dim * block_size``). Writes through them land in
        ``kv_cache``.
    """
    check_tensor("kv_cache", kv_cache, ndim=4, dtypes=FLOAT_DTYPES)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    num_blocks, kv_heads, block_size, last = kv_cache.shape
    if last != 2 * head_dim:
        raise ValueError(f"kv_cache must be (num_blocks, kv_heads, block_size, 2*head_dim={2 * head_dim}), "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1 or (block_size > 1 and kv_cache.stride(2) != 2 * head_dim):
        raise ValueError(f"kv_cache must be contiguous in its last two dimensions (strides (..., {2 * head_dim}, 1)), "
                         f"got strides {kv_cache.stride()}")
    s0, s1 = kv_cache.stride(0), kv_cache.stride(1)
    shape = (num_blocks, kv_heads, block_size, head_dim)
    base = kv_cache.storage_offset()
    k_view = kv_cache.as_strided(shape, (s0, s1, 1, block_size), base)
    v_view = kv_cache.as_strided(shape, (s0, s1, head_dim, 1), base + head_dim * block_size)
    return k_view, v_view


class DecodeSplit(NamedTuple):
    """Rows of a ragged batch by kind (all int64 on the device of ``query_start_loc``).

    ``decode_rows (Rd,)``: requests with exactly one query token; ``decode_tokens (Rd,)``: the index of
    that token in the flattened ``(T, ...)`` query; ``prefill_rows (Rp,)``: requests with more than one
    query token (prefill, chunked prefill, speculative verification). Requests with no query token are
    in neither list.
    """

    decode_rows: torch.Tensor
    decode_tokens: torch.Tensor
    prefill_rows: torch.Tensor


def split_decode_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> DecodeSplit:
    """Split a ragged batch (vLLM ``query_start_loc`` / ``seq_lens``) into decode and prefill rows.

    Args:
        query_start_loc: ``(R + 1,)`` int32/int64, non-decreasing, ``query_start_loc[0] == 0``; request
            ``r`` owns query tokens ``query_start_loc[r] : query_start_loc[r + 1]``.
        seq_lens: ``(R,)`` int32/int64 tokens in the cache of each request after this step (its query
            tokens included), so ``seq_lens[r] >= q_len[r]``.

    Returns:
        :class:`DecodeSplit` ``(decode_rows, decode_tokens, prefill_rows)``; the query of the decode rows
        is ``query[decode_tokens]`` (``(Rd, Hq, D)``), ready for the ops of this module. Reads the
        tensors on the host (a planning helper, not a decode-step kernel).
    """
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INT_DTYPES)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=query_start_loc.device)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc must have R + 1 = {seq_lens.shape[0] + 1} entries for seq_lens of "
                         f"R = {seq_lens.shape[0]} requests, got {query_start_loc.shape[0]}")
    loc = query_start_loc.long()
    q_len = loc[1:] - loc[:-1]
    if bool(loc[0] != 0):
        raise ValueError(f"query_start_loc[0] must be 0, got {int(loc[0])}")
    if bool((q_len < 0).any()):
        raise ValueError("query_start_loc must be non-decreasing")
    if bool((seq_lens.long() < q_len).any()):
        r = int((seq_lens.long() < q_len).nonzero()[0])
        raise ValueError(f"seq_lens[{r}] = {int(seq_lens[r])} is smaller than that request's query length "
                         f"{int(q_len[r])}")
    decode_rows = (q_len == 1).nonzero().squeeze(1)
    prefill_rows = (q_len > 1).nonzero().squeeze(1)
    return DecodeSplit(decode_rows, loc[decode_rows], prefill_rows)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_cache(name, cache, device=None, kv_heads=None, last=None):
    check_tensor(name, cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    if kv_heads is not None and cache.shape[1] != kv_heads:
        raise ValueError(f"{name} must be (num_blocks, kv_heads={kv_heads}, block_size, ...), got {tuple(cache.shape)}")
    if last is not None and cache.shape[3] != last:
        raise ValueError(f"{name} last dimension must be {last}, got shape {tuple(cache.shape)}")
    if cache.shape[2] == 0:
        raise ValueError(f"{name} block_size (dimension 2) must be >= 1, got shape {tuple(cache.shape)}")


def _check_table(block_table, seq_lens, rows, device, block_size, num_blocks, max_len=None):
    """Shapes always; in debug mode: lengths fit the table and every used table entry is a real block."""
    check_tensor("block_table", block_table, ndim=2, dtypes=INT_DTYPES, device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=device)
    if block_table.shape[0] != rows or seq_lens.shape[0] != rows:
        raise ValueError(f"block_table must be (R={rows}, max_blocks) and seq_lens (R={rows},), got "
                         f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    capacity = block_table.shape[1] * block_size
    if debug_checks() and rows:
        lens = seq_lens.long()
        if int(lens.min()) < 0 or int(lens.max()) > capacity:
            raise ValueError(f"seq_lens values must lie in [0, max_blocks * block_size = {capacity}], got range "
                             f"[{int(lens.min())}, {int(lens.max())}]")
    if max_len is not None and max_len > capacity:
        raise ValueError(f"max_len={max_len} exceeds the block table capacity max_blocks * block_size = {capacity}")
    if debug_checks() and rows:
        if max_len is not None and int(lens.max()) > max_len:
            raise ValueError(f"max_len={max_len} is smaller than seq_lens.max() = {int(lens.max())}")
        used = torch.arange(block_table.shape[1], device=device)[None, :] * block_size < lens[:, None]
        entries = block_table.long()[used]
        upper = num_blocks if num_blocks is not None else float("inf")
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= upper):
            raise IndexError(f"block_table entries of used blocks must lie in [0, num_blocks={num_blocks}), got "
                             f"range [{int(entries.min())}, {int(entries.max())}]")


def _resolve_max_len(max_len, seq_lens):
    if max_len is None:
        return int(seq_lens.max()) if seq_lens.numel() else 0
    _check_int("max_len", max_len)
    return max_len


def _check_fc_index(fc_index, heads, kv_heads, head_dim, chunk, device, per_kv_only):
    check_tensor("fc_index", fc_index, ndim=2, dtypes=INT_DTYPES, device=device)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or head_dim % (2 * chunk):
        raise ValueError(f"chunk must be a positive int dividing head_dim/2 ({head_dim // 2}), got {chunk!r}")
    allowed = (kv_heads,) if per_kv_only else (kv_heads, heads)
    if fc_index.shape[0] not in allowed:
        what = f"kv_heads={kv_heads}" if per_kv_only else f"kv_heads={kv_heads} or heads={heads}"
        raise ValueError(f"fc_index must be ({what}, F), got {tuple(fc_index.shape)}")
    n_fc = head_dim // (2 * chunk)
    if debug_checks() and fc_index.numel():
        lo, hi = int(fc_index.min()), int(fc_index.max())
        if lo < 0 or hi >= n_fc:
            raise IndexError(f"fc_index values must lie in [0, {n_fc}) (head_dim={head_dim}, chunk={chunk}), "
                             f"got range [{lo}, {hi}]")


def _check_q(q):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    return q.shape


def _check_slots(name, slots, upper):
    if debug_checks() and slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        if lo < -1 or hi >= upper:
            raise IndexError(f"{name} values must be -1 or lie in [0, num_blocks * block_size = {upper}), got range "
                             f"[{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------------
# FC side cache write
# ----------------------------------------------------------------------------------------------------

def write_paged_fc_keys(fc_cache: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                        fc_index: torch.Tensor, chunk: int = 1, *, backend: Optional[str] = None) -> torch.Tensor:
    """Write the packed FC dimensions of new keys into the paged FASA side cache, in place.

    ``fc_cache[s // bs, h, s % bs, :] = key[t, h, dims(h)]`` for every token ``t`` with slot
    ``s = slot_mapping[t] >= 0`` (``-1`` skips a token, as vLLM does for padding), where ``dims(h)`` are
    the dimensions of FC set ``fc_index[h]`` in :func:`tokprune.reference.fasa.fc_dims` order.

    Args:
        fc_cache: ``(num_blocks, kv_heads, block_size, 2*chunk*F)`` fp32/fp16/bf16, any strides; written.
        key: ``(T, kv_heads, head_dim)`` post-RoPE keys of this step (any float dtype; cast on store).
        slot_mapping: ``(T,)`` int32/int64 slots ``block * block_size + offset`` or ``-1``. Slots must be
            distinct (checked in debug mode).
        fc_index: ``(kv_heads, F)`` int32/int64 FC ids per KV head.
        chunk: rotation pairs per FC.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``fc_cache`` (the same tensor).
    """
    _check_cache("fc_cache", fc_cache)
    num_blocks, kv_heads, block_size, n_dims = fc_cache.shape
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, device=fc_cache.device)
    if key.shape[1] != kv_heads:
        raise ValueError(f"key must be (T, kv_heads={kv_heads}, head_dim), got {tuple(key.shape)}")
    head_dim = key.shape[2]
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INT_DTYPES, device=fc_cache.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be (T={key.shape[0]},), got {tuple(slot_mapping.shape)}")
    _check_fc_index(fc_index, kv_heads, kv_heads, head_dim, chunk, fc_cache.device, per_kv_only=True)
    if n_dims != 2 * chunk * fc_index.shape[1]:
        raise ValueError(f"fc_cache last dimension must be 2*chunk*F = {2 * chunk * fc_index.shape[1]}, got "
                         f"{n_dims}")
    _check_slots("slot_mapping", slot_mapping, num_blocks * block_size)
    if debug_checks() and slot_mapping.numel():
        written = slot_mapping[slot_mapping >= 0]
        if written.unique().numel() != written.numel():
            raise ValueError("slot_mapping must not repeat a slot (two tokens written to one place)")
    from tokprune.reference.fasa import fc_dims

    dims = fc_dims(fc_index, head_dim, chunk).to(fc_cache.device)  # (Hkv, nd)
    chosen = resolve_backend(backend, fc_cache.device, ("torch", "triton"), "write_paged_fc_keys")
    if key.shape[0] == 0 or n_dims == 0:
        return fc_cache
    if chosen == "triton":
        from tokprune.kernels.triton.paged import write_paged_fc_keys_triton

        write_paged_fc_keys_triton(fc_cache, key, slot_mapping, dims)
        return fc_cache
    keep = (slot_mapping >= 0).nonzero().squeeze(1)  # the torch backend may synchronise here
    slots = slot_mapping.long().index_select(0, keep)
    packed = torch.gather(key.index_select(0, keep), 2, dims[None].expand(keep.numel(), -1, -1))  # (T', Hkv, nd)
    fc_cache[slots // block_size, :, slots % block_size] = packed.to(fc_cache.dtype)
    return fc_cache


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------

def _block_ids(block_table, seq_lens, max_len, block_size):
    """``(R * n_blocks,)`` int64 physical blocks holding each row's first ``max_len`` tokens, row-major;
    table entries past a row's length are replaced by block 0 (read, then masked by the caller)."""
    n_blocks = -(-max_len // block_size)
    table = block_table[:, :n_blocks].long()
    used = torch.arange(n_blocks, device=table.device)[None, :] * block_size < seq_lens.long()[:, None]
    return torch.where(used, table, torch.zeros_like(table)).reshape(-1), n_blocks


def _gather_blocks_t(cache, ids, rows, n_blocks):
    """``(R, n_blocks, Hkv, last, bs)``: the blocks ``ids`` with the token axis last (``K^T`` per block).

    ``index_select`` copies whole blocks (no per-element indexing); a cache whose token axis has unit
    stride (vLLM's transposed CPU K) is gathered in that layout, others are gathered as stored and
    returned as a transposed view (``matmul`` reads either without another copy)."""
    if cache.stride(2) == 1 and cache.shape[3] > 1:
        out = cache.transpose(2, 3).index_select(0, ids)
    else:
        out = cache.index_select(0, ids).transpose(2, 3)
    return out.view(rows, n_blocks, *out.shape[1:])


def _gather_blocks(cache, ids, rows, n_blocks):
    """``(R, n_blocks, Hkv, bs, last)`` copy of the blocks ``ids`` (token axis second to last)."""
    out = cache.index_select(0, ids)
    return out.view(rows, n_blocks, *out.shape[1:])


def paged_fc_scores(q: torch.Tensor, fc_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    fc_index: torch.Tensor, chunk: int = 1, *, packed: bool = True, reduce: Optional[str] = None,
                    max_len: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """FASA partial logits of one decode query per request over its paged cache.

    ``scores[r, h, t] = sum_{d in dims(h)} q[r, h, d] * k_r[h // g, t, d]`` for ``t < seq_lens[r]``
    (``k_r`` = request ``r``'s keys in logical order, ``g = Hq / Hkv``), ``-inf`` for
    ``seq_lens[r] <= t < max_len``. Equals :func:`tokprune.ops.fc_scores` on each request's gathered cache.

    Args:
        q: ``(R, Hq, head_dim)`` post-RoPE decode queries, fp32/fp16/bf16.
        fc_cache: with ``packed=True`` (default) the side cache ``(num_blocks, Hkv, block_size,
            2*chunk*F)`` written by :func:`write_paged_fc_keys`; with ``packed=False`` the paged K cache
            ``(num_blocks, Hkv, block_size, head_dim)`` itself (reads its FC dimensions, strided). Any strides.
        block_table: ``(R, max_blocks)`` int32/int64.
        seq_lens: ``(R,)`` int32/int64.
        fc_index: ``(Hkv, F)`` int32/int64 FC ids (``(Hq, F)`` also allowed with ``packed=False``).
        chunk: rotation pairs per FC.
        reduce: ``None`` -> per query head; ``"max"`` / ``"mean"`` -> over the query heads of a KV group.
        max_len: width of the result (``>= seq_lens.max()``); ``None`` reads ``seq_lens.max()`` (a sync).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        fp32 ``(R, Hq, max_len)`` (or ``(R, Hkv, max_len)`` with ``reduce``).
    """
    rows, heads, head_dim = _check_q(q)
    _check_cache("fc_cache", fc_cache, device=q.device)
    num_blocks, kv_heads, block_size, last = fc_cache.shape
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of fc_cache kv_heads ({kv_heads})")
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    _check_fc_index(fc_index, heads, kv_heads, head_dim, chunk, q.device, per_kv_only=packed)
    n_dims = 2 * chunk * fc_index.shape[1]
    if packed and last != n_dims:
        raise ValueError(f"packed fc_cache must have last dimension 2*chunk*F = {n_dims}, got {last}")
    if not packed and last != head_dim:
        raise ValueError(f"with packed=False fc_cache is the K cache and its head_dim {last} must equal q's {head_dim}")
    if reduce not in (None, "max", "mean"):
        raise ValueError(f"reduce must be None, 'max' or 'mean', got {reduce!r}")
    max_len = _resolve_max_len(max_len, seq_lens)
    _check_table(block_table, seq_lens, rows, q.device, block_size, num_blocks, max_len)
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "paged_fc_scores")
    from tokprune.reference.fasa import fc_dims

    dims = fc_dims(fc_index, head_dim, chunk).to(q.device)  # (Hf, nd)
    if rows == 0 or max_len == 0:
        scores = torch.empty(rows, heads, max_len, dtype=torch.float32, device=q.device)
    elif chosen == "triton":
        from tokprune.kernels.triton.paged import paged_fc_scores_triton

        scores = paged_fc_scores_triton(q, fc_cache, block_table, seq_lens, dims, packed, max_len)
    else:
        scores = _paged_fc_scores_torch(q, fc_cache, block_table, seq_lens, dims, packed, max_len, reduce)
        if reduce is not None:
            return scores
    if reduce is None:
        return scores
    grouped = scores.view(rows, kv_heads, heads // kv_heads, max_len)
    return grouped.amax(2) if reduce == "max" else grouped.mean(2)


def _paged_fc_scores_torch(q, fc_cache, block_table, seq_lens, dims, packed, max_len, reduce=None):
    """Scores ``(R, Hq, max_len)``, or ``(R, Hkv, max_len)`` reduced over the group when ``reduce`` is
    set and the FCs are per KV head (reduced before the layout change, a ``g`` times smaller copy)."""
    rows, heads, head_dim = q.shape
    kv_heads, block_size = fc_cache.shape[1], fc_cache.shape[2]
    group = heads // kv_heads
    ids, n_blocks = _block_ids(block_table, seq_lens, max_len, block_size)
    span = n_blocks * block_size
    if dims.shape[0] == kv_heads:
        q_fc = torch.gather(q.view(rows, kv_heads, group, head_dim), 3,
                            dims[None, :, None, :].expand(rows, -1, group, -1)).float()  # (R, Hkv, g, nd)
        if packed:
            keys_t = _gather_blocks_t(fc_cache, ids, rows, n_blocks)  # (R, nb, Hkv, nd, bs)
        else:  # the rows' K^T blocks, then their FC dims
            keys_t = _gather_blocks_t(fc_cache, ids, rows, n_blocks)  # (R, nb, Hkv, D, bs)
            idx = dims[None, None, :, :, None].expand(rows, n_blocks, -1, -1, block_size)
            keys_t = torch.gather(keys_t, 3, idx)
        out = torch.matmul(q_fc[:, None], keys_t.float())  # (R, nb, Hkv, g, bs)
        if reduce is not None:
            out = out.amax(3) if reduce == "max" else out.mean(3)  # (R, nb, Hkv, bs)
            out = out.permute(0, 2, 1, 3).reshape(rows, kv_heads, span)
        else:
            out = out.permute(0, 2, 3, 1, 4).reshape(rows, heads, span)
    else:  # per query head FCs, unpacked K only
        keys = _gather_blocks(fc_cache, ids, rows, n_blocks)  # (R, nb, Hkv, bs, D)
        keys = keys.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, span, head_dim)
        head_map = torch.arange(heads, device=q.device) // group
        q_fc = torch.gather(q, 2, dims[None].expand(rows, -1, -1)).float()  # (R, H, nd)
        k_fc = torch.gather(keys[:, head_map], 3, dims[None, :, None, :].expand(rows, -1, span, -1))
        out = torch.einsum("rhd,rhtd->rht", q_fc, k_fc.float())
        if reduce is not None:
            grouped = out.view(rows, kv_heads, group, span)
            out = grouped.amax(2) if reduce == "max" else grouped.mean(2)
    out = out[:, :, :max_len]
    past = torch.arange(max_len, device=q.device)[None, :] >= seq_lens.long()[:, None]  # (R, L)
    return out.masked_fill(past[:, None, :], float("-inf"))


# ----------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------

def paged_select(scores: torch.Tensor, budget: int, sink: int, window: int, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, block_size: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """Physical slots to attend per request and head: sinks, recent window and the best-scoring rest.

    Per row ``(r, h)``, over the logical tokens ``t < seq_lens[r]``: the first ``sink`` and last ``window``
    tokens are always kept (the window is shortened to ``budget - sink`` when it does not fit), the rest
    of the ``budget`` go to the highest ``scores`` (ties to the lower token). Same choice as
    :func:`tokprune.ops.select_sparse_indices` on the request's own scores; each chosen token is then
    translated to its slot ``block_table[r, t // block_size] * block_size + t % block_size``.

    Args:
        scores: ``(R, H, L)`` float scores (``H`` = kv_heads or query heads, ``L >= seq_lens.max()``);
            positions ``>= seq_lens[r]`` are ignored whatever they hold. NaN inside a row's length is
            rejected in debug mode (undefined choice otherwise).
        budget, sink, window: non-negative ints.
        seq_lens: ``(R,)`` int32/int64.
        block_table: ``(R, max_blocks)`` int32/int64.
        block_size: tokens per block.
        backend: ``"auto" | "torch" | "triton"`` (Triton translates tokens to slots; the top-k is torch's).

    Returns:
        ``(R, H, budget)`` int64 slots in increasing logical-token order, ``-1`` for the unused tail of a
        row with fewer than ``budget`` tokens.
    """
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    for name, value in (("budget", budget), ("sink", sink), ("window", window)):
        _check_int(name, value)
    _check_int("block_size", block_size, 1)
    rows, heads, n_tokens = scores.shape
    _check_table(block_table, seq_lens, rows, scores.device, block_size, None)
    if debug_checks() and rows:
        if int(seq_lens.max()) > n_tokens:
            raise ValueError(f"scores has {n_tokens} positions but seq_lens.max() = {int(seq_lens.max())}")
        inside = torch.arange(n_tokens, device=scores.device)[None, :] < seq_lens.long()[:, None]
        if bool(torch.isnan(scores).logical_and(inside[:, None, :]).any()):
            raise ValueError("scores contains NaN inside a row's length")
    chosen = resolve_backend(backend, scores.device, ("torch", "triton"), "paged_select")
    token = _select_logical(scores, budget, sink, window, seq_lens)  # (R, H, budget), -1 padded
    if chosen == "triton":
        from tokprune.kernels.triton.paged import tokens_to_slots_triton

        return tokens_to_slots_triton(token, block_table, block_size)
    return _tokens_to_slots_torch(token, block_table, block_size)


def _select_logical(scores, budget, sink, window, seq_lens):
    """Logical token ids ``(R, H, budget)`` chosen per row (ascending, ``-1`` padded)."""
    from tokprune.ops.fasa import _select_top_cpu

    rows, heads, n_tokens = scores.shape
    sink = min(sink, budget)
    window = min(window, budget - sink)
    lens = seq_lens.long()[:, None]
    pos = torch.arange(n_tokens, device=scores.device)[None, :]
    valid = pos < lens  # (R, L)
    forced = valid & ((pos < sink) | (pos >= lens - window))
    work = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    keep = min(budget, n_tokens)
    work = work.masked_fill(forced[:, None, :], float("inf"))
    if keep == 0 or rows * heads == 0:
        index = torch.zeros(rows, heads, keep, dtype=torch.long, device=scores.device)
    elif work.device.type == "cpu" and not torch.compiler.is_compiling():
        index = _select_top_cpu(work, keep)  # top-k + threshold: fast, reads one flag on the host
    else:  # stable sort (ties to the lower token, as select_tokens): no host synchronisation
        order = torch.sort(work, dim=-1, descending=True, stable=True).indices[..., :keep]
        index = torch.sort(order, dim=-1).values
    index = index.masked_fill(index >= lens[:, :, None], -1)  # chosen past the length: padding
    if keep < budget:
        index = torch.nn.functional.pad(index, (0, budget - keep), value=-1)
    return index


def _tokens_to_slots_torch(token, block_table, block_size):
    rows = token.shape[0]
    if token.numel() == 0:
        return token.clone()
    t = token.clamp_min(0)
    col = (t // block_size).clamp_max(max(block_table.shape[1] - 1, 0))
    blk = torch.gather(block_table.long(), 1, col.view(rows, -1)).view_as(t)
    return torch.where(token >= 0, blk * block_size + t % block_size, torch.full_like(token, -1))


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------

def _check_qkv(q, k_cache, v_cache):
    rows, heads, head_dim = _check_q(q)
    _check_cache("k_cache", k_cache, device=q.device)
    _check_cache("v_cache", v_cache, device=q.device)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, kv_heads, block_size, head_dim={head_dim}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k_cache kv_heads ({kv_heads})")
    return rows, heads, kv_heads


def _check_scale(scale):
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    return float(scale)


def paged_sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  slots: torch.Tensor, scale: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """Exact decode attention of one query per request and head over the physical slots listed.

    ``out[r, h] = softmax(scale * q[r, h] . K[S, h // g]) @ V[S, h // g]`` with
    ``S = {s in slots[r, h or h // g] : s >= 0}`` and ``K[s, kvh] = k_cache[s // bs, kvh, s % bs]``;
    softmax and accumulation in fp32. A row with no valid slot gives zeros. The Triton backend splits
    the slot list over programs (online softmax per split) and combines the splits (flash-decoding).

    Args:
        q: ``(R, Hq, head_dim)`` fp32/fp16/bf16.
        k_cache, v_cache: ``(num_blocks, Hkv, block_size, head_dim)``, q's dtype, any strides.
        slots: ``(R, Hkv or Hq, K)`` int32/int64 slots (:func:`paged_select`), ``-1`` = none.
        scale: softmax scale.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(R, Hq, head_dim)`` in q's dtype.
    """
    rows, heads, kv_heads = _check_qkv(q, k_cache, v_cache)
    check_tensor("slots", slots, ndim=3, dtypes=INT_DTYPES, device=q.device)
    if slots.shape[0] != rows or slots.shape[1] not in (kv_heads, heads):
        raise ValueError(f"slots must be (R={rows}, kv_heads={kv_heads} or heads={heads}, K), got {tuple(slots.shape)}")
    scale = _check_scale(scale)
    num_blocks, _, block_size, _ = k_cache.shape
    _check_slots("slots", slots, num_blocks * block_size)
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "paged_sparse_decode_attention")
    if slots.shape[2] == 0 or q.numel() == 0:
        return torch.zeros_like(q)
    if chosen == "triton":
        from tokprune.kernels.triton.paged import paged_sparse_decode_triton

        return paged_sparse_decode_triton(q, k_cache, v_cache, slots, scale)
    return _paged_sparse_decode_torch(q, k_cache, v_cache, slots, scale)


def _softmax_attend(q_rows, k, v, valid, scale):
    """``q_rows (R, Hi, g', D)``, ``k/v (R, Hi, K, D)`` fp32, ``valid (R, Hi, K)`` -> ``(R, Hi, g', D)`` fp32."""
    s = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))


def _gather_slot_rows(cache, blk, kvh, off):
    """``cache[blk, kvh, off]`` (``(..., D)``) for broadcastable int64 index tensors.

    When a token's ``D`` values are contiguous (``stride(3) == 1``, e.g. vLLM's V), the rows are read
    with one ``index_select`` over a row view of the cache's memory (whole rows, about 6x faster than
    per-element indexing on the CPU); otherwise (vLLM's transposed K: a token's values lie
    ``block_size`` apart) per-element indexing."""
    s0, s1, s2, s3 = cache.stride()
    if s3 != 1 or cache.numel() == 0:
        return cache[blk, kvh, off]
    n_blocks, kv_heads, block_size, head_dim = cache.shape
    last_row = (n_blocks - 1) * s0 + (kv_heads - 1) * s1 + (block_size - 1) * s2  # start of the last row
    rows = cache.as_strided((last_row + 1, head_dim), (1, 1))  # row i starts at element i of the view
    start = (blk * s0 + kvh * s1 + off * s2)
    shape = torch.broadcast_shapes(blk.shape, torch.Size(kvh.shape), off.shape)
    return rows.index_select(0, start.expand(shape).reshape(-1)).view(*shape, head_dim)


def _paged_sparse_decode_torch(q, k_cache, v_cache, slots, scale):
    rows, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    n_idx_heads = slots.shape[1]
    group = heads // kv_heads
    s = slots.long()
    valid = s >= 0
    s = s.clamp_min(0)
    kv_of = (torch.arange(n_idx_heads, device=q.device) // (group if n_idx_heads == heads else 1))[None, :, None]
    blk, off = s // block_size, s % block_size
    k = _gather_slot_rows(k_cache, blk, kv_of, off).float()  # (R, Hi, K, D)
    v = _gather_slot_rows(v_cache, blk, kv_of, off).float()
    q_rows = q.float().view(rows, n_idx_heads, heads // n_idx_heads, head_dim)
    out = _softmax_attend(q_rows, k, v, valid, scale)
    return out.reshape(rows, heads, head_dim).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, max_len: Optional[int] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    """Dense decode attention of one query per request over all its ``seq_lens[r]`` paged tokens.

    The exact path for requests whose context fits the budget, and the baseline the sparse path is
    measured against. Equals :func:`paged_sparse_decode_attention` with every slot of the request.

    Args:
        q: ``(R, Hq, head_dim)`` fp32/fp16/bf16.
        k_cache, v_cache: ``(num_blocks, Hkv, block_size, head_dim)``, q's dtype, any strides.
        block_table: ``(R, max_blocks)`` int32/int64; seq_lens: ``(R,)`` int32/int64.
        scale: softmax scale.
        max_len: ``>= seq_lens.max()``; ``None`` reads ``seq_lens.max()`` (a sync).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(R, Hq, head_dim)`` in q's dtype (zeros for a request with ``seq_lens[r] == 0``).
    """
    rows, heads, kv_heads = _check_qkv(q, k_cache, v_cache)
    scale = _check_scale(scale)
    num_blocks, _, block_size, head_dim = k_cache.shape
    max_len = _resolve_max_len(max_len, seq_lens)
    _check_table(block_table, seq_lens, rows, q.device, block_size, num_blocks, max_len)
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "paged_decode_attention")
    if rows == 0 or max_len == 0:
        return torch.zeros_like(q)
    if chosen == "triton":
        from tokprune.kernels.triton.paged import paged_decode_triton

        return paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale, max_len)
    return _paged_decode_torch(q, k_cache, v_cache, block_table, seq_lens, scale, max_len)


def _paged_decode_torch(q, k_cache, v_cache, block_table, seq_lens, scale, max_len):
    """Blockwise dense decode: gather whole blocks, scores ``(R, nb, Hkv, g, bs)``, one softmax over
    (blocks, offsets), ``p @ V`` per block summed over blocks."""
    rows, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    ids, n_blocks = _block_ids(block_table, seq_lens, max_len, block_size)
    k_t = _gather_blocks_t(k_cache, ids, rows, n_blocks)  # (R, nb, Hkv, D, bs)
    q_rows = q.float().view(rows, 1, kv_heads, group, head_dim)
    s = torch.matmul(q_rows, k_t.float()) * scale  # (R, nb, Hkv, g, bs)
    pos = torch.arange(n_blocks * block_size, device=q.device).view(1, n_blocks, 1, 1, block_size)
    s = s.masked_fill(pos >= seq_lens.long().view(rows, 1, 1, 1, 1), float("-inf"))
    m = s.amax(dim=(1, 4), keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=(1, 4), keepdim=True)  # (R, 1, Hkv, g, 1)
    v = _gather_blocks(v_cache, ids, rows, n_blocks).float()  # (R, nb, Hkv, bs, D)
    out = torch.matmul(p, v).sum(1) / torch.where(denom > 0, denom, torch.ones_like(denom))[:, 0]
    return out.reshape(rows, heads, head_dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Quest page bounds on a paged cache
# ----------------------------------------------------------------------------------------------------

def _check_bounds(kmin, kmax, page_size, device=None):
    _check_int("page_size", page_size, 1)
    _check_cache("kmin", kmin, device=device)
    _check_cache("kmax", kmax, device=kmin.device)
    if kmin.shape != kmax.shape or kmin.dtype != kmax.dtype:
        raise ValueError(f"kmin and kmax must share shape and dtype, got {tuple(kmin.shape)} {kmin.dtype} and "
                         f"{tuple(kmax.shape)} {kmax.dtype}")
    if not (kmin.is_contiguous() and kmax.is_contiguous()):
        raise ValueError("kmin and kmax must be contiguous (num_blocks, kv_heads, block_size // page_size, head_dim)")
    return kmin.shape


def update_paged_page_bounds(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                             page_size: int = 16, *,
                             backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quest's per-page key bounds on a paged cache, updated in place for the written slots only.

    Pages of ``page_size`` tokens tile each block (``block_size % page_size == 0``); page ``p`` of block
    ``b`` holds slots ``b*block_size + p*page_size ...``. For every token ``t`` with slot
    ``s = slot_mapping[t] >= 0``: a token at the start of its page (``s % page_size == 0``) resets the
    page's bounds, every token then folds its key in: ``kmin[page] = min(kmin[page], key[t])``,
    ``kmax[page] = max(...)`` per head and dimension. Pages must be written in token order (the first
    token of a page in this call or an earlier one), as appends in vLLM and tokprune's cache are; the
    bounds then cover exactly the written tokens of each page (a partial last page included), whatever
    a reused block held before.

    Args:
        kmin, kmax: ``(num_blocks, kv_heads, block_size // page_size, head_dim)`` contiguous, float;
            written.
        key: ``(T, kv_heads, head_dim)`` keys of this step (cast to the bounds' dtype).
        slot_mapping: ``(T,)`` int32/int64 slots or ``-1`` (skipped).
        page_size: tokens per page.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(kmin, kmax)``, the same tensors.
    """
    num_blocks, kv_heads, n_pages, head_dim = _check_bounds(kmin, kmax, page_size)
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, device=kmin.device)
    if key.shape[1] != kv_heads or key.shape[2] != head_dim:
        raise ValueError(f"key must be (T, kv_heads={kv_heads}, head_dim={head_dim}), got {tuple(key.shape)}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INT_DTYPES, device=kmin.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be (T={key.shape[0]},), got {tuple(slot_mapping.shape)}")
    block_size = n_pages * page_size
    _check_slots("slot_mapping", slot_mapping, num_blocks * block_size)
    chosen = resolve_backend(backend, kmin.device, ("torch", "triton"), "update_paged_page_bounds")
    if key.shape[0] == 0:
        return kmin, kmax
    if chosen == "triton":
        from tokprune.kernels.triton.paged import update_page_bounds_triton

        update_page_bounds_triton(kmin, kmax, key, slot_mapping, page_size)
        return kmin, kmax
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.long().index_select(0, keep)
    vals = key.index_select(0, keep).to(kmin.dtype)  # (T', Hkv, D)
    page = (slots // block_size * kv_heads)[:, None] * n_pages + \
        torch.arange(kv_heads, device=kmin.device)[None, :] * n_pages + (slots % block_size // page_size)[:, None]
    page = page.reshape(-1)  # (T' * Hkv,) rows of the (num_blocks * Hkv * P, D) view
    vals = vals.reshape(-1, head_dim)
    flat_min, flat_max = kmin.view(-1, head_dim), kmax.view(-1, head_dim)
    fresh = (slots % page_size == 0)[:, None].expand(-1, kv_heads).reshape(-1)
    reset = page[fresh]
    flat_min.index_fill_(0, reset, float("inf"))
    flat_max.index_fill_(0, reset, float("-inf"))
    index = page[:, None].expand(-1, head_dim)
    flat_min.scatter_reduce_(0, index, vals, "amin")
    flat_max.scatter_reduce_(0, index, vals, "amax")
    return kmin, kmax


def paged_quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, page_size: int = 16, *, max_len: Optional[int] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Quest's upper bound of each page's attention logit, per request and query head.

    ``scores[r, h, p] = sum_d max(q[r, h, d] * kmin[P, kvh, d], q[r, h, d] * kmax[P, kvh, d])`` for the
    logical page ``p < ceil(seq_lens[r] / page_size)`` of request ``r`` (physical page ``P``: block
    ``block_table[r, p*page_size // block_size]``, page ``p % (block_size // page_size)`` inside it),
    ``-inf`` for pages past the request's length.

    Args:
        q: ``(R, Hq, head_dim)`` fp32/fp16/bf16.
        kmin, kmax: ``(num_blocks, Hkv, block_size // page_size, head_dim)`` from
            :func:`update_paged_page_bounds`.
        block_table: ``(R, max_blocks)`` int32/int64; seq_lens: ``(R,)`` int32/int64.
        page_size: tokens per page.
        max_len: ``>= seq_lens.max()`` (sets the width ``ceil(max_len / page_size)``); ``None`` reads
            ``seq_lens.max()`` (a sync).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        fp32 ``(R, Hq, ceil(max_len / page_size))``.
    """
    rows, heads, head_dim = _check_q(q)
    num_blocks, kv_heads, n_pages, bound_dim = _check_bounds(kmin, kmax, page_size, q.device)
    if bound_dim != head_dim:
        raise ValueError(f"kmin head_dim {bound_dim} must equal q's {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kmin kv_heads ({kv_heads})")
    block_size = n_pages * page_size
    max_len = _resolve_max_len(max_len, seq_lens)
    _check_table(block_table, seq_lens, rows, q.device, block_size, num_blocks, max_len)
    chosen = resolve_backend(backend, q.device, ("torch", "triton"), "paged_quest_scores")
    width = -(-max_len // page_size)
    if rows == 0 or width == 0:
        return torch.empty(rows, heads, width, dtype=torch.float32, device=q.device)
    if chosen == "triton":
        from tokprune.kernels.triton.paged import paged_quest_scores_triton

        return paged_quest_scores_triton(q, kmin, kmax, block_table, seq_lens, page_size, width)
    group = heads // kv_heads
    ids, n_blocks = _block_ids(block_table, seq_lens, max_len, block_size)
    lo = _gather_blocks(kmin, ids, rows, n_blocks).float()  # (R, nb, Hkv, P, D)
    hi = _gather_blocks(kmax, ids, rows, n_blocks).float()
    qg = q.float().view(rows, 1, kv_heads, group, 1, head_dim)
    bound = torch.maximum(qg * lo[:, :, :, None], qg * hi[:, :, :, None]).sum(-1)  # (R, nb, Hkv, g, P)
    out = bound.permute(0, 2, 3, 1, 4).reshape(rows, heads, n_blocks * n_pages)[:, :, :width]
    pages = -(-seq_lens.long() // page_size)
    past = torch.arange(width, device=q.device)[None, :] >= pages[:, None]
    return out.masked_fill(past[:, None, :], float("-inf"))


def paged_select_pages(page_scores: torch.Tensor, n_pages: int, seq_lens: torch.Tensor, block_table: torch.Tensor,
                       block_size: int, page_size: int = 16, *, backend: Optional[str] = None) -> torch.Tensor:
    """Physical slots of Quest's choice: the ``n_pages`` best pages per row (the newest page always).

    Args:
        page_scores: ``(R, H, W)`` float (:func:`paged_quest_scores`), ``W >= ceil(seq_lens.max() / page_size)``.
        n_pages: pages kept per row, ``>= 0``.
        seq_lens, block_table, block_size: the paged layout.
        page_size: tokens per page (divides ``block_size``).
        backend: ``"auto" | "torch" | "triton"`` (for the slot translation, see :func:`paged_select`).

    Returns:
        ``(R, H, n_pages * page_size)`` int64 slots in increasing token order, ``-1`` for tokens past a
        request's length and for unused pages; feed it to :func:`paged_sparse_decode_attention`.
    """
    check_tensor("page_scores", page_scores, ndim=3, dtypes=FLOAT_DTYPES)
    _check_int("n_pages", n_pages)
    _check_int("block_size", block_size, 1)
    _check_int("page_size", page_size, 1)
    if block_size % page_size:
        raise ValueError(f"page_size={page_size} must divide block_size={block_size}")
    rows, heads, width = page_scores.shape
    _check_table(block_table, seq_lens, rows, page_scores.device, block_size, None)
    chosen = resolve_backend(backend, page_scores.device, ("torch", "triton"), "paged_select_pages")
    lens = seq_lens.long()
    pages = _select_logical(page_scores, n_pages, 0, 1, -(-lens // page_size))  # (R, H, n_pages), -1 padded
    token = pages[..., None] * page_size + torch.arange(page_size, device=page_scores.device)
    token = token.masked_fill((pages[..., None] < 0) | (token >= lens[:, None, None, None]), -1).flatten(2)
    if chosen == "triton":
        from tokprune.kernels.triton.paged import tokens_to_slots_triton

        return tokens_to_slots_triton(token, block_table, block_size)
    return _tokens_to_slots_torch(token, block_table, block_size)


# ----------------------------------------------------------------------------------------------------
# fused FASA decode step
# ----------------------------------------------------------------------------------------------------

def paged_fasa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, fc_cache: torch.Tensor,
                      fc_dims: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, budget: int,
                      sink: int, window: int, scale: float, *, vote_scale: Optional[float] = None,
                      out: Optional[torch.Tensor] = None, return_selected: bool = False,
                      num_threads: Optional[int] = None, backend: Optional[str] = "auto",
                      fc_scale: Optional[torch.Tensor] = None):
    """One FASA decode step on a paged cache: vote, selection and exact attention, one query per request.

    For every request ``r`` and KV head ``h`` (``L = seq_lens[r]``, ``g = Hq / Hkv``):

    * ``L <= budget``: every token is attended (dense attention).
    * else FASA's group vote over the packed FC side cache,
      ``vote[t] = sum_j softmax_t(vote_scale * q[r, h*g+j, fc_dims[h]] . fc[t])``, the first ``sink`` and the
      last ``window`` tokens forced (the window shortened to ``budget - sink``), and the ``budget`` highest
      votes chosen (ties to the lower token) — :class:`tokprune.methods.FASA` with ``selection="group"``,
      ``aggregate="softmax"``;
    * ``out[r, h*g+j] = softmax(scale * q . K[chosen]) @ V[chosen]``, fp32 accumulation.

    Caches use tokprune's paged convention (a token ``t`` of request ``r`` lives in block
    ``block_table[r, t // bs]`` at offset ``t % bs``) and are read in place with any strides, so vLLM's CPU
    layout (:func:`vllm_cpu_kv_views`, K transposed per block) and tokprune's contiguous ``(batch, Hkv,
    capacity, D)`` cache (``block_size = capacity``, ``block_table = [[0], [1], ...]``) both work.

    Args:
        q: ``(R, Hq, head_dim)`` fp32/fp16/bf16 post-RoPE decode queries (any strides).
        k_cache, v_cache: ``(num_blocks, Hkv, block_size, head_dim)``, q's dtype, any strides.
        fc_cache: ``(num_blocks, Hkv, block_size, nd)`` fp32/fp16/bf16 packed FC keys (``fc[..., i] =
            K[..., fc_dims[h, i]]``, :func:`write_paged_fc_keys`), any strides (the C++ kernel is fastest
            when the token axis has unit stride, i.e. ``[nd, block_size]`` per block and head); or int8
            keys quantised per token (:func:`quantize_fc_keys`: ``fc * fc_scale`` is the key) with ``fc_scale``.
        fc_dims: ``(Hkv, nd)`` int32/int64: the head dimensions of each packed column
            (:func:`tokprune.reference.fasa.fc_dims`).
        block_table: ``(R, max_blocks)`` int32/int64.
        seq_lens: ``(R,)`` int32/int64 context lengths (the new token included).
        budget, sink, window: non-negative ints.
        scale: attention softmax scale.
        vote_scale: scale of the vote's partial logits; ``None`` -> ``head_dim ** -0.5`` (FASA's).
        out: optional ``(R, Hq, head_dim)`` fp32/fp16/bf16 tensor written in place (any strides; the
            ``"cuda"`` backend needs its last dimension contiguous).
        return_selected: also return the chosen tokens.
        num_threads: threads of the ``"cuda"`` (host) backend; ``None`` -> ``torch.get_num_threads()``. The
            result does not depend on it.
        backend: ``"auto" | "torch" | "cuda"``. ``"cuda"`` is the host (CPU) build of ``tokprune._C``
            (CPU tensors only); ``"auto"`` picks it for CPU tensors when the extension has it, else torch.
        fc_scale: ``(num_blocks, Hkv, block_size)`` fp32 per-token scales of int8 ``fc_cache`` (any strides);
            ``None`` for float FC keys.

    Returns:
        ``out`` ``(R, Hq, head_dim)`` (q's dtype unless ``out`` is given), and with ``return_selected`` also
        ``(R, Hkv, budget)`` int64 chosen logical tokens in ascending order, ``-1`` padded.
    """
    scale, vote_scale = _check_fasa(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink,
                                    window, scale, vote_scale, out, num_threads, fc_scale)
    chosen = _fasa_decode_backend(backend, q.device)
    if chosen == "cuda":
        from tokprune.kernels.cuda import paged_fasa_decode_host

        target = out if out is None or out.stride(-1) == 1 or out.shape[-1] <= 1 else None
        res, selected = paged_fasa_decode_host(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget,
                                               sink, window, scale, vote_scale,
                                               num_threads or torch.get_num_threads(), out=target,
                                               want_selected=return_selected, fc_scale=fc_scale)
        if out is not None and target is None:
            out.copy_(res)
            res = out
        return (res, selected.long()) if return_selected else res
    if fc_scale is not None:  # the torch path votes from the dequantised keys
        fc_cache = dequantize_fc_keys(fc_cache, fc_scale)
    res, token = _paged_fasa_decode_torch(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget,
                                          sink, window, scale, vote_scale)
    if out is not None:
        out.copy_(res)
        res = out
    return (res, token) if return_selected else res


def _check_fasa(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink, window, scale,
                vote_scale, out, num_threads, fc_scale=None):
    """:func:`paged_fasa_decode`'s argument checks; returns ``(scale, vote_scale)`` as floats."""
    rows, heads, kv_heads = _check_qkv(q, k_cache, v_cache)
    head_dim = q.shape[2]
    num_blocks, _, block_size, _ = k_cache.shape
    check_tensor("fc_cache", fc_cache, ndim=4, dtypes=FLOAT_DTYPES + (torch.int8,), device=q.device)
    if fc_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"fc_cache must be (num_blocks, kv_heads, block_size) = {tuple(k_cache.shape[:3])} + (nd,), "
                         f"got {tuple(fc_cache.shape)}")
    if fc_cache.dtype == torch.int8:
        if fc_scale is None:
            raise ValueError("fc_scale is required with int8 fc_cache: (num_blocks, kv_heads, block_size) fp32 "
                             "per-token scales (quantize_fc_keys)")
        check_tensor("fc_scale", fc_scale, ndim=3, dtypes=(torch.float32,), device=q.device)
        if fc_scale.shape != fc_cache.shape[:3]:
            raise ValueError(f"fc_scale must be (num_blocks, kv_heads, block_size) = {tuple(fc_cache.shape[:3])}, "
                             f"got {tuple(fc_scale.shape)}")
    elif fc_scale is not None:
        raise ValueError(f"fc_scale is only for int8 fc_cache; got fc_cache {fc_cache.dtype} and an fc_scale")
    check_tensor("fc_dims", fc_dims, ndim=2, dtypes=INT_DTYPES, device=q.device)
    if fc_dims.shape != (kv_heads, fc_cache.shape[3]):
        raise ValueError(f"fc_dims must be (kv_heads={kv_heads}, nd={fc_cache.shape[3]}), got {tuple(fc_dims.shape)}")
    if debug_checks() and fc_dims.numel() and (int(fc_dims.min()) < 0 or int(fc_dims.max()) >= head_dim):
        raise IndexError(f"fc_dims values must lie in [0, head_dim={head_dim}), got range "
                         f"[{int(fc_dims.min())}, {int(fc_dims.max())}]")
    for name, value in (("budget", budget), ("sink", sink), ("window", window)):
        _check_int(name, value)
    _check_table(block_table, seq_lens, rows, q.device, block_size, num_blocks)
    scale = _check_scale(scale)
    vote_scale = head_dim ** -0.5 if vote_scale is None else _check_scale(vote_scale)
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
        if out.shape != q.shape:
            raise ValueError(f"out must be (R, Hq, head_dim) = {tuple(q.shape)}, got {tuple(out.shape)}")
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    return scale, vote_scale


class PagedFasaDecoder:
    """:func:`paged_fasa_decode` bound to one set of caches (see :func:`paged_fasa_decoder`)."""

    def __init__(self, call, heads: int, head_dim: int, dtype: torch.dtype, out_dtype: torch.dtype,
                 block_size: int, num_blocks: int):
        self._call = call
        self.heads, self.head_dim, self.dtype, self.out_dtype = heads, head_dim, dtype, out_dtype
        self._block_size, self._num_blocks = block_size, num_blocks

    def __call__(self, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                 out: Optional[torch.Tensor] = None, pack_from: Optional[int] = None) -> torch.Tensor:
        """``out (R, Hq, head_dim)``: :func:`paged_fasa_decode` of ``q (R, Hq, head_dim)`` (the bound dtype) with
        ``block_table (R, max_blocks)`` and ``seq_lens (R,)`` int32 (int64 is converted, at a cost), ``out``:
        optional, the bound output dtype, written in place.

        ``pack_from`` (int >= 0, optional): first write the FC side cache from the key cache for every row's
        tokens ``pack_from <= t < seq_lens[r]`` (``fc_cache[t, i] = k_cache[t, fc_dims[h, i]]``, rounded to the
        FC dtype), then score: a decode loop whose FC side cache lags the key cache (tokprune's KV cache defers
        the FC copy of appended tokens to this call) keeps it in step without a separate pass."""
        if q.dim() != 3 or q.shape[1] != self.heads or q.shape[2] != self.head_dim or q.dtype != self.dtype:
            raise ValueError(f"q must be (R, Hq={self.heads}, head_dim={self.head_dim}) {self.dtype}, got "
                             f"{tuple(q.shape)} {q.dtype}")
        rows = q.shape[0]
        if block_table.dim() != 2 or block_table.shape[0] != rows or seq_lens.shape != (rows,):
            raise ValueError(f"block_table must be (R={rows}, max_blocks) and seq_lens (R={rows},), got "
                             f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
        if out is None:
            out = torch.empty(q.shape, dtype=self.out_dtype)
        elif out.shape != q.shape or out.dtype != self.out_dtype or (out.shape[2] > 1 and out.stride(2) != 1):
            raise ValueError(f"out must be (R, Hq, head_dim) = {tuple(q.shape)} {self.out_dtype} with a contiguous "
                             f"last dimension, got {tuple(out.shape)} {out.dtype}")
        if pack_from is not None:
            _check_int("pack_from", pack_from)
        if debug_checks():  # the value checks of paged_fasa_decode
            _check_table(block_table, seq_lens, rows, q.device, self._block_size, self._num_blocks)
        return self._call(q, block_table, seq_lens, out, pack_from=pack_from)

    def launcher(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """``launch(q, out, pack_from=None) -> out``: this decoder for a loop whose ``block_table (R, max_blocks)``
        and ``seq_lens (R,)`` int32 tensors stay the same objects (their contents may change): with the host
        kernel a call writes three fields of a prepared struct and checks nothing (``q (R, Hq, head_dim)`` of the
        bound dtype and ``out`` of the output dtype, both with a contiguous last dimension, are the caller's
        guarantee); elsewhere it is this decoder's checked call."""
        call = getattr(self._call, "launcher", None)
        if call is not None:
            return call(block_table, seq_lens)

        def launch(q, out, pack_from=None):
            return self(q, block_table, seq_lens, out=out, pack_from=pack_from)

        return launch


def paged_fasa_decoder(k_cache: torch.Tensor, v_cache: torch.Tensor, fc_cache: torch.Tensor, fc_dims: torch.Tensor,
                       budget: int, sink: int, window: int, scale: float, *, heads: int,
                       out_dtype: Optional[torch.dtype] = None, vote_scale: Optional[float] = None,
                       num_threads: Optional[int] = None, backend: Optional[str] = "auto",
                       fc_scale: Optional[torch.Tensor] = None) -> PagedFasaDecoder:
    """:func:`paged_fasa_decode` bound to fixed caches, for a decode loop (one decoder per layer, called every
    step): the caches, FC dims and scalars are checked once here, and a call checks only the shapes and dtypes
    of the query, table and lengths. With the host kernel (``backend="cuda"``, or ``"auto"`` where the
    extension has it) a call sets a few fields of a prepared argument struct: on SmolLM2-135M's 30 layers the
    per-layer Python cost of the full op (~100 us inside a model's decode step) goes down to a few us.
    Elsewhere each call runs :func:`paged_fasa_decode` with the bound arguments.

    Args:
        k_cache, v_cache, fc_cache, fc_dims, budget, sink, window, scale, vote_scale, backend, fc_scale: as
            :func:`paged_fasa_decode` (the tensors must keep their storage while the decoder is used).
        heads: query heads ``Hq`` of the queries the decoder will get (a multiple of ``Hkv``).
        out_dtype: dtype of the output rows (default: the caches' dtype).
        num_threads: host kernel threads (``None`` -> ``torch.get_num_threads()`` now).

    Returns:
        A :class:`PagedFasaDecoder`: ``decoder(q, block_table, seq_lens, out=None) -> out (R, Hq, head_dim)``.
    """
    _check_int("heads", heads, 1)
    head_dim = k_cache.shape[3] if k_cache.dim() == 4 else 0
    probe = torch.empty(0, heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    table = torch.empty(0, 1, dtype=torch.int32, device=k_cache.device)
    lens = torch.empty(0, dtype=torch.int32, device=k_cache.device)
    scale, vote_scale = _check_fasa(probe, k_cache, v_cache, fc_cache, fc_dims, table, lens, budget, sink, window,
                                    scale, vote_scale, None, num_threads, fc_scale)
    out_dtype = k_cache.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    threads = num_threads or torch.get_num_threads()
    if _fasa_decode_backend(backend, k_cache.device) == "cuda":
        from tokprune.kernels.cuda import PagedFasaHostCall

        call = PagedFasaHostCall(k_cache, v_cache, fc_cache, fc_dims, heads, out_dtype, budget, sink, window, scale,
                                 vote_scale, threads, fc_scale=fc_scale)
    else:
        def call(q, block_table, seq_lens, out, pack_from):
            if pack_from is not None:
                pack_paged_fc_keys(k_cache, fc_cache, fc_dims, block_table, seq_lens, pack_from, fc_scale=fc_scale)
            return paged_fasa_decode(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink,
                                     window, scale, vote_scale=vote_scale, out=out, backend="torch",
                                     fc_scale=fc_scale)
    return PagedFasaDecoder(call, heads, head_dim, k_cache.dtype, out_dtype, k_cache.shape[2], k_cache.shape[0])


def quantize_fc_keys(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of FC keys per token: ``scale = max_i |x[..., i]| / 127`` (fp32) and
    ``q = round_half_even(x / scale)`` clamped to [-127, 127] (``q = 0``, ``scale = 0`` for an all-zero row);
    ``q * scale`` approximates ``x`` within ``scale / 2`` per element. The fused kernel's ``pack_from`` does the
    same arithmetic, so both give the same bytes.

    Args:
        x: ``(..., nd)`` float keys.

    Returns:
        ``(q (..., nd) int8, scale (...) fp32)``.
    """
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / div[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_fc_keys(fc_cache: torch.Tensor, fc_scale: torch.Tensor) -> torch.Tensor:
    """``fc_cache (..., nd)`` int8 times ``fc_scale (...)``: the fp32 keys :func:`quantize_fc_keys` stands for."""
    return fc_cache.float() * fc_scale[..., None]


def pack_paged_fc_keys(k_cache: torch.Tensor, fc_cache: torch.Tensor, fc_dims: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, pack_from: int, fc_scale: Optional[torch.Tensor] = None) -> None:
    """Write the FC side cache from the key cache for the logical tokens ``pack_from <= t < seq_lens[r]`` of every
    row ``r``: ``fc_cache[blk, h, t % bs, i] = k_cache[blk, h, t % bs, fc_dims[h, i]]`` with
    ``blk = block_table[r, t // bs]`` (rounded to ``fc_cache``'s dtype). Torch ops (the host kernel does this
    inside :class:`PagedFasaDecoder`'s call); finds the rows' tokens with one host synchronisation.

    Args:
        k_cache: ``(num_blocks, Hkv, block_size, D)``; fc_cache: ``(num_blocks, Hkv, block_size, nd)`` (written).
        fc_dims: ``(Hkv, nd)`` int head-dim indices; block_table: ``(R, max_blocks)`` int; seq_lens: ``(R,)`` int.
        pack_from: first logical token to write (int >= 0).
        fc_scale: ``(num_blocks, Hkv, block_size)`` fp32, written too, for int8 ``fc_cache``
            (:func:`quantize_fc_keys`).
    """
    bs = k_cache.shape[2]
    n_pos = block_table.shape[1] * bs
    if pack_from >= n_pos or block_table.shape[0] == 0:
        return
    pos = torch.arange(pack_from, n_pos, device=k_cache.device)
    rows, cols = (pos[None, :] < seq_lens.long()[:, None]).nonzero(as_tuple=True)  # only the rows' own tokens
    t = pos[cols]
    b = block_table.long()[rows, t // bs][:, None, None]  # (n, 1, 1)
    s = (t % bs)[:, None, None]
    dims = fc_dims.long().to(k_cache.device)  # (Hkv, nd)
    h = torch.arange(k_cache.shape[1], device=k_cache.device)[None, :, None]  # (1, Hkv, 1)
    i = torch.arange(dims.shape[1], device=k_cache.device)[None, None, :]  # (1, 1, nd)
    keys = k_cache[b, h, s, dims[None]]  # (n, Hkv, nd)
    if fc_cache.dtype == torch.int8:
        keys, scales = quantize_fc_keys(keys)
        fc_scale[b[..., 0], h[..., 0], s[..., 0]] = scales
    fc_cache[b, h, s, i] = keys.to(fc_cache.dtype)


def default_fc_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The FC side cache dtype the fused FASA kernel is given by default (FASA's packed keys on tokprune's cache,
    the vLLM backend's side cache): bf16 for an fp32 cache (half the bytes each vote reads), else the cache's
    own 16-bit dtype."""
    return torch.bfloat16 if cache_dtype == torch.float32 else cache_dtype


def fused_fasa_available(device: torch.device) -> bool:
    """Whether :func:`paged_fasa_decode` can run as the fused host kernel of ``tokprune._C`` for tensors on
    ``device``: CPU tensors and an extension that has the kernel (there is no CUDA kernel for it)."""
    return device.type == "cpu" and unavailable_reason("cuda", device, "paged_fasa_decode") is None


def _fasa_decode_backend(backend, device):
    implemented = ("torch", "cuda") if device.type == "cpu" else ("torch",)
    if backend in (None, "auto") and not os.environ.get("TOKPRUNE_BACKEND") and fused_fasa_available(device):
        return "cuda"
    return resolve_backend(backend, device, implemented, "paged_fasa_decode")


def _paged_fasa_decode_torch(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink, window,
                             scale, vote_scale):
    """The oracle: FASA's vote from the gathered FC blocks, :func:`paged_select`'s choice and
    :func:`paged_sparse_decode_attention` (torch). Returns ``(out, tokens (R, Hkv, budget) int64)``."""
    rows, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    max_len = int(seq_lens.max()) if rows else 0
    if rows == 0 or max_len == 0:
        token = torch.full((rows, kv_heads, budget), -1, dtype=torch.long, device=q.device)
        return torch.zeros_like(q), token
    ids, n_blocks = _block_ids(block_table, seq_lens, max_len, block_size)
    keys = _gather_blocks(fc_cache, ids, rows, n_blocks)  # (R, nb, Hkv, bs, nd)
    keys = keys.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, n_blocks * block_size, -1)[:, :, :max_len].float()
    dims = fc_dims.long()
    q_fc = torch.gather(q.view(rows, kv_heads, group, head_dim).float(), 3,
                        dims[None, :, None, :].expand(rows, -1, group, -1))  # (R, Hkv, g, nd)
    logits = torch.matmul(q_fc, keys.transpose(-1, -2)) * vote_scale  # (R, Hkv, g, L)
    past = torch.arange(max_len, device=q.device)[None, :] >= seq_lens.long()[:, None]
    logits = logits.masked_fill(past[:, None, None, :], float("-inf"))
    votes = torch.softmax(logits, dim=-1).sum(2)  # (R, Hkv, L)
    token = _select_logical(votes, budget, sink, window, seq_lens)  # (R, Hkv, budget), -1 padded
    slots = _tokens_to_slots_torch(token, block_table, block_size)
    out = _paged_sparse_decode_torch(q, k_cache, v_cache, slots, scale) if budget else torch.zeros_like(q)
    return out, token
