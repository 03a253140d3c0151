"""Comparison helpers shared by all tests."""

from __future__ import annotations

import torch

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
