"""Matrix-entropy ops: oracle agreement, known spectra, dual Gram, Rényi limits, truncation, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import assert_close, dev, needs_backend
from tokprune._backend import BackendUnavailable
from tokprune.ops import matrix_entropy, token_information_scores, truncated_matrix_entropy
from tokprune.reference.entropy import (
    matrix_entropy_reference,
    token_information_scores_reference,
    truncated_matrix_entropy_reference,
)

TOL = dict(atol=1e-4, rtol=0)


def low_rank(batch, n, d, rank, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, rank, generator=g) @ torch.randn(batch, rank, d, generator=g)


def equal_singular_values(n, d, rank, *, seed=0):
    """``n x d`` matrix with exactly ``rank`` equal non-zero singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    return (u @ v.T * 3.0).float()


# ---------------------------------------------------------------------------------------------------
# matrix_entropy
@pytest.mark.parametrize("shape", [(2, 37, 16), (3, 9, 40), (1, 64, 64)])
@pytest.mark.parametrize("order", [1, 2, 0.5])
def test_matrix_entropy_matches_direct_oracle(shape, order):
    x = torch.randn(*shape)
    assert_close(matrix_entropy(x, order=order), matrix_entropy_reference(x, order=order).float(), **TOL)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_matrix_entropy_low_rank_matches_oracle(rank):
    x = low_rank(2, 30, 50, rank)
    for kwargs in (dict(), dict(center=False, normalize_rows=False), dict(truncate=4), dict(normalizer=None)):
        assert_close(matrix_entropy(x, **kwargs), matrix_entropy_reference(x, **kwargs).float(), **TOL,
                     name=str(kwargs))


def test_dual_gram_sides_have_the_same_entropy():
    # N < D, N > D and N == D: forcing either side gives the same value (shared non-zero spectrum).
    for n, d in ((12, 70), (70, 12), (24, 24)):
        x = torch.randn(2, n, d)
        for order, truncate in ((1, None), (2, None), (1, 5)):
            a = matrix_entropy(x, side="tokens", order=order, truncate=truncate)
            b = matrix_entropy(x, side="features", order=order, truncate=truncate)
            assert_close(a, b, atol=1e-5, rtol=0, name=f"n={n} d={d}")


def test_dual_gram_nonzero_spectra_coincide():
    z = torch.randn(9, 31, dtype=torch.float64)
    small = torch.linalg.eigvalsh(z @ z.T).flip(0)
    large = torch.linalg.eigvalsh(z.T @ z).flip(0)
    assert_close(small, large[:9], atol=1e-9, rtol=1e-9)
    assert float(large[9:].abs().max()) < 1e-9


@pytest.mark.parametrize("rank", [1, 2, 5, 8])
def test_known_spectrum_equal_singular_values(rank):
    n, d = 16, 40
    x = equal_singular_values(n, d, rank)[None]
    plain = dict(center=False, normalize_rows=False)
    got = matrix_entropy(x, **plain)
    expected = math.log(rank) / math.log(min(n, d))
    assert abs(float(got) - expected) < 1e-5
    # raw nats: log r; Rényi of any order is also log r for a flat spectrum
    for order in (0.5, 2, 3):
        assert abs(float(matrix_entropy(x, normalizer=None, order=order, **plain)) - math.log(rank)) < 1e-5
    # UNComp's normaliser divides by log D
    assert abs(float(matrix_entropy(x, normalizer="dim", **plain)) - math.log(rank) / math.log(d)) < 1e-5


def test_rank_one_has_zero_entropy_and_isotropic_has_one():
    v = torch.randn(1, 1, 32)
    x = torch.randn(1, 20, 1) * v
    assert float(matrix_entropy(x, center=False)) < 1e-6
    eye = torch.eye(16)[None] * 2.5
    assert abs(float(matrix_entropy(eye, center=False)) - 1.0) < 1e-6


def test_renyi_limits_and_monotonicity():
    x = low_rank(1, 40, 24, 10) + 0.1 * torch.randn(1, 40, 24)
    vn = matrix_entropy(x, order=1)
    near = matrix_entropy(x, order=1 + 1e-4)
    assert abs(float(vn - near)) < 1e-3  # alpha -> 1 recovers von Neumann
    values = [float(matrix_entropy(x, order=a)) for a in (0.5, 1, 2, 4)]
    assert all(a >= b - 1e-6 for a, b in zip(values, values[1:])), values  # non-increasing in alpha
    # alpha -> 0 tends to log(rank): all non-zero eigenvalues count equally
    h0 = float(matrix_entropy(x, order=1e-6, normalizer=None, center=False, normalize_rows=False))
    assert abs(h0 - math.log(24)) < 1e-3


