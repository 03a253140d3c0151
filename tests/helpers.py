"""Comparison and device helpers shared by all tests."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

#: device of the kernel tests' inputs: ``TOKPRUNE_TEST_DEVICE`` (``cpu`` default, ``cuda`` on a GPU host).
TEST_DEVICE = torch.device(os.environ.get("TOKPRUNE_TEST_DEVICE", "cpu").strip().lower() or "cpu")


def backend_skip_reason(name: str, device=None, op: Optional[str] = None) -> Optional[str]:
    """Why backend ``name`` cannot run (``op``) on ``device`` (default :data:`TEST_DEVICE`); ``None`` if it can.
    Decided by :func:`tokprune._backend.unavailable_reason`, the function the ops themselves use."""
    from tokprune._backend import unavailable_reason

    device = torch.device(device) if device is not None else TEST_DEVICE
    reason = unavailable_reason(name, device, op)
    return None if reason is None else f"backend {name!r} cannot run on {device}: {reason}"


def needs_backend(name: str, device=None, op: Optional[str] = None):
    """Mark: skip the test unless backend ``name`` can run on ``device`` (default :data:`TEST_DEVICE`).
    Evaluated at set-up (``tests/conftest.py``), so importing a test module queries no GPU."""
    return pytest.mark.needs_backend(name, None if device is None else str(device), op)


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend name with its :func:`needs_backend` mark (``torch`` needs none)."""
    return [pytest.param(n, marks=() if n == "torch" else needs_backend(n), id=n) for n in names]


def dev(*tensors):
    """Copies of ``tensors`` on :data:`TEST_DEVICE` (views stay views when already there); ``None`` passes.
    One tensor in, one out; several in, a tuple out."""
    out = tuple(t if t is None or not isinstance(t, torch.Tensor) else t.to(TEST_DEVICE) for t in tensors)
    return out[0] if len(out) == 1 else out


def host(*tensors):
    """CPU copies (results brought back for comparison with CPU oracles)."""
    out = tuple(t if not isinstance(t, torch.Tensor) else t.detach().cpu() for t in tensors)
    return out[0] if len(out) == 1 else out


def oracle_copy(t: torch.Tensor) -> torch.Tensor:
    """CPU float64 copy of a float tensor (integer tensors: a CPU copy) for the oracles."""
    t = t.detach().cpu()
    return t.double() if t.is_floating_point() else t

# Per-dtype tolerances: about twice what torch itself loses computing in that precision
# (flash-attention's rule). fp32 kernels are compared against fp32 or fp64 references.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol=None, rtol=None, name: str = "tensor",
                 max_report: int = 5) -> None:
    """``torch.allclose`` with a report of where and by how much the tensors differ.

    Tolerances default to :data:`TOLERANCES` of the less precise of the two dtypes.
    """
    if actual.device != expected.device:  # kernels may run on TEST_DEVICE, oracles on the CPU
        actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if not actual.is_floating_point():
        bad = actual != expected
        if bool(bad.any()):
            where = bad.nonzero()[:max_report].tolist()
            raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} entries differ, first at {where}: "
                                 f"{actual[bad][:max_report].tolist()} vs {expected[bad][:max_report].tolist()}")
        return
    dtype = actual.dtype if TOLERANCES.get(actual.dtype, {}).get("atol", 0) >= \
        TOLERANCES.get(expected.dtype, {}).get("atol", 0) else expected.dtype
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    a, e = actual.double(), expected.double()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    diff = (a - e).abs().nan_to_num(0.0)
    bad = (diff > atol + rtol * e.abs().nan_to_num(0.0)) | nan_mismatch
    if bool(bad.any()):
        idx = bad.nonzero()[:max_report]
        pairs = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx.tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ beyond "
                             f"atol={atol:g}, rtol={rtol:g}; max abs diff {diff.max().item():.3g}; first: {pairs}")
