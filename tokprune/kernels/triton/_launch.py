"""Launch helper shared by the Triton launchers: the tensor's device and CUDA's grid limits.

* Triton launches on the *current* CUDA device and its current stream. With a multi-GPU
  ``device_map`` the tensors of a layer may live on another device, so every launch runs inside
  ``torch.cuda.device(tensor.device)`` (:func:`device_guard`).
* CUDA grids allow ``2**31 - 1`` programs on axis 0 but only 65535 on axes 1 and 2. Launchers put
  the dimension that grows with the sequence (token blocks) on axis 0 and the bounded ones (heads,
  batch, splits) on axes 1 / 2; :func:`check_grid` turns anything larger into a clear error instead
  of a failed launch.
"""

from __future__ import annotations

import contextlib
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


def launch(kernel, grid: Sequence[int], device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``device`` after :func:`check_grid`."""
    fn = getattr(kernel, "fn", kernel)
    grid = check_grid(grid, getattr(fn, "__name__", "triton kernel"))
    with device_guard(device):
        kernel[grid](*args, **kwargs)
