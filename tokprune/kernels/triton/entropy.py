"""Gram matrices for the matrix-entropy family (the eigendecomposition stays in torch, float64).

* ``_masked_gram_kernel``: for each batch element, the Gram matrix of ``Z = (X - mean) * scale``
  on the smaller side, fused with the centring and row normalisation (``Z`` is never materialised):
  tokens side ``G = Z Z^T / n`` (``N x N``) or features side ``G = Z^T Z / n`` (``D x D``).
  ``mean [B, D]``, ``scale [B, N]`` (0 for padded rows, ``1 / ||x_n - mean||`` when rows are
  normalised) and ``n [B]`` come from a cheap torch prologue.
* ``_token_gram_kernel``: EntropyPrune's per-token ``G_t = Z_t Z_t^T / H`` with ``Z_t`` the token's
  ``[H, d_h]`` per-head vectors centred across heads; one program per token.

Operands are upcast to fp32 before ``tl.dot`` (bf16 ``tl.dot`` is wrong under the interpreter) and the
products use IEEE fp32 (no TF32): small eigenvalues matter for the entropy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune.kernels.triton._launch import launch
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants


@triton.jit
def _masked_gram_kernel(
    x_ptr, mean_ptr, scale_ptr, count_ptr, out_ptr,
    m_size, k_size,
    stride_xb, stride_xm, stride_xk,
    stride_mb, stride_sb, stride_ob, stride_oi, stride_oj,
    TOKENS_SIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows of the Gram product are indexed by m (tokens when TOKENS_SIDE, features otherwise) and the
    # product contracts over k (features when TOKENS_SIDE, tokens otherwise).
    # Grid (batch, row blocks, column blocks): the batch, which has no bound, sits on axis 0.
    # Offsets are int64 before they meet a stride (strides below 2**31 arrive as i32).
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    pid_j = tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    in_i = offs_i < m_size
    in_j = offs_j < m_size
    x_base = x_ptr + b * stride_xb
    if TOKENS_SIDE:
        s_i = tl.load(scale_ptr + b * stride_sb + offs_i, mask=in_i, other=0.0)
        s_j = tl.load(scale_ptr + b * stride_sb + offs_j, mask=in_j, other=0.0)
    else:
        mu_i = tl.load(mean_ptr + b * stride_mb + offs_i, mask=in_i, other=0.0)
        mu_j = tl.load(mean_ptr + b * stride_mb + offs_j, mask=in_j, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = offs_k < k_size
        mask_i = in_i[:, None] & in_k[None, :]
        mask_j = in_j[:, None] & in_k[None, :]
        a = tl.load(x_base + offs_i[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_i, other=0.0)
        c = tl.load(x_base + offs_j[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_j, other=0.0)
        a = a.to(tl.float32)
        c = c.to(tl.float32)
        if TOKENS_SIDE:
            mu_k = tl.load(mean_ptr + b * stride_mb + offs_k, mask=in_k, other=0.0)
            a = tl.where(mask_i, (a - mu_k[None, :]) * s_i[:, None], 0.0)
            c = tl.where(mask_j, (c - mu_k[None, :]) * s_j[:, None], 0.0)
        else:
            s_k = tl.load(scale_ptr + b * stride_sb + offs_k, mask=in_k, other=0.0)
            a = tl.where(mask_i, (a - mu_i[:, None]) * s_k[None, :], 0.0)
            c = tl.where(mask_j, (c - mu_j[:, None]) * s_k[None, :], 0.0)
        acc += tl.dot(a, tl.trans(c), input_precision="ieee")
    n = tl.load(count_ptr + b)
    acc = acc / tl.maximum(n, 1.0)
    out = out_ptr + b * stride_ob + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    tl.store(out, acc, mask=in_i[:, None] & in_j[None, :])


@triton.jit
def _token_gram_kernel(
    x_ptr, out_ptr,
    n_heads, head_dim,
    stride_xt, stride_xh, stride_xd,
    stride_ot, stride_oi, stride_oj,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)  # int64 before meeting a stride
    in_h = offs_h < n_heads
    acc = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_h[:, None] & (offs_d[None, :] < head_dim)
        v = tl.load(x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd,
                    mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / n_heads
        z = tl.where(mask, v - mean[None, :], 0.0)
        acc += tl.dot(z, tl.trans(z), input_precision="ieee")
    acc = acc / n_heads
    out = out_ptr + t * stride_ot + offs_h[:, None] * stride_oi + offs_h[None, :] * stride_oj
    tl.store(out, acc, mask=in_h[:, None] & in_h[None, :])


# ---------------------------------------------------------------------------------------------------
# launch configurations (every one the launchers can pick is registered for the AOT check)
MAX_TOKEN_HEADS = 64


def _gram_config(m_size: int) -> LaunchConfig:
    block_m = 32 if m_size <= 32 else 64
    return LaunchConfig({"BLOCK_M": block_m, "BLOCK_K": 32}, num_warps=4 if block_m == 32 else 8, num_stages=2)


def _token_config(n_heads: int) -> LaunchConfig:
    block_h = max(16, triton.next_power_of_2(n_heads))
    return LaunchConfig({"BLOCK_H": block_h, "BLOCK_D": 64 if block_h <= 32 else 32}, num_warps=4, num_stages=2)


def masked_gram_triton(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, count: torch.Tensor,
                       *, tokens_side: bool) -> torch.Tensor:
    """Gram matrix of ``Z = (x - mean[:, None]) * scale[..., None]`` divided by ``count``.

    Args:
        x: ``(batch, n_tokens, dim)`` fp32/fp16/bf16 (validated by the op).
        mean: ``(batch, dim)`` fp32; scale: ``(batch, n_tokens)`` fp32; count: ``(batch,)`` fp32.
        tokens_side: ``True`` -> ``(batch, n_tokens, n_tokens)``, else ``(batch, dim, dim)``.

    Returns:
        fp32 Gram matrices.
    """
    batch, n_tokens, dim = x.shape
    mean = mean.contiguous()
    scale = scale.contiguous()
    count = count.contiguous()
    if tokens_side:
        m_size, k_size, s_m, s_k = n_tokens, dim, x.stride(1), x.stride(2)
    else:
        m_size, k_size, s_m, s_k = dim, n_tokens, x.stride(2), x.stride(1)
    out = torch.empty(batch, m_size, m_size, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    cfg = _gram_config(m_size)
    block_m = cfg.constexprs["BLOCK_M"]
    grid = (batch, triton.cdiv(m_size, block_m), triton.cdiv(m_size, block_m))
    launch(_masked_gram_kernel, grid, x.device,
           x, mean, scale, count, out, m_size, k_size,
           x.stride(0), s_m, s_k, mean.stride(0), scale.stride(0), *out.stride(),
           TOKENS_SIDE=tokens_side, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def token_gram_triton(x: torch.Tensor) -> torch.Tensor:
    """Per-token head Gram matrices: ``x (tokens, heads, head_dim)`` -> ``(tokens, heads, heads)`` fp32,
    ``G_t = Z_t Z_t^T / heads`` with ``Z_t`` centred across heads.

    Raises:
        ValueError: more than 64 heads (one program holds the whole ``H x H`` tile).
    """
    n_tok, heads, head_dim = x.shape
    if heads > MAX_TOKEN_HEADS:
        raise ValueError(f"the Triton token Gram kernel supports at most {MAX_TOKEN_HEADS} heads, got {heads}; "
                         f"use backend='torch'")
    out = torch.empty(n_tok, heads, heads, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    cfg = _token_config(heads)
    launch(_token_gram_kernel, (n_tok,), x.device,
           x, out, heads, head_dim, *x.stride(), *out.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _register() -> None:
    for dtype, _, modes in type_variants(with_index=False, wide=("bf16",)):  # x is converted to fp32
        sig = {"x_ptr": f"*{dtype}", "mean_ptr": "*fp32", "scale_ptr": "*fp32", "count_ptr": "*fp32",
               "out_ptr": "*fp32", "m_size": "i32", "k_size": "i32"}
        sig.update({f"stride_{s}": "i64" for s in ("xb", "xm", "xk", "mb", "sb", "ob", "oi", "oj")})
        for tokens_side in (True, False):
            configs = []
            for m_size in (16, 576):
                base = _gram_config(m_size)
                configs.append(LaunchConfig({"TOKENS_SIDE": tokens_side, **base.constexprs},
                                            num_warps=base.num_warps, num_stages=base.num_stages))
            # x's last dimension (features) is contiguous: it is the contracted side k on the tokens side.
            unit = ("stride_xk" if tokens_side else "stride_xm", "stride_oj")
            register_aot("entropy", _masked_gram_kernel, sig, configs, strides=modes, unit=unit, variant=dtype)

        sig = {"x_ptr": f"*{dtype}", "out_ptr": "*fp32", "n_heads": "i32", "head_dim": "i32"}
        sig.update({f"stride_{s}": "i64" for s in ("xt", "xh", "xd", "ot", "oi", "oj")})
        register_aot("entropy", _token_gram_kernel, sig, [_token_config(h) for h in (2, 32, 64)], strides=modes,
                     unit=("stride_xd", "stride_oj"), variant=dtype)


_register()
