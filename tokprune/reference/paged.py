"""Plain-torch oracles of the paged decode ops (:mod:`tokprune.ops.paged`), written for clarity.

Each oracle gathers every request's blocks into a contiguous cache, one request at a time, and calls
the contiguous FASA oracles / ops on it: the paged ops must equal "gather, then run the contiguous op".
"""

from __future__ import annotations

from typing import List

import torch

from tokprune.reference.fasa import fc_dims, fc_scores_reference, sparse_decode_attention_reference


def gather_request(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, row: int) -> torch.Tensor:
    """Request ``row``'s first ``seq_len`` tokens of a paged ``cache (num_blocks, Hkv, bs, X)`` in logical
    order: ``(1, Hkv, seq_len, X)``, built token by token from ``block_table[row]``."""
    block_size = cache.shape[2]
    tokens = [cache[int(block_table[row, t // block_size]), :, t % block_size] for t in range(seq_len)]
    if not tokens:
        return cache.new_zeros(1, cache.shape[1], 0, cache.shape[3])
    return torch.stack(tokens, dim=1)[None]


def logical_to_slot(block_table: torch.Tensor, row: int, token: int, block_size: int) -> int:
    """Slot of logical token ``token`` of request ``row``."""
    return int(block_table[row, token // block_size]) * block_size + token % block_size


def write_paged_fc_keys_reference(fc_cache, key, slot_mapping, fc_index, chunk: int = 1) -> torch.Tensor:
    """Token-by-token write of the packed FC dims of ``key (T, Hkv, D)`` at ``slot_mapping``; -1 skipped."""
    block_size = fc_cache.shape[2]
    dims = fc_dims(fc_index, key.shape[2], chunk)
    for t in range(key.shape[0]):
        s = int(slot_mapping[t])
        if s < 0:
            continue
        for h in range(key.shape[1]):
            fc_cache[s // block_size, h, s % block_size] = key[t, h, dims[h]].to(fc_cache.dtype)
    return fc_cache


def unpack_fc_keys(packed: torch.Tensor, fc_index: torch.Tensor, head_dim: int, chunk: int = 1) -> torch.Tensor:
    """Inverse of :func:`tokprune.ops.pack_fc_keys` on the FC dims, zeros elsewhere: ``(..., Hkv, T, D)``."""
    dims = fc_dims(fc_index, head_dim, chunk)
    out = packed.new_zeros(*packed.shape[:-1], head_dim)
    for h in range(packed.shape[-3]):
        out[..., h, :, dims[h]] = packed[..., h, :, :]
    return out


def paged_fc_scores_reference(q, fc_cache, block_table, seq_lens, fc_index, chunk: int = 1, packed: bool = True,
                              max_len: int = None) -> torch.Tensor:
    """Per request: gather its keys (unpacking the FC side cache into zero-filled keys), call
    :func:`fc_scores_reference`; ``-inf`` past its length. Returns ``(R, Hq, max_len)`` fp32."""
    rows, heads, head_dim = q.shape
    max_len = int(seq_lens.max()) if max_len is None else max_len
    out = torch.full((rows, heads, max_len), float("-inf"), dtype=torch.float32)
    for r in range(rows):
        length = int(seq_lens[r])
        keys = gather_request(fc_cache, block_table, length, r)
        if packed:
            keys = unpack_fc_keys(keys, fc_index, head_dim, chunk)
        if length:
            out[r, :, :length] = fc_scores_reference(q[r:r + 1, :, None, :], keys, fc_index, chunk)[0]
    return out


def paged_select_reference(scores, budget, sink, window, seq_lens, block_table, block_size) -> torch.Tensor:
    """Per request: :func:`tokprune.ops.select_sparse_indices` on its own ``seq_lens[r]`` scores, tokens
    translated to slots, ``-1`` padded to ``budget``. Returns ``(R, H, budget)`` int64."""
    from tokprune.ops.fasa import select_sparse_indices

    rows, heads, _ = scores.shape
    out = torch.full((rows, heads, budget), -1, dtype=torch.long)
    for r in range(rows):
        length = int(seq_lens[r])
        if length == 0:
            continue
        index = select_sparse_indices(scores[r:r + 1, :, :length].float(), budget, sink=sink, window=window)[0]
        for h in range(heads):
            for j, t in enumerate(index[h].tolist()):
                if t >= 0:
                    out[r, h, j] = logical_to_slot(block_table, r, t, block_size)
    return out


def _flat_cache(cache: torch.Tensor) -> torch.Tensor:
    """``(1, Hkv, num_blocks * bs, D)``: the whole physical cache as one contiguous "request" whose token
    index is the slot."""
    num_blocks, kv_heads, block_size, head_dim = cache.shape
    return cache.permute(1, 0, 2, 3).reshape(kv_heads, num_blocks * block_size, head_dim)[None]


def paged_sparse_decode_attention_reference(q, k_cache, v_cache, slots, scale) -> torch.Tensor:
    """Per request: :func:`sparse_decode_attention_reference` with the slots as token ids of the flattened
    physical cache. Returns ``(R, Hq, D)`` in q's dtype."""
    k_flat, v_flat = _flat_cache(k_cache), _flat_cache(v_cache)
    outs: List[torch.Tensor] = []
    for r in range(q.shape[0]):
        outs.append(sparse_decode_attention_reference(q[r:r + 1, :, None, :], k_flat, v_flat, slots[r:r + 1], scale))
    if not outs:
        return torch.zeros_like(q)
    return torch.cat(outs, dim=0)[:, :, 0, :]


def paged_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale) -> torch.Tensor:
    """Per request: gather its keys/values and attend to all of them (fp32 softmax). ``(R, Hq, D)``."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.zeros(rows, heads, head_dim, dtype=torch.float32)
    for r in range(rows):
        length = int(seq_lens[r])
        if length == 0:
            continue
        k = gather_request(k_cache, block_table, length, r)[0].float()  # (Hkv, L, D)
        v = gather_request(v_cache, block_table, length, r)[0].float()
        for h in range(heads):
            w = torch.softmax((k[h // group] @ q[r, h].float()) * scale, dim=0)
            out[r, h] = w @ v[h // group]
    return out.to(q.dtype)


def paged_quest_scores_reference(q, k_cache, block_table, seq_lens, page_size: int = 16) -> torch.Tensor:
    """Quest bounds from scratch: per request, gather its keys, min/max over each logical page's tokens
    (the last page may be partial), ``sum_d max(q_d min_d, q_d max_d)``; ``-inf`` past the request's
    pages. Reads the keys, not the incremental bounds. Returns ``(R, Hq, ceil(max(seq_lens) / page_size))``."""
    rows, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    width = -(-int(seq_lens.max()) // page_size) if rows else 0
    out = torch.full((rows, heads, width), float("-inf"), dtype=torch.float32)
    for r in range(rows):
        length = int(seq_lens[r])
        keys = gather_request(k_cache, block_table, length, r)[0].float()  # (Hkv, L, D)
        for p in range(-(-length // page_size)):
            page = keys[:, p * page_size:min((p + 1) * page_size, length)]
            lo, hi = page.amin(1), page.amax(1)  # (Hkv, D)
            for h in range(heads):
                qh = q[r, h].float()
                out[r, h, p] = torch.maximum(qh * lo[h // group], qh * hi[h // group]).sum()
    return out


def paged_select_pages_reference(page_scores, n_pages, seq_lens, block_table, block_size, page_size=16):
    """Per request: the ``n_pages`` best of its pages with the newest always kept
    (:func:`tokprune.ops.select_sparse_indices` with ``window=1``), expanded to the pages' tokens below the
    request's length, as slots; ``-1`` padded to ``n_pages * page_size``."""
    from tokprune.ops.fasa import select_sparse_indices

    rows, heads, _ = page_scores.shape
    out = torch.full((rows, heads, n_pages * page_size), -1, dtype=torch.long)
    for r in range(rows):
        length = int(seq_lens[r])
        pages = -(-length // page_size)
        if pages == 0:
            continue
        chosen = select_sparse_indices(page_scores[r:r + 1, :, :pages].float(), n_pages, sink=0, window=1)[0]
        for h in range(heads):
            j = 0
            for p in chosen[h].tolist():
                for i in range(page_size):
                    t = p * page_size + i
                    if p >= 0 and t < length:
                        out[r, h, j] = logical_to_slot(block_table, r, t, block_size)
                    j += 1
    return out
