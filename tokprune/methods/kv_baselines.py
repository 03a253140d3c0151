"""Decode-time KV selection policies with a fixed token budget, and the baselines FASA is compared with.

Every policy here is a small dataclass with ``attend(module, query, key, value, attention_mask, scale)``
(the interface of :func:`tokprune.hf.patch_attention`). In decode (one query token) it picks at most
``budget`` cached tokens per KV head (or per query head) and runs exact attention over them with
:func:`tokprune.ops.sparse_decode_attention`; the KV cache itself stays complete. With
``budget >= n_tokens`` the policy declines and SDPA computes exact full attention. Padding in a batch is
honoured: positions masked out by the decode ``attention_mask`` are never selected.

Baselines:
- :class:`StreamingLLM`: ``sink`` first tokens plus the most recent ``budget - sink``.
- :class:`Quest`: pages of ``page_size`` keys keep per-dimension min/max; a page's bound for query ``q`` is
  ``sum_d max(q_d min_d, q_d max_d)``; the top ``budget // page_size`` pages per query head are attended
  (the newest page always).
- :class:`SnapKV`: in prefill, the attention of the prompt's last ``obs_window`` queries (summed over the
  group's heads, max-pooled over ``pool`` tokens) ranks the prompt tokens once; in decode the best
  ``budget - window`` prompt tokens by that fixed ranking plus the ``window`` most recent tokens are kept
  (eviction decided at prefill, as in SnapKV; tokens generated after prefill survive only in the window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from tokprune.ops.fasa import select_sparse_indices, sparse_decode_attention


def decode_valid_mask(attention_mask, batch: int, n_tokens: int) -> Optional[torch.Tensor]:
    """``(batch, n_tokens)`` bool of attendable keys for the last query, or ``None`` if all are.

    Accepts ``None``, a bool mask ``(batch, 1, q_len, n_tokens)`` (True = attend) or an additive float mask
    of that shape (``0`` = attend, very negative = masked).
    """
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
    last = last[..., -n_tokens:] if last.shape[-1] >= n_tokens else last
    if last.dtype == torch.bool:
        valid = last
    else:
        valid = last > torch.finfo(last.dtype).min / 2
    valid = valid.expand(batch, n_tokens)
    return None if bool(valid.all()) else valid.contiguous()


@dataclass
class KVSelectionPolicy:
    """Base: ``select()`` returns token indices; ``attend()`` runs exact attention over them in decode."""

    budget: int = 256
    sink: int = 4
    window: int = 64
    backend: Optional[str] = None

    def __post_init__(self):
        for name in ("budget", "sink", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a non-negative int, got {value!r}")
        if self.budget == 0:
            raise ValueError(f"{type(self).__name__}: budget must be >= 1")

    uses_prefill = False

    def select(self, module, query, key, valid) -> torch.Tensor:  # pragma: no cover - abstract
        """``(batch, kv_heads or heads, K)`` int64 token indices (``-1`` = empty slot)."""
        raise NotImplementedError

    def prefill(self, module, query, key, value, attention_mask, scale):
        """Hook for multi-token calls; returns ``None`` so that SDPA computes the prefill."""
        return None

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs):
        if query.shape[2] != 1:
            return self.prefill(module, query, key, value, attention_mask, scale)
        n_tokens = key.shape[2]
        if self.budget >= n_tokens:
            return None  # exact full attention (SDPA)
        valid = decode_valid_mask(attention_mask, query.shape[0], n_tokens)
        index = self.select(module, query, key, valid)
        out = sparse_decode_attention(query, key, value, index, float(scale), backend=self.backend)
        return out.transpose(1, 2)

    def patch(self, model, layers=None):
        """``patch_attention(model, decode=self)`` (and ``prefill=self`` for policies that observe prefill)."""
        from tokprune.hf.attention import patch_attention

        return patch_attention(model, prefill=self if self.uses_prefill else None, decode=self, layers=layers)


@dataclass
class StreamingLLM(KVSelectionPolicy):
    """Attention sinks plus a recent window: ``sink`` first tokens and the ``budget - sink`` newest."""

    def select(self, module, query, key, valid):
        batch, kv_heads, n_tokens = key.shape[0], key.shape[1], key.shape[2]
        zeros = torch.zeros(batch, 1, n_tokens, device=key.device)
        index = select_sparse_indices(zeros, self.budget, sink=self.sink, window=self.budget, valid=valid)
        return index.expand(batch, kv_heads, -1)


@dataclass
class Quest(KVSelectionPolicy):
    """Query-aware page selection from per-page min/max key bounds (Quest), per query head."""

    page_size: int = 16

    def select(self, module, query, key, valid):
        batch, heads, _, head_dim = query.shape
        kv_heads, n_tokens = key.shape[1], key.shape[2]
        ps = self.page_size
        n_pages = -(-n_tokens // ps)
        pad = n_pages * ps - n_tokens
        k = key.float()
        tok_valid = torch.ones(batch, n_tokens, dtype=torch.bool, device=key.device) if valid is None else valid
        tok_valid = torch.nn.functional.pad(tok_valid, (0, pad), value=False)
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        k = k.view(batch, kv_heads, n_pages, ps, head_dim)
        m = tok_valid.view(batch, 1, n_pages, ps, 1)
        kmax = k.masked_fill(~m, float("-inf")).amax(3)  # (B, Hkv, P, D)
        kmin = k.masked_fill(~m, float("inf")).amin(3)
        page_valid = tok_valid.view(batch, n_pages, ps).any(-1)  # (B, P)
        kmax = kmax.masked_fill(~page_valid[:, None, :, None], 0.0)
        kmin = kmin.masked_fill(~page_valid[:, None, :, None], 0.0)
        group = heads // kv_heads
        q = query.reshape(batch, kv_heads, group, 1, head_dim).float()
        bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1)  # (B, Hkv, g, P)
        bound = bound.reshape(batch, heads, n_pages)
        keep_pages = max(1, self.budget // ps)
        pages = select_sparse_indices(bound, keep_pages, sink=0, window=1, valid=page_valid)  # (B, H, kp)
        tokens = pages[..., None] * ps + torch.arange(ps, device=key.device)  # (B, H, kp, ps)
        ok = (pages[..., None] >= 0) & (tokens < n_tokens)
        safe = tokens.clamp(0, n_tokens - 1)
        if valid is not None:
            ok &= torch.gather(valid[:, None, :].expand(-1, heads, -1), 2, safe.flatten(2)).view_as(ok)
        return tokens.masked_fill(~ok, -1).flatten(2)


@dataclass
class SnapKV(KVSelectionPolicy):
    """SnapKV-style: prompt tokens ranked once at prefill by the attention of the last ``obs_window``
    queries (max-pooled), then kept by that fixed ranking plus a recent ``window``."""

    window: int = 32
    sink: int = 0
    obs_window: int = 32
    pool: int = 7
    prompt_scores: Dict[int, torch.Tensor] = field(default_factory=dict)

    uses_prefill = True

    def prefill(self, module, query, key, value, attention_mask, scale):
        batch, heads, n_q, head_dim = query.shape
        kv_heads, n_tokens = key.shape[1], key.shape[2]
        group = heads // kv_heads
        obs = min(self.obs_window, n_q)
        q = query[:, :, -obs:].reshape(batch, kv_heads, group * obs, head_dim).float()
        logits = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (B, Hkv, g*obs, T)
        logits = logits.view(batch, kv_heads, group, obs, n_tokens)
        q_pos = torch.arange(n_tokens - obs, n_tokens, device=key.device)
        allowed = torch.arange(n_tokens, device=key.device)[None, :] <= q_pos[:, None]  # (obs, T) causal
        allowed = allowed[None, None, None]
        if attention_mask is not None:
            m = attention_mask[:, :, -obs:, -n_tokens:]
            m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            allowed = allowed & m[:, :, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        votes = probs.sum((2, 3))  # (B, Hkv, T)
        if self.pool > 1:
            votes = torch.nn.functional.max_pool1d(votes, self.pool, stride=1, padding=self.pool // 2)
        seen = allowed.any(3).any(2)  # (B or 1, 1, T): keys some observation query may attend
        votes = votes.masked_fill(~seen, 0.0)  # pooling must not leak votes into padding
        self.prompt_scores[module.layer_idx] = votes
        return None

    def select(self, module, query, key, valid):
        batch, kv_heads, n_tokens = key.shape[0], key.shape[1], key.shape[2]
        prompt = self.prompt_scores.get(module.layer_idx)
        if prompt is None:
            raise RuntimeError("SnapKV: no prefill was observed for this layer; patch with policy.patch(model) "
                               "(prefill=policy, decode=policy) so that the prompt is ranked")
        n_prompt = min(prompt.shape[-1], n_tokens)
        scores = torch.full((batch, kv_heads, n_tokens), float("-inf"), device=key.device)
        scores[..., :n_prompt] = prompt[..., :n_prompt]
        scores = torch.nan_to_num(scores, neginf=-1e30)
        return select_sparse_indices(scores, self.budget, sink=self.sink, window=self.window, valid=valid)