def test_truncation():
    x = torch.randn(2, 50, 20)
    full = matrix_entropy(x)
    assert_close(matrix_entropy(x, truncate=20), full, atol=1e-6, rtol=0)
    assert_close(matrix_entropy(x, truncate=100), full, atol=1e-6, rtol=0)
    parts = [matrix_entropy(x, truncate=k) for k in (1, 4, 10, 20)]
    assert all(bool((a <= b + 1e-7).all()) for a, b in zip(parts, parts[1:]))  # more terms, more entropy
    # truncate=k of a flat rank-r spectrum: k * (1/r) log r
    flat = equal_singular_values(16, 40, 8)[None]
    got = matrix_entropy(flat, truncate=3, center=False, normalize_rows=False, normalizer=None)
    assert abs(float(got) - 3 / 8 * math.log(8)) < 1e-5


def test_mask_equals_dropping_the_padded_rows():
    x = torch.randn(2, 30, 12)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :7] = False
    mask[1, 20:] = False
    got = matrix_entropy(x, mask=mask, truncate=6)
    expected = torch.stack([matrix_entropy(x[0:1, 7:], truncate=6)[0], matrix_entropy(x[1:2, :20], truncate=6)[0]])
    assert_close(got, expected, atol=1e-5, rtol=0)
    assert_close(got, matrix_entropy_reference(x, mask=mask, truncate=6).float(), **TOL)
    x[0, :7] = 1e6  # padded values are ignored
    assert_close(matrix_entropy(x, mask=mask, truncate=6), got, atol=1e-5, rtol=0)


def test_empty_and_degenerate():
    assert matrix_entropy(torch.randn(3, 0, 8)).tolist() == [0.0, 0.0, 0.0]
    assert matrix_entropy(torch.randn(0, 4, 8)).shape == (0,)
    assert float(matrix_entropy(torch.randn(1, 1, 8))) == 0.0  # one token: centred to zero
    assert float(matrix_entropy(torch.zeros(1, 5, 8))) == 0.0


def test_half_precision_inputs():
    x = torch.randn(2, 40, 24)
    for dtype in (torch.float16, torch.bfloat16):
        got = matrix_entropy(x.to(dtype))
        assert got.dtype == torch.float32
        assert_close(got, matrix_entropy_reference(x.to(dtype)).float(), **TOL)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_matrix_entropy_rejects_non_finite(bad):
    x = torch.randn(1, 5, 4)
    x[0, 2, 1] = bad
    with pytest.raises(ValueError, match="x contains"):
        matrix_entropy(x)


