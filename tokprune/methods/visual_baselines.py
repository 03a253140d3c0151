"""Visual-token pruning baselines: :class:`tokprune.methods.base.VisualPolicy` subclasses like EntropyPrune.

* :class:`FastV` — head-averaged attention of the last real token over the prompt at layer ``K-1``
  (computed from the captured post-RoPE query of that one token and the keys: ``O(N)`` per head, the
  ``N x N`` attention map is never formed).
* :class:`DivPrune` — greedy max-min diversity on the projector outputs (distance ``1 - cosine``); the
  first pick is the token whose nearest neighbour is farthest; the score is the reverse pick order.
* :class:`RandomPrune` — seeded uniform scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from tokprune.methods.base import VisualPolicy


@dataclass
class FastV(VisualPolicy):
    """Keep the visual tokens the last real token attends to most at layer ``K-1`` (FastV, ``K=2``)."""

    keep: int = 288
    layer: Union[int, str] = 2
    needs_query = True
    needs_key = True

    def score(self, ctx) -> torch.Tensor:
        """``(B, N)`` float32 head-averaged softmax attention of the last non-padding token."""
        last = ctx.last_valid_index()
        q = ctx.query(rows=last).float()[:, 0]  # (B, H, d)
        k = ctx.key().float()  # (B, N, Hkv, d)
        groups = ctx.num_heads // ctx.num_kv_heads
        q = q.view(q.shape[0], ctx.num_kv_heads, groups, ctx.head_dim)
        logits = torch.einsum("bkgd,bnkd->bkgn", q, k) * ctx.head_dim ** -0.5
        n = k.shape[1]
        pos = torch.arange(n, device=k.device)
        visible = ctx.valid_mask & (pos[None, :] <= last[:, None])
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        return logits.softmax(-1).mean(dim=(1, 2))


def max_min_order(features: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy max-min diversity picks: ``(B, N, D)`` features, ``(B, N)`` bool candidates ->
    ``(B, N)`` float32 scores, ``steps - i`` for the ``i``-th pick and ``-1`` for tokens not picked.

    Distance ``1 - cosine``. First pick: the candidate whose nearest other candidate is farthest; then
    repeatedly the candidate farthest from the picked set (ties: lowest index). Vectorised over the batch
    and the tokens; the loop runs over picks only.
    """
    batch, n, _ = features.shape
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
    pair_ok = mask[:, :, None] & mask[:, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    nearest = dist.masked_fill(~pair_ok | eye, float("inf")).amin(-1)
    nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)  # single candidate
    scores = torch.full((batch, n), -1.0, device=features.device)
    available = mask.clone()
    rows = torch.arange(batch, device=features.device)
    steps = min(steps, n)
    if steps == 0:
        return scores
    first = nearest.masked_fill(~available, float("-inf")).argmax(-1)
    has = available[rows, first]
    scores[rows[has], first[has]] = float(steps)
    available[rows, first] = False
    min_dist = dist[rows, first]  # (B, N) distance to the picked set
    for i in range(1, steps):
        pick = min_dist.masked_fill(~available, float("-inf")).argmax(-1)
        has = available[rows, pick]
        if not bool(has.any()):
            break
        scores[rows[has], pick[has]] = float(steps - i)
        available[rows, pick] = False
        min_dist = torch.minimum(min_dist, dist[rows, pick])
    return scores


@dataclass
class DivPrune(VisualPolicy):
    """Keep a maximally diverse set of visual tokens (greedy max-min, ``1 - cosine`` on projector outputs)."""

    keep: int = 128
    layer: Union[int, str] = 1

    def score(self, ctx) -> torch.Tensor:
        """``(B, N)`` float32: higher for earlier greedy picks among the visual tokens."""
        return max_min_order(ctx.inputs_embeds, ctx.visual_mask, self.keep)


@dataclass
class RandomPrune(VisualPolicy):
    """Keep ``keep`` visual tokens drawn uniformly with a fixed ``seed``."""

    keep: int = 128
    layer: Union[int, str] = 2
    seed: int = 0

    def score(self, ctx) -> torch.Tensor:
        """``(B, N)`` float32 uniform scores from a ``seed``-ed generator (reproducible)."""
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(ctx.visual_mask.shape, generator=g).to(ctx.visual_mask.device)
