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

Resolution:

1. An explicit ``backend=`` argument (``"torch" | "triton" | "cuda"``) is obeyed or raises
   :class:`BackendUnavailable` with the reason (not implemented by the op, or cannot run here).
2. Else ``TOKPRUNE_BACKEND`` is a *preference*: used when the op implements it and it can run; otherwise
   the op falls back to the ``auto`` order and says so once (``logging`` at debug level under the
   ``tokprune`` logger, plus a :class:`BackendFallbackWarning` in debug mode, ``TOKPRUNE_DEBUG=1``).
3. Else ``auto``: ``torch`` for CPU tensors. For CUDA tensors the kernel backends are chosen only on a
   GPU architecture where ``make gpu-check`` passed (``tokprune/data/validated_archs.json``): there the
   order is ``cuda -> triton -> torch`` (each backend only if validated there); elsewhere ``torch ->
   triton``, and ``backend="cuda"`` (or ``TOKPRUNE_BACKEND=cuda``) is an explicit opt-in.

For ``tokprune._C`` on CUDA tensors :func:`unavailable_reason` also compares the architectures it was
built for and the CUDA runtime it links (``_C_build.json``) with the device's compute capability and
the driver (facts from :func:`device_facts`), so an sm_75 GPU or an old driver is reported with the
reason instead of failing inside the first launch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import re
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")

# Triton decides at decoration time whether a kernel is interpreted, so the state that matters is
# the one at import of tokprune (kernels are defined on import of tokprune.kernels.triton.*).
TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


VALIDATED_ARCHS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "validated_archs.json")

logger = logging.getLogger("tokprune")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on the given tensors."""


class BackendFallbackWarning(UserWarning):
    """``TOKPRUNE_BACKEND`` names a backend the op cannot use here; the op fell back (debug mode only)."""


# ------------------------------------------------------------------------------------ device facts
def _version_tuple(text: Optional[str]) -> Optional[Tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.lru_cache(maxsize=None)
def driver_cuda_version() -> Optional[str]:
    """Highest CUDA version the installed driver supports (``"12.4"``), from ``cuDriverGetVersion`` of
    libcuda; ``None`` without a driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return f"{version.value // 1000}.{(version.value % 1000) // 10}"
        except (AttributeError, OSError):
            return None
    return None


def device_facts(device: torch.device) -> Dict[str, object]:
    """``{"name", "capability": (major, minor), "arch": "sm_90", "driver_cuda": "12.4" | None}`` of a CUDA
    device (tests replace this function to fake a GPU)."""
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> Dict[str, object]:
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": (major, minor), "arch": f"sm_{major}{minor}",
            "driver_cuda": driver_cuda_version()}


def kernel_image_reason(capability: Tuple[int, int], built_archs: Sequence[str]) -> Optional[str]:
    """Why a binary holding SASS for ``built_archs`` (``["sm_80", "sm_90"]``, plus PTX of the last one, as
    ``tokprune_build.py`` compiles) has no kernel image for a device of ``capability``; ``None`` if it has.
    SASS ``sm_XY`` runs on ``sm_XZ`` with ``Z >= Y``; PTX of ``compute_XY`` is JIT-compiled for any newer
    GPU; ``sm_90a``-style archs run on exactly that GPU."""
    if not built_archs:
        return "tokprune._C has no CUDA architectures (built without nvcc)"
    major, minor = capability
    parsed = []
    for arch in built_archs:
        m = re.fullmatch(r"sm_(\d+?)(\d)(a?)", arch)
        if m:
            parsed.append((int(m.group(1)), int(m.group(2)), m.group(3) == "a"))
    for a_major, a_minor, specific in parsed:
        if a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return None
    last = parsed[-1] if parsed else None
    if last is not None and not last[2] and (major, minor) >= (last[0], last[1]):
        return None  # PTX JIT
    return (f"tokprune._C was built for {', '.join(built_archs)} and this GPU is sm_{major}{minor}: its launches "
            f"would fail with 'no kernel image is available for execution on the device' (rebuild with "
            f"TOKPRUNE_CUDA_ARCHS={major}{minor} python tokprune_build.py)")


def driver_reason(runtime: Optional[str], driver: Optional[str]) -> Optional[str]:
    """Why a driver that supports CUDA ``driver`` cannot run code linked with CUDA runtime ``runtime``."""
    rt, dv = _version_tuple(runtime), _version_tuple(driver)
    if rt is None or dv is None:
        return None  # unknown: let the launch say
    if dv[0] < rt[0] or (dv[0] == rt[0] and dv < rt and rt[0] < 12):
        return (f"tokprune._C links the CUDA {runtime} runtime but the driver supports CUDA {driver} only "
                f"(update the driver, e.g. >= 580 for CUDA 13, or rebuild with the nvcc matching "
                f"torch.version.cuda)")
    return None


