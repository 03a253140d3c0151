"""Plain-torch oracles for the matrix-entropy family, written for clarity (float64, direct formulas).

These compute every quantity the "long way" (e.g. the ``D x D`` covariance even when ``N << D``)
so that tests can check the fast paths in :mod:`tokprune.ops.entropy` against them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def spectrum_entropy_reference(p: torch.Tensor, order: float = 1.0) -> torch.Tensor:
    """Rényi entropy (nats) of non-negative weights ``p`` over the last axis (``0 log 0 = 0``).

    ``order == 1`` is the Shannon / von Neumann entropy ``-sum p log p``; otherwise
    ``log(sum p**order) / (1 - order)``. ``p`` is used as given (no renormalisation).
    """
    p = p.clamp_min(0)
    if order == 1:
        return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum(-1)
    total = (p ** order).sum(-1)
    return torch.where(total > 0, torch.log(total.clamp_min(1e-300)) / (1.0 - order), torch.zeros_like(total))


def matrix_entropy_reference(
    x: torch.Tensor,
    *,
    order: float = 1.0,
    truncate: Optional[int] = None,
    center: bool = True,
    normalize_rows: bool = True,
    normalizer: Optional[str] = "rank",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Matrix entropy of each ``x[b]`` (``N`` tokens x ``D`` features) through the ``D x D`` covariance.

    Steps (UNComp / Diff-eRank convention): keep the valid rows (``mask``), centre them over tokens,
    L2-normalise each row, ``S = Z^T Z / N``, eigenvalues ``lambda`` of ``S`` divided by ``trace(S)``,
    optionally keep the ``truncate`` largest, Rényi entropy of order ``order``, divided by
    ``log(min(N, D))`` (``normalizer="rank"``), ``log(D)`` (``"dim"``) or nothing (``None``).
    Returns ``[B]`` float64. A batch row with a zero matrix (or fewer than 2 valid rows after centring)
    has entropy 0.
    """
    out = []
    for b in range(x.shape[0]):
        rows = x[b].double()
        if mask is not None:
            rows = rows[mask[b]]
        n, d = rows.shape
        if n == 0:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        if center:
            rows = rows - rows.mean(0, keepdim=True)
        if normalize_rows:
            norms = rows.norm(dim=1, keepdim=True)
            rows = torch.where(norms > 0, rows / norms.clamp_min(1e-300), torch.zeros_like(rows))
        cov = rows.T @ rows / n  # D x D, the large side when N < D
        lam = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
        trace = lam.sum()
        if trace <= 0:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        p = lam / trace
        if truncate is not None:
            p = p[:truncate]
        h = spectrum_entropy_reference(p, order)
        bound = {"rank": min(n, d), "dim": d, None: None}[normalizer]
        if bound is not None:
            h = h / math.log(bound) if bound > 1 else torch.zeros_like(h)
        out.append(h)
    return torch.stack(out)


def truncated_matrix_entropy_reference(x: torch.Tensor, k: int = 32) -> torch.Tensor:
    """UNComp's per-head truncated matrix entropy, transcribed from the paper/reference formula.

    ``x [B, H, N, d]`` (post-RoPE queries or keys of one layer). Per head: centre over tokens,
    L2-normalise rows, ``A = Z^T Z / N`` (``d x d``), ``A / trace(A) + 1e-10 I``, singular values
    descending, ``E = -sum_{i<=k} s_i log s_i / log d``. Returns ``[B, H]`` float64.
    """
    z = x.double()
    z = z - z.mean(-2, keepdim=True)
    z = z / z.norm(dim=-1, keepdim=True)
    a = z.transpose(-1, -2) @ z / z.shape[-2]
    trace = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    s = torch.linalg.svdvals(a / trace[..., None, None] + 1e-10 * eye)[..., :k]
    return -(s * torch.log(s)).sum(-1) / math.log(a.shape[-1])


def token_information_scores_reference(x: torch.Tensor, num_heads: int, *, exact_reference: bool = True) -> torch.Tensor:
    """EntropyPrune's per-token information value, one token at a time (float64).

    ``x [B, N, D]`` with ``D = num_heads * d_h``. For token ``t``: ``X_t = x[b, t].view(H, d_h)``,
    ``Z = X_t - mean over heads``, ``G = Z Z^T / H`` (``H x H``), eigenvalues clamped to ``1e-10``,
    ``S_t = -sum lambda log lambda / log H``. With ``exact_reference=False`` the eigenvalues are first
    divided by ``trace(G)`` (scale-free, in ``[0, 1]``). Returns ``[B, N]`` float64.
    """
    batch, n_tokens, dim = x.shape
    out = torch.zeros(batch, n_tokens, dtype=torch.float64)
    for b in range(batch):
        for t in range(n_tokens):
            xt = x[b, t].double().view(num_heads, dim // num_heads)
            z = xt - xt.mean(0, keepdim=True)
            g = z @ z.T / num_heads
            lam = torch.linalg.eigvalsh(g)
            if not exact_reference:
                trace = lam.sum()
                lam = lam / trace if trace > 0 else torch.zeros_like(lam)
            lam = lam.clamp_min(1e-10)
            out[b, t] = -(lam * torch.log(lam)).sum() / math.log(num_heads)
    return out
