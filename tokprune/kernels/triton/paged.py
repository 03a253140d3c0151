"""Triton kernels for the paged decode ops (:mod:`tokprune.ops.paged`): every cache access goes through
a block table or a physical slot, ``address = block * stride_block + head * stride_head + offset *
stride_token + dim * stride_dim`` in int64, so strided views (vLLM's transposed CPU K) work unchanged.

* ``_write_fc_kernel``: one program per (new token, KV head); copies its FC dimensions into the side cache.
* ``_paged_fc_scores_kernel``: one program per (request * head, block of logical tokens); translates the
  tokens through the block table and reads only the FC dimensions; ``-inf`` past the request's length.
* ``_tokens_to_slots_kernel``: logical token ids -> physical slots through the block table.
* ``_reset_pages_kernel`` + ``_fold_pages_kernel``: Quest page bounds of the written slots (reset of
  pages whose first token is written, then atomic min/max; fp32 bounds).
* ``_paged_quest_scores_kernel``: Quest's bound per logical page, read through the block table.
* ``_paged_decode_split_kernel``: flash-decoding split over the slot list (``DENSE=False``) or over the
  request's logical tokens (``DENSE=True``, the exact dense path); the splits are merged by the combine
  kernel of :mod:`tokprune.kernels.triton.fasa`. Elementwise multiply + sum, fp32 math (no ``tl.dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune.kernels.triton._launch import launch
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants
from tokprune.kernels.triton.fasa import _combine_config, _sparse_decode_combine_kernel, split_plan


@triton.jit
def _write_fc_kernel(
    key_ptr, slot_ptr, dims_ptr, fc_ptr,
    n_dims, block_size,
    stride_kt, stride_kh, stride_kd,
    stride_fb, stride_fh, stride_ft, stride_fd,
    BLOCK_N: tl.constexpr,
):
    # grid (tokens, kv heads)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    slot = tl.load(slot_ptr + t + offs_n * 0).to(tl.int64)  # the token's slot, broadcast over the dims
    mask = (offs_n < n_dims) & (slot >= 0)
    dims = tl.load(dims_ptr + h * n_dims + offs_n, mask=mask, other=0).to(tl.int64)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + dims * stride_kd, mask=mask, other=0.0)
    safe = tl.where(slot >= 0, slot, 0).to(tl.int32)  # slots < 2**31: 32-bit division (64-bit uses a stack)
    dst = fc_ptr + (safe // block_size).to(tl.int64) * stride_fb + h * stride_fh + \
        (safe % block_size).to(tl.int64) * stride_ft
    tl.store(dst + offs_n * stride_fd, k.to(fc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_fc_scores_kernel(
    q_ptr, k_ptr, qdims_ptr, kdims_ptr, table_ptr, lens_ptr, out_ptr,
    max_len, n_dims, group, block_size,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_tr, stride_tc,
    stride_or, stride_oh, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (token blocks, heads, requests): the axis that grows with the context is axis 0
    pid_t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    length = tl.load(lens_ptr + r).to(tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_dims
    qd = tl.load(qdims_ptr + h * n_dims + offs_n, mask=mask_n, other=0).to(tl.int64)
    kd = tl.load(kdims_ptr + h * n_dims + offs_n, mask=mask_n, other=0).to(tl.int64)
    q = tl.load(q_ptr + r * stride_qr + h * stride_qh + qd * stride_qd, mask=mask_n, other=0.0).to(tl.float32)
    offs_t = pid_t.to(tl.int32) * BLOCK_T + tl.arange(0, BLOCK_T)  # token ids < 2**31: 32-bit division
    in_len = offs_t < length
    blk = tl.load(table_ptr + r * stride_tr + (offs_t // block_size).to(tl.int64) * stride_tc, mask=in_len,
                  other=0).to(tl.int64)
    off = (offs_t % block_size).to(tl.int64)
    base = k_ptr + (tl.program_id(1) // group).to(tl.int64) * stride_kh  # 32-bit division
    k = tl.load(base + (blk * stride_kb + off * stride_kt)[:, None] + kd[None, :] * stride_kd,
                mask=in_len[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * q[None, :], axis=1)
    s = tl.where(in_len, s, float("-inf"))
    tl.store(out_ptr + r * stride_or + h * stride_oh + offs_t.to(tl.int64) * stride_ot, s, mask=offs_t < max_len)


@triton.jit
def _tokens_to_slots_kernel(
    tok_ptr, table_ptr, out_ptr,
    n_heads, n_keep, block_size,
    stride_tr, stride_tc,
    BLOCK_K: tl.constexpr,
):
    pid_rh = tl.program_id(0)
    pid_k = tl.program_id(1).to(tl.int64)
    r = (pid_rh // n_heads).to(tl.int64)  # divisions in 32 bits (a 64-bit one compiles to a call)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = offs < n_keep
    row = pid_rh.to(tl.int64) * n_keep
    tok = tl.load(tok_ptr + row + offs, mask=mask, other=-1)
    ok = tok >= 0
    t = tl.where(ok, tok, 0).to(tl.int32)  # token ids < 2**31: 32-bit division
    blk = tl.load(table_ptr + r * stride_tr + (t // block_size).to(tl.int64) * stride_tc, mask=mask & ok,
                  other=0).to(tl.int64)
    slot = tl.where(ok, blk * block_size + t % block_size, -1)
    tl.store(out_ptr + row + offs, slot, mask=mask)


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
    n_heads, n_keep, head_dim, group, idx_div, block_size, split_size, n_splits, scale,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_sr, stride_sh, stride_sk,
    stride_tr, stride_tc,
    DENSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_rh = tl.program_id(0)
    sp = tl.program_id(1)
    # divisions in 32 bits (a 64-bit division compiles to a call with a stack frame), offsets in 64
    r = (pid_rh // n_heads).to(tl.int64)
    h32 = pid_rh % n_heads
    h = h32.to(tl.int64)
    kvh = (h32 // group).to(tl.int64)
    ih = (h32 // idx_div).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + r * stride_qr + h * stride_qh + offs_d * stride_qd, mask=mask_d,
                other=0.0).to(tl.float32)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = sp * split_size
    end = tl.minimum(start + split_size, n_keep)
    if DENSE:
        end = tl.minimum(end, tl.load(lens_ptr + r).to(tl.int32))
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        # token ids and slots < 2**31: 32-bit division (a 64-bit one compiles to a call with a stack frame)
        if DENSE:
            ok = mask_k
            t = tl.where(ok, offs_k, 0)
            blk = tl.load(table_ptr + r * stride_tr + (t // block_size).to(tl.int64) * stride_tc, mask=ok,
                          other=0).to(tl.int64)
            off = (t % block_size).to(tl.int64)
        else:
            slot = tl.load(slots_ptr + r * stride_sr + ih * stride_sh + offs_k.to(tl.int64) * stride_sk,
                           mask=mask_k, other=-1)
            ok = mask_k & (slot >= 0)
            safe = tl.where(ok, slot, 0).to(tl.int32)
            blk = (safe // block_size).to(tl.int64)
            off = (safe % block_size).to(tl.int64)
        tile_mask = ok[:, None] & mask_d[None, :]
        kt = tl.load(k_base + (blk * stride_kb + off * stride_kt)[:, None] + offs_d[None, :] * stride_kd,
                     mask=tile_mask, other=0.0).to(tl.float32)
        s = tl.sum(kt * q[None, :], axis=1) * scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        vt = tl.load(v_base + (blk * stride_vb + off * stride_vt)[:, None] + offs_d[None, :] * stride_vd,
                     mask=tile_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new
    out_row = pid_rh.to(tl.int64) * n_splits + sp
    one = tl.arange(0, 1)
    tl.store(m_ptr + out_row + one, m_i)
    tl.store(l_ptr + out_row + one, l_i)
    tl.store(acc_ptr + out_row * head_dim + offs_d, acc, mask=mask_d)


@triton.jit
def _reset_pages_kernel(
    slot_ptr, kmin_ptr, kmax_ptr,
    n_heads, head_dim, page_size, pages_per_block,
    BLOCK_D: tl.constexpr,
):
    # grid (tokens, kv heads); bounds rows: ((block * n_heads + head) * pages_per_block + page) * head_dim
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    slot = tl.load(slot_ptr + t + offs_d * 0).to(tl.int32)  # slots < 2**31: 32-bit division
    fresh = (slot >= 0) & (slot % page_size == 0)
    page = tl.where(fresh, slot, 0) // page_size  # = block * pages_per_block + page in block
    row = ((page // pages_per_block).to(tl.int64) * n_heads + h) * pages_per_block + page % pages_per_block
    mask = fresh & (offs_d < head_dim)
    tl.store(kmin_ptr + row * head_dim + offs_d, tl.full([BLOCK_D], float("inf"), tl.float32), mask=mask)
    tl.store(kmax_ptr + row * head_dim + offs_d, tl.full([BLOCK_D], float("-inf"), tl.float32), mask=mask)


@triton.jit
def _fold_pages_kernel(
    key_ptr, slot_ptr, kmin_ptr, kmax_ptr,
    n_heads, head_dim, page_size, pages_per_block,
    stride_kt, stride_kh, stride_kd,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    slot = tl.load(slot_ptr + t + offs_d * 0).to(tl.int32)  # slots < 2**31: 32-bit division
    mask = (slot >= 0) & (offs_d < head_dim)
    page = tl.where(slot >= 0, slot, 0) // page_size
    row = ((page // pages_per_block).to(tl.int64) * n_heads + h) * pages_per_block + page % pages_per_block
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + offs_d * stride_kd, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_min(kmin_ptr + row * head_dim + offs_d, k, mask=mask)
    tl.atomic_max(kmax_ptr + row * head_dim + offs_d, k, mask=mask)


@triton.jit
def _paged_quest_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, table_ptr, lens_ptr, out_ptr,
    kv_heads, width, head_dim, group, page_size, pages_per_block,
    stride_qr, stride_qh, stride_qd,
    stride_tr, stride_tc,
    stride_or, stride_oh, stride_op,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (page blocks, heads, requests): the axis that grows with the context is axis 0
    pid_p = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    length = tl.load(lens_ptr + r).to(tl.int32)
    n_pages = (length + page_size - 1) // page_size
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + r * stride_qr + h * stride_qh + offs_d * stride_qd, mask=mask_d,
                other=0.0).to(tl.float32)
    offs_p = pid_p.to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)  # page ids < 2**31: 32-bit division
    live = offs_p < n_pages
    block_size = page_size * pages_per_block
    token0 = offs_p * page_size
    blk = tl.load(table_ptr + r * stride_tr + (token0 // block_size).to(tl.int64) * stride_tc, mask=live,
                  other=0).to(tl.int64)
    kvh = (tl.program_id(1) // group).to(tl.int64)  # 32-bit division
    row = (blk * kv_heads + kvh) * pages_per_block + offs_p % pages_per_block
    ptrs = row[:, None] * head_dim + offs_d[None, :]
    mask = live[:, None] & mask_d[None, :]
    lo = tl.load(kmin_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(kmax_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    bound = tl.sum(tl.maximum(lo * q[None, :], hi * q[None, :]), axis=1)
    bound = tl.where(live, bound, float("-inf"))
    tl.store(out_ptr + r * stride_or + h * stride_oh + offs_p.to(tl.int64) * stride_op, bound, mask=offs_p < width)


# ----------------------------------------------------------------------------------------------------
# launch configurations and launchers (inputs validated in tokprune.ops.paged)
# ----------------------------------------------------------------------------------------------------

def _write_config(n_dims: int) -> LaunchConfig:
    return LaunchConfig({"BLOCK_N": max(16, triton.next_power_of_2(n_dims))}, num_warps=1, num_stages=1)


def _scores_config(n_dims: int) -> LaunchConfig:
    block_n = max(16, triton.next_power_of_2(n_dims))
    return LaunchConfig({"BLOCK_T": min(128, max(16, 4096 // block_n)), "BLOCK_N": block_n}, num_warps=4,
                        num_stages=1)


_SLOTS_CONFIG = LaunchConfig({"BLOCK_K": 128}, num_warps=4, num_stages=1)


def _split_config(head_dim: int, dense: bool) -> LaunchConfig:
    block_d = max(16, triton.next_power_of_2(head_dim))
    # 32 tokens per step only where the AOT check shows no spill (DENSE at D=64, and the sparse kernel at
    # D=32 with 64-bit strides, spilled 8-24 B on sm_80/sm_90)
    block_k = 32 if 64 <= block_d <= 128 and not dense else 16
    return LaunchConfig({"DENSE": dense, "BLOCK_K": block_k, "BLOCK_D": block_d}, num_warps=4, num_stages=1)


def _bounds_config(head_dim: int) -> LaunchConfig:
    return LaunchConfig({"BLOCK_D": max(16, triton.next_power_of_2(head_dim))}, num_warps=1, num_stages=1)


def _quest_config(head_dim: int) -> LaunchConfig:
    block_d = max(16, triton.next_power_of_2(head_dim))
    # BLOCK_P=64 at D=32 spilled 8 B on sm_90 (AOT check)
    return LaunchConfig({"BLOCK_P": max(4, min(32, 2048 // block_d)), "BLOCK_D": block_d}, num_warps=4,
                        num_stages=1)


def _run(kernel, grid, device, cfg: LaunchConfig, *args) -> None:
    launch(kernel, grid, device, *args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def write_paged_fc_keys_triton(fc_cache, key, slot_mapping, dims) -> None:
    """Launcher for :func:`tokprune.ops.write_paged_fc_keys` (``dims (Hkv, nd)`` from ``fc_dims``)."""
    n_tokens, kv_heads, _ = key.shape
    n_dims = dims.shape[1]
    _run(_write_fc_kernel, (n_tokens, kv_heads), key.device, _write_config(n_dims),
         key, slot_mapping, dims.to(torch.int32).contiguous(), fc_cache,
         n_dims, fc_cache.shape[2], *key.stride(), *fc_cache.stride())


def paged_fc_scores_triton(q, cache, block_table, seq_lens, dims, packed: bool, max_len: int) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.paged_fc_scores`; returns ``(R, Hq, max_len)`` fp32."""
    rows, heads, _ = q.shape
    kv_heads = cache.shape[1]
    group = heads // kv_heads
    n_dims = dims.shape[1]
    head_rows = torch.arange(heads, device=q.device) // (group if dims.shape[0] == kv_heads else 1)
    qdims = dims[head_rows].to(torch.int32).contiguous()
    kdims = torch.arange(n_dims, device=q.device, dtype=torch.int32).expand(heads, -1).contiguous() if packed else qdims
    out = torch.empty(rows, heads, max_len, device=q.device, dtype=torch.float32)
    if n_dims == 0:
        past = torch.arange(max_len, device=q.device)[None, :] >= seq_lens.long()[:, None]
        return out.zero_().masked_fill_(past[:, None, :], float("-inf"))
    cfg = _scores_config(n_dims)
    grid = (triton.cdiv(max_len, cfg.constexprs["BLOCK_T"]), heads, rows)
    _run(_paged_fc_scores_kernel, grid, q.device, cfg,
         q, cache, qdims, kdims, block_table, seq_lens, out,
         max_len, n_dims, group, cache.shape[2],
         *q.stride(), *cache.stride(), *block_table.stride(), *out.stride())
    return out


