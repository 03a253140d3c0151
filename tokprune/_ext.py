"""Loader for the optional compiled extension ``tokprune._C``.

The extension is a pybind11 module built by ``setup.py`` from ``csrc/`` (see the README). It does not
link against torch: functions take raw pointers, shapes and strides. This module only answers
whether it imported, what it contains, and why not.
"""

from __future__ import annotations

import functools
import os
from typing import Optional


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("TOKPRUNE_NO_EXT") == "1":
        return None, "disabled by TOKPRUNE_NO_EXT=1"
    try:
        from tokprune import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built for another Python
        return None, f"not built ({exc})"
    return _C, None


def extension():
    """The ``tokprune._C`` module, or ``None`` when it is not available."""
    return _load()[0]


def load_error() -> Optional[str]:
    """``None`` if ``tokprune._C`` imported, else the reason it did not."""
    return _load()[1]


def build_info() -> dict:
    """What the extension was built with: ``{"cuda": bool, "archs": [...], "ops": [...], "codes": {...},
    ...}`` (the op list is recorded by the binding as it binds each kernel)."""
    return dict(_build_info())


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    ext = extension()
    if ext is None:
        return {}
    info = getattr(ext, "build_info", None)
    return dict(info()) if callable(info) else {}


def cuda_runtime_version() -> Optional[str]:
    """CUDA runtime version linked into tokprune._C (``"13.0"``, the release of the nvcc that built it, as
    recorded in ``_C_build.json``); ``None`` for a host-only build or when unknown."""
    return build_report().get("cuda_runtime") if has_cuda_kernels() else None


def build_report() -> dict:
    """The build report written beside the module by ``tokprune_build.py`` (``tokprune/_C_build.json``):
    ``{"cuda", "archs", "cxx", "nvcc", "cuda_runtime", "ninja_seconds", "ptxas": [{kernel, arch, registers, spill_stores,
    spill_loads, stack, smem, source}, ...]}``; ``{}`` when absent."""
    return dict(_build_report())


@functools.lru_cache(maxsize=None)
def _build_report() -> dict:
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def describe() -> list:
    """Lines for ``tokprune info``: which parts of tokprune._C were compiled and their ptxas summary."""
    if extension() is None:
        return [f"extension tokprune._C: unavailable: {load_error()}"]
    info = _build_info()
    parts = info.get("parts", {})
    lines = [f"  compiled parts: host (g++): {', '.join(parts.get('host', [])) or 'none'}; "
             f"CUDA (nvcc): {', '.join(parts.get('cuda', [])) or 'none (built without nvcc)'}"]
    records = build_report().get("ptxas", [])
    if records:
        spills = sum(1 for r in records if r.get("spill_stores") or r.get("spill_loads"))
        lines.append(f"  ptxas: {len(records)} kernel builds for {', '.join(sorted({r['arch'] for r in records}))}, "
                     f"max {max(r['registers'] or 0 for r in records)} registers, {spills} with spills")
    return lines


def has_cuda_kernels() -> bool:
    return bool(_build_info().get("cuda", False))


def has_op(op: str) -> bool:
    return op in _build_info().get("ops", ())
