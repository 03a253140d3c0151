"""Backend selection shared by every op.

Each op in :mod:`tokprune.ops` implements a subset of three backends:

``"torch"``
    Plain vectorised PyTorch. Always available; the default for CPU tensors.
``"triton"``
    ``@triton.jit`` kernels. Runs on CUDA tensors with a GPU driver, and on CPU tensors when the
    Triton interpreter was enabled (``TRITON_INTERPRET=1`` set *before* tokprune was imported,
    as ``tests/conftest.py`` does).
``"cuda"``
    The compiled extension ``tokprune._C``. On CUDA tensors it runs the ``.cu`` kernels (when the
    extension was built with nvcc); on CPU tensors it runs the host build of the same
    ``__host__ __device__`` math, which is how the kernels are tested on machines without a GPU.

Resolution order: the explicit ``backend=`` argument, else the environment variable
``TOKPRUNE_BACKEND``, else ``"auto"``. ``"auto"`` picks ``cuda`` -> ``triton`` -> ``torch`` for CUDA
tensors (first one the op implements and that can run) and ``torch`` for CPU tensors. An explicit
request that cannot run raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable, Optional, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")

# Triton decides at decoration time whether a kernel is interpreted, so the state that matters is
# the one at import of tokprune (kernels are defined on import of tokprune.kernels.triton.*).
TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on the given tensors."""


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _extension():
    from tokprune import _ext

    return _ext


def unavailable_reason(backend: str, device: torch.device, op: Optional[str] = None) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device``; ``None`` if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'"
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
        if device.type == "cpu":
            if TRITON_INTERPRET_AT_IMPORT:
                return None
            return ("Triton needs a GPU driver for CPU tensors unless TRITON_INTERPRET=1 is set before "
                    "tokprune is imported (0 active drivers otherwise)")
        return f"triton cannot run on device type {device.type!r}"
    # cuda = compiled extension tokprune._C
    ext = _extension()
    reason = ext.load_error()
    if reason is not None:
        return f"the compiled extension tokprune._C is not available: {reason}"
    if device.type == "cuda":
        if not ext.has_cuda_kernels():
            return "tokprune._C was built without nvcc, so it has no CUDA kernels (host build only)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    elif device.type != "cpu":
        return f"tokprune._C cannot run on device type {device.type!r}"
    if op is not None and not ext.has_op(op):
        return f"tokprune._C has no kernel for {op!r}"
    return None


def resolve_backend(
    backend: Optional[str],
    device: torch.device,
    implemented: Sequence[str],
    op: str,
) -> str:
    """Pick the backend that runs ``op`` for tensors on ``device``.

    Args:
        backend: ``None`` or ``"auto"`` to choose automatically (``TOKPRUNE_BACKEND`` is consulted
            first), or one of ``"torch" | "triton" | "cuda"``.
        device: device of the op's main input.
        implemented: backends this op has.
        op: op name, used in error messages and to look the kernel up in ``tokprune._C``.

    Returns:
        The backend name.

    Raises:
        BackendUnavailable: an explicit backend is not implemented for ``op`` or cannot run here.
    """
    requested = backend if backend not in (None, "auto") else os.environ.get("TOKPRUNE_BACKEND", "auto")
    requested = requested.strip().lower() or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise BackendUnavailable(
                f"{op}: backend={requested!r} is unknown; expected 'auto' or one of {BACKENDS}")
        if requested not in implemented:
            raise BackendUnavailable(
                f"{op}: backend={requested!r} is not implemented for this op; it has {tuple(implemented)}")
        reason = unavailable_reason(requested, device, op)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend={requested!r} cannot run on {device}: {reason}")
        return requested
    if device.type == "cpu":
        return "torch"
    for candidate in ("cuda", "triton", "torch"):
        if candidate in implemented and unavailable_reason(candidate, device, op) is None:
            return candidate
    raise BackendUnavailable(f"{op}: no backend can run on {device}")


def available_backends(device: torch.device) -> dict:
    """``{backend: None | reason}`` for ``device``, used by ``tokprune info``."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def check_backend_name(backend: Optional[str]) -> None:
    if backend not in (None, "auto") and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected 'auto' or one of {BACKENDS}")


def as_device(x: torch.Tensor | torch.device | str) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device(x)


__all__: Iterable[str] = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "resolve_backend",
    "unavailable_reason",
]
