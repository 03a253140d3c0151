"""Limits the ops check themselves before any kernel runs (issue 12: one validation point, in the ops)."""

import pytest
import torch

import tokprune._backend as backend_mod
from tests.helpers import needs_backend
from tokprune.ops import select_tokens, sparse_decode_attention


def _decode_inputs(head_dim):
    q = torch.randn(1, 2, 1, head_dim)
    k = torch.randn(1, 2, 12, head_dim)
    return q, k, torch.randn(1, 2, 12, head_dim), torch.randint(0, 12, (1, 2, 5))


@needs_backend("cuda", "cpu", "sparse_decode_attention")
def test_sparse_decode_cuda_rejects_head_dim_above_256_naming_it():
    q, k, v, idx = _decode_inputs(288)
    with pytest.raises(ValueError, match=r"q head_dim D=288 must be in \[1, 256\] for backend='cuda'"):
        sparse_decode_attention(q, k, v, idx, 0.1, backend="cuda")
    q, k, v, idx = _decode_inputs(256)  # the limit itself runs, equal to the torch backend
    torch.testing.assert_close(sparse_decode_attention(q, k, v, idx, 0.1, backend="cuda"),
                               sparse_decode_attention(q, k, v, idx, 0.1, backend="torch"))


@needs_backend("cuda", "cpu", "sparse_decode_attention")
def test_sparse_decode_auto_skips_cuda_above_its_head_dim(monkeypatch):
    """``auto`` (or a TOKPRUNE_BACKEND=cuda preference) whose first choice is cuda falls back for head_dim > 256."""
    monkeypatch.setattr(backend_mod, "auto_order", lambda device: ("cuda", "torch"))
    q, k, v, idx = _decode_inputs(288)
    torch.testing.assert_close(sparse_decode_attention(q, k, v, idx, 0.1),
                               sparse_decode_attention(q, k, v, idx, 0.1, backend="torch"))


def test_select_tokens_under_a_triton_preference_falls_back(monkeypatch):
    """select_tokens has torch and cuda backends only: TOKPRUNE_BACKEND=triton is a preference it cannot
    follow; it falls back to the auto choice (and says so), with the same result."""
    scores = torch.randn(3, 40)
    expected = select_tokens(scores, 7, backend="torch")
    monkeypatch.setenv("TOKPRUNE_BACKEND", "triton")
    monkeypatch.setattr(backend_mod, "_FALLBACKS_SEEN", set())
    with pytest.warns(backend_mod.BackendFallbackWarning, match="select_tokens: TOKPRUNE_BACKEND='triton' not used"):
        assert torch.equal(select_tokens(scores, 7), expected)
