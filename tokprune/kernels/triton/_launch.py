"""Launch helper shared by the Triton launchers: the tensor's device and CUDA's grid limits.

* Triton launches on the *current* CUDA device and its current stream. With a multi-GPU
  ``device_map`` the tensors of a layer may live on another device, so every launch runs inside
  ``torch.cuda.device(tensor.device)`` (:func:`device_guard`).
* CUDA grids allow ``2**31 - 1`` programs on axis 0 but only 65535 on axes 1 and 2. Launchers put
  the dimension that grows with the sequence (token blocks) on axis 0 and the bounded ones (heads,
  batch, splits) on axes 1 / 2; :func:`check_grid` turns anything larger into a clear error instead
  of a failed launch.
* Kernel faults are asynchronous: in debug mode (``TOKPRUNE_DEBUG=1``) or with
  ``TOKPRUNE_CUDA_SYNC=1`` every launch synchronises its device, so a fault is raised by the op that
  caused it (the same switch as the CUDA extension's launches, :func:`tokprune.kernels.cuda.sync_launches`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence, Tuple

import torch

#: Largest grid per axis (CUDA: x up to 2**31 - 1, y and z up to 65535).
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(grid: Sequence[int], what: str) -> Tuple[int, ...]:
    """``grid`` as a tuple after checking it against :data:`MAX_GRID`.

    Raises:
        ValueError: an axis exceeds CUDA's limit, naming ``what`` (the kernel) and the axis.
    """
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{what}: grid must have 1 to 3 axes, got {grid}")
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{what}: grid axis {axis} has {n} programs, more than CUDA's limit {limit}; "
                             f"the input is too large for one launch of this kernel")
    return grid


def token_grid(batch: int, heads: int, n_tokens: int, block: int) -> Tuple[int, int, int]:
    """Grid ``(token blocks, heads, batch)`` of the per-(batch, head) token kernels (gathers, scatters):
    the token axis, which grows with the sequence, gets axis 0 (up to 2**31 - 1 programs)."""
    return (-(-n_tokens // block), heads, batch)


def device_guard(device: torch.device):
    """Context manager making ``device`` the current CUDA device (nothing for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def sync_launches() -> bool:
    """Whether launches synchronise (debug mode or ``TOKPRUNE_CUDA_SYNC=1``)."""
    from tokprune._debug import debug_checks

    return debug_checks() or os.environ.get("TOKPRUNE_CUDA_SYNC", "0") not in ("", "0")


def launch(kernel, grid: Sequence[int], device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``device`` after :func:`check_grid`; synchronised when
    :func:`sync_launches` (a kernel fault then surfaces here, naming the kernel)."""
    fn = getattr(kernel, "fn", kernel)
    name = getattr(fn, "__name__", "triton kernel")
    grid = check_grid(grid, name)
    with device_guard(device):
        kernel[grid](*args, **kwargs)
        if device.type == "cuda" and sync_launches():
            try:
                torch.cuda.synchronize(device)
            except RuntimeError as exc:
                raise RuntimeError(f"Triton kernel {name} failed on {device} (grid {grid}): {exc}") from exc
