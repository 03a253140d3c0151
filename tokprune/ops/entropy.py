"""Matrix entropy of token representations (EntropyPrune, UNComp).

Two kinds of quantity:

* :func:`matrix_entropy` / :func:`truncated_matrix_entropy` — the entropy of the spectrum of the
  covariance of a *set of tokens* (``N`` tokens x ``D`` features), UNComp's layer/head statistic.
  ``Z^T Z`` (``D x D``) and ``Z Z^T`` (``N x N``) have the same non-zero eigenvalues, so the
  eigendecomposition runs on whichever side is smaller (the "dual Gram" trick): for ``N = 576``
  visual tokens of a 4096-wide model that is a 576x576 problem instead of 4096x4096.
* :func:`token_information_scores` — EntropyPrune's per-token value: the entropy of the ``H x H``
  Gram matrix of one token's per-head vectors (``[H, d_h]``), for every token at once.

Eigenvalues are always computed in float64 with ``torch.linalg.eigvalsh``; the Gram products run on
the torch backend (float64) or the Triton kernels (fp32 accumulation) in
:mod:`tokprune.kernels.triton.entropy`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from tokprune._backend import resolve_backend
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

_NORMALIZERS = ("rank", "dim", None)
_SIDES = ("auto", "tokens", "features")


def _check_finite(name: str, x: torch.Tensor) -> None:
    """NaN/inf in ``x`` -> ValueError; reads the data, so debug mode only (:mod:`tokprune._debug`)."""
    if debug_checks() and x.numel() and not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"{name} contains {kind}; matrix entropy needs finite values")


def _check_order(order) -> float:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not order > 0 or math.isinf(order):
        raise ValueError(f"order must be a finite number > 0 (1 = von Neumann), got {order!r}")
    return float(order)


def _check_truncate(truncate) -> Optional[int]:
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1:
        raise ValueError(f"truncate must be None or an int >= 1, got {truncate!r}")
    return truncate


def _spectrum_entropy(p: torch.Tensor, order: float) -> torch.Tensor:
    """Rényi entropy (nats) over the last axis of non-negative ``p`` (``0 log 0 = 0``)."""
    if order == 1.0:
        return -torch.special.xlogy(p, p).sum(-1)
    total = (p ** order).sum(-1)
    return torch.where(total > 0, torch.log(total.clamp_min(1e-300)) / (1.0 - order), torch.zeros_like(total))


def _row_stats(x: torch.Tensor, mask: Optional[torch.Tensor], center: bool, normalize_rows: bool,
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean [B, D], row_scale [B, N], count [B])`` in float64.

    ``Z = (x - mean) * row_scale[..., None]`` is the matrix whose covariance is analysed: padded rows
    get scale 0, centring uses the valid rows only, normalisation divides each centred row by its norm.
    """
    xd = x.double()
    valid = torch.ones(x.shape[:2], dtype=torch.float64, device=x.device) if mask is None else mask.double()
    count = valid.sum(1)
    if center:
        mean = (xd * valid[..., None]).sum(1) / count.clamp_min(1)[:, None]
    else:
        mean = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64, device=x.device)
    scale = valid
    if normalize_rows:
        norms = (xd - mean[:, None, :]).norm(dim=-1)
        scale = torch.where(norms > 0, valid / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return mean, scale, count


def _gram_torch(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, count: torch.Tensor,
                tokens_side: bool) -> torch.Tensor:
    z = (x.double() - mean[:, None, :]) * scale[..., None]
    gram = z @ z.transpose(1, 2) if tokens_side else z.transpose(1, 2) @ z
    return gram / count.clamp_min(1)[:, None, None]


def _entropy_from_gram(gram: torch.Tensor, order: float, truncate: Optional[int],
                       bound: Optional[torch.Tensor]) -> torch.Tensor:
    """Normalised entropy of the trace-normalised spectrum of symmetric PSD ``gram [B, M, M]``."""
    lam = torch.linalg.eigvalsh(gram.double()).flip(-1).clamp_min(0)  # descending
    trace = lam.sum(-1, keepdim=True)
    p = torch.where(trace > 0, lam / trace.clamp_min(1e-300), torch.zeros_like(lam))
    if truncate is not None:
        p = p[..., :truncate]
    h = _spectrum_entropy(p, order)
    if bound is not None:
        logb = torch.log(bound.double())
        h = torch.where(bound > 1, h / torch.where(bound > 1, logb, torch.ones_like(logb)), torch.zeros_like(h))
    return h


def _matrix_entropy(x, mask, order, truncate, center, normalize_rows, normalizer, side, backend, op):
    batch, n_tokens, dim = x.shape
    if batch == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    if n_tokens == 0 or dim == 0:
        return torch.zeros(batch, dtype=torch.float32, device=x.device)
    chosen = resolve_backend(backend, x.device, ("torch", "triton"), op)
    mean, scale, count = _row_stats(x, mask, center, normalize_rows)
    tokens_side = (n_tokens <= dim) if side == "auto" else side == "tokens"
    if chosen == "triton":
        from tokprune.kernels.triton.entropy import masked_gram_triton

        gram = masked_gram_triton(x, mean.float(), scale.float(), count.float(), tokens_side=tokens_side)
    else:
        gram = _gram_torch(x, mean, scale, count, tokens_side)
    if normalizer == "rank":
        bound = torch.minimum(count, torch.full_like(count, float(dim)))
    elif normalizer == "dim":
        bound = torch.full_like(count, float(dim))
    else:
        bound = None
    return _entropy_from_gram(gram, order, truncate, bound).float()


def _check_common(x, mask, normalizer, side, ndim, name="x"):
    check_tensor(name, x, ndim=ndim, dtypes=FLOAT_DTYPES)
    _check_finite(name, x)
    if normalizer not in _NORMALIZERS:
        raise ValueError(f"normalizer must be one of {_NORMALIZERS}, got {normalizer!r}")
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), device=x.device)
        expected = (x.shape[0], x.shape[-2])
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape (batch, n_tokens) = {expected}, got {tuple(mask.shape)}")


