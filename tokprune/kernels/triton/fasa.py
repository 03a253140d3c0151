"""Triton kernels for FASA: frequency-chunk scoring and split-K sparse decode attention.

``_fc_scores_kernel``: one program per (block of tokens, KV head group or query head, batch); reads only
the FC dimensions of the keys (a per-head dimension table, the identity table for the packed layout), once
for all query heads of a group when the group shares its FCs, and writes fp32 partial logits.

Sparse decode attention is split over the selected tokens (flash-decoding): ``_sparse_decode_split_kernel``
runs an online softmax over one slice of the index list per program and writes its running max ``m``, sum
``l`` and unnormalised output; ``_sparse_decode_combine_kernel`` rescales the slices by
``exp(m_i - max m)`` and normalises. A split program serves every query head that shares its index row
(the whole GQA group when the indices are per KV head, FASA's case), in chunks of ``BLOCK_G`` heads, so
each selected K/V row is read once per KV head instead of once per query head. Dot products use
elementwise multiply + sum (a few query rows), so no ``tl.dot`` is needed (the interpreter's bf16
``tl.dot`` is broken); all math is fp32.

Grids keep the growing dimension on axis 0 (token blocks for ``fc_scores``, index rows for the decode)
and launch on the tensors' device (:mod:`tokprune.kernels.triton._launch`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokprune.kernels.triton._launch import launch
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants


@triton.jit
def _fc_scores_kernel(
    q_ptr, k_ptr, qdims_ptr, kdims_ptr, out_ptr,
    n_tokens, n_dims, group, heads_per_prog,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_ob, stride_oh, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (token blocks, head groups, batch): see fc_scores_grid. A program scores heads_per_prog
    # query heads that read the same key columns (the whole GQA group when the FC dims are shared by
    # the group, FASA's case; one head otherwise), so each key tile is loaded once for all of them.
    # Program ids, offsets and dims are int64 before any stride product: at run time strides below
    # 2**31 arrive as i32, and an i32 product wraps past 2**31 elements.
    pid_t = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1).to(tl.int64) * heads_per_prog
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_dims
    qd = tl.load(qdims_ptr + h0 * n_dims + offs_n, mask=mask_n, other=0).to(tl.int64)
    kd = tl.load(kdims_ptr + h0 * n_dims + offs_n, mask=mask_n, other=0).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    k_base = k_ptr + b * stride_kb + (h0 // group) * stride_kh
    k = tl.load(k_base + offs_t[:, None] * stride_kt + kd[None, :] * stride_kd,
                mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    for g in range(0, heads_per_prog):
        h = h0 + g
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + qd * stride_qd, mask=mask_n, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_t * stride_ot, s, mask=mask_t)


def _fc_config(n_dims: int) -> LaunchConfig:
    block_n = max(16, triton.next_power_of_2(n_dims))
    block_t = min(128, max(16, 4096 // block_n))
    return LaunchConfig({"BLOCK_T": block_t, "BLOCK_N": block_n}, num_warps=4, num_stages=1)


def fc_scores_grid(batch: int, heads: int, n_tokens: int, block_t: int, heads_per_prog: int = 1) -> tuple:
    """Grid of ``_fc_scores_kernel``: ``(token blocks, heads / heads_per_prog, batch)``; the token axis,
    the one that grows with the context, sits on axis 0 (up to 2**31 - 1 programs)."""
    return (triton.cdiv(n_tokens, block_t), heads // heads_per_prog, batch)


def fc_scores_triton(q: torch.Tensor, k_cache: torch.Tensor, dims: torch.Tensor, packed: bool) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.fc_scores` (inputs validated there). ``dims (Hkv or H, nd)``."""
    batch, heads, _, _ = q.shape
    kv_heads, n_tokens = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    n_dims = dims.shape[1]
    head_rows = torch.arange(heads, device=q.device) // (group if dims.shape[0] == kv_heads else 1)
    qdims = dims[head_rows].to(torch.int32).contiguous()
    if packed:
        kdims = torch.arange(n_dims, device=q.device, dtype=torch.int32).expand(heads, -1).contiguous()
    else:
        kdims = qdims
    out = torch.empty(batch, heads, n_tokens, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if n_dims == 0:
        return out.zero_()
    cfg = _fc_config(n_dims)
    # FC dims shared by a KV head's group (always so when packed): one program serves the group.
    heads_per_prog = group if dims.shape[0] == kv_heads else 1
    launch(_fc_scores_kernel, fc_scores_grid(batch, heads, n_tokens, cfg.constexprs["BLOCK_T"], heads_per_prog),
           q.device,
           q, k_cache, qdims, kdims, out,
           n_tokens, n_dims, group, heads_per_prog,
           q.stride(0), q.stride(1), q.stride(3),
           *k_cache.stride(), *out.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr,
    n_idx_heads, n_keep, head_dim, heads_per_row, group, split_size, n_splits, scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ib, stride_ih, stride_ik,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (index rows, splits, head chunks). Index row r = b * n_idx_heads + ih is shared by the
    # heads_per_row query heads ih * heads_per_row + g (all of them read KV head h // group); this
    # program serves BLOCK_G of them, so a selected K/V row is loaded once for BLOCK_G heads.
    # Everything that meets a stride is int64 (strides below 2**31 arrive as i32).
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    b = row // n_idx_heads
    ih = row % n_idx_heads
    offs_g = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_g = offs_g < heads_per_row
    h0 = ih * heads_per_row
    kvh = h0 // group
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + (h0 + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = sp * split_size
    end = tl.minimum(start + split_size, n_keep)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    i_base = idx_ptr + b * stride_ib + ih * stride_ih
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        idx = tl.load(i_base + offs_k.to(tl.int64) * stride_ik, mask=mask_k, other=-1)
        ok = mask_k & (idx >= 0)
        rows = tl.where(ok, idx, 0).to(tl.int64)
        tile_mask = ok[:, None] & mask_d[None, :]
        kt = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=tile_mask,
                     other=0.0).to(tl.float32)  # [K, D], read once for the G heads
        s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2) * scale  # [G, K]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        vt = tl.load(v_base + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=tile_mask,
                     other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new
    slot = (row * heads_per_row + offs_g) * n_splits + sp  # (query row b * H + h) * n_splits + split
    tl.store(m_ptr + slot, m_i, mask=mask_g)
    tl.store(l_ptr + slot, l_i, mask=mask_g)
    tl.store(acc_ptr + slot[:, None] * head_dim + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _sparse_decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    n_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    m = tl.load(m_ptr + pid * n_splits + offs_s, mask=mask_s, other=float("-inf"))
    l = tl.load(l_ptr + pid * n_splits + offs_s, mask=mask_s, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)
    total = tl.sum(l * w, axis=0)
    rows = pid * n_splits + offs_s
    acc = tl.load(acc_ptr + rows[:, None] * head_dim + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                  other=0.0)
    o = tl.sum(acc * w[:, None], axis=0)
    denom = tl.where(total > 0, total, 1.0)
    o = tl.where(total > 0, o / denom, 0.0)
    tl.store(out_ptr + pid * head_dim + offs_d, o, mask=mask_d)


_MAX_SPLITS = 64
_GROUP_BLOCK = 4  # query heads per split program when several heads share an index row
_DEFAULT_SMS = 132  # plan for an H100 when the device cannot be asked (CPU tensors, interpreter)


def _split_config(head_dim: int, block_g: int = 1) -> LaunchConfig:
    """Block sizes of the split kernel: the ``[G, K, D]`` products hold at most 4096 fp32 values
    (32 a thread with 4 warps; larger tiles spilled in the AOT check)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_k = max(4, min(32, 4096 // (block_g * block_d)))
    return LaunchConfig({"BLOCK_G": block_g, "BLOCK_K": block_k, "BLOCK_D": block_d}, num_warps=4, num_stages=1)


def _combine_config(head_dim: int) -> LaunchConfig:
    block_d = max(16, triton.next_power_of_2(head_dim))
    return LaunchConfig({"BLOCK_S": _MAX_SPLITS, "BLOCK_D": block_d}, num_warps=4, num_stages=1)


def split_plan(n_keep: int, block_k: int, programs: int = 1, n_sms: int = 0) -> tuple:
    """``(n_splits, split_size)``: slices of the index list, each a multiple of ``block_k``, at most 64.

    ``programs`` is the number of programs per split (index rows x head chunks: batch x heads).
    With ``n_sms > 0`` the plan asks for no more splits than needed to give every SM about four
    programs: when batch x heads already fills the GPU, splitting only adds combine work.
    ``n_sms = 0`` splits as finely as allowed (64 slices).
    """
    n_blocks = max(1, triton.cdiv(n_keep, block_k))
    n_splits = min(_MAX_SPLITS, n_blocks)
    if n_sms > 0:
        n_splits = max(1, min(n_splits, triton.cdiv(4 * n_sms, max(programs, 1))))
    split_size = triton.cdiv(n_blocks, n_splits) * block_k
    return triton.cdiv(max(n_keep, 1), split_size), split_size


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def sparse_decode_grid(batch: int, n_idx_heads: int, heads_per_row: int, n_splits: int, block_g: int) -> tuple:
    """Grid of ``_sparse_decode_split_kernel``: ``(index rows, splits, head chunks)``; the index rows
    (batch x index heads) sit on axis 0 (up to 2**31 - 1), splits (<= 64) and head chunks on 1 / 2."""
    return (batch * n_idx_heads, n_splits, triton.cdiv(heads_per_row, block_g))


def sparse_decode_attention_triton(q, k_cache, v_cache, indices, scale: float) -> torch.Tensor:
    """Launcher for :func:`tokprune.ops.sparse_decode_attention` (inputs validated there)."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    n_idx_heads, n_keep = indices.shape[1], indices.shape[2]
    heads_per_row = heads // n_idx_heads  # the GQA group when indices are per KV head, else 1
    if n_keep == 0 or q.numel() == 0:
        return torch.zeros_like(q)
    cfg = _split_config(head_dim, 1 if heads_per_row == 1 else _GROUP_BLOCK)
    block_g = cfg.constexprs["BLOCK_G"]
    programs = batch * n_idx_heads * triton.cdiv(heads_per_row, block_g)
    n_splits, split_size = split_plan(n_keep, cfg.constexprs["BLOCK_K"], programs, _sm_count(q.device))
    rows = batch * heads
    m = torch.empty(rows * n_splits, device=q.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    acc = torch.empty(rows * n_splits, head_dim, device=q.device, dtype=torch.float32)
    launch(_sparse_decode_split_kernel, sparse_decode_grid(batch, n_idx_heads, heads_per_row, n_splits, block_g),
           q.device,
           q, k_cache, v_cache, indices, m, lse, acc,
           n_idx_heads, n_keep, head_dim, heads_per_row, group, split_size, n_splits, scale,
           q.stride(0), q.stride(1), q.stride(3),
           *k_cache.stride(), *v_cache.stride(), *indices.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty(rows, head_dim, device=q.device, dtype=torch.float32)
    ccfg = _combine_config(head_dim)
    launch(_sparse_decode_combine_kernel, (rows,), q.device,
           m, lse, acc, out, n_splits, head_dim,
           **ccfg.constexprs, num_warps=ccfg.num_warps, num_stages=ccfg.num_stages)
    return out.view(batch, heads, 1, head_dim).to(q.dtype)


_HEAD_DIMS = (16, 32, 64, 128, 256)


def _register() -> None:
    fc_configs = list({c.label(): c for c in (_fc_config(n) for n in (2, 32, 64, 128, 256))}.values())
    split_configs = [_split_config(d, g) for g in (1, _GROUP_BLOCK) for d in _HEAD_DIMS]
    strides = lambda *names: {f"stride_{n}": "i64" for n in names}  # noqa: E731
    for elem, _, modes in type_variants(with_index=False, wide=("bf16",)):
        sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "qdims_ptr": "*i32", "kdims_ptr": "*i32",
               "out_ptr": "*fp32", "n_tokens": "i32", "n_dims": "i32", "group": "i32", "heads_per_prog": "i32"}
        sig.update(strides("qb", "qh", "qd", "kb", "kh", "kt", "kd", "ob", "oh", "ot"))
        register_aot("fasa", _fc_scores_kernel, sig, fc_configs, strides=modes,
                     unit=("stride_qd", "stride_kd", "stride_ot"), variant=elem)
    for elem, index, modes in type_variants(with_index=True, wide=("bf16",)):
        sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "v_ptr": f"*{elem}", "idx_ptr": f"*{index}",
               "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
        sig.update({n: "i32" for n in ("n_idx_heads", "n_keep", "head_dim", "heads_per_row", "group",
                                       "split_size", "n_splits")})
        sig["scale"] = "fp32"
        sig.update(strides("qb", "qh", "qd", "kb", "kh", "kt", "kd", "vb", "vh", "vt", "vd", "ib", "ih", "ik"))
        register_aot("fasa", _sparse_decode_split_kernel, sig, split_configs, strides=modes,
                     unit=("stride_qd", "stride_kd", "stride_vd", "stride_ik"), variant=f"{elem},idx {index}")
    sig = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*fp32",
           "n_splits": "i32", "head_dim": "i32"}
    register_aot("fasa", _sparse_decode_combine_kernel, sig, [_combine_config(d) for d in _HEAD_DIMS])


_register()
