"""Fused gather (compress) and scatter (decompress) kernels of token sparse attention.

``compress``: one launch gathers the selected rows of Q, K and V for every (batch, query head)::

    qc[b, h, j] = q[b, h, idx[b, h, j]]
    kc[b, h, j] = k[b, h // group, idx[b, h, j]]      (GQA: KV heads are never expanded)
    vc[b, h, j] = v[b, h // group, idx[b, h, j]]

``decompress``: ``out[b, h, idx[b, h, j]] = oc[b, h, j]``; the other rows of ``out`` keep what the
launcher wrote there first (zeros, or a caller-given fill). Index sets within a (b, h) are distinct,
so the scatter has no write conflicts. All pointers are addressed through strides, so HF's
``(B, N, H, D)``-backed views work without copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune.kernels.triton._launch import launch, token_grid
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants


@triton.jit
def _compress_qkv_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, qc_ptr, kc_ptr, vc_ptr,
    n_keep, head_dim, group,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_cb, stride_ch, stride_ck, stride_cd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Every offset is int64 before it meets a stride: at run time strides below 2**31 arrive as i32 and
    # tl.program_id is i32, so an i32 product would wrap for tensors past 2**31 elements.
    # Grid (blocks of kept tokens, heads, batch): see tokprune.kernels.triton._launch.token_grid.
    pid_k = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hkv = h // group
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_keep
    rows = tl.load(idx_ptr + b * stride_ib + h * stride_ih + offs_k * stride_ik, mask=mask_k, other=0)
    rows = rows.to(tl.int64)[:, None]
    q_base = q_ptr + b * stride_qb + h * stride_qh + rows * stride_qn
    k_base = k_ptr + b * stride_kb + hkv * stride_kh + rows * stride_kn
    v_base = v_ptr + b * stride_vb + hkv * stride_vh + rows * stride_vn
    c_off = b * stride_cb + h * stride_ch + offs_k[:, None] * stride_ck
    for d0 in range(0, head_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_k[:, None] & (offs_d[None, :] < head_dim)
        tl.store(qc_ptr + c_off + offs_d[None, :] * stride_cd,
                 tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask), mask=mask)
        tl.store(kc_ptr + c_off + offs_d[None, :] * stride_cd,
                 tl.load(k_base + offs_d[None, :] * stride_kd, mask=mask), mask=mask)
        tl.store(vc_ptr + c_off + offs_d[None, :] * stride_cd,
                 tl.load(v_base + offs_d[None, :] * stride_vd, mask=mask), mask=mask)


@triton.jit
def _decompress_kernel(
    src_ptr, idx_ptr, out_ptr,
    n_keep, head_dim,
    stride_sb, stride_sh, stride_sk, stride_sd,
    stride_ib, stride_ih, stride_ik,
    stride_ob, stride_oh, stride_on, stride_od,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0).to(tl.int64)  # grid and int64 offsets as in _compress_qkv_kernel
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_keep
    rows = tl.load(idx_ptr + b * stride_ib + h * stride_ih + offs_k * stride_ik, mask=mask_k, other=0)
    s_base = src_ptr + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk
    o_base = out_ptr + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_on
    for d0 in range(0, head_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_k[:, None] & (offs_d[None, :] < head_dim)
        vals = tl.load(s_base + offs_d[None, :] * stride_sd, mask=mask)
        tl.store(o_base + offs_d[None, :] * stride_od, vals, mask=mask)


_BLOCK_D = 64


def _launch_config(n_keep: int) -> LaunchConfig:
    """One place that picks block sizes: small index sets get small blocks (less masked work)."""
    block_k = 16 if n_keep <= 16 else 32
    # One warp per 4 gathered rows keeps registers low (64-bit row addresses for three tensors);
    # BLOCK_K=64 spilled in the fused Q/K/V gather, so larger index sets use more programs instead.
    return LaunchConfig({"BLOCK_K": block_k, "BLOCK_D": _BLOCK_D}, num_warps=max(4, block_k // 4), num_stages=1)


def compress_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor):
    """Triton launcher; inputs validated by :func:`tokprune.ops.compress_qkv`.

    Returns three contiguous ``(B, H, K, D)`` tensors in the dtype of ``q``.
    """
    batch, heads, n_keep = indices.shape
    head_dim = q.shape[-1]
    qc = torch.empty(batch, heads, n_keep, head_dim, device=q.device, dtype=q.dtype)
    kc, vc = torch.empty_like(qc), torch.empty_like(qc)
    if qc.numel() == 0:
        return qc, kc, vc
    cfg = _launch_config(n_keep)
    launch(_compress_qkv_kernel, token_grid(batch, heads, n_keep, cfg.constexprs["BLOCK_K"]), q.device,
           q, k, v, indices, qc, kc, vc,
           n_keep, head_dim, heads // k.shape[1],
           *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *qc.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return qc, kc, vc


def decompress_triton(src: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Scatter ``src (B, H, K, D)`` rows into the pre-filled ``out (B, H, N, D)`` (any strides)."""
    batch, heads, n_keep = indices.shape
    if src.numel() == 0:
        return out
    cfg = _launch_config(n_keep)
    launch(_decompress_kernel, token_grid(batch, heads, n_keep, cfg.constexprs["BLOCK_K"]), src.device,
           src, indices, out,
           n_keep, src.shape[-1],
           *src.stride(), *indices.stride(), *out.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _register() -> None:
    configs = [_launch_config(n) for n in (1, 1024)]  # every block size the launcher can pick
    for elem, index, modes in type_variants(with_index=True):
        sig = {name: f"*{elem}" for name in ("q_ptr", "k_ptr", "v_ptr")}
        sig["idx_ptr"] = f"*{index}"
        sig.update({name: f"*{elem}" for name in ("qc_ptr", "kc_ptr", "vc_ptr")})
        sig.update({name: "i32" for name in ("n_keep", "head_dim", "group")})
        for t in ("q", "k", "v"):
            sig.update({f"stride_{t}{s}": "i64" for s in "bhnd"})
        sig.update({f"stride_i{s}": "i64" for s in "bhk"})
        sig.update({f"stride_c{s}": "i64" for s in "bhkd"})
        register_aot("token_sparse", _compress_qkv_kernel, sig, configs, strides=modes,
                     unit=("stride_qd", "stride_kd", "stride_vd", "stride_ik", "stride_cd"),
                     variant=f"{elem},idx {index}")

        sig = {"src_ptr": f"*{elem}", "idx_ptr": f"*{index}", "out_ptr": f"*{elem}"}
        sig.update({name: "i32" for name in ("n_keep", "head_dim")})
        sig.update({f"stride_s{s}": "i64" for s in "bhkd"})
        sig.update({f"stride_i{s}": "i64" for s in "bhk"})
        sig.update({f"stride_o{s}": "i64" for s in "bhnd"})
        register_aot("token_sparse", _decompress_kernel, sig, configs, strides=modes,
                     unit=("stride_sd", "stride_ik", "stride_od"), variant=f"{elem},idx {index}")


_register()
