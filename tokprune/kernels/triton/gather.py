"""Row gather along the token axis with per-(batch, head) index sets.

``out[b, h, k, :] = x[b, h // group, index[b, h, k], :]`` where ``group = H_index / H_x`` lets several
query heads read one KV head (GQA) without expanding it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune.kernels.triton._launch import launch, token_grid
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants


@triton.jit
def _gather_tokens_kernel(
    x_ptr, index_ptr, out_ptr,
    n_keep, head_dim, group,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ib, stride_ih, stride_ik,
    stride_ob, stride_oh, stride_ok, stride_od,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Every offset is int64 before it meets a stride: at run time strides below 2**31 arrive as i32 and
    # tl.program_id is i32, so an i32 product would wrap for tensors past 2**31 elements.
    # Grid (blocks of kept tokens, heads, batch): see token_grid.
    pid_k = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_keep
    rows = tl.load(index_ptr + b * stride_ib + h * stride_ih + offs_k * stride_ik, mask=mask_k, other=0)
    x_base = x_ptr + b * stride_xb + (h // group) * stride_xh + rows.to(tl.int64)[:, None] * stride_xn
    o_base = out_ptr + b * stride_ob + h * stride_oh + offs_k[:, None] * stride_ok
    for d0 in range(0, head_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_k[:, None] & (offs_d[None, :] < head_dim)
        vals = tl.load(x_base + offs_d[None, :] * stride_xd, mask=mask)
        tl.store(o_base + offs_d[None, :] * stride_od, vals, mask=mask)


_BLOCK_D = 64


def _launch_config(n_keep: int) -> LaunchConfig:
    block_k = 16 if n_keep <= 16 else 32
    return LaunchConfig({"BLOCK_K": block_k, "BLOCK_D": _BLOCK_D}, num_warps=4, num_stages=1)


def gather_tokens_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton launcher; inputs already validated by :func:`tokprune.ops.gather_tokens`."""
    batch, n_heads, n_keep = index.shape
    head_dim = x.shape[-1]
    out = torch.empty(batch, n_heads, n_keep, head_dim, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    cfg = _launch_config(n_keep)
    launch(_gather_tokens_kernel, token_grid(batch, n_heads, n_keep, cfg.constexprs["BLOCK_K"]), x.device,
           x, index, out,
           n_keep, head_dim, n_heads // x.shape[1],
           *x.stride(), *index.stride(), *out.stride(),
           **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _register() -> None:
    configs = [_launch_config(n_keep) for n_keep in (1, 1024)]
    for elem, index, modes in type_variants(with_index=True):
        sig = {"x_ptr": f"*{elem}", "index_ptr": f"*{index}", "out_ptr": f"*{elem}"}
        sig.update({name: "i32" for name in ("n_keep", "head_dim", "group")})
        sig.update({f"stride_{s}": "i64" for s in ("xb", "xh", "xn", "xd", "ib", "ih", "ik", "ob", "oh", "ok", "od")})
        register_aot("common", _gather_tokens_kernel, sig, configs, strides=modes,
                     unit=("stride_xd", "stride_ik", "stride_od"), variant=f"{elem},idx {index}")


_register()