def matrix_entropy(
    x: torch.Tensor,
    *,
    order: float = 1,
    truncate: Optional[int] = None,
    center: bool = True,
    normalize_rows: bool = True,
    normalizer: Optional[str] = "rank",
    mask: Optional[torch.Tensor] = None,
    side: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Normalised matrix entropy of a set of tokens, per batch element.

    For each ``b``: ``Z = rows of x[b]`` (valid rows only), centred over tokens, each row L2-normalised
    (UNComp / Diff-eRank convention), covariance ``S = Z^T Z / N``; its eigenvalues ``lambda`` divided
    by ``trace(S)`` form a distribution ``p``; the result is the Rényi entropy of order ``order`` of
    ``p`` (von Neumann ``-sum p log p`` for ``order=1``), over the ``truncate`` largest ``p`` only when
    given (UNComp's truncated entropy), divided by ``log(bound)``.

    The eigenvalues come from the smaller of ``Z Z^T`` (``N x N``) and ``Z^T Z`` (``D x D``): they
    share their non-zero spectrum.

    Args:
        x: ``(batch, n_tokens, dim)`` fp32/fp16/bf16, finite.
        order: Rényi order ``alpha > 0``; 1 = von Neumann; 2 = collision entropy.
        truncate: keep only the ``truncate`` largest eigenvalues (after trace normalisation).
        center: subtract the token mean first.
        normalize_rows: divide every (centred) token row by its L2 norm.
        normalizer: ``"rank"`` divides by ``log(min(N, D))`` (the largest possible entropy, so the
            result lies in ``[0, 1]``), ``"dim"`` by ``log(D)`` (UNComp), ``None`` returns nats.
        mask: optional ``(batch, n_tokens)`` bool, ``True`` = valid token (padding excluded; ``N`` in
            the formulas is then the number of valid tokens of that row).
        side: ``"auto"`` (smaller Gram side), ``"tokens"`` (force ``N x N``), ``"features"`` (force
            ``D x D``; the slow path, for checks and benchmarks).
        backend: ``"auto" | "torch" | "triton"``; the Triton kernel forms the Gram matrix, the
            eigendecomposition stays in torch (float64).

    Returns:
        ``(batch,)`` float32. Rows with no valid token, a zero matrix, or ``bound <= 1`` give 0.

    Raises:
        ValueError: wrong ``ndim``, NaN/inf in ``x``, bad ``order``/``truncate``/``normalizer``/``side``,
            ``mask`` of the wrong shape.
    """
    _check_common(x, mask, normalizer, side, ndim=3)
    order = _check_order(order)
    truncate = _check_truncate(truncate)
    return _matrix_entropy(x, mask, order, truncate, center, normalize_rows, normalizer, side, backend,
                           "matrix_entropy")


def truncated_matrix_entropy(
    x: torch.Tensor,
    k: int = 32,
    *,
    mask: Optional[torch.Tensor] = None,
    order: float = 1,
    normalizer: Optional[str] = "dim",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """UNComp's per-head truncated matrix entropy of one layer's queries or keys.

    Per ``(b, h)``: tokens ``x[b, h]`` (``N x d``) centred over tokens, rows L2-normalised,
    ``S = Z^T Z / N``, trace-normalised eigenvalues ``p`` in descending order,
    ``E_k = -sum_{i <= k} p_i log p_i / log d`` (UNComp's ``normalizer="dim"``).

    Args:
        x: ``(batch, heads, n_tokens, head_dim)`` fp32/fp16/bf16 (e.g. post-RoPE queries).
        k: number of leading eigenvalues kept (UNComp uses 32); ``k >= head_dim`` is the full entropy.
        mask: optional ``(batch, n_tokens)`` bool, ``True`` = valid token (shared by all heads).
        order, normalizer, backend: as in :func:`matrix_entropy`.

    Returns:
        ``(batch, heads)`` float32.
    """
    _check_common(x, mask, normalizer, "auto", ndim=4)
    order = _check_order(order)
    k = _check_truncate(k)
    batch, heads, n_tokens, head_dim = x.shape
    flat = x.reshape(batch * heads, n_tokens, head_dim)
    flat_mask = None if mask is None else mask.repeat_interleave(heads, dim=0)
    out = _matrix_entropy(flat, flat_mask, order, k, True, True, normalizer, "auto", backend,
                          "truncated_matrix_entropy")
    return out.view(batch, heads)


def token_information_scores(
    x: torch.Tensor,
    *,
    num_heads: Optional[int] = None,
    exact_reference: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """EntropyPrune's information value of every token (higher = more informative).

    For token ``t`` with per-head vectors ``X_t [H, d_h]`` (e.g. the post-RoPE query of the previous
    layer): ``Z = X_t - mean over heads``, ``G_t = Z Z^T / H`` (``H x H``, the dual of the
    ``d_h x d_h`` covariance), eigenvalues clamped to ``1e-10``, ``S_t = -sum lambda log lambda / log H``.
    All tokens are scored at once (one batched ``eigvalsh`` on ``[B*N, H, H]`` in float64).

    Args:
        x: ``(batch, n_tokens, dim)`` with ``num_heads`` dividing ``dim``, or
            ``(batch, n_tokens, heads, head_dim)``. fp32/fp16/bf16, finite.
        num_heads: number of heads ``H >= 2``; required for 3-D ``x``; must match a 4-D ``x``.
        exact_reference: ``True`` reproduces the released EntropyPrune code (eigenvalues not
            normalised, so the score grows with the token's norm and can be negative);
            ``False`` divides the eigenvalues by ``trace(G_t)`` first (scale-free, in ``[0, 1]``).
        backend: ``"auto" | "torch" | "triton"`` (Triton forms the ``G_t`` in one kernel).

    Returns:
        ``(batch, n_tokens)`` float32.

    Raises:
        ValueError: wrong ``ndim``, ``num_heads`` missing / < 2 / not dividing ``dim`` / not matching,
            NaN or inf in ``x``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 4:
        if num_heads is not None and num_heads != x.shape[2]:
            raise ValueError(f"num_heads={num_heads} does not match x.shape[2]={x.shape[2]} of the 4-D x")
        num_heads = x.shape[2]
        xh = x
    elif x.dim() == 3:
        if num_heads is None:
            raise ValueError("num_heads is required when x is (batch, n_tokens, dim)")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or x.shape[2] % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={x.shape[2]}, got {num_heads!r}")
        xh = x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)
    else:
        raise ValueError(f"x must have 3 dimensions (batch, n_tokens, dim) or 4 (batch, n_tokens, heads, "
                         f"head_dim), got shape {tuple(x.shape)}")
    if num_heads < 2:
        raise ValueError(f"num_heads must be >= 2 (the entropy is divided by log(num_heads)), got {num_heads}")
    _check_finite("x", x)
    batch, n_tokens, heads, head_dim = xh.shape
    if batch * n_tokens == 0:
        return torch.zeros(batch, n_tokens, dtype=torch.float32, device=x.device)
    chosen = resolve_backend(backend, x.device, ("torch", "triton"), "token_information_scores")
    flat = xh.reshape(batch * n_tokens, heads, head_dim)
    if chosen == "triton":
        from tokprune.kernels.triton.entropy import token_gram_triton

        gram = token_gram_triton(flat)
    else:
        z = flat.double()
        z = z - z.mean(1, keepdim=True)
        gram = z @ z.transpose(1, 2) / heads
    lam = torch.linalg.eigvalsh(gram.double())
    if not exact_reference:
        trace = lam.sum(-1, keepdim=True)
        lam = torch.where(trace > 0, lam / trace.clamp_min(1e-300), torch.zeros_like(lam))
    lam = lam.clamp_min(1e-10)
    scores = -(lam * torch.log(lam)).sum(-1) / math.log(heads)
    return scores.float().view(batch, n_tokens)


__all__ = ["matrix_entropy", "truncated_matrix_entropy", "token_information_scores"]