# ------------------------------------------------------------------------------ validated archs
@functools.lru_cache(maxsize=None)
def validated_archs() -> Dict[str, dict]:
    """``{"sm_90": {"backends": ["triton", "cuda"], "torch": ..., "triton": ..., "cuda_runtime": ...,
    "driver_cuda": ..., "date": ...}, ...}``: the architectures where ``make gpu-check`` passed, read from
    ``tokprune/data/validated_archs.json`` (written by :mod:`tokprune.tools.gpu_check`)."""
    try:
        with open(VALIDATED_ARCHS_PATH) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    archs = data.get("archs", {}) if isinstance(data, dict) else {}
    return {str(k): dict(v) for k, v in archs.items() if isinstance(v, dict)}


def validated_backends(device: torch.device) -> Tuple[str, ...]:
    """Kernel backends validated by ``make gpu-check`` on the architecture of ``device`` (CUDA only)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ()
    entry = validated_archs().get(str(device_facts(device)["arch"]))
    return tuple(b for b in (entry or {}).get("backends", ()) if b in ("cuda", "triton"))


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """Backends ``auto`` tries for tensors on ``device``, first to last."""
    if device.type != "cuda":
        return ("torch",)
    validated = validated_backends(device)
    order: List[str] = [b for b in ("cuda", "triton") if b in validated] + ["torch", "triton"]
    return tuple(dict.fromkeys(order))


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
            return ("Triton runs CPU tensors only under its interpreter: TRITON_INTERPRET=1 set before tokprune is "
                    "imported (otherwise a launch fails: '0 active drivers' without a GPU, a pointer error with one)")
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
        facts = device_facts(device)
        reason = kernel_image_reason(tuple(facts["capability"]), ext.build_info().get("archs", []))
        if reason is None:
            reason = driver_reason(ext.cuda_runtime_version(), facts.get("driver_cuda"))
        if reason is not None:
            return reason
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
    explicit = backend not in (None, "auto")
    requested = (backend if explicit else os.environ.get("TOKPRUNE_BACKEND", "auto")) or "auto"
    requested = requested.strip().lower() or "auto"
    source = "backend" if explicit else "TOKPRUNE_BACKEND"
    if requested != "auto":
        if requested not in BACKENDS:
            raise BackendUnavailable(
                f"{op}: {source}={requested!r} is unknown; expected 'auto' or one of {BACKENDS}")
        if requested not in implemented:
            reason = f"not implemented for this op; it has {tuple(implemented)}"
        else:
            reason = unavailable_reason(requested, device, op)
        if reason is None:
            return requested
        if explicit:
            raise BackendUnavailable(f"{op}: backend={requested!r} " + (
                "is " + reason if reason.startswith("not implemented") else f"cannot run on {device}: {reason}"))
    for candidate in auto_order(device):
        if candidate in implemented and unavailable_reason(candidate, device, op) is None:
            if requested != "auto":
                _note_fallback(op, requested, reason, candidate)
            return candidate
    raise BackendUnavailable(f"{op}: no backend can run on {device} (tried {auto_order(device)}, the op has "
                             f"{tuple(implemented)})")


_FALLBACKS_SEEN: set = set()


def _note_fallback(op: str, preferred: str, reason: str, chosen: str) -> None:
    """Say once per (op, preference, choice) that ``TOKPRUNE_BACKEND`` was not followed, and why."""
    key = (op, preferred, chosen)
    if key in _FALLBACKS_SEEN:
        return
    _FALLBACKS_SEEN.add(key)
    message = f"{op}: TOKPRUNE_BACKEND={preferred!r} not used ({reason}); using {chosen!r} instead"
    logger.debug(message)
    from tokprune._debug import debug_checks

    if debug_checks():
        warnings.warn(message, BackendFallbackWarning, stacklevel=3)


def available_backends(device: torch.device) -> dict:
    """``{backend: None | reason}`` for ``device``, used by ``tokprune info``."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


__all__: Iterable[str] = [
    "BACKENDS",
    "BackendFallbackWarning",
    "BackendUnavailable",
    "auto_order",
    "available_backends",
    "device_facts",
    "validated_archs",
    "resolve_backend",
    "unavailable_reason",
]