def test_matrix_entropy_argument_errors():
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        matrix_entropy(torch.randn(5, 4))
    with pytest.raises(TypeError, match="x must have dtype"):
        matrix_entropy(torch.randn(1, 5, 4).double())
    with pytest.raises(ValueError, match="order"):
        matrix_entropy(torch.randn(1, 5, 4), order=0)
    with pytest.raises(ValueError, match="truncate"):
        matrix_entropy(torch.randn(1, 5, 4), truncate=0)
    with pytest.raises(ValueError, match="normalizer"):
        matrix_entropy(torch.randn(1, 5, 4), normalizer="trace")
    with pytest.raises(ValueError, match="side"):
        matrix_entropy(torch.randn(1, 5, 4), side="left")
    with pytest.raises(ValueError, match="mask must have shape"):
        matrix_entropy(torch.randn(1, 5, 4), mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(BackendUnavailable):
        matrix_entropy(torch.randn(1, 5, 4), backend="cuda")


# ---------------------------------------------------------------------------------------------------
# truncated_matrix_entropy (UNComp)
def uncomp_numpy(key: np.ndarray, k: int) -> np.ndarray:
    """The formula of UNComp's ``cal_entropy_no_group_svd`` re-derived with numpy (float64)."""
    r = key - key.mean(axis=-2, keepdims=True)
    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
    a = np.einsum("hni,hnj->hij", r, r) / r.shape[-2]
    a = a / np.trace(a, axis1=-2, axis2=-1)[:, None, None] + 1e-10 * np.eye(a.shape[-1])
    s = np.linalg.svd(a, compute_uv=False)[:, :k]
    return -np.nansum(s * np.log(s), axis=-1) / math.log(a.shape[-1])


@pytest.mark.parametrize("n_tokens,k", [(50, 8), (200, 32), (10, 32)])
def test_truncated_matrix_entropy_matches_uncomp_formula(n_tokens, k):
    q = torch.randn(2, 3, n_tokens, 16) + torch.randn(2, 3, 1, 16)  # a shared offset, removed by centring
    got = truncated_matrix_entropy(q, k)
    assert_close(got, truncated_matrix_entropy_reference(q, k).float(), **TOL)
    for b in range(2):
        assert_close(got[b], torch.from_numpy(uncomp_numpy(q[b].double().numpy(), k)).float(), **TOL)


def test_truncated_matrix_entropy_low_rank_heads_rank_lower():
    q = torch.randn(1, 2, 64, 16)
    q[0, 1] = low_rank(1, 64, 16, 2)[0]
    e = truncated_matrix_entropy(q, 32)
    assert float(e[0, 1]) < float(e[0, 0])
    assert_close(e, truncated_matrix_entropy_reference(q, 32).float(), **TOL)


def test_truncated_matrix_entropy_errors():
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        truncated_matrix_entropy(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="x contains NaN"):
        truncated_matrix_entropy(torch.full((1, 1, 3, 4), float("nan")))


# ---------------------------------------------------------------------------------------------------
# token_information_scores (EntropyPrune)
def entropyprune_plain(x: torch.Tensor, heads: int, normalise: bool) -> torch.Tensor:
    """Independent vectorised transcription of the paper's per-token formula (float64)."""
    b, n, d = x.shape
    r = x.double().reshape(b * n, heads, d // heads)
    r = r - r.mean(dim=-2, keepdim=True)
    a = torch.einsum("tni,tki->tnk", r, r) / heads
    lam = torch.linalg.eigvalsh(a)
    if normalise:
        lam = lam / lam.sum(-1, keepdim=True)
    lam = lam.clamp_min(1e-10)
    return (-(lam * lam.log()).sum(-1) / math.log(heads)).view(b, n)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("shape,heads", [((2, 13, 48), 4), ((1, 40, 256), 8), ((1, 7, 96), 32)])
def test_token_information_scores_match_oracles(shape, heads, exact):
    x = torch.randn(*shape) * 1.7
    got = token_information_scores(x, num_heads=heads, exact_reference=exact)
    assert got.shape == shape[:2] and got.dtype == torch.float32
    assert_close(got, token_information_scores_reference(x, heads, exact_reference=exact).float(), **TOL)
    assert_close(got, entropyprune_plain(x, heads, not exact).float(), **TOL)
    # 4-D input (batch, n, heads, head_dim) gives the same scores
    assert_close(token_information_scores(x.view(*shape[:2], heads, -1), exact_reference=exact), got,
                 atol=0, rtol=0)


def test_token_information_scores_low_rank_and_known_values():
    heads, hd = 8, 16
    # token whose heads differ along one direction only -> rank-1 centred Gram -> normalised score 0
    base = torch.randn(hd)
    coef = torch.randn(heads, 1)
    rank1 = (coef * base)[None, None]  # (1, 1, heads, hd)
    # token whose centred heads are orthogonal with equal norms -> flat spectrum over H-1 values
    flat = (torch.eye(heads, hd) * 2.0)[None, None]
    x = torch.cat([rank1, flat], dim=1)
    s = token_information_scores(x, exact_reference=False)
    assert abs(float(s[0, 0])) < 1e-6
    # centring I_H (equal-norm orthogonal rows) leaves H-1 equal eigenvalues
    assert abs(float(s[0, 1]) - math.log(heads - 1) / math.log(heads)) < 1e-5
    assert_close(s, token_information_scores_reference(x.flatten(2), heads, exact_reference=False).float(), **TOL)


def test_token_information_scores_exact_mode_depends_on_scale_normalised_does_not():
    x = torch.randn(1, 6, 64)
    a = token_information_scores(x, num_heads=4, exact_reference=False)
    b = token_information_scores(x * 10, num_heads=4, exact_reference=False)
    assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(token_information_scores(x, num_heads=4), token_information_scores(x * 10, num_heads=4))


def test_token_information_scores_empty_and_errors():
    assert token_information_scores(torch.randn(2, 0, 32), num_heads=4).shape == (2, 0)
    x = torch.randn(1, 3, 30)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing dim=30"):
        token_information_scores(x, num_heads=4)
    with pytest.raises(ValueError, match="num_heads is required"):
        token_information_scores(x)
    with pytest.raises(ValueError, match="num_heads must be >= 2"):
        token_information_scores(x, num_heads=1)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        token_information_scores(torch.randn(3, 30), num_heads=3)
    with pytest.raises(ValueError, match="does not match"):
        token_information_scores(torch.randn(1, 3, 4, 8), num_heads=2)
    x[0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        token_information_scores(x, num_heads=3)


# ---------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, real kernels with TOKPRUNE_TEST_DEVICE=cuda) == torch on the CPU
@needs_backend("triton")
@pytest.mark.parametrize("shape", [(2, 13, 40), (1, 70, 24), (2, 33, 33)])
@pytest.mark.parametrize("normalize_rows", [True, False])
def test_triton_masked_gram_matches_torch(shape, normalize_rows):
    from tokprune.kernels.triton.entropy import masked_gram_triton
    from tokprune.ops.entropy import _gram_torch, _row_stats

    x = torch.randn(*shape)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[0, :3] = False
    mean, scale, count = _row_stats(x, mask, True, normalize_rows)
    for tokens_side in (True, False):
        got = masked_gram_triton(*dev(x, mean.float(), scale.float(), count.float()), tokens_side=tokens_side)
        expected = _gram_torch(x, mean, scale, count, tokens_side).float()
        assert_close(got, expected, atol=1e-5, rtol=1e-4, name=f"tokens_side={tokens_side}")


@needs_backend("triton")
def test_triton_matrix_entropy_matches_torch_including_strided_and_bf16():
    x = torch.randn(2, 50, 36)
    for kwargs in (dict(), dict(truncate=5, order=2), dict(side="features"), dict(normalizer="dim")):
        assert_close(matrix_entropy(dev(x), backend="triton", **kwargs), matrix_entropy(x, **kwargs), **TOL,
                     name=str(kwargs))
    strided = torch.randn(2, 36, 50).transpose(1, 2)  # non-contiguous view
    assert_close(matrix_entropy(dev(strided), backend="triton"), matrix_entropy(strided.contiguous()), **TOL)
    xb = x.bfloat16()
    assert_close(matrix_entropy(dev(xb), backend="triton"), matrix_entropy(xb), **TOL)
    q = torch.randn(1, 2, 40, 16)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, :9] = False
    assert_close(truncated_matrix_entropy(dev(q), 8, mask=dev(mask), backend="triton"),
                 truncated_matrix_entropy(q, 8, mask=mask), **TOL)


@needs_backend("triton")
@pytest.mark.parametrize("heads,head_dim", [(4, 24), (9, 64), (32, 16), (40, 8)])
def test_triton_token_gram_and_scores_match_torch(heads, head_dim):
    from tokprune.kernels.triton.entropy import token_gram_triton

    x = torch.randn(2, 11, heads * head_dim)
    flat = x.view(22, heads, head_dim).double()
    z = flat - flat.mean(1, keepdim=True)
    assert_close(token_gram_triton(dev(x.view(22, heads, head_dim))), (z @ z.transpose(1, 2) / heads).float(),
                 atol=1e-5, rtol=1e-4)
    for exact in (False, True):
        got = token_information_scores(dev(x), num_heads=heads, exact_reference=exact, backend="triton")
        # fp32 Gram vs float64: the near-zero eigenvalue (centring) costs ~1e-5 in the exact mode
        assert_close(got, token_information_scores(x, num_heads=heads, exact_reference=exact),
                     atol=1e-4 if not exact else 5e-4, rtol=1e-4)
    xb = x.bfloat16()
    assert_close(token_information_scores(dev(xb), num_heads=heads, exact_reference=False, backend="triton"),
                 token_information_scores(xb, num_heads=heads, exact_reference=False), **TOL)


@needs_backend("triton")
def test_triton_token_gram_rejects_too_many_heads():
    with pytest.raises(ValueError, match="at most 64 heads"):
        token_information_scores(dev(torch.randn(1, 2, 65 * 2)), num_heads=65, backend="triton")
