"""Linear layers for a few rows (speculative tree forwards on the CPU).

:func:`small_m_linear` computes ``x @ weight.T (+ bias)`` like ``torch.nn.functional.linear``. With
backend ``"cuda"`` (the host build of ``tokprune._C``; fp32 CPU tensors only) each weight row is read
from memory once and reused for every row of ``x``, which for 2..16 rows beats a GEMM library that packs
the weights on every call. Other dtypes and devices run ``F.linear``. The kernel uses the widest of
AVX-512F / AVX2+FMA / SSE2 the CPU has; ``TOKPRUNE_LINEAR_ISA=avx2`` or ``base`` (read once per process)
caps it, e.g. to test the narrower variants.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from tokprune._backend import resolve_backend
from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

_OP = "small_m_linear"


def _backend(backend, x, weight, bias):
    fast = (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32))
    if backend in (None, "auto") and not os.environ.get("TOKPRUNE_BACKEND"):
        if fast:
            from tokprune._backend import unavailable_reason

            if unavailable_reason("cuda", x.device, _OP) is None:
                return "cuda"
        return "torch"
    chosen = resolve_backend(backend, x.device, ("torch", "cuda") if fast else ("torch",), _OP)
    return chosen


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   num_threads: Optional[int] = None, backend: Optional[str] = "auto") -> torch.Tensor:
    """``y = x @ weight.T + bias`` for a small number of rows.

    Args:
        x: ``(..., K)`` float32 / float16 / bfloat16; any strides (the ``"cuda"`` backend copies a
            non-contiguous last dimension, and leading dimensions that cannot be flattened to rows).
        weight: ``(N, K)``, same dtype and device as ``x``.
        bias: ``(N,)`` or ``None``, same dtype and device as ``x``.
        num_threads: threads of the ``"cuda"`` (host) backend; ``None`` -> ``torch.get_num_threads()``.
            Results do not depend on it.
        backend: ``"auto" | "torch" | "cuda"``. ``"cuda"`` is the host (CPU) kernel of ``tokprune._C``,
            fp32 only; ``"auto"`` picks it for fp32 CPU inputs when the extension is built, else torch
            (``F.linear``).

    Returns:
        ``(..., N)`` in x's dtype. The kernel sums in a different order than ``F.linear`` (results agree
        to fp32 rounding); a row's result does not depend on how many rows are passed with it.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, {x.shape[-1]}) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) like weight's rows, got {tuple(bias.shape)}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    if _backend(backend, x, weight, bias) == "torch":
        return F.linear(x, weight, bias)
    from tokprune.kernels.cuda import small_m_linear_host

    rows = x.reshape(-1, x.shape[-1])
    y = small_m_linear_host(rows, weight, bias, num_threads or torch.get_num_threads())
    return y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["small_m_linear"]