def tokens_to_slots_triton(token, block_table, block_size: int) -> torch.Tensor:
    """Logical token ids ``(R, H, K)`` int64 (``-1`` = none) -> physical slots, same shape."""
    rows, heads, n_keep = token.shape
    out = torch.empty_like(token)
    if token.numel() == 0:
        return out
    token = token.contiguous()
    grid = (rows * heads, triton.cdiv(n_keep, _SLOTS_CONFIG.constexprs["BLOCK_K"]))
    _run(_tokens_to_slots_kernel, grid, token.device, _SLOTS_CONFIG,
         token, block_table, out, heads, n_keep, block_size, *block_table.stride())
    return out


def _decode(q, k_cache, v_cache, slots, block_table, seq_lens, scale, n_keep, dense):
    rows, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    idx_div = 1 if (dense or slots.shape[1] == heads) else group
    cfg = _split_config(head_dim, dense)
    n_splits, split_size = split_plan(n_keep, cfg.constexprs["BLOCK_K"])
    n_rows = rows * heads
    m = torch.empty(n_rows * n_splits, device=q.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    acc = torch.empty(n_rows * n_splits, head_dim, device=q.device, dtype=torch.float32)
    dummy = torch.zeros(1, 1, 1, dtype=torch.int64, device=q.device)
    slots = dummy if dense else slots
    table = block_table if dense else dummy[0]
    lens = seq_lens if dense else dummy[0, 0]
    _run(_paged_decode_split_kernel, (n_rows, n_splits), q.device, cfg,
         q, k_cache, v_cache, slots, table, lens, m, lse, acc,
         heads, n_keep, head_dim, group, idx_div, block_size, split_size, n_splits, scale,
         *q.stride(), *k_cache.stride(), *v_cache.stride(), *slots.stride(), *table.stride())
    out = torch.empty(n_rows, head_dim, device=q.device, dtype=torch.float32)
    _run(_sparse_decode_combine_kernel, (n_rows,), q.device, _combine_config(head_dim),
         m, lse, acc, out, n_splits, head_dim)
    return out.view(rows, heads, head_dim).to(q.dtype)


def paged_sparse_decode_triton(q, k_cache, v_cache, slots, scale: float) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.paged_sparse_decode_attention`."""
    return _decode(q, k_cache, v_cache, slots, None, None, scale, slots.shape[2], dense=False)


def paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale: float, max_len: int) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.paged_decode_attention` (dense over each request's tokens)."""
    return _decode(q, k_cache, v_cache, None, block_table, seq_lens, scale, max_len, dense=True)


def update_page_bounds_triton(kmin, kmax, key, slot_mapping, page_size: int) -> None:
    """Launcher for :func:`tokprune.ops.update_paged_page_bounds`: a reset pass for the pages whose first
    token is written, then atomic min/max of every written key (stream-ordered). fp32 bounds only (Triton
    has no 16-bit float atomics); other dtypes take the torch path, which runs on any device."""
    if kmin.dtype != torch.float32:
        from tokprune.ops.paged import update_paged_page_bounds

        update_paged_page_bounds(kmin, kmax, key, slot_mapping, page_size, backend="torch")
        return
    n_tokens, kv_heads, head_dim = key.shape
    pages_per_block = kmin.shape[2]
    cfg = _bounds_config(head_dim)
    _run(_reset_pages_kernel, (n_tokens, kv_heads), key.device, cfg,
         slot_mapping, kmin, kmax, kv_heads, head_dim, page_size, pages_per_block)
    _run(_fold_pages_kernel, (n_tokens, kv_heads), key.device, cfg,
         key, slot_mapping, kmin, kmax, kv_heads, head_dim, page_size, pages_per_block, *key.stride())


def paged_quest_scores_triton(q, kmin, kmax, block_table, seq_lens, page_size: int, width: int) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.paged_quest_scores`; ``(R, Hq, width)`` fp32."""
    rows, heads, head_dim = q.shape
    kv_heads, pages_per_block = kmin.shape[1], kmin.shape[2]
    out = torch.empty(rows, heads, width, device=q.device, dtype=torch.float32)
    cfg = _quest_config(head_dim)
    grid = (triton.cdiv(width, cfg.constexprs["BLOCK_P"]), heads, rows)
    _run(_paged_quest_scores_kernel, grid, q.device, cfg,
         q, kmin, kmax, block_table, seq_lens, out,
         kv_heads, width, head_dim, heads // kv_heads, page_size, pages_per_block,
         *q.stride(), *block_table.stride(), *out.stride())
    return out


_HEAD_DIMS = (16, 32, 64, 128, 256)


def _register() -> None:
    strides = lambda *names: {f"stride_{n}": "i64" for n in names}  # noqa: E731
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    write_configs = [_write_config(n) for n in (16, 32, 64, 128, 256)]
    score_configs = list({c.label(): c for c in (_scores_config(n) for n in (2, 32, 64, 128, 256))}.values())
    split_configs = [_split_config(d, dense) for d in _HEAD_DIMS for dense in (False, True)]
    bounds_configs = [_bounds_config(d) for d in _HEAD_DIMS]
    for elem, index, modes in type_variants(with_index=True, wide=("bf16",)):
        # index = the dtype of slot_mapping / slots / block_table / seq_lens (int32 or int64 in the ops)
        sig = {"key_ptr": f"*{elem}", "slot_ptr": f"*{index}", "dims_ptr": "*i32", "fc_ptr": f"*{elem}",
               **ints("n_dims", "block_size"), **strides("kt", "kh", "kd", "fb", "fh", "ft", "fd")}
        register_aot("paged", _write_fc_kernel, sig, write_configs, strides=modes,
                     unit=("stride_kd", "stride_fd"), variant=f"{elem},idx {index}")
        sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "qdims_ptr": "*i32", "kdims_ptr": "*i32",
               "table_ptr": f"*{index}", "lens_ptr": f"*{index}", "out_ptr": "*fp32",
               **ints("max_len", "n_dims", "group", "block_size"),
               **strides("qr", "qh", "qd", "kb", "kh", "kt", "kd", "tr", "tc", "or", "oh", "ot")}
        register_aot("paged", _paged_fc_scores_kernel, sig, score_configs, strides=modes,
                     unit=("stride_qd", "stride_kd", "stride_tc", "stride_ot"), variant=f"{elem},idx {index}")
        sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "v_ptr": f"*{elem}", "slots_ptr": "*i64",
               "table_ptr": f"*{index}", "lens_ptr": f"*{index}", "m_ptr": "*fp32", "l_ptr": "*fp32",
               "acc_ptr": "*fp32",
               **ints("n_heads", "n_keep", "head_dim", "group", "idx_div", "block_size", "split_size", "n_splits"),
               "scale": "fp32",
               **strides("qr", "qh", "qd", "kb", "kh", "kt", "kd", "vb", "vh", "vt", "vd", "sr", "sh", "sk",
                         "tr", "tc")}
        register_aot("paged", _paged_decode_split_kernel, sig, split_configs, strides=modes,
                     unit=("stride_qd", "stride_kd", "stride_vd", "stride_sk", "stride_tc"),
                     variant=f"{elem},idx {index}")
        sig = {"q_ptr": f"*{elem}", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32", "table_ptr": f"*{index}",
               "lens_ptr": f"*{index}", "out_ptr": "*fp32",
               **ints("kv_heads", "width", "head_dim", "group", "page_size", "pages_per_block"),
               **strides("qr", "qh", "qd", "tr", "tc", "or", "oh", "op")}
        register_aot("paged", _paged_quest_scores_kernel, sig, [_quest_config(d) for d in _HEAD_DIMS],
                     strides=modes, unit=("stride_qd", "stride_tc", "stride_op"), variant=f"{elem},idx {index}")
        sig = {"key_ptr": f"*{elem}", "slot_ptr": f"*{index}", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32",
               **ints("n_heads", "head_dim", "page_size", "pages_per_block"), **strides("kt", "kh", "kd")}
        register_aot("paged", _fold_pages_kernel, sig, bounds_configs, strides=modes, unit=("stride_kd",),
                     variant=f"{elem},idx {index}")
    for index in ("i32", "i64"):
        sig = {"slot_ptr": f"*{index}", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32",
               **ints("n_heads", "head_dim", "page_size", "pages_per_block")}
        register_aot("paged", _reset_pages_kernel, sig, bounds_configs, variant=f"idx {index}")
        sig = {"tok_ptr": "*i64", "table_ptr": f"*{index}", "out_ptr": "*i64",
               **ints("n_heads", "n_keep", "block_size"), **strides("tr", "tc")}
        register_aot("paged", _tokens_to_slots_kernel, sig, [_SLOTS_CONFIG], strides=("i32", "i64"),
                     unit=("stride_tc",), variant=f"idx {index}")


_register()
