"""Input checks shared by the public ops. Every error names the argument and what was expected.

Metadata checks (type, shape, dtype, device) always run. Checks that read tensor values (finiteness,
index ranges) run only in debug mode (:func:`tokprune._debug.debug_checks`, ``TOKPRUNE_DEBUG=1``): on a
GPU each one is a host synchronisation and a graph break under ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tokprune._debug import debug_checks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    x,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {x.device}")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    """``x`` must not contain NaN (debug mode only: it reads the data)."""
    if debug_checks() and x.is_floating_point() and x.numel() and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")


def check_index(name: str, index: torch.Tensor, upper: int) -> None:
    """``index`` must be an integer tensor (always checked) with values in ``[0, upper)`` (debug mode only)."""
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if debug_checks() and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{name} values must lie in [0, {upper}), got range [{lo}, {hi}]")
